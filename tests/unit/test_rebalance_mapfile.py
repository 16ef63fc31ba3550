"""Rewriting the operator's config file after a move (rebalancer/mapfile.py), and `--move`."""

from __future__ import annotations

import pytest

from shardwire.config import Config
from shardwire.config import parse_config as _parse
from shardwire.rebalancer.apply import moves_from_args
from shardwire.rebalancer.mapfile import MapFileError, place_keys
from shardwire.rebalancer.plan import PlanError, plan_from_dict
from shardwire.router.shardmap import KeyType, RuleKind

CONFIG = """\
# Production shop. Owner: the platform team.
database: app
auth: {method: trust}
users:
  app: {password: "${APP_PASSWORD}"}   # from the environment
shards:
  s1: {primary: "postgresql://u@h1/app"}
  s2: {primary: "postgresql://u@h2/app"}
default_shard: s1
catalog: "postgresql://u@h1/catalog"
sharding:
  rules:
    by_tenant:                 # customers
      kind: tenant
      column: tenant_id
      tables:
        - orders
        - order_items          # co-located with orders
      tenants:
        1: s1                  # the big one
        2: s1
      default: s1
    by_line:
      kind: category
      type: text
      column: category
      tables: [products]
      values: {books: s1, "no": s2}
      default: s1
"""


def parse_config(text: str) -> Config:
    return _parse(text, env={"APP_PASSWORD": "secret"})


def test_a_tenant_entry_changes_and_everything_else_stays_as_written() -> None:
    out = place_keys(CONFIG, "by_tenant", RuleKind.TENANT, KeyType.INTEGER, [1], "s2")
    assert out == CONFIG.replace("        1: s1                  # the big one",
                                 "        1: s2                  # the big one")
    assert parse_config(out).sharding.rules["by_tenant"].shard_for(1) == "s2"


def test_a_tenant_on_the_default_shard_is_added_to_the_list() -> None:
    out = place_keys(CONFIG, "by_tenant", RuleKind.TENANT, KeyType.INTEGER, [7, 8], "s2")
    assert "        2: s1\n        7: s2\n        8: s2\n      default: s1" in out
    assert out.startswith("# Production shop.")
    assert '"${APP_PASSWORD}"}   # from the environment' in out
    rule = parse_config(out).sharding.rules["by_tenant"]
    assert (rule.shard_for(7), rule.shard_for(8), rule.shard_for(9)) == ("s2", "s2", "s1")


def test_category_values_keep_flow_style_and_are_quoted_when_yaml_would_misread_them() -> None:
    out = place_keys(CONFIG, "by_line", RuleKind.CATEGORY, KeyType.TEXT,
                     ["books", "yes", "12", "garden"], "s2")
    assert 'values: {books: s2, "no": s2, "yes": s2, "12": s2, garden: s2}' in out
    rule = parse_config(out).sharding.rules["by_line"]
    assert all(rule.shard_for(v) == "s2" for v in ("books", "yes", "12", "garden", "no"))


def test_an_existing_key_written_another_way_is_found() -> None:
    text = CONFIG.replace("        2: s1", '        "02": s1')
    out = place_keys(text, "by_tenant", RuleKind.TENANT, KeyType.INTEGER, [2], "s2")
    assert '"02": s2' in out and "\n        2: s2" not in out


def test_unknown_rules_and_other_kinds_are_refused() -> None:
    with pytest.raises(MapFileError, match="no sharding.rules.nope"):
        place_keys(CONFIG, "nope", RuleKind.TENANT, KeyType.INTEGER, [1], "s2")
    with pytest.raises(MapFileError, match="range rules are not written"):
        place_keys(CONFIG, "by_tenant", RuleKind.RANGE, KeyType.INTEGER, [1], "s2")


def test_move_arguments_become_plan_moves_from_the_keys_shard() -> None:
    smap = parse_config(CONFIG).sharding
    data = moves_from_args(["by_tenant:1,2:s2", "by_line:books:s2"], smap)
    moves = plan_from_dict(data, smap)
    assert [(m.rule.name, m.keys, m.source, m.target) for m in moves] == [
        ("by_tenant", (1, 2), "s1", "s2"), ("by_line", ("books",), "s1", "s2")]
    with pytest.raises(PlanError, match="RULE:KEY"):
        moves_from_args(["by_tenant:1"], smap)
    with pytest.raises(PlanError, match="no rule 'nope'"):
        moves_from_args(["nope:1:s2"], smap)
    with pytest.raises(PlanError, match="unknown shard 's9'"):
        plan_from_dict(moves_from_args(["by_tenant:1:s9"], smap), smap)
