"""Hot reload of the shard map (docs/operations.md, "Reloading the configuration"): RELOAD
under load drops no client; a transaction open across a reload runs each statement where the
map it began with puts it, and fails with 40001 when the new map would put that statement
elsewhere (it never runs on two maps); new transactions and other clients get the new map at
once; an invalid file leaves the old map serving."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import psycopg
import pytest
from conftest import ADMIN_PASSWORD, APP_PASSWORD, DATABASE, MakeProxy, on_shard
from wire import SYNC, RawClient, bind, data_rows, execute, kinds, parse

from shardwire.testing import PostgresCluster
from shardwire.testing.proxy import ProxyProcess

TABLE = f"rl_orders_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def table(shards: list[PostgresCluster]) -> Any:
    for shard in shards[:2]:
        shard.sql(f"CREATE TABLE {TABLE} (tenant_id int, id int, note text)", dbname=DATABASE)
    yield TABLE
    for shard in shards[:2]:
        shard.sql(f"DROP TABLE IF EXISTS {TABLE}", dbname=DATABASE)


def tenant_map(cfg: dict[str, Any], tenants: dict[int, str]) -> None:
    cfg["shards"] = {name: cfg["shards"][name] for name in ("s1", "s2")}
    cfg["sharding"] = {"rules": {"by_tenant": {
        "kind": "tenant", "column": "tenant_id", "tables": [TABLE],
        "tenants": tenants, "default": "s1"}}}


def reload(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn("admin", ADMIN_PASSWORD, database="shardwire"),
                         autocommit=True) as admin:
        admin.execute("RELOAD")


def notes(shard: PostgresCluster) -> list[str]:
    return sorted(r[0] for r in on_shard(shard, f"SELECT note FROM {TABLE}"))


def test_a_transaction_open_across_a_reload_keeps_its_map(
        make_proxy: MakeProxy, shards: list[PostgresCluster], table: str) -> None:
    proxy = make_proxy(lambda cfg: tenant_map(cfg, {5: "s1", 6: "s1"}))
    dsn = proxy.dsn("app", APP_PASSWORD)
    with psycopg.connect(dsn) as old, psycopg.connect(dsn, autocommit=True) as other:
        # The transaction begins (psycopg sends BEGIN) under the old map.
        old.execute(f"INSERT INTO {table} (tenant_id, id, note) VALUES (5, 1, 'before')")
        # The operator moves tenant 5 to s2 in the file (no rows moved) and reloads.
        cfg = proxy.config
        tenant_map(cfg, {5: "s2", 6: "s1"})
        proxy.write_config(cfg)
        reload(proxy)
        # Other clients, and new transactions, route by the new map at once.
        other.execute(f"INSERT INTO {table} (tenant_id, id, note) VALUES (5, 2, 'new map')")
        assert notes(shards[1]) == ["new map"]
        # The open transaction goes on where both maps agree: tenant 6 is on s1 in both.
        old.execute(f"INSERT INTO {table} (tenant_id, id, note) VALUES (6, 3, 'same shard')")
        old.commit()
        assert notes(shards[0]) == ["before", "same shard"]
        # After its end the client is on the new map too.
        assert old.execute(f"SELECT note FROM {table} WHERE tenant_id = 5").fetchall() == [
            ("new map",)]
        old.commit()


def test_a_statement_the_new_map_routes_elsewhere_fails_with_40001(
        make_proxy: MakeProxy, shards: list[PostgresCluster], table: str) -> None:
    proxy = make_proxy(lambda cfg: tenant_map(cfg, {5: "s1", 6: "s1"}))
    dsn = proxy.dsn("app", APP_PASSWORD)
    with psycopg.connect(dsn) as conn:
        conn.execute(f"INSERT INTO {table} (tenant_id, id, note) VALUES (6, 1, 'lost')")
        cfg = proxy.config
        tenant_map(cfg, {5: "s2", 6: "s1"})
        proxy.write_config(cfg)
        reload(proxy)
        # Tenant 5 is on s1 under the transaction's map and on s2 under the new one: the
        # transaction cannot go on without mixing the two.
        with pytest.raises(psycopg.errors.SerializationFailure) as info:
            conn.execute(f"UPDATE {table} SET note = 'x' WHERE tenant_id = 5", prepare=True)
        assert "shard map changed" in str(info.value)
        conn.rollback()
        # Retried, the transaction runs on the new map.
        conn.execute(f"INSERT INTO {table} (tenant_id, id, note) VALUES (6, 1, 'retried')")
        conn.execute(f"INSERT INTO {table} (tenant_id, id, note) VALUES (5, 2, 'retried')")
        conn.commit()
    assert notes(shards[0]) == ["retried"]
    assert notes(shards[1]) == ["retried"]


def test_reload_under_load_drops_no_client(
        make_proxy: MakeProxy, shards: list[PostgresCluster], table: str) -> None:
    """Eight clients run transactions while the map is rewritten and reloaded again and
    again (tenant 9 flips between shards, the others stay): no client sees an error or
    loses its connection, and every committed row is where the map of its transaction put
    it."""
    proxy = make_proxy(lambda cfg: tenant_map(cfg, {1: "s1", 2: "s2", 9: "s1"}))
    dsn = proxy.dsn("app", APP_PASSWORD)
    stop = threading.Event()
    errors: list[BaseException] = []
    committed: list[int] = []

    def client(number: int) -> None:
        tenant = 1 + number % 2
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                row = 0
                while not stop.is_set():
                    row += 1
                    with conn.transaction():
                        conn.execute(f"INSERT INTO {table} (tenant_id, id, note) "
                                     "VALUES (%s, %s, 'load')", (tenant, number * 100_000 + row))
                        conn.execute(f"SELECT count(*) FROM {table} WHERE tenant_id = %s",
                                     (tenant,)).fetchone()
                    committed.append(tenant)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    cfg = proxy.config
    for i in range(20):
        tenant_map(cfg, {1: "s1", 2: "s2", 9: "s2" if i % 2 == 0 else "s1"})
        proxy.write_config(cfg)
        reload(proxy)
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(10)
    assert not errors, errors
    assert committed.count(1) > 20 and committed.count(2) > 20
    on_s1 = on_shard(shards[0], f"SELECT tenant_id, count(*) FROM {table} GROUP BY 1")
    on_s2 = on_shard(shards[1], f"SELECT tenant_id, count(*) FROM {table} GROUP BY 1")
    assert on_s1 == [(1, committed.count(1))]
    assert on_s2 == [(2, committed.count(2))]


def test_an_invalid_map_is_rejected_and_the_old_one_keeps_serving(
        make_proxy: MakeProxy, shards: list[PostgresCluster], table: str) -> None:
    proxy = make_proxy(lambda cfg: tenant_map(cfg, {5: "s2"}))
    cfg = proxy.config
    tenant_map(cfg, {5: "s7"})  # no such shard
    proxy.write_config(cfg)
    with psycopg.connect(proxy.dsn("admin", ADMIN_PASSWORD, database="shardwire"),
                         autocommit=True) as admin:
        with pytest.raises(psycopg.Error) as info:
            admin.execute("RELOAD")
        assert info.value.sqlstate == "F0000"
        assert "s7" in (info.value.diag.message_detail or ""), info.value.diag.message_detail
    with psycopg.connect(proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
        conn.execute(f"INSERT INTO {table} (tenant_id, id, note) VALUES (5, 1, 'old map')")
    assert notes(shards[1]) == ["old map"]


def test_a_statement_prepared_before_a_reload_runs_on_the_new_map(
        make_proxy: MakeProxy, shards: list[PostgresCluster], table: str) -> None:
    """A client prepares (Parse) under the old map and executes (Bind) after the reload:
    each execution after the reload runs where the new map puts its key. The Binds have
    the layout libpq and pgbench send, which the proxy recognises by their first bytes
    (routing.md, Speed): that shortcut must not outlive the map it was made for."""
    for shard, note in ((shards[0], "old map"), (shards[1], "new map")):
        shard.sql(f"INSERT INTO {table} (tenant_id, id, note) VALUES (5, 1, '{note}')",
                  dbname=DATABASE)
    proxy = make_proxy(lambda cfg: tenant_map(cfg, {5: "s1", 6: "s1"}))
    with RawClient(proxy.host, proxy.port) as raw:
        raw.login("app", APP_PASSWORD, DATABASE)
        raw.send(parse("st", f"SELECT note FROM {table} WHERE tenant_id = $1", [23]), SYNC)
        assert kinds(raw.read_until_ready()) == "1Z"
        for _ in range(3):
            raw.send(bind("", "st", [b"5"]), execute(), SYNC)
            assert data_rows(raw.read_until_ready()) == [("old map",)]
        cfg = proxy.config
        tenant_map(cfg, {5: "s2", 6: "s1"})
        proxy.write_config(cfg)
        reload(proxy)
        for _ in range(3):
            raw.send(bind("", "st", [b"5"]), execute(), SYNC)
            assert data_rows(raw.read_until_ready()) == [("new map",)]
