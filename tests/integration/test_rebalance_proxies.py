"""A move with two proxies in front of the same shards, catalog and config file: writers go
through both during the whole move; both proxies install the fence and acknowledge the new
map before the fence is released; afterwards every acknowledged write (of either writer) is on
the target exactly once and nothing of the moved tenant is left on the source."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from conftest import APP_PASSWORD, MakeProxy, on_shard
from test_rebalance_apply import CATALOG, _cleanup, on_shard_db, rebalance
from test_rebalance_kinds import ROWS, check_invariant, nothing_left
from writers import KeyWriter

from shardwire.testing import PostgresCluster
from shardwire.testing.proxy import ProxyProcess

MOVING = [1]
OTHERS = [2, 3]  # 2 stays on s1, 3 lives on s2


@pytest.fixture
def table(shards: list[PostgresCluster]) -> Iterator[str]:
    _cleanup(shards)
    name = "px_orders"
    for shard in shards[:2]:
        shard.sql(f"DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (tenant_id int NOT NULL, "
                  "id int NOT NULL, v int NOT NULL, PRIMARY KEY (tenant_id, id))",
                  dbname="app")
    for tenant, where in ((1, 0), (2, 0), (3, 1)):
        shards[where].sql(f"INSERT INTO {name} SELECT {tenant}, g, 0 FROM generate_series(0, "
                          f"{ROWS - 1}) g", dbname="app")
    yield name
    _cleanup(shards)
    for shard in shards[:2]:
        shard.sql(f"DROP TABLE IF EXISTS {name}", dbname="app")


def two_proxies(make_proxy: MakeProxy, shards: list[PostgresCluster], table: str
                ) -> tuple[ProxyProcess, ProxyProcess]:
    """Two proxies reading one config file; each listens on its own port, given to it by
    `${SW_LISTEN_PORT}` in the file."""
    def edit(cfg: dict[str, Any]) -> None:
        cfg["shards"] = {name: cfg["shards"][name] for name in ("s1", "s2")}
        cfg["catalog"] = shards[0].dsn(CATALOG)
        cfg["sharding"] = {"rules": {"by_tenant": {
            "kind": "tenant", "column": "tenant_id", "tables": [table],
            "tenants": {1: "s1", 2: "s1", 3: "s2"}, "default": "s1"}}}
    first = make_proxy(edit, start=False)
    second = make_proxy(edit, start=False)
    text = first.config_path.read_text()
    assert f"port: {first.port}" in text
    first.config_path.write_text(text.replace(f"port: {first.port}", "port: ${SW_LISTEN_PORT}"))
    second.config_path = first.config_path
    for proxy in (first, second):
        proxy.env["SW_LISTEN_PORT"] = str(proxy.port)
        proxy.start()
    end = time.monotonic() + 10
    while on_shard_db(shards[0], CATALOG, "SELECT count(*) FROM shardwire_proxies") != [(2,)]:
        assert time.monotonic() < end, "the proxies did not both register in the catalog"
        time.sleep(0.1)
    return first, second


def test_a_move_with_two_proxies_loses_and_doubles_nothing(
        make_proxy: MakeProxy, shards: list[PostgresCluster], table: str) -> None:
    first, second = two_proxies(make_proxy, shards, table)
    a = KeyWriter(first.dsn("app", APP_PASSWORD), table, "tenant_id", MOVING, OTHERS,
                  first_id=ROWS)
    b = KeyWriter(second.dsn("app", APP_PASSWORD), table, "tenant_id", MOVING, OTHERS,
                  first_id=100_000)
    with a, b:
        done = rebalance(first, "apply", "--move", "by_tenant:1:s2")
        assert done.returncode == 0, done.stdout + done.stderr
    print(f"two proxies: {done.stdout.strip()}; longest write of the moving tenant "
          f"{max(a.moving_latencies() + b.moving_latencies()) * 1000:.0f} ms")
    assert a.acked and b.acked
    assert any(k[0] == 1 and k[1] >= 100_000 for k in b.acked), "no write of the moving " \
        "tenant through the second proxy"
    home = {1: "s2", 2: "s1", 3: "s2"}
    check_invariant(shards, table, "tenant_id", [a, b], home.__getitem__, lambda k: k == 1)
    nothing_left(shards)
    # Both proxies installed the fence and loaded the new map before the fence was released.
    instances = {r[0] for r in on_shard_db(shards[0], CATALOG,
                                           "SELECT instance FROM shardwire_proxies")}
    assert len(instances) == 2
    for kind in ("fence", "map"):
        acked = on_shard_db(
            shards[0], CATALOG,
            "SELECT a.instance, a.ok, a.acked_at <= f.released_at FROM shardwire_acks a, "
            f"shardwire_fences f WHERE a.kind = '{kind}' ORDER BY 1")
        assert {r[0] for r in acked} == instances and all(r[1] and r[2] for r in acked), \
            (kind, acked)
    for proxy in (first, second):
        with psycopg.connect(proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
            row = conn.execute(f"SHOW ROUTE FOR SELECT * FROM {table} WHERE tenant_id = 1"
                               ).fetchone()
            assert row is not None and row[1] == "s2", row
    assert on_shard(shards[0], f"SELECT count(*) FROM {table} WHERE tenant_id = 1") == [(0,)]
