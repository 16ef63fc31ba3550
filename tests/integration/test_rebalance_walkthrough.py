"""The walk-through at the end of docs/rebalancing.md, as an operator types it: `shardwire
demo`, `shardwire demo-load --hot-tenant 1,3`, then `shardwire rebalance status`, `plan`,
`apply` while the load runs, and `status` again. Each step's visible outcome is checked: the
skew is shown, the plan moves one of the hot tenants, the move succeeds under the load with
no acknowledged write lost or applied twice (the load's own check, and the shards read
directly), and afterwards the skew is under the threshold."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from test_demo import Demo, urls

from shardwire.config import load_config
from shardwire.testing import PostgresCluster, free_port

SHARDS = ("shard1", "shard2")  # the demo's default: tenants 1, 3 and 5 on shard1
HOT = (1, 3)
THRESHOLD = 1.2  # rebalance status and plan's default
TENANT_TABLES = ("tenants", "customers", "orders", "order_items")
FIRST_LOAD_ORDER = 100_000  # demo-load numbers its new orders from here


@pytest.fixture
def demo_dir(tmp_path: Path) -> Iterator[Path]:
    data_dir = tmp_path / "demo"
    yield data_dir
    for name in SHARDS:
        if (data_dir / name).is_dir():
            PostgresCluster(data_dir / name, name=name).stop(mode="immediate")


def shardwire(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardwire.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=_env())


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PG", "SHARDWIRE_"))}


def status(config: Path, *extra: str) -> dict[str, Any]:
    result = shardwire("rebalance", "status", "--config", str(config), "--json", *extra)
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def count(dsn: str, sql: str, *params: object) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(sql, params).fetchone()
    assert row is not None
    return int(row[0])


def test_walkthrough_from_one_hot_shard_to_balanced(demo_dir: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    demo = Demo(demo_dir, free_port(), tmp_path / "demo.log")
    load: subprocess.Popen[str] | None = None
    try:
        app_url, _ = urls(demo.wait_ready())
        config = demo_dir / "shardwire.yaml"
        dsns = {name: PostgresCluster(demo_dir / name, name=name).dsn("demo") for name in SHARDS}

        # The application: most statements at tenants 1 and 3, both on shard1.
        load = subprocess.Popen(
            [sys.executable, "-m", "shardwire.cli", "demo-load", "--url", app_url,
             "--hot-tenant", ",".join(map(str, HOT)), "--report-every", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())

        # `rebalance status`: once the heat of the load has reached the catalog, shard1 is
        # marked hot, with the hot tenants as its hottest keys.
        deadline = time.monotonic() + 30
        while True:
            before = status(config)
            shard1 = before["shards"][0]
            if before["skew"] > 1.5 and shard1["over_threshold"]:
                break
            assert time.monotonic() < deadline, f"no skew shown: {before}"
            time.sleep(2)
        assert before["hottest"] == "shard1"
        assert {k["key"] for k in shard1["hot_keys"][:2]} == {str(t) for t in HOT}
        text = shardwire("rebalance", "status", "--config", str(config))
        assert text.returncode == 0, text.stderr
        assert re.search(r"^shard1 \*", text.stdout, re.M), text.stdout
        assert "over the threshold (1.2 x mean): shard1" in text.stdout

        # `rebalance plan`: one move, a hot tenant from shard1 to shard2.
        plan_file = tmp_path / "plan.yaml"
        plan = shardwire("rebalance", "plan", "--config", str(config), "--output",
                         str(plan_file))
        assert plan.returncode == 0, plan.stdout + plan.stderr
        moves = yaml.safe_load(plan_file.read_text())["moves"]
        assert len(moves) == 1, moves
        move = moves[0]
        assert (move["rule"], move["from"], move["to"]) == ("by_tenant", "shard1", "shard2")
        assert len(move["keys"]) == 1 and move["keys"][0] in HOT
        moved = move["keys"][0]
        assert f"move 1: by_tenant tenant {moved} from shard1 to shard2" in plan.stdout

        # `rebalance apply`, with the load running.
        assert load.poll() is None, "demo-load stopped early"
        applied = shardwire("rebalance", "apply", "--config", str(config), "--plan",
                            str(plan_file), timeout=120)
        assert applied.returncode == 0, applied.stdout + applied.stderr
        assert "1 move(s) done" in applied.stdout
        moved_at = time.monotonic()
        # The map in the file, and the rows on the shards, read directly.
        rule = load_config(config).sharding.rules["by_tenant"]
        assert rule.shard_for(moved) == "shard2"
        for table in TENANT_TABLES:
            sql = f"SELECT count(*) FROM {table} WHERE tenant_id = %s"
            assert count(dsns["shard1"], sql, moved) == 0, table
            assert count(dsns["shard2"], sql, moved) > 0, table

        # `rebalance status` over windows that began after the move: balanced.
        window = 15
        time.sleep(max(0.0, moved_at + window + 6 - time.monotonic()))
        after = status(config, "--since", str(window))
        assert after["skew"] < THRESHOLD, after
        assert not any(s["over_threshold"] for s in after["shards"]), after
        placed = {s["shard"]: {k["key"] for k in s["hot_keys"]} for s in after["shards"]}
        assert str(moved) in placed["shard2"] and str(moved) not in placed["shard1"], placed

        # The load stops and reads every acknowledged write back through the proxy.
        load.send_signal(signal.SIGINT)
        out, _ = load.communicate(timeout=60)
        assert load.returncode == 0, out
        assert "checked through the proxy: every acknowledged write is there, once" in out
        assert re.search(r"^acknowledged: \d+ new orders, \d+ updates, \d+ reads; errors: 0$",
                         out, re.M), out
        acked = {int(t): int(n) for t, n in
                 re.findall(r"^tenant (\d+): (\d+) new orders", out, re.M)}
        assert acked[moved] > 0
        # Each acknowledged new order of the moved tenant is on shard2, once; none on shard1.
        new_orders = ("SELECT count(*) FROM orders WHERE tenant_id = %s AND order_no >= "
                      f"{FIRST_LOAD_ORDER}")
        assert count(dsns["shard1"], new_orders, moved) == 0
        assert count(dsns["shard2"], new_orders, moved) == acked[moved]
        assert demo.interrupt() == 0
        assert time.monotonic() - started < 90
    except BaseException:
        print(f"the demo's log:\n{demo.stderr()}")  # shown by pytest with the failure
        raise
    finally:
        if load is not None and load.poll() is None:
            load.kill()
            load.wait()
        demo.kill()
