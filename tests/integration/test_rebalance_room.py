"""Room on the target (rebalance.max_shard_bytes): `shardwire rebalance apply` refuses a move
the target has no room for, before it creates anything, saying the sizes and how to fix it
(with room, the same move goes through); `shardwire rebalance plan` proposes no such target
and says so."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import test_rebalance as heat
import test_rebalance_apply as base
import yaml
from conftest import APP_PASSWORD, PROXY_ENV, MakeProxy, on_shard
from test_rebalance_apply import CATALOG, Tables, on_shard_db, rebalance, start_proxy

from shardwire.testing import PostgresCluster

tables = base.tables  # the fixture: a tenant table on both shards, a notes table on s1 only
orders = heat.orders  # the fixture: a tenant table on both shards, a fresh heat table


def test_a_move_to_a_shard_without_room_is_refused_before_anything_is_created(
        make_proxy: MakeProxy, shards: list[PostgresCluster], tables: Tables) -> None:
    s1, s2 = shards[0], shards[1]
    held = on_shard(s2, "SELECT pg_database_size(current_database())")[0][0]
    # Room for the database as it is, not for the tenant's rows on top of it.
    proxy = start_proxy(make_proxy, shards, tables, rebalance={"max_shard_bytes": held + 100})
    refused = rebalance(proxy, "apply", "--move", "by_tenant:1:s2")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    err = refused.stderr
    assert "shard s2 has no room" in err, err
    assert f"rebalance.max_shard_bytes = {held + 100}" in err
    said = re.search(r"its database holds (\d+) bytes .*the move copies about (\d+) bytes", err)
    assert said is not None, err
    assert int(said.group(1)) > held - 1_000_000 and int(said.group(2)) > 100
    assert "Fix: choose another target" in err and "raise rebalance.max_shard_bytes" in err
    # Nothing was created: not the notes table on the target, no subscription there, no
    # publication or slot on the source; the map and the rows where they were.
    assert on_shard(s2, f"SELECT to_regclass('{tables.notes}')") == [(None,)]
    assert on_shard(s2, "SELECT count(*) FROM pg_subscription") == [(0,)]
    assert on_shard(s1, "SELECT count(*) FROM pg_publication") == [(0,)]
    assert on_shard(s1, "SELECT count(*) FROM pg_replication_slots") == [(0,)]
    assert on_shard(s2, f"SELECT count(*) FROM {tables.orders} WHERE tenant_id = 1") == [(0,)]
    assert on_shard(s1, f"SELECT count(*) FROM {tables.orders} WHERE tenant_id = 1") == [
        (base.ROWS,)]
    assert "1: s1" in proxy.config_path.read_text()
    assert on_shard_db(s1, CATALOG, "SELECT state FROM shardwire_moves") == [("refused",)]

    # With room (the operator raised the setting), the same move goes through.
    text = proxy.config_path.read_text()
    assert f"max_shard_bytes: {held + 100}" in text
    proxy.config_path.write_text(text.replace(f"max_shard_bytes: {held + 100}",
                                              f"max_shard_bytes: {held + 100_000_000}"))
    done = rebalance(proxy, "apply", "--move", "by_tenant:1:s2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert on_shard(s2, f"SELECT count(*) FROM {tables.orders} WHERE tenant_id = 1") == [
        (base.ROWS,)]
    assert on_shard(s1, f"SELECT count(*) FROM {tables.orders} WHERE tenant_id = 1") == [(0,)]


def test_plan_proposes_no_target_without_room_and_says_so(
        make_proxy: MakeProxy, shards: list[PostgresCluster], orders: str,
        tmp_path: Path) -> None:
    """The planner's side, from the heat of a real proxy: with room, tenant 1 goes to s2;
    with rebalance.max_shard_bytes below s2's database size, no move is proposed and the
    warning says why."""
    proxy = heat.start(make_proxy, shards, orders)
    with psycopg.connect(proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
        for tenant in heat.ON_S1 + heat.ON_S2:
            with conn.transaction():
                for order in range(heat.ROWS_PER_TENANT):
                    conn.execute(f"INSERT INTO {orders} (tenant_id, order_id, amount) "
                                 "VALUES (%s, %s, %s)", (tenant, order, order))
        workload = [heat.HOT] * 600 + [t for t in heat.ON_S1[1:] for _ in range(60)] + [
            t for t in heat.ON_S2 for _ in range(60)]
        for tenant in workload:
            conn.execute(f"SELECT count(*) FROM {orders} WHERE tenant_id = %s", (tenant,))
    held = on_shard(shards[1], "SELECT pg_database_size(current_database())")[0][0]
    # The plan reads the heat the proxy flushed to the catalog: wait until all of it is there,
    # that is until the workload's last tenant has all its statements (its INSERTs and its
    # SELECTs, the last ones run). A total over the shards would count the INSERTs too, and
    # could be reached with part of the workload still in the proxy's open window.
    last = workload[-1]
    expected = heat.ROWS_PER_TENANT + workload.count(last)
    deadline = time.monotonic() + 20
    while True:
        status = subprocess.run(
            [sys.executable, "-m", "shardwire.cli", "rebalance", "status", "--json",
             "--config", str(proxy.config_path)],
            capture_output=True, text=True, timeout=60, env={**proxy.env, **PROXY_ENV})
        assert status.returncode == 0, status.stderr
        counted = sum(k["statements"] for s in json.loads(status.stdout)["shards"]
                      for k in s["hot_keys"] if str(k["key"]) == str(last))
        if counted >= expected:
            break
        assert time.monotonic() < deadline, f"the catalog has {counted} of tenant {last}'s"
        time.sleep(0.3)

    def plan(capacity: int) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
        cfg = yaml.safe_load(proxy.config_path.read_text())
        cfg["rebalance"]["max_shard_bytes"] = capacity
        path = tmp_path / f"config_{capacity}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        out = tmp_path / f"plan_{capacity}.yaml"
        done = subprocess.run(
            [sys.executable, "-m", "shardwire.cli", "rebalance", "plan", "--threshold", "1.3",
             "--output", str(out), "--config", str(path)],
            capture_output=True, text=True, timeout=60, env={**proxy.env, **PROXY_ENV})
        return done, yaml.safe_load(out.read_text())

    deadline = time.monotonic() + 15  # until the proxy has flushed its heat to the catalog
    while True:
        roomy, data = plan(held + 100_000_000)
        if data["moves"] or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert roomy.returncode == 0, roomy.stdout + roomy.stderr
    [move] = data["moves"]
    assert (move["keys"], move["to"]) == ([heat.HOT], "s2")
    assert data["max_shard_bytes"] == held + 100_000_000
    assert data["shards"]["s2"]["database_bytes"] >= held
    assert data["shards"]["s2"]["database_bytes_after"] == (
        data["shards"]["s2"]["database_bytes"] + move["copy"]["bytes"])

    cramped, data = plan(held)
    assert cramped.returncode == 1, cramped.stdout + cramped.stderr
    assert data["moves"] == []
    [warning] = data["warnings"]
    assert "no target has room" in warning and f"rebalance.max_shard_bytes = {held}" in warning
    assert "fits on no shard: s2 holds" in warning
    assert "warning: s1 stays above the limit" in cramped.stdout
