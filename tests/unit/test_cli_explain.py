"""`shardwire explain`: where a statement goes, from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shardwire.cli import main

CONFIG = """
auth: {method: trust}
database: app
users: {app: {}}
shards:
  s1: {primary: "postgresql://postgres@127.0.0.1:5432/app"}
  s2: {primary: "postgresql://postgres@127.0.0.1:5433/app"}
default_shard: s1
sharding:
  rules:
    by_tenant: {kind: tenant, column: tenant_id, tables: [orders], tenants: {2: s2}, default: s1}
"""


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "shardwire.yaml"
    path.write_text(CONFIG)
    return str(path)


def test_explain_json_names_the_shard_and_the_sql(config: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--config", config, "--json",
                 "SELECT * FROM orders WHERE tenant_id = 2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["route"] == "single" and out["shards"] == ["s2"]
    assert out["sql"] == {"s2": "SELECT * FROM orders WHERE tenant_id = 2"}


def test_explain_a_refusal_exits_non_zero(config: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--config", config, "--json",
                 "INSERT INTO orders VALUES (1, 2)"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["route"] == "refused" and out["sqlstate"] == "0A000"


def test_explain_shows_each_shards_part_of_a_split_insert(
        config: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--config", config, "--json",
                 "INSERT INTO orders (id, tenant_id) VALUES (1, 2), (2, 1), (3, 2)"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["route"] == "multi" and out["rows"] == ["s2", "s1", "s2"]
    assert out["sql"] == {"s1": "INSERT INTO orders (id, tenant_id) VALUES (2, 1)",
                          "s2": "INSERT INTO orders (id, tenant_id) VALUES (1, 2), (3, 2)"}
