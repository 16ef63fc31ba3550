"""The rebalance planner (rebalancer/plan.py): pure, from loads and sizes to moves."""

from __future__ import annotations

import datetime

import pytest
import yaml

from shardwire.config import parse_config
from shardwire.rebalancer.plan import (
    KeyState,
    PlanError,
    ShardState,
    plan_from_dict,
    plan_moves,
    plan_to_dict,
    skew,
)
from shardwire.router.shardmap import RuleKind, ShardMap

MAP = """\
database: app
auth: {method: trust}
users: {app: }
shards:
  s1: {primary: "postgresql://u@h1/app"}
  s2: {primary: "postgresql://u@h2/app"}
  s3: {primary: "postgresql://u@h3/app"}
default_shard: s1
catalog: "postgresql://u@h1/catalog"
sharding:
  rules:
    by_tenant:
      kind: tenant
      tables: [orders, order_items]
      column: tenant_id
      tenants: {1: s1, 2: s1, 3: s1, 4: s2, 5: s3}
      default: s1
    by_line:
      kind: category
      column: category
      type: text
      tables: [products]
      values: {books: s1, games: s2, toys: s3}
    by_time:
      kind: range
      column: day
      type: date
      tables: [events]
      ranges:
        - {to: 2026-01-01, shard: s2}
        - {from: 2026-01-01, shard: s1}
    by_user:
      kind: lookup
      column: user_id
      tables: [users]
      shards: [s1, s2]
    by_session:
      kind: hash
      column: session_id
      type: text
      tables: [sessions]
"""


@pytest.fixture(scope="module")
def smap() -> ShardMap:
    return parse_config(MAP).sharding


def shards(**loads: float) -> list[ShardState]:
    return [ShardState(name, load, bytes=1000 * int(load), rows=10 * int(load))
            for name, load in loads.items()]


def tenant(key: int, shard: str, load: float, rows: int = 100) -> KeyState:
    return KeyState("by_tenant", key, shard, load, rows=rows, bytes=rows * 50)


def test_balanced_shards_get_no_move(smap: ShardMap) -> None:
    plan = plan_moves(shards(s1=10, s2=11, s3=9), [tenant(1, "s1", 5)], smap)
    assert plan.moves == () and plan.warnings == ()
    assert plan.after == plan.before


def test_the_hot_tenant_moves_to_the_coolest_shard(smap: ShardMap) -> None:
    # s1 carries tenant 1 (hot) and two small tenants; s3 is the coolest.
    loads = shards(s1=60, s2=25, s3=10)
    keys = [tenant(1, "s1", 30, rows=3000), tenant(2, "s1", 10), tenant(3, "s1", 10),
            tenant(4, "s2", 20), tenant(5, "s3", 10)]
    plan = plan_moves(loads, keys, smap, threshold=1.3)
    assert skew({s.name: s.load for s in loads}) == pytest.approx(60 / (95 / 3))
    [move] = plan.moves
    assert (move.rule, move.kind, move.keys, move.source, move.target) == (
        "by_tenant", RuleKind.TENANT, (1,), "s1", "s3")
    assert (move.load, move.rows, move.bytes) == (30, 3000, 150_000)
    # moving tenant 2 or 3 instead would leave s1 over the limit
    assert (move.source_load, move.target_load) == (30, 40) and plan.limit > 40
    assert (move.source_bytes, move.target_bytes) == (0, 10_000 + 150_000)
    after = {name: s.load for name, s in plan.after.items()}
    assert max(after.values()) <= plan.limit
    assert skew(after) < 1.3


def test_several_moves_when_one_is_not_enough(smap: ShardMap) -> None:
    loads = shards(s1=80, s2=10, s3=10)
    keys = [tenant(k, "s1", 15) for k in (1, 2, 3)] + [tenant(4, "s2", 10)]
    plan = plan_moves(loads, keys, smap, threshold=1.2)
    assert len(plan.moves) == 3
    assert {m.target for m in plan.moves} == {"s2", "s3"}
    assert max(s.load for s in plan.after.values()) <= plan.limit


def test_a_key_too_hot_for_any_shard_is_reported_not_moved(smap: ShardMap) -> None:
    plan = plan_moves(shards(s1=70, s2=20, s3=10), [tenant(1, "s1", 60)], smap)
    assert plan.moves == ()
    [warning] = plan.warnings
    assert "s1 stays above the limit" in warning and "shard of its own" in warning


def test_hash_rules_are_refused_with_a_warning(smap: ShardMap) -> None:
    keys = [KeyState("by_session", "abc", "s1", 30)]
    plan = plan_moves(shards(s1=60, s2=10, s3=10), keys, smap)
    assert plan.moves == ()
    assert any("hash rule by_session" in w and "cannot move on its own" in w
               for w in plan.warnings)


def test_lookup_keys_move_as_one_set_within_the_rules_shards(smap: ShardMap) -> None:
    keys = [KeyState("by_user", k, "s1", 8, rows=1, bytes=100) for k in range(10, 15)]
    # s3 is the coolest but not one of by_user's shards: one key fits on s2, then s1 is stuck
    plan = plan_moves(shards(s1=40, s2=15, s3=5), keys, smap, threshold=1.2)
    [move] = plan.moves
    assert move.kind is RuleKind.LOOKUP and move.target == "s2" and len(move.keys) == 1
    assert any("s1 stays above the limit" in w for w in plan.warnings)
    plan = plan_moves(shards(s1=70, s2=0, s3=30), keys, smap, threshold=1.2)
    [move] = plan.moves
    assert move.target == "s2" and move.keys == (10, 11, 12, 13)
    assert move.load == 32 and move.rows == 4 and move.source_load == 38


def test_a_hot_range_is_split_at_a_point_from_the_key_distribution(smap: ShardMap) -> None:
    day = datetime.date
    # The open-ended range from 2026-01-01 on s1 is hot in its recent days.
    keys = [KeyState("by_time", day(2026, 1, d), "s1", 2) for d in (3, 5, 9)]
    keys += [KeyState("by_time", day(2026, 3, d), "s1", 12, rows=500, bytes=5000)
             for d in (1, 2, 3)]
    plan = plan_moves(shards(s1=60, s2=20, s3=10), keys, smap, threshold=1.2)
    [move] = plan.moves
    assert move.kind is RuleKind.RANGE and (move.source, move.target) == ("s1", "s3")
    # From March 1st on would make s3 too hot: the upper part from March 2nd moves.
    assert move.split_at == day(2026, 3, 2)
    assert (move.lower, move.upper) == (day(2026, 3, 2), None)
    assert move.load == 24 and move.rows == 1000 and not move.measured
    assert max(s.load for s in plan.after.values()) <= plan.limit


def test_a_category_value_moves(smap: ShardMap) -> None:
    keys = [KeyState("by_line", "books", "s1", 15)]
    plan = plan_moves(shards(s1=50, s2=20, s3=20), keys, smap, threshold=1.2)
    [move] = plan.moves
    assert (move.kind, move.keys, move.target) == (RuleKind.CATEGORY, ("books",), "s2")


def test_heat_from_before_a_map_change_is_left_out(smap: ShardMap) -> None:
    plan = plan_moves(shards(s1=60, s2=10, s3=10), [tenant(4, "s1", 30)], smap)
    assert plan.moves == ()
    assert any("no longer gives them" in w for w in plan.warnings)


def test_no_heat_means_no_plan(smap: ShardMap) -> None:
    plan = plan_moves(shards(s1=0, s2=0, s3=0), [], smap)
    assert plan.moves == () and "no heat recorded" in plan.warnings[0]


def test_the_plan_file_reads_back_and_is_checked_against_the_map(smap: ShardMap) -> None:
    keys = [tenant(1, "s1", 30), KeyState("by_time", datetime.date(2026, 3, 1), "s1", 20)]
    plan = plan_moves(shards(s1=90, s2=20, s3=10), keys, smap, threshold=1.2)
    text = yaml.safe_dump(plan_to_dict(plan), sort_keys=False)
    data = yaml.safe_load(text)
    assert data["version"] == 1 and data["skew_before"] > data["skew_after"]
    assert [m["kind"] for m in data["moves"]] == ["tenant", "range"]
    assert data["moves"][1]["split_at"] == "2026-03-01"
    moves = plan_from_dict(data, smap)
    assert [(m.rule.name, m.keys, m.source, m.target) for m in moves][0] == (
        "by_tenant", (1,), "s1", data["moves"][0]["to"])
    assert moves[1].split_at == datetime.date(2026, 3, 1) and moves[1].upper is None
    data["moves"][0]["to"] = "s9"
    with pytest.raises(PlanError, match=r"moves\[0\]\.to: unknown shard 's9'"):
        plan_from_dict(data, smap)
    data["moves"][0]["to"] = "s2"
    data["moves"][0]["keys"] = [4]
    with pytest.raises(PlanError, match=r"the map puts 4 on s2, not s1"):
        plan_from_dict(data, smap)


@pytest.mark.parametrize("seed", range(30))
def test_random_skews_end_under_the_limit_or_say_why(smap: ShardMap, seed: int) -> None:
    import random
    rng = random.Random(seed)
    owner = {1: "s1", 2: "s1", 3: "s1", 4: "s2", 5: "s3"}
    keys = [tenant(k, owner[k], rng.uniform(0, 20)) for k in owner]
    loads = {name: sum(k.load for k in keys if k.shard == name) + rng.uniform(0, 5)
             for name in ("s1", "s2", "s3")}
    plan = plan_moves(shards(**loads), keys, smap, threshold=1.2)
    after = {name: s.load for name, s in plan.after.items()}
    assert sum(after.values()) == pytest.approx(sum(loads.values()))
    for move in plan.moves:
        assert move.target_load <= plan.limit + 1e-9  # a move never makes its target hot
    over = [name for name, load in after.items() if load > plan.limit + 1e-9]
    for name in over:
        assert any(w.startswith(f"{name} stays above the limit") for w in plan.warnings)
    if not over:
        assert skew(after) <= 1.2 + 1e-9
