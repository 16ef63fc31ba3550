"""Heat statistics and the rebalance planner, end to end: a skewed workload through the real
proxy, then what an operator looks at: SHOW HOT, `shardwire rebalance status`, and
`shardwire rebalance plan`."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from conftest import ADMIN_PASSWORD, APP_PASSWORD, PROXY_ENV, MakeProxy

from shardwire.testing import PostgresCluster
from shardwire.testing.proxy import ProxyProcess

CATALOG = "rebalance_catalog"
HOT = 1
ON_S1 = list(range(1, 10))  # tenant 1 (hot) and eight ordinary tenants
ON_S2 = [10, 11, 12]
ROWS_PER_TENANT = 40


@pytest.fixture
def orders(shards: list[PostgresCluster]) -> Iterator[str]:
    name = f"rb_orders_{uuid.uuid4().hex[:8]}"
    for shard in shards[:2]:
        shard.sql(f"CREATE TABLE {name} (tenant_id int NOT NULL, order_id int NOT NULL, "
                  "amount numeric NOT NULL, PRIMARY KEY (tenant_id, order_id))", dbname="app")
    shards[0].create_database(CATALOG)
    shards[0].sql("DROP TABLE IF EXISTS shardwire_heat", dbname=CATALOG)
    yield name
    for shard in shards[:2]:
        shard.sql(f"DROP TABLE IF EXISTS {name}", dbname="app")
    shards[0].sql("DROP TABLE IF EXISTS shardwire_heat", dbname=CATALOG)


def start(make_proxy: MakeProxy, shards: list[PostgresCluster], table: str) -> ProxyProcess:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["shards"] = {name: cfg["shards"][name] for name in ("s1", "s2")}
        cfg["catalog"] = shards[0].dsn(CATALOG)
        # SHOW HOT covers the last window and the open one: the whole workload must fit in
        # one window's length even on a loaded machine.
        cfg["rebalance"] = {"heat_flush_interval": 4.0, "heat_top_keys": 20}
        tenants = {t: "s1" for t in ON_S1} | {t: "s2" for t in ON_S2}
        cfg["sharding"] = {"rules": {"by_tenant": {
            "kind": "tenant", "column": "tenant_id", "tables": [table], "tenants": tenants,
            "default": "s1"}}}
    return make_proxy(edit)


def rebalance(proxy: ProxyProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shardwire.cli", "rebalance", *args,
         "--config", str(proxy.config_path)],
        capture_output=True, text=True, timeout=60, env={**proxy.env, **PROXY_ENV})


def test_a_hot_tenant_is_found_and_a_move_to_the_cool_shard_planned(
        make_proxy: MakeProxy, shards: list[PostgresCluster], orders: str,
        tmp_path: Path) -> None:
    proxy = start(make_proxy, shards, orders)
    with psycopg.connect(proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
        for tenant in ON_S1 + ON_S2:
            with conn.transaction():
                for order in range(ROWS_PER_TENANT):
                    conn.execute(f"INSERT INTO {orders} (tenant_id, order_id, amount) "
                                 "VALUES (%s, %s, %s)", (tenant, order, order * 1.5))
        # The same point query for every tenant; tenant 1 gets 40% of them, the other
        # tenants of s1 45% together, the tenants of s2 15%.
        workload = [HOT] * 800 + [t for t in ON_S1[1:] for _ in range(112)] + [
            t for t in ON_S2 for _ in range(100)]
        random.Random(6).shuffle(workload)
        for tenant in workload:
            conn.execute(f"SELECT count(*), sum(amount) FROM {orders} WHERE tenant_id = %s",
                         (tenant,)).fetchone()

    # SHOW HOT: the proxy's own view, at once.
    with psycopg.connect(proxy.dsn("admin", ADMIN_PASSWORD, database="shardwire"),
                         autocommit=True) as admin:
        cur = admin.execute("SHOW HOT")
        columns = [c.name for c in cur.description or []]
        hot = [dict(zip(columns, row, strict=True)) for row in cur.fetchall()]
    shard_rows = [r for r in hot if r["kind"] == "shard"]
    key_rows = [r for r in hot if r["kind"] == "key" and r["rule"] == "by_tenant"]
    assert [r["shard"] for r in shard_rows] == ["s1", "s2"]  # busiest first
    assert shard_rows[0]["statements"] > 3 * shard_rows[1]["statements"]
    assert shard_rows[0]["rows"] >= 1696  # each point query returns one row
    assert (key_rows[0]["key"], key_rows[0]["shard"]) == (str(HOT), "s1")
    assert key_rows[0]["statements"] >= 800
    assert key_rows[0]["statements"] > 5 * key_rows[1]["statements"]

    # rebalance status: from the catalog, once the proxy has flushed its windows there.
    deadline = time.monotonic() + 15
    while True:
        status = rebalance(proxy, "status", "--json")
        assert status.returncode == 0, status.stderr
        data = json.loads(status.stdout)
        counted = sum(s["statements"] for s in data["shards"])
        if counted >= len(workload) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert counted >= len(workload)
    assert data["hottest"] == "s1" and data["skew"] > 1.3
    by_shard = {s["shard"]: s for s in data["shards"]}
    assert by_shard["s1"]["over_threshold"] and not by_shard["s2"]["over_threshold"]
    assert by_shard["s1"]["hot_keys"][0]["key"] == str(HOT)
    assert by_shard["s1"]["table_rows"] == len(ON_S1) * ROWS_PER_TENANT
    assert by_shard["s2"]["table_rows"] == len(ON_S2) * ROWS_PER_TENANT
    assert by_shard["s1"]["bytes"] > 0
    text = rebalance(proxy, "status")
    assert text.returncode == 0, text.stderr
    assert "skew:" in text.stdout and "s1 *" in text.stdout

    # rebalance plan: move the hot tenant to the cool shard.
    plan_file = tmp_path / "plan.yaml"
    planned = rebalance(proxy, "plan", "--threshold", "1.3", "--output", str(plan_file))
    assert planned.returncode == 0, planned.stdout + planned.stderr
    plan = yaml.safe_load(plan_file.read_text())
    assert plan["version"] == 1 and plan["warnings"] == []
    [move] = plan["moves"]
    assert (move["rule"], move["kind"], move["keys"], move["from"], move["to"]) == (
        "by_tenant", "tenant", [HOT], "s1", "s2")
    assert move["copy"]["rows"] == ROWS_PER_TENANT and move["copy"]["bytes"] > 0
    assert plan["skew_before"] > 1.3 >= plan["skew_after"]
    assert plan["shards"]["s1"]["load_after"] < plan["shards"]["s1"]["load"]
    assert "move 1: by_tenant tenant 1 from s1 to s2" in planned.stdout
