"""Real clients through the proxy: psql, pgbench, psycopg 3 and asyncpg.

Every statement goes to the default shard s1 for now, so each test asserts what a user of
that client would check (rows, command tags, SQLSTATEs, what another connection sees) and,
where it matters, what landed on shard1 through a direct connection that bypasses the proxy.
Several tests run the same thing directly against shard1 and demand the same answer.

The clusters are shared by the whole session: every table gets a unique name and is dropped
afterwards, and after every test nothing may be left `idle in transaction` on any shard.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import os
import re
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from conftest import APP_PASSWORD, DATABASE, SESSION_PASSWORD, assert_nothing_left_behind, on_shard
from psycopg import errors as pg_errors
from psycopg.types.json import Jsonb

from shardwire.testing import PostgresCluster
from shardwire.testing.proxy import ProxyProcess

UTC = dt.UTC
# More clients than the pool has server connections (pool.size is 10 in the base config).
CROWD = 16

# --- helpers -------------------------------------------------------------------------------


def unique(prefix: str) -> str:
    return f"cl_{prefix}_{uuid.uuid4().hex[:10]}"


def table_exists(cluster: PostgresCluster, name: str) -> bool:
    return on_shard(cluster, "select to_regclass(%s) is not null", [name])[0][0]


def _client_env(password: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env["PGCONNECT_TIMEOUT"] = "10"
    if password is not None:
        env["PGPASSWORD"] = password
    return env


def psql(dsn: str, *args: str, password: str | None = APP_PASSWORD, on_error_stop: bool = True,
         stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run psql against `dsn` (a URI without password) the way a user would."""
    cmd = ["psql", "-X", "-v", f"ON_ERROR_STOP={1 if on_error_stop else 0}", *args, dsn]
    result = subprocess.run(cmd, input=stdin, env=_client_env(password), capture_output=True,
                            text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"psql exited with {result.returncode}\nstdout:\n{result.stdout}\n"
                             f"stderr:\n{result.stderr}")
    return result


def proxy_uri(proxy: ProxyProcess, user: str = "app") -> str:
    return proxy.dsn(user)


def direct_uri(cluster: PostgresCluster) -> str:
    return cluster.dsn(DATABASE)


def run_threads(count: int, work: Callable[[int], Any]) -> list[Any]:
    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(work, range(count)))


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def names(shards: list[PostgresCluster]) -> Iterator[Callable[[str], str]]:
    """`names(prefix)` gives a unique table name; every such table is dropped afterwards on
    every shard (directly, so a broken proxy cannot leave them behind)."""
    made: list[str] = []

    def make(prefix: str = "t") -> str:
        name = unique(prefix)
        made.append(name)
        return name

    yield make
    if made:
        for cluster in shards:
            with psycopg.connect(cluster.dsn(DATABASE), autocommit=True) as conn:
                for name in made:
                    conn.execute(f"drop table if exists {name} cascade")


@pytest.fixture(autouse=True)
def nothing_left_behind(proxy: ProxyProcess, shards: list[PostgresCluster]) -> Iterator[None]:
    """After each test: no session idle in transaction on any shard, and the proxy still
    serves a fresh connection (TESTING idea 4)."""
    yield
    assert_nothing_left_behind(proxy, shards)


# --- psql ----------------------------------------------------------------------------------


def test_psql_create_insert_select(proxy: ProxyProcess, shards: list[PostgresCluster],
                                   names: Callable[[str], str]) -> None:
    t = names("psql")
    out = psql(proxy_uri(proxy), "-A", "-t",
               "-c", f"create table {t} (id int primary key, name text)",
               "-c", f"insert into {t} values (1, 'one'), (2, 'two'), (3, NULL)",
               "-c", f"update {t} set name = 'deux' where id = 2",
               "-c", f"select id, coalesce(name, '<null>') from {t} order by id").stdout
    assert out.splitlines() == ["CREATE TABLE", "INSERT 0 3", "UPDATE 1",
                                "1|one", "2|deux", "3|<null>"]
    assert on_shard(shards[0], f"select id, name from {t} order by id") == [
        (1, "one"), (2, "deux"), (3, None)]


def test_psql_describe_and_list_tables(proxy: ProxyProcess, shards: list[PostgresCluster],
                                       names: Callable[[str], str]) -> None:
    t = names("desc")
    psql(proxy_uri(proxy), "-c",
         f"create table {t} (id bigint primary key, name text not null default 'x', "
         f"amount numeric(10, 2), created timestamptz default now())")
    psql(proxy_uri(proxy), "-c", f"create index {t}_name on {t} (name)")
    through_proxy = psql(proxy_uri(proxy), "-c", f"\\d {t}").stdout
    direct = psql(direct_uri(shards[0]), "-c", f"\\d {t}", password=None).stdout
    assert through_proxy == direct
    for expected in ("id", "bigint", "not null", "numeric(10,2)", "timestamp with time zone",
                     f'"{t}_pkey" PRIMARY KEY, btree (id)', f'"{t}_name" btree (name)'):
        assert expected in through_proxy
    listing = psql(proxy_uri(proxy), "-c", "\\dt").stdout
    assert re.search(rf"public\s*\|\s*{t}\s*\|\s*table", listing), listing
    assert listing == psql(direct_uri(shards[0]), "-c", "\\dt", password=None).stdout


def test_psql_multiple_statements_in_one_command(
        proxy: ProxyProcess, shards: list[PostgresCluster], names: Callable[[str], str]) -> None:
    t = names("multi")
    out = psql(proxy_uri(proxy), "-A", "-t", "-c",
               f"create table {t} (x int); insert into {t} values (1); "
               f"insert into {t} values (2), (3); select count(*) from {t}").stdout
    assert out.splitlines() == ["CREATE TABLE", "INSERT 0 1", "INSERT 0 2", "3"]
    # One query string is one implicit transaction: an error undoes all of it.
    failed = psql(proxy_uri(proxy), "-A", "-t", "-c",
                  f"insert into {t} values (4); select 1/0; insert into {t} values (5)",
                  check=False)
    assert failed.returncode != 0
    assert "division by zero" in failed.stderr
    assert on_shard(shards[0], f"select array_agg(x order by x) from {t}") == [([1, 2, 3],)]
    out = psql(proxy_uri(proxy), "-A", "-t", "-c",
               f"begin; insert into {t} values (6); commit; select max(x) from {t}").stdout
    assert out.splitlines() == ["BEGIN", "INSERT 0 1", "COMMIT", "6"]


def test_psql_copy_in_and_out(proxy: ProxyProcess, shards: list[PostgresCluster],
                              names: Callable[[str], str], tmp_path: Path) -> None:
    t = names("copy")
    rows = [f"{i},name {i},{i * 1.5}" for i in range(1, 20001)]
    rows[7] = '8,"quoted, with comma",12.0'
    source = tmp_path / "in.csv"
    source.write_text("\n".join(rows) + "\n")
    bad = tmp_path / "bad.csv"
    bad.write_text("20001,ok,1\nnot-a-number,bad,2\n")
    out_file = tmp_path / "out.csv"
    script = "\n".join([
        f"create table {t} (id int primary key, name text, amount numeric);",
        f"\\copy {t} from '{source}' with (format csv)",
        f"select count(*), sum(id) from {t};",
        f"\\copy {t} to '{out_file}' with (format csv)",
        f"\\copy (select id, name from {t} where id <= 3 order by id) to stdout with (format csv)",
        f"\\copy {t} from '{bad}' with (format csv)",
        f"select count(*) from {t};",
    ]) + "\n"
    result = psql(proxy_uri(proxy), "-A", "-t", "-f", "-", stdin=script, on_error_stop=False)
    assert result.stdout.splitlines() == [
        "CREATE TABLE", "COPY 20000", "20000|200010000", "COPY 20000",
        "1,name 1", "2,name 2", "3,name 3", "20000"]
    assert 'invalid input syntax for type integer: "not-a-number"' in result.stderr
    assert sorted(out_file.read_text().splitlines(), key=lambda r: int(r.split(",")[0])) == rows
    assert on_shard(shards[0], f"select count(*), min(id), max(id) from {t}") == [
        (20000, 1, 20000)]
    assert on_shard(shards[0], f"select name from {t} where id = 8") == [
        ("quoted, with comma",)]


def test_psql_error_keeps_session_usable(proxy: ProxyProcess, shards: list[PostgresCluster],
                                         names: Callable[[str], str]) -> None:
    result = psql(proxy_uri(proxy), "-A", "-t", "-c", "select 1/0", "-c",
                  "select 'still here'", on_error_stop=False)
    assert "ERROR:  division by zero" in result.stderr
    assert result.stdout.splitlines() == ["still here"]

    t = names("err")
    script = "\n".join([
        f"create table {t} (x int primary key);",
        "select * from no_such_table_anywhere;",
        "begin;",
        f"insert into {t} values (1);",
        f"insert into {t} values (1);",
        f"insert into {t} values (2);",
        "rollback;",
        f"insert into {t} values (3);",
        "selec 1;",
        f"select array_agg(x) from {t};",
    ]) + "\n"
    result = psql(proxy_uri(proxy), "-A", "-t", "-f", "-", stdin=script, on_error_stop=False)
    assert result.stdout.splitlines() == [
        "CREATE TABLE", "BEGIN", "INSERT 0 1", "ROLLBACK", "INSERT 0 1", "{3}"]
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 4, result.stderr
    assert 'relation "no_such_table_anywhere" does not exist' in errors[0]
    assert "duplicate key value violates unique constraint" in errors[1]
    assert "current transaction is aborted" in errors[2]
    assert 'syntax error at or near "selec"' in errors[3]
    assert on_shard(shards[0], f"select array_agg(x) from {t}") == [([3],)]


def test_rows_land_on_the_default_shard_only(proxy: ProxyProcess, shards: list[PostgresCluster],
                                             names: Callable[[str], str]) -> None:
    t = names("place")
    # The same table on shard2 with a poison row: the proxy must neither read nor write it.
    on_shard(shards[1], f"create table {t} (id int primary key, v text)")
    on_shard(shards[1], f"insert into {t} values (999, 'poison')")
    with psycopg.connect(proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
        conn.execute(f"create table {t} (id int primary key, v text)")
        conn.execute(f"insert into {t} select g, 'v' || g from generate_series(1, 100) g")
        assert conn.execute(f"select count(*), max(id) from {t}").fetchone() == (100, 100)
        assert conn.execute(f"select v from {t} where id = 999").fetchall() == []
    assert on_shard(shards[0], f"select count(*), min(id), max(id) from {t}") == [(100, 1, 100)]
    assert on_shard(shards[1], f"select id, v from {t}") == [(999, "poison")]
    assert not table_exists(shards[2], t)


# --- pgbench -------------------------------------------------------------------------------

PGBENCH_TABLES = ("pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history")


def pgbench(proxy: ProxyProcess, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = ["pgbench", "-h", proxy.host, "-p", str(proxy.port), "-U", "app", *args, DATABASE]
    return subprocess.run(cmd, env=_client_env(APP_PASSWORD), capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def pgbench_tables(proxy: ProxyProcess, shards: list[PostgresCluster]) -> Iterator[str]:
    """`pgbench -i -s 1` through the proxy; yields its output. The pgbench_* names are
    fixed, and this module is their only user."""
    result = pgbench(proxy, "-i", "-s", "1")
    yield f"rc={result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    with psycopg.connect(shards[0].dsn(DATABASE), autocommit=True) as conn:
        conn.execute("drop table if exists " + ", ".join(PGBENCH_TABLES))


def test_pgbench_initialize(pgbench_tables: str, shards: list[PostgresCluster]) -> None:
    assert pgbench_tables.startswith("rc=0"), pgbench_tables
    assert "done in" in pgbench_tables
    assert on_shard(shards[0], "select (select count(*) from pgbench_accounts), "
                               "(select count(*) from pgbench_branches), "
                               "(select count(*) from pgbench_tellers), "
                               "(select count(*) from pgbench_history)") == [(100000, 1, 10, 0)]
    assert on_shard(shards[0], "select conname from pg_constraint "
                               "where conrelid = 'pgbench_accounts'::regclass") == [
        ("pgbench_accounts_pkey",)]
    assert not table_exists(shards[1], "pgbench_accounts")


@pytest.mark.parametrize("script", ["select-only", "tpcb-like"])
@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_run(proxy: ProxyProcess, shards: list[PostgresCluster], pgbench_tables: str,
                     mode: str, script: str) -> None:
    assert pgbench_tables.startswith("rc=0"), pgbench_tables
    totals = ("select (select count(*) from pgbench_history), "
              "(select coalesce(sum(delta), 0) from pgbench_history), "
              "(select sum(abalance) from pgbench_accounts), "
              "(select sum(tbalance) from pgbench_tellers), "
              "(select sum(bbalance) from pgbench_branches)")
    (history_before, delta_before, *balances_before), = on_shard(shards[0], totals)
    args = ["-n", "-T", "3", "-c", "4", "-j", "2", "-M", mode]
    if script == "select-only":
        args.append("-S")
    result = pgbench(proxy, *args)
    report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, report
    processed = int(re.search(r"number of transactions actually processed: (\d+)",
                              result.stdout).group(1))  # type: ignore[union-attr]
    failed = re.search(r"number of failed transactions: (\d+)", result.stdout)
    assert processed > 0, report
    assert failed is not None and int(failed.group(1)) == 0, report
    (history_after, delta_after, *balances_after), = on_shard(shards[0], totals)
    if script == "tpcb-like":
        assert history_after - history_before == processed
        # Each transaction added its delta to an account, a teller and a branch.
        added = delta_after - delta_before
        assert [a - b for a, b in zip(balances_after, balances_before, strict=True)] == [
            added] * 3
    else:
        assert history_after == history_before


# --- psycopg 3 -----------------------------------------------------------------------------

TYPES_QUERY = """select 42::int4 as i4, 9007199254740993::int8 as i8,
    12345678901234567890.123456789::numeric as n, 'héllo wörld ☃'::text as t, true as b,
    '\\x00ff10'::bytea as by, '2024-02-29'::date as d,
    '2024-02-29 12:34:56.789+00'::timestamptz as ts,
    'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid as u,
    '{"a": [1, 2, null], "b": "x"}'::jsonb as j, array[1, null, 3]::int4[] as ai,
    array['a', null, 'c d', '"q"']::text[] as at, null::int4 as ni, null::text as nt,
    null::jsonb as nj"""

TYPES_EXPECTED: tuple[Any, ...] = (
    42, 9007199254740993, Decimal("12345678901234567890.123456789"), "héllo wörld ☃", True,
    b"\x00\xff\x10", dt.date(2024, 2, 29), dt.datetime(2024, 2, 29, 12, 34, 56, 789000, UTC),
    uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"), {"a": [1, 2, None], "b": "x"},
    [1, None, 3], ["a", None, "c d", '"q"'], None, None, None)

TYPES_COLUMNS = ("i4 int4, i8 int8, n numeric, t text, b bool, by bytea, d date, "
                 "ts timestamptz, u uuid, j jsonb, ai int4[], at text[]")


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_psycopg_types(proxy: ProxyProcess, shards: list[PostgresCluster],
                       names: Callable[[str], str], binary: bool) -> None:
    t = names("types")
    with psycopg.connect(proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn, \
            psycopg.connect(shards[0].dsn(DATABASE), autocommit=True) as direct:
        cur = conn.cursor(binary=binary)
        row = cur.execute(TYPES_QUERY).fetchone()
        assert row == TYPES_EXPECTED
        direct_cur = direct.cursor(binary=binary)
        direct_cur.execute(TYPES_QUERY)
        assert [(d.name, d.type_code) for d in cur.description or []] == [
            (d.name, d.type_code) for d in direct_cur.description or []]
        # The same values as parameters, in the same format, and back.
        conn.execute(f"create table {t} (id int, {TYPES_COLUMNS})")
        ph = "%b" if binary else "%t"
        values = list(TYPES_EXPECTED[:12])
        values[9] = Jsonb(values[9])
        cur.execute(f"insert into {t} values (1, {', '.join([ph] * 12)})", values)
        cur.execute(f"insert into {t} (id) values (2)")
        rows = cur.execute(f"select * from {t} order by id").fetchall()
        assert rows == [(1, *TYPES_EXPECTED[:12]), (2, *([None] * 12))]
    assert on_shard(shards[0], f"select count(*) from {t}") == [(2,)]


def test_psycopg_prepared_statements_shared_by_many_clients(
        proxy: ProxyProcess, names: Callable[[str], str]) -> None:
    t = names("prep")
    dsn = proxy.dsn("app", APP_PASSWORD)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"create table {t} (id int primary key, v text)")
        conn.execute(f"insert into {t} select g, 'v' || g from generate_series(1, 100) g")
    start = threading.Barrier(CROWD)

    def client(n: int) -> set[int]:
        pids: set[int] = set()
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as conn:
            start.wait()
            for i in range(1, 31):
                row = conn.execute("select %s::int + 1, pg_backend_pid()", [i]).fetchone()
                assert row is not None and row[0] == i + 1
                pids.add(row[1])
                # A statement text that only this client uses.
                assert conn.execute(f"select %s::text || '-{n}'", [str(i)]).fetchone() == (
                    f"{i}-{n}",)
                assert conn.execute(f"select v from {t} where id = %s", [i],
                                    prepare=True).fetchone() == (f"v{i}",)
                with conn.transaction():
                    assert conn.execute(f"select count(*) from {t} where id <= %s",
                                        [i]).fetchone() == (i,)
        return pids

    seen = run_threads(CROWD, client)
    all_pids = set().union(*seen)
    # The clients really took turns on server connections, and no more than pool.size.
    assert any(len(pids) > 1 for pids in seen)
    assert len(all_pids) <= 10


def test_psycopg_pipeline_with_an_error_in_the_middle(
        proxy: ProxyProcess, shards: list[PostgresCluster], names: Callable[[str], str]) -> None:

    def scenario(dsn: str, t: str) -> list[Any]:
        outcome: list[Any] = []
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"create table {t} (x int primary key)")
            with conn.pipeline() as p:
                conn.execute(f"insert into {t} values (1)")
                first = conn.execute(f"insert into {t} values (2) returning x")
                p.sync()
                try:
                    # psycopg raises the error as soon as it has read it: at any of these.
                    conn.execute(f"insert into {t} values (3)")
                    conn.execute("select 1/0")
                    conn.execute(f"insert into {t} values (4)")
                    p.sync()
                except psycopg.Error as e:
                    outcome.append(e.sqlstate)
                try:
                    p.sync()  # out of the aborted state, wherever the error was raised
                except pg_errors.PipelineAborted:
                    pass  # statements queued after the error, skipped by the server
                after = conn.execute(f"insert into {t} values (5) returning x")
                conn.execute(f"insert into {t} values (6)")
                count = conn.execute(f"select count(*) from {t}")
            outcome += [first.fetchone(), after.fetchone(), count.fetchone()]
            outcome.append(conn.execute(f"select array_agg(x order by x) from {t}").fetchone())
        return outcome

    expected = ["22012", (2,), (5,), (4,), ([1, 2, 5, 6],)]
    for _ in range(5):
        t = names("pipe")
        assert scenario(proxy.dsn("app", APP_PASSWORD), t) == expected
        assert on_shard(shards[0], f"select array_agg(x order by x) from {t}") == [
            ([1, 2, 5, 6],)]
        # PostgreSQL itself, directly.
        assert scenario(shards[0].dsn(DATABASE), names("pipe")) == expected


def test_psycopg_transactions_commit_and_rollback(
        proxy: ProxyProcess, shards: list[PostgresCluster], names: Callable[[str], str]) -> None:
    t = names("tx")
    dsn = proxy.dsn("app", APP_PASSWORD)
    with psycopg.connect(dsn) as a, psycopg.connect(dsn, autocommit=True) as b:
        a.execute(f"create table {t} (x int primary key)")
        a.commit()

        def seen_by_b() -> list[int]:
            return [r[0] for r in b.execute(f"select x from {t} order by x")]

        a.execute(f"insert into {t} values (1)")
        assert seen_by_b() == []
        assert a.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        a.commit()
        assert seen_by_b() == [1]
        a.execute(f"insert into {t} values (2)")
        assert a.execute(f"select count(*) from {t}").fetchone() == (2,)
        a.rollback()
        assert seen_by_b() == [1]
        with a.transaction():
            a.execute(f"insert into {t} values (3)")
            with pytest.raises(pg_errors.UniqueViolation):
                with a.transaction():  # a savepoint
                    a.execute(f"insert into {t} values (4)")
                    a.execute(f"insert into {t} values (1)")
            a.execute(f"insert into {t} values (5)")
            assert seen_by_b() == [1]
        assert seen_by_b() == [1, 3, 5]
        # A row lock held by a's open transaction blocks b until a commits.
        a.execute(f"update {t} set x = 30 where x = 3")
        b.execute("set lock_timeout = '200ms'")
        with pytest.raises(pg_errors.LockNotAvailable):
            b.execute(f"update {t} set x = 31 where x = 3")
        a.commit()
        assert seen_by_b() == [1, 5, 30]
    assert on_shard(shards[0], f"select array_agg(x order by x) from {t}") == [([1, 5, 30],)]


def test_psycopg_error_then_connection_still_works(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
        for sql, sqlstate in [("select 1/0", "22012"),
                              ("select * from no_such_table_anywhere", "42P01"),
                              ("selec 1", "42601"),
                              ("select 'abc'::int", "22P02")]:
            with pytest.raises(psycopg.Error) as info:
                conn.execute(sql)
            assert info.value.sqlstate == sqlstate
            assert conn.execute("select 41 + 1").fetchone() == (42,)
        # A server-side prepared statement that fails at one execution and works at the next.
        for divisor, expected in [(0, None), (2, 5), (0, None), (5, 2)]:
            if expected is None:
                with pytest.raises(pg_errors.DivisionByZero):
                    conn.execute("select 10 / %s::int", [divisor], prepare=True)
            else:
                assert conn.execute("select 10 / %s::int", [divisor],
                                    prepare=True).fetchone() == (expected,)
    with psycopg.connect(proxy.dsn("app", APP_PASSWORD)) as conn:
        with pytest.raises(pg_errors.DivisionByZero):
            conn.execute("select 1/0")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(pg_errors.InFailedSqlTransaction):
            conn.execute("select 1")
        conn.rollback()
        assert conn.execute("select 2").fetchone() == (2,)


def test_psycopg_notices_reach_the_client(proxy: ProxyProcess) -> None:
    got: list[tuple[str | None, str | None, str | None]] = []
    with psycopg.connect(proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
        conn.add_notice_handler(
            lambda d: got.append((d.severity_nonlocalized, d.sqlstate, d.message_primary)))
        conn.execute("DO $$ BEGIN RAISE NOTICE 'hello %', 42; "
                     "RAISE WARNING 'careful' USING ERRCODE = '01000'; END $$")
        with conn.transaction():
            conn.execute("DO $$ BEGIN RAISE NOTICE 'inside a transaction'; END $$")
        assert conn.execute("select 'after'").fetchone() == ("after",)
    assert got == [("NOTICE", "00000", "hello 42"), ("WARNING", "01000", "careful"),
                   ("NOTICE", "00000", "inside a transaction")]


def test_psycopg_executemany(proxy: ProxyProcess, shards: list[PostgresCluster],
                             names: Callable[[str], str]) -> None:
    t = names("many")
    with psycopg.connect(proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
        conn.execute(f"create table {t} (id int primary key, name text)")
        cur = conn.cursor()
        cur.executemany(f"insert into {t} values (%s, %s)", [(i, f"n{i}") for i in range(500)])
        cur.executemany(f"insert into {t} values (%s, %s) returning id * 10",
                        [(i, None) for i in range(500, 505)], returning=True)
        returned = []
        while True:
            returned.append(cur.fetchone())
            if not cur.nextset():
                break
        assert returned == [(5000,), (5010,), (5020,), (5030,), (5040,)]
        # A duplicate in the middle of a batch inside a transaction: nothing of it stays.
        with pytest.raises(pg_errors.UniqueViolation):
            with conn.transaction():
                cur.executemany(f"insert into {t} values (%s, %s)",
                                [(1000, "a"), (1001, "b"), (3, "dup"), (1002, "c")])
        assert conn.execute(f"select count(*), count(name) from {t}").fetchone() == (505, 500)
    assert on_shard(shards[0], f"select count(*), sum(id) from {t}") == [
        (505, sum(range(505)))]


def _deallocate_everything(client: psycopg.Connection[Any], statement: str) -> None:
    """Make `client` (not in autocommit) end up sending `statement`; for "rollback", psycopg
    follows the ROLLBACK with DEALLOCATE ALL because it has prepared statements."""
    if statement == "rollback":
        client.rollback()
    else:
        client.commit()
        client.autocommit = True
        client.execute(statement)
        client.autocommit = False


@pytest.mark.parametrize("statement", ["rollback", "deallocate all", "discard all"])
def test_deallocate_all_keeps_session_settings(make_proxy: Callable[..., ProxyProcess],
                                               statement: str) -> None:
    """DEALLOCATE ALL frees prepared statements and nothing else; DISCARD ALL also resets the
    settings (to those of the startup packet)."""
    # A proxy of its own, so that server connections this test may break reach no other test.
    own = make_proxy()
    probe = "select current_setting('application_name'), current_setting('TimeZone')"
    with psycopg.connect(own.dsn("app", APP_PASSWORD), autocommit=True) as fresh:
        defaults = fresh.execute(probe).fetchone()
    with psycopg.connect(own.dsn("app", APP_PASSWORD), prepare_threshold=0) as client:
        client.execute("set application_name = 'keeps_me'")
        client.execute("set time zone 'Asia/Kathmandu'")
        client.commit()
        assert client.execute("select %s::int * 3", [1]).fetchone() == (3,)
        _deallocate_everything(client, statement)
        expected = defaults if statement == "discard all" else ("keeps_me", "Asia/Kathmandu")
        assert client.execute(probe).fetchone() == expected
        client.rollback()


@pytest.mark.parametrize("statement", ["rollback", "deallocate all", "discard all"])
def test_deallocate_all_leaves_other_clients_statements_working(
        make_proxy: Callable[..., ProxyProcess], statement: str) -> None:
    """One client's DEALLOCATE ALL (or DISCARD ALL) on a server connection that other clients'
    prepared statements live on must not break theirs, nor its own next ones."""
    own = make_proxy()
    dsn = own.dsn("app", APP_PASSWORD)
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as other, \
            psycopg.connect(dsn, prepare_threshold=0) as client:
        assert other.execute("select %s::int * 2", [21]).fetchone() == (42,)
        assert client.execute("select %s::int * 3", [1]).fetchone() == (3,)
        _deallocate_everything(client, statement)
        for i in range(3):
            assert other.execute("select %s::int * 2", [i]).fetchone() == (2 * i,)
            assert client.execute("select %s::int * 3", [i]).fetchone() == (3 * i,)
            client.commit()
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as fresh:
            for i in range(3):
                assert fresh.execute("select %s::int * 2", [i]).fetchone() == (2 * i,)
                assert fresh.execute("select %s::int * 3", [i]).fetchone() == (3 * i,)


# --- asyncpg -------------------------------------------------------------------------------


def test_asyncpg_prepared_statements(proxy: ProxyProcess) -> None:
    dsn = proxy.dsn("app", APP_PASSWORD)

    async def main() -> None:
        a = await asyncpg.connect(dsn)
        b = await asyncpg.connect(dsn)
        try:
            sa = await a.prepare("select $1::int * 2 as doubled, $2::text || '!' as shout")
            assert [attr.name for attr in sa.get_attributes()] == ["doubled", "shout"]
            assert [p.name for p in sa.get_parameters()] == ["int4", "text"]
            # b prepares the same text, and its own statement under what asyncpg will name
            # the same way on b as a's next one.
            sb = await b.prepare("select $1::int * 2 as doubled, $2::text || '!' as shout")
            sb2 = await b.prepare("select $1::int - 1")
            sa2 = await a.prepare("select $1::text || '?'")
            for i in range(40):
                assert tuple(await sa.fetchrow(i, "a")) == (2 * i, "a!")
                assert tuple(await sb.fetchrow(i, "b")) == (2 * i, "b!")
                assert await sb2.fetchval(i) == i - 1
                assert await sa2.fetchval(str(i)) == f"{i}?"
                assert await a.fetchval("select $1::int + 100", i) == i + 100
            with pytest.raises(asyncpg.DivisionByZeroError):
                await a.fetchval("select 1 / $1::int", 0)
            assert await a.fetchval("select 1 / $1::int", 1) == 1
            assert await sa.fetchval(5, "x") == 10
            rows = await sa.fetch(3, "y")
            assert [tuple(r) for r in rows] == [(6, "y!")]
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_asyncpg_binary_types(proxy: ProxyProcess, shards: list[PostgresCluster],
                              names: Callable[[str], str]) -> None:
    t = names("atypes")
    dsn = proxy.dsn("app", APP_PASSWORD)

    async def main() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads,
                                      schema="pg_catalog")
            row = await conn.fetchrow(TYPES_QUERY)
            assert row is not None
            got = list(row)
            got[8] = uuid.UUID(str(got[8]))
            assert tuple(got) == TYPES_EXPECTED
            await conn.execute(f"create table {t} (id int, {TYPES_COLUMNS})")
            placeholders = ", ".join(f"${i}" for i in range(2, 14))
            await conn.execute(f"insert into {t} values ($1, {placeholders})", 1,
                               *TYPES_EXPECTED[:12])
            await conn.execute(f"insert into {t} (id) values (2)")
            rows = await conn.fetch(f"select * from {t} order by id")
            back = [list(r) for r in rows]
            back[0][9] = uuid.UUID(str(back[0][9]))
            assert back == [[1, *TYPES_EXPECTED[:12]], [2, *([None] * 12)]]
        finally:
            await conn.close()

    asyncio.run(main())
    assert on_shard(shards[0], f"select id, j from {t} order by id") == [
        (1, {"a": [1, 2, None], "b": "x"}), (2, None)]


def test_asyncpg_copy(proxy: ProxyProcess, shards: list[PostgresCluster],
                      names: Callable[[str], str]) -> None:
    src, dst = names("acopy"), names("acopy")
    dsn = proxy.dsn("app", APP_PASSWORD)
    records = [(i, f"name {i}", Decimal(i) / 4) for i in range(1, 20001)]

    async def main() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f"create table {src} (id int primary key, name text, "
                               f"amount numeric)")
            await conn.execute(f"create table {dst} (id int primary key, name text, "
                               f"amount numeric)")
            status = await conn.copy_records_to_table(src, records=records,
                                                      columns=["id", "name", "amount"])
            assert status == "COPY 20000"
            assert await conn.fetchval(f"select sum(amount) from {src}") == sum(
                r[2] for r in records)
            out = io.BytesIO()
            status = await conn.copy_from_query(
                f"select id, name, amount from {src} where id <= $1 order by id", 100,
                output=out, format="csv")
            assert status == "COPY 100"
            lines = out.getvalue().decode().splitlines()
            assert lines[:2] == ["1,name 1,0.25", "2,name 2,0.5"] and len(lines) == 100
            status = await conn.copy_to_table(dst, source=io.BytesIO(out.getvalue()),
                                              format="csv")
            assert status == "COPY 100"
            whole = io.BytesIO()
            assert await conn.copy_from_table(src, output=whole) == "COPY 20000"
            assert len(whole.getvalue().splitlines()) == 20000
            # A COPY that fails (duplicate key) changes nothing, and the connection goes on.
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.copy_records_to_table(dst, records=[(1000, "x", 1), (1, "dup", 2)])
            assert await conn.fetchval(f"select count(*) from {dst}") == 100
        finally:
            await conn.close()

    asyncio.run(main())
    assert on_shard(shards[0], f"select count(*), sum(id) from {src}") == [
        (20000, 20000 * 20001 // 2)]
    assert on_shard(shards[0], f"select count(*), max(id) from {dst}") == [(100, 100)]


def test_asyncpg_transactions(proxy: ProxyProcess, shards: list[PostgresCluster],
                              names: Callable[[str], str]) -> None:
    t = names("atx")
    dsn = proxy.dsn("app", APP_PASSWORD)

    async def main() -> None:
        a = await asyncpg.connect(dsn)
        b = await asyncpg.connect(dsn)

        async def seen_by_b() -> list[int]:
            return [r[0] for r in await b.fetch(f"select x from {t} order by x")]

        try:
            await a.execute(f"create table {t} (x int primary key)")
            async with a.transaction():
                await a.execute(f"insert into {t} values (1)")
                assert await seen_by_b() == []
            assert await seen_by_b() == [1]
            with pytest.raises(RuntimeError):
                async with a.transaction():
                    await a.execute(f"insert into {t} values (2)")
                    raise RuntimeError("give up")
            assert await seen_by_b() == [1]
            async with a.transaction():
                await a.execute(f"insert into {t} values (3)")
                with pytest.raises(asyncpg.UniqueViolationError):
                    async with a.transaction():  # savepoint
                        await a.execute(f"insert into {t} values (4)")
                        await a.execute(f"insert into {t} values (1)")
                await a.execute(f"insert into {t} values (5)")
            assert await seen_by_b() == [1, 3, 5]
            async with a.transaction(isolation="repeatable_read", readonly=True):
                before = await a.fetchval(f"select count(*) from {t}")
                await b.execute(f"insert into {t} values (6)")
                assert await a.fetchval(f"select count(*) from {t}") == before
                with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                    await a.execute(f"insert into {t} values (7)")
            assert await a.fetchval(f"select count(*) from {t}") == 4
            assert not a.is_in_transaction()
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())
    assert on_shard(shards[0], f"select array_agg(x order by x) from {t}") == [([1, 3, 5, 6],)]


def test_asyncpg_fetch_many_rows(proxy: ProxyProcess) -> None:
    dsn = proxy.dsn("app", APP_PASSWORD)

    async def main() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                "select g, md5(g::text) as h from generate_series(1, 50000) g")
            assert len(rows) == 50000
            assert [r["g"] for r in rows] == list(range(1, 50001))
            assert rows[-1]["h"] == "1017bfd4673955ffee4641ad3d481b1c"  # md5('50000')
            # Single values larger than any socket read.
            big = await conn.fetchval("select repeat('x', 5000000)")
            assert big == "x" * 5000000
            blob = await conn.fetchval("select decode(repeat('00ff', 1000000), 'hex')")
            assert blob == b"\x00\xff" * 1000000
            assert await conn.fetchval("select 1") == 1
        finally:
            await conn.close()

    asyncio.run(main())


def test_asyncpg_cursor_in_a_transaction(proxy: ProxyProcess) -> None:
    dsn = proxy.dsn("app", APP_PASSWORD)

    async def main() -> None:
        conn = await asyncpg.connect(dsn)
        others = [await asyncpg.connect(dsn) for _ in range(3)]
        try:
            async with conn.transaction():
                got = []
                async for record in conn.cursor(
                        "select g from generate_series(1, 5000) g", prefetch=100):
                    got.append(record["g"])
                    if record["g"] % 1000 == 0:
                        # Other clients keep the pool busy while the portal is suspended.
                        assert await asyncio.gather(
                            *(o.fetchval("select $1::int", record["g"]) for o in others)
                        ) == [record["g"]] * 3
                assert got == list(range(1, 5001))
                cur = await conn.cursor("select g from generate_series(1, 1000) g")
                cur2 = await conn.cursor("select -g from generate_series(1, 1000) g")
                assert [r[0] for r in await cur.fetch(10)] == list(range(1, 11))
                assert [r[0] for r in await cur2.fetch(3)] == [-1, -2, -3]
                assert await conn.fetchval("select 'between'") == "between"
                assert await cur.forward(100) == 100
                assert (await cur.fetchrow())[0] == 111
                assert [r[0] for r in await cur2.fetch(2)] == [-4, -5]
        finally:
            await conn.close()
            for o in others:
                await o.close()

    asyncio.run(main())


def test_asyncpg_many_concurrent_prepared_queries(proxy: ProxyProcess) -> None:
    dsn = proxy.dsn("app", APP_PASSWORD)

    async def client(n: int, start: asyncio.Event) -> set[int]:
        conn = await asyncpg.connect(dsn)
        pids: set[int] = set()
        try:
            await start.wait()
            # asyncpg names statements per connection (__asyncpg_stmt_1__...), so the same
            # client-side name means a different statement on every connection.
            own = await conn.prepare(f"select $1::int + {n}")
            shared = await conn.prepare("select $1::int * 3, pg_backend_pid()")
            for i in range(20):
                assert await own.fetchval(i) == i + n
                tripled, pid = await shared.fetchrow(i)
                assert tripled == 3 * i
                pids.add(pid)
                assert await conn.fetchval(f"select $1::text || '-{n}'", str(i)) == f"{i}-{n}"
        finally:
            await conn.close()
        return pids

    async def main() -> list[set[int]]:
        start = asyncio.Event()
        tasks = [asyncio.create_task(client(n, start)) for n in range(30)]
        await asyncio.sleep(0.5)
        start.set()
        return await asyncio.gather(*tasks)

    seen = asyncio.run(main())
    assert any(len(pids) > 1 for pids in seen)
    assert len(set().union(*seen)) <= 10


def test_asyncpg_pool_with_more_connections_than_servers(proxy: ProxyProcess) -> None:
    """asyncpg's own pool, larger than the proxy's (10): every query gets an answer. The pool
    sends its reset query (advisory unlock, CLOSE ALL, UNLISTEN *, RESET ALL) each time a
    connection goes back to it."""
    dsn = proxy.dsn("app", APP_PASSWORD)

    async def main() -> list[Any]:
        pool = await asyncpg.create_pool(dsn, min_size=2, max_size=16)
        try:
            async def work(i: int) -> int:
                return await pool.fetchval("select $1::int * 2", i)  # type: ignore[no-any-return]

            return await asyncio.gather(*(work(i) for i in range(300)), return_exceptions=True)
        finally:
            await pool.close()

    results = asyncio.run(main())
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures == []
    assert results == [2 * i for i in range(300)]


# --- session state over pooled server connections (TESTING idea 7) ----------------------


@dataclass(frozen=True)
class StateCase:
    """A client leaves session state behind with `setup`; `probe` (one value) shows it."""

    id: str
    setup: tuple[str, ...]
    probe: str
    owner_sees: Any
    others_see: Any


ROLE = "sw_clients_role"
LOCK_KEY = 7_340_117

STATE_CASES = [
    StateCase("search_path", ("set search_path to {schema}, public",),
              "select current_setting('search_path')", "{schema}, public", '"$user", public'),
    StateCase("statement_timeout", ("set statement_timeout = '4321ms'",),
              "select current_setting('statement_timeout')", "4321ms", "0"),
    StateCase("set_config", ("select set_config('search_path', '{schema}', false)",),
              "select current_setting('search_path')", "{schema}", '"$user", public'),
    StateCase("set_role", (f"set role {ROLE}",), "select current_user::text", ROLE, "postgres"),
    StateCase("create_temp_table", ("create temp table {tmp} (x int)",
                                    "insert into {tmp} values (7)"),
              "select to_regclass('pg_temp.{tmp}') is not null", True, False),
    StateCase("select_into_temp", ("select 7 as x into temp table {tmp}",),
              "select to_regclass('pg_temp.{tmp}') is not null", True, False),
    StateCase("create_table_in_pg_temp", ("create table pg_temp.{tmp} (x int)",),
              "select to_regclass('pg_temp.{tmp}') is not null", True, False),
    StateCase("sql_prepare", ("prepare {tmp} as select 42",),
              "select count(*) from pg_prepared_statements where name = '{tmp}'", 1, 0),
    StateCase("listen", ("listen {tmp}",),
              "select count(*) from pg_listening_channels() c where c = '{tmp}'", 1, 0),
    StateCase("advisory_lock", (f"select pg_advisory_lock({LOCK_KEY})",),
              "select count(*) from pg_locks where locktype = 'advisory' "
              f"and objid = {LOCK_KEY} and pid = pg_backend_pid()", 1, 0),
    StateCase("declare_with_hold", ("declare {tmp} cursor with hold for "
                                    "select generate_series(1, 10)",),
              "select count(*) from pg_cursors where name = '{tmp}'", 1, 0),
]


def probe_crowd(dsn: str, probe: str, rounds: int = 4) -> list[tuple[Any, ...]]:
    """The row of `probe` as each of CROWD clients saw it, `rounds` times each, all at once."""
    start = threading.Barrier(CROWD)

    def client(_: int) -> list[tuple[Any, ...]]:
        with psycopg.connect(dsn, autocommit=True) as conn:
            start.wait()
            return [conn.execute(probe).fetchone() or () for _ in range(rounds)]

    return [row for rows in run_threads(CROWD, client) for row in rows]


@pytest.mark.parametrize("case", STATE_CASES, ids=[c.id for c in STATE_CASES])
def test_session_state_stays_with_its_client(proxy: ProxyProcess, shards: list[PostgresCluster],
                                            case: StateCase) -> None:
    dsn = proxy.dsn("app", APP_PASSWORD)
    tmp = unique("state")
    schema = unique("schema")
    fill = {"tmp": tmp, "schema": schema}
    on_shard(shards[0], f"create schema {schema}")
    on_shard(shards[0], f"do $$ begin create role {ROLE}; "
                        f"exception when duplicate_object then null; end $$")
    probe = case.probe.format(**fill)
    owner_sees = case.owner_sees.format(**fill) if isinstance(case.owner_sees, str) \
        else case.owner_sees
    try:
        with psycopg.connect(dsn, autocommit=True) as owner:
            for statement in case.setup:
                owner.execute(statement.format(**fill))
            # The next client to need a server connection takes the one just given back.
            with psycopg.connect(dsn, autocommit=True) as next_client:
                with next_client.transaction():
                    assert next_client.execute(probe).fetchone() == (case.others_see,)
                    # Meanwhile the owner still has its state, in a new transaction.
                    assert owner.execute(probe).fetchone() == (owner_sees,)
            assert set(probe_crowd(dsn, probe)) == {(case.others_see,)}
            for _ in range(3):
                assert owner.execute(probe).fetchone() == (owner_sees,)
        # After the owner leaves, its server connection is reset before anyone else gets it.
        time.sleep(0.2)
        assert set(probe_crowd(dsn, probe)) == {(case.others_see,)}
    finally:
        on_shard(shards[0], f"drop schema {schema} cascade")


def test_notifications_reach_the_listening_client(proxy: ProxyProcess) -> None:
    dsn = proxy.dsn("app", APP_PASSWORD)
    channel = unique("chan")
    with psycopg.connect(dsn, autocommit=True) as listener, \
            psycopg.connect(dsn, autocommit=True) as bystander:
        listener.execute(f"listen {channel}")
        probe_crowd(dsn, "select 1", rounds=2)  # the pool is busy in between
        with psycopg.connect(dsn, autocommit=True) as sender:
            sender.execute("select pg_notify(%s, 'first')", [channel])
            with sender.transaction():
                sender.execute(f"notify {channel}, 'second'")
        got = [(n.channel, n.payload) for n in listener.notifies(timeout=3, stop_after=2)]
        assert got == [(channel, "first"), (channel, "second")]
        assert list(bystander.notifies(timeout=0.3, stop_after=1)) == []


def test_reported_settings_follow_their_client(proxy: ProxyProcess) -> None:
    dsn = proxy.dsn("app", APP_PASSWORD)
    app_name = unique("appname")
    probe = ("select current_setting('application_name'), current_setting('TimeZone'), "
             "'2024-01-01 00:00+00'::timestamptz::text")
    with psycopg.connect(dsn, autocommit=True) as fresh:
        baseline = fresh.execute(probe).fetchone()
        baseline_tz = fresh.info.parameter_status("TimeZone")
    assert baseline is not None and baseline[0] != app_name and baseline[1] != "Asia/Kathmandu"
    mine = (app_name, "Asia/Kathmandu", "2024-01-01 05:45:00+05:45")
    owner_pids: set[int] = set()
    # No automatic preparing: psycopg would follow the rollback below with DEALLOCATE ALL,
    # which test_statements_that_deallocate_everything covers.
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as owner:
        owner.execute(f"set application_name = '{app_name}'")
        owner.execute("set time zone 'Asia/Kathmandu'")
        assert owner.info.parameter_status("application_name") == app_name
        for _ in range(6):
            with psycopg.connect(dsn, autocommit=True) as other:
                # Someone else takes the server connection the owner just gave back...
                other.execute("begin")
                assert other.execute(probe).fetchone() == baseline
                assert other.info.parameter_status("TimeZone") == baseline_tz
                # ...so the owner gets another one, with its settings replayed.
                owner.execute("begin")
                assert owner.execute(probe).fetchone() == mine
                pid = owner.execute("select pg_backend_pid()").fetchone()
                owner_pids.add(pid[0])  # type: ignore[index]
                # Given back in this order, the owner's is next for the next `other`.
                other.execute("commit")
                owner.execute("commit")
        assert set(probe_crowd(dsn, probe, rounds=3)) == {baseline}
        # A rolled-back SET and a SET LOCAL leave the owner's own settings as they were.
        with owner.transaction(force_rollback=True):
            owner.execute("set time zone 'UTC'")
        with owner.transaction():
            owner.execute("set local time zone 'America/New_York'")
        assert owner.execute(probe).fetchone() == mine
        assert owner.info.parameter_status("TimeZone") == "Asia/Kathmandu"
        owner.execute("reset timezone")
        assert owner.execute(probe).fetchone() == (app_name, baseline[1], baseline[2])
    # Reported settings are replayed, not pinned: the owner really moved between servers.
    assert len(owner_pids) > 1


def test_startup_settings_follow_their_client(proxy: ProxyProcess) -> None:
    app_name = unique("startup")
    dsn = proxy.dsn("app", APP_PASSWORD)
    probe = ("select current_setting('application_name'), "
             "current_setting('statement_timeout'), current_setting('DateStyle')")
    with psycopg.connect(dsn, autocommit=True) as fresh:
        baseline = fresh.execute(probe).fetchone()
    with psycopg.connect(dsn, autocommit=True, application_name=app_name,
                         options="-c statement_timeout=2345 -c DateStyle=German") as owner:
        mine = (app_name, "2345ms", "German, DMY")
        assert owner.execute(probe).fetchone() == mine
        for _ in range(3):
            with psycopg.connect(dsn, autocommit=True) as other:
                with other.transaction():
                    assert other.execute(probe).fetchone() == baseline
                    assert owner.execute(probe).fetchone() == mine
        assert set(probe_crowd(dsn, probe, rounds=2)) == {baseline}
        assert owner.execute("select '2024-02-29'::date::text").fetchone() == ("29.02.2024",)


def test_disconnect_mid_transaction_leaves_nothing(
        proxy: ProxyProcess, shards: list[PostgresCluster], names: Callable[[str], str]) -> None:
    t = names("gone")
    dsn = proxy.dsn("app", APP_PASSWORD)
    with psycopg.connect(dsn, autocommit=True) as setup:
        setup.execute(f"create table {t} (id int primary key)")
    conn = psycopg.connect(dsn)
    conn.execute(f"insert into {t} values (1)")
    server_pid = conn.execute("select pg_backend_pid()").fetchone()[0]  # type: ignore[index]
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    # The client vanishes: its socket closes without a Terminate message.
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    conn.close()

    deadline = time.monotonic() + 2
    while True:
        stuck = on_shard(shards[0], "select pid, state from pg_stat_activity where "
                                    "datname = %s and state like 'idle in transaction%%'",
                         [DATABASE])
        alive = on_shard(shards[0], "select state from pg_stat_activity where pid = %s",
                         [server_pid])
        if (not stuck and not alive) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert stuck == []
    assert alive == []
    assert on_shard(shards[0], f"select count(*) from {t}") == [(0,)]
    # Nobody holds the row lock either: the same key can be inserted at once.
    with psycopg.connect(dsn, autocommit=True) as again:
        again.execute("set lock_timeout = '1s'")
        again.execute(f"insert into {t} values (1)")
        assert again.execute(f"select count(*) from {t}").fetchone() == (1,)


def test_session_pool_mode_keeps_state_until_disconnect(
        make_proxy: Callable[..., ProxyProcess], proxy: ProxyProcess) -> None:
    # One server connection only, so the next client certainly gets the same one.
    def one_connection(cfg: dict[str, Any]) -> None:
        cfg["pool"]["size"] = 1

    small = make_proxy(one_connection)
    sess_dsn = small.dsn("sess", SESSION_PASSWORD)
    tmp = unique("sesstmp")
    probe = f"select to_regclass('pg_temp.{tmp}') is not null"
    with psycopg.connect(sess_dsn) as first:
        first.execute(f"create temp table {tmp} (x int)")
        first.execute("set search_path to pg_catalog, public")
        first.execute("prepare sess_stmt as select 1")
        pid = first.execute("select pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        first.commit()
        for i in range(3):
            first.execute(f"insert into {tmp} values (%s)", [i])
            first.commit()
        assert first.execute(f"select count(*) from {tmp}").fetchone() == (3,)
        assert first.execute("select pg_backend_pid()").fetchone() == (pid,)
        first.rollback()
    with psycopg.connect(sess_dsn) as second:
        row = second.execute(
            f"{probe}, current_setting('search_path'), "
            "(select count(*) from pg_prepared_statements), pg_backend_pid()").fetchone()
        assert row == (False, '"$user", public', 0, pid)
    with psycopg.connect(small.dsn("app", APP_PASSWORD), autocommit=True) as pooled:
        assert pooled.execute(f"{probe}, pg_backend_pid()").fetchone() == (False, pid)
    # The same on the shared proxy, with other clients busy in between.
    with psycopg.connect(proxy.dsn("sess", SESSION_PASSWORD), autocommit=True) as sess:
        sess.execute(f"create temp table {tmp} (x int)")
        probe_crowd(proxy.dsn("app", APP_PASSWORD), "select 1", rounds=2)
        sess.execute(f"insert into {tmp} values (1)")
        assert sess.execute(f"select count(*) from {tmp}").fetchone() == (1,)
    with psycopg.connect(proxy.dsn("sess", SESSION_PASSWORD), autocommit=True) as sess:
        assert sess.execute(probe).fetchone() == (False,)
