"""Lookup rules: a directory of key → shard in the catalog database."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from conftest import APP_PASSWORD, MakeProxy

from shardwire.testing import PostgresCluster

CATALOG = "shardwire_catalog"


@pytest.fixture
def users_table(shards: list[PostgresCluster]) -> Iterator[str]:
    name = f"lk_users_{uuid.uuid4().hex[:8]}"
    for shard in shards[:2]:
        shard.sql(f"CREATE TABLE {name} (user_id bigint PRIMARY KEY, name text)", dbname="app")
    shards[0].create_database(CATALOG)
    yield name
    for shard in shards[:2]:
        shard.sql(f"DROP TABLE IF EXISTS {name}", dbname="app")
    shards[0].sql(f"DROP TABLE IF EXISTS directory_{name}", dbname=CATALOG)


def lookup_config(shards: list[PostgresCluster], table: str, **rule: Any):
    def edit(cfg: dict[str, Any]) -> None:
        cfg["catalog"] = shards[0].dsn(CATALOG)
        cfg["sharding"] = {"rules": {"by_user": {
            "kind": "lookup", "column": "user_id", "type": "integer", "tables": [table],
            "directory": f"directory_{table}", "shards": ["s1", "s2"], **rule}}}
    return edit


def rows_on(shard: PostgresCluster, table: str) -> set[int]:
    out = shard.sql(f"SELECT user_id FROM {table}", dbname="app")
    return {int(x) for x in out.split()} if out else set()


def test_new_keys_get_a_shard_and_rows_follow_the_directory(
        make_proxy: MakeProxy, shards: list[PostgresCluster], users_table: str) -> None:
    proxy = make_proxy(lookup_config(shards, users_table))
    with psycopg.connect(proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
        for uid in range(1, 11):
            conn.execute(f"INSERT INTO {users_table} (user_id, name) VALUES (%s, %s)",
                         (uid, f"u{uid}"))
        directory = dict(
            (int(k), s) for k, s in (line.split("|") for line in shards[0].sql(
                f"SELECT key, shard FROM directory_{users_table}", dbname=CATALOG).split()))
        assert set(directory) == set(range(1, 11))
        # least_loaded spreads new keys evenly
        assert sorted(list(directory.values()).count(s) for s in ("s1", "s2")) == [5, 5]
        on = {"s1": rows_on(shards[0], users_table), "s2": rows_on(shards[1], users_table)}
        for uid, shard in directory.items():
            assert uid in on[shard]
            other = "s2" if shard == "s1" else "s1"
            assert uid not in on[other]
        for uid in (1, 7):
            assert conn.execute(f"SELECT name FROM {users_table} WHERE user_id = %s",
                                (uid,)).fetchone() == (f"u{uid}",)
        conn.execute(f"UPDATE {users_table} SET name = 'x' WHERE user_id = 3")
        assert conn.execute(f"SELECT name FROM {users_table} WHERE user_id = 3").fetchone() \
            == ("x",)
        # An unknown key: no rows, no directory entry.
        assert conn.execute(f"SELECT * FROM {users_table} WHERE user_id = 999").fetchall() == []
        assert shards[0].sql(f"SELECT count(*) FROM directory_{users_table} WHERE key = 999",
                             dbname=CATALOG) == "0"


def test_a_multi_row_insert_of_new_keys_is_placed_then_split(
        make_proxy: MakeProxy, shards: list[PostgresCluster], users_table: str) -> None:
    """New keys in one INSERT get their shards first (least loaded: spread), then each
    shard gets its own rows; RETURNING comes back in the VALUES order."""
    proxy = make_proxy(lookup_config(shards, users_table))
    with psycopg.connect(proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
        rows = conn.execute(f"INSERT INTO {users_table} (user_id, name) VALUES (21, 'a'), "
                            "(22, 'b'), (23, 'c'), (24, 'd') RETURNING user_id").fetchall()
        assert rows == [(21,), (22,), (23,), (24,)]
    directory = dict(
        (int(k), s) for k, s in (line.split("|") for line in shards[0].sql(
            f"SELECT key, shard FROM directory_{users_table}", dbname=CATALOG).split()))
    assert set(directory) == {21, 22, 23, 24}
    assert set(directory.values()) == {"s1", "s2"}  # the rows really went two ways
    on = {"s1": rows_on(shards[0], users_table), "s2": rows_on(shards[1], users_table)}
    assert on == {s: {k for k, v in directory.items() if v == s} for s in ("s1", "s2")}


def test_explicit_policy_and_a_second_proxy(
        make_proxy: MakeProxy, shards: list[PostgresCluster], users_table: str) -> None:
    first = make_proxy(lookup_config(shards, users_table, new_keys="s2"))
    second = make_proxy(lookup_config(shards, users_table, new_keys="s1"))
    with psycopg.connect(first.dsn("app", APP_PASSWORD), autocommit=True) as a, \
            psycopg.connect(second.dsn("app", APP_PASSWORD), autocommit=True) as b:
        # b looks the key up first and caches "no such key"
        assert b.execute(f"SELECT * FROM {users_table} WHERE user_id = 42").fetchall() == []
        a.execute(f"INSERT INTO {users_table} (user_id, name) VALUES (42, 'a')")
        assert rows_on(shards[1], users_table) == {42}
        # a's NOTIFY made b forget; b finds the row on s2
        for _ in range(50):
            if b.execute(f"SELECT name FROM {users_table} WHERE user_id = 42").fetchall():
                break
        assert b.execute(f"SELECT name FROM {users_table} WHERE user_id = 42").fetchone() \
            == ("a",)
        # b's policy says s1, but the key already has a shard: b follows the directory
        b.execute(f"INSERT INTO {users_table} (user_id, name) VALUES (42, 'dup') "
                  "ON CONFLICT (user_id) DO UPDATE SET name = 'b'")
        assert rows_on(shards[0], users_table) == set()
        assert a.execute(f"SELECT name FROM {users_table} WHERE user_id = 42").fetchone() \
            == ("b",)


def test_catalog_down_gives_a_clear_error(make_proxy: MakeProxy,
                                          shards: list[PostgresCluster],
                                          users_table: str) -> None:
    def edit(cfg: dict[str, Any]) -> None:
        lookup_config(shards, users_table)(cfg)
        cfg["catalog"] = "postgresql://postgres@127.0.0.1:1/nowhere"
    proxy = make_proxy(edit)
    with psycopg.connect(proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
        with pytest.raises(psycopg.OperationalError) as err:
            conn.execute(f"SELECT * FROM {users_table} WHERE user_id = 1")
        assert err.value.sqlstate == "08006"
        assert "catalog" in str(err.value)
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_show_route_for(make_proxy: MakeProxy, shards: list[PostgresCluster],
                        users_table: str) -> None:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["sharding"] = {"rules": {"by_tenant": {
            "kind": "tenant", "column": "tenant_id", "tables": ["sr_orders"],
            "tenants": {1: "s1", 2: "s2"}, "default": "s1"}}}
    proxy = make_proxy(edit)
    with psycopg.connect(proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
        row = conn.execute("SHOW ROUTE FOR SELECT * FROM sr_orders WHERE tenant_id = 2"
                           ).fetchone()
        assert row is not None and row[:2] == ("single", "s2")
        row = conn.execute("SHOW ROUTE FOR SELECT * FROM sr_orders").fetchone()
        assert row is not None and row[:2] == ("multi", "s1, s2")
        row = conn.execute("SHOW ROUTE FOR SELECT * FROM sr_orders o JOIN sr_orders p "
                           "ON o.id = p.id").fetchone()
        assert row is not None and row[0] == "refused" and row[3] == "0A000"
