"""Reads across shards, end to end: what a client sees when a query runs on every shard
(the differential rig in tests/oracle checks the merged answers themselves at scale; this
file checks the behaviour around them: protocols, errors, cancels, timeouts, leftovers)."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
import uuid
from decimal import Decimal
from typing import Any

import asyncpg
import psycopg
import pytest
from conftest import APP_PASSWORD, PROXY_ENV, assert_nothing_left_behind, base_config, on_shard

from shardwire.testing import PostgresCluster
from shardwire.testing.proxy import ProxyProcess

SUFFIX = uuid.uuid4().hex[:8]
ORDERS = f"sc_orders_{SUFFIX}"
COUNTRIES = f"sc_countries_{SUFFIX}"
# tenant -> shard: 1 -> s1, 2 -> s2, 3 -> s3; each tenant has 10 orders, amounts 1..10 (x tenant)
ROWS = [(t * 100 + i, t, i * t, f"note {t}-{i}" if i % 3 else None)
        for t in (1, 2, 3) for i in range(1, 11)]


@pytest.fixture(scope="module")
def scatter_proxy(shards: list[PostgresCluster],
                  tmp_path_factory: pytest.TempPathFactory) -> Any:
    cfg = base_config(shards)
    cfg["sharding"] = {
        "rules": {"sc_by_tenant": {"kind": "tenant", "column": "tenant_id", "type": "integer",
                                   "tables": [ORDERS], "tenants": {1: "s1", 2: "s2", 3: "s3"},
                                   "default": "s1"}},
        "reference": [COUNTRIES],
    }
    for i, cluster in enumerate(shards):
        on_shard(cluster, f"create table {ORDERS} (id int primary key, tenant_id int, "
                          "amount int, note text)")
        on_shard(cluster, f"create table {COUNTRIES} (code text primary key, name text)")
        on_shard(cluster, f"insert into {COUNTRIES} values ('fr', 'France'), ('jp', 'Japan')")
        for row in ROWS:
            if row[1] == i + 1:
                on_shard(cluster, f"insert into {ORDERS} values (%s, %s, %s, %s)", list(row))
    proc = ProxyProcess(cfg, tmp_path_factory.mktemp("scatter-proxy"), env=PROXY_ENV)
    proc.start()
    yield proc
    proc.stop()
    for cluster in shards:
        on_shard(cluster, f"drop table if exists {ORDERS}, {COUNTRIES}")


@pytest.fixture
def dsn(scatter_proxy: ProxyProcess) -> str:
    return scatter_proxy.dsn("app", APP_PASSWORD)


def test_simple_and_extended_protocols_give_the_same_rows(dsn: str) -> None:
    expected = sorted(ROWS, key=lambda r: (-r[2], r[0]))[:7]
    sql = f"select id, tenant_id, amount, note from {ORDERS} order by amount desc, id limit 7"
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute(sql).fetchall() == expected  # extended protocol, text
        cur = conn.cursor(binary=True)
        assert cur.execute(sql).fetchall() == expected  # binary results
        assert [d.name for d in cur.description] == ["id", "tenant_id", "amount", "note"]
        assert cur.statusmessage == "SELECT 7"
        # parameters in LIMIT/OFFSET and in the filter
        rows = conn.execute(f"select id from {ORDERS} where amount > %s order by id "
                            "limit %s offset %s", [5, 4, 2]).fetchall()
        assert rows == [(r[0],) for r in sorted(ROWS) if r[2] > 5][2:6]
    out = subprocess.run(["psql", dsn, "-X", "-At", "-c", sql], capture_output=True, text=True,
                         check=True)  # simple protocol
    assert out.stdout.splitlines() == ["|".join("" if v is None else str(v) for v in r)
                                       for r in expected]


def test_aggregates_over_every_shard(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(f"select count(*), sum(amount), avg(amount), min(note), "
                           f"max(amount) from {ORDERS}").fetchone()
        amounts = [r[2] for r in ROWS]
        notes = [r[3] for r in ROWS if r[3] is not None]
        assert row == (30, sum(amounts),
                       conn.execute("select avg(x) from unnest(%s::int[]) x",
                                    [amounts]).fetchone()[0],  # type: ignore[index]
                       min(notes), max(amounts))
        groups = conn.execute(f"select tenant_id, count(*), sum(amount) from {ORDERS} "
                              "group by tenant_id having sum(amount) > 60 order by 1").fetchall()
        assert groups == [(2, 10, 110), (3, 10, 165)]


async def _asyncpg_rows(dsn: str) -> list[Any]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(f"select tenant_id, sum(amount) as total, avg(amount) from "
                                f"{ORDERS} where amount >= $1 group by tenant_id order by "
                                "tenant_id", 3)
        return [tuple(r) for r in rows]
    finally:
        await conn.close()


def test_asyncpg_prepared_binary(dsn: str) -> None:
    rows = asyncio.run(_asyncpg_rows(dsn))
    expected = []
    for t in (1, 2, 3):
        amounts = [r[2] for r in ROWS if r[1] == t and r[2] >= 3]
        expected.append((t, sum(amounts)))
    assert [r[:2] for r in rows] == expected
    assert all(isinstance(r[2], Decimal) for r in rows)


def test_a_shard_error_fails_the_whole_statement(dsn: str, scatter_proxy: ProxyProcess,
                                                 shards: list[PostgresCluster]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        # 1 / (amount - 30) fails only where amount = 30: tenant 3's shard (s3)
        with pytest.raises(psycopg.errors.DivisionByZero) as info:
            conn.execute(f"select id, 1 / (amount - 30) from {ORDERS}").fetchall()
        assert "s3:" in str(info.value)
        assert conn.execute(f"select count(*) from {ORDERS}").fetchone() == (30,)
    assert_nothing_left_behind(scatter_proxy, shards)


def test_cancel_and_statement_timeout_reach_every_shard(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("set statement_timeout = '300ms'")
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute(f"select pg_sleep(5) from {ORDERS}").fetchall()
        assert time.monotonic() - started < 4
        conn.execute("set statement_timeout = 0")

        timer = threading.Timer(0.5, conn.cancel)
        timer.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute(f"select pg_sleep(5) from {ORDERS}").fetchall()
        assert time.monotonic() - started < 4
        assert conn.execute(f"select count(*) from {ORDERS}").fetchone() == (30,)


def test_refused_constructs_say_why(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for sql in (f"select id, row_number() over () from {ORDERS}",
                    f"select count(distinct amount) from {ORDERS}"):
            with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
                conn.execute(sql)
            assert info.value.diag.message_hint
        # Inside a transaction block too; the refusal aborts the transaction.
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            with conn.transaction():
                assert conn.execute(f"select count(*) from {ORDERS}").fetchone() == (30,)
                conn.execute(f"select id, row_number() over () from {ORDERS}")
        assert conn.execute("select 1").fetchone() == (1,)


def test_a_user_defined_aggregate_is_refused_not_taken_for_rows(
        dsn: str, shards: list[PostgresCluster]) -> None:
    """The proxy has no catalog of its own: it asks a shard whether an unknown function is an
    aggregate, rather than returning one partial result per shard as rows."""
    name = f"sc_total_{SUFFIX}"
    for cluster in shards:
        on_shard(cluster, f"create aggregate {name}(int) (sfunc = int4pl, stype = int, "
                          "initcond = '0')")
        on_shard(cluster, f"create function {name}_twice(int) returns int "
                          "language sql immutable as 'select $1 * 2'")
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
                conn.execute(f"select {name}(amount) from {ORDERS}")
            assert f"{name}()" in str(info.value)
            # a plain user-defined function is fine
            rows = conn.execute(f"select {name}_twice(amount) from {ORDERS} order by 1 "
                                "limit 3").fetchall()
            assert rows == [(2,), (4,), (4,)]
            # grouped by the key, the aggregate runs within each shard: exact
            rows = conn.execute(f"select tenant_id, {name}(amount) from {ORDERS} "
                                "group by tenant_id order by 1").fetchall()
            assert rows == [(t, sum(r[2] for r in ROWS if r[1] == t)) for t in (1, 2, 3)]
            # Inside a transaction the refusal comes once the shards were asked; the
            # transaction is aborted as after any error.
            with conn.transaction():
                assert conn.execute(f"select count(*) from {ORDERS} where tenant_id = 1"
                                    ).fetchone() is not None
                with pytest.raises(psycopg.errors.FeatureNotSupported):
                    conn.execute(f"select {name}(amount) from {ORDERS}")
                with pytest.raises(psycopg.errors.InFailedSqlTransaction):
                    conn.execute(f"select count(*) from {ORDERS}")
                raise psycopg.Rollback()
            assert conn.execute(f"select count(*) from {ORDERS}").fetchone() == (30,)
    finally:
        for cluster in shards:
            on_shard(cluster, f"drop aggregate if exists {name}(int)")
            on_shard(cluster, f"drop function if exists {name}_twice(int)")
