"""Routing by the shard map, end to end: real clients through the proxy, rows checked on each
shard through direct connections.

One proxy serves the whole module with the shard map below; its tables are created directly
on every shard (test_ddl.py covers DDL through the proxy) under names unique to this
run, emptied before each test and dropped at the end. Most tests plant *poison rows*: rows
with the tested key on shards that do not own it (TESTING idea 2). A statement routed to the
wrong shard sees or changes them; a correct one never does.

What the map says (checked by every placement test):

- tenant rule on `tenant_id` (tenants: `id`): 1 → s1, 2 → s2, 3 → s3, 42 → s3, others → s2;
  it also governs a schema-qualified table and a quoted mixed-case table with a quoted column;
- category rule on `category`: books → s1, music → s2, games → s3, no default;
- range rule on integer `id`: [.., 100) → s1, [100, 200) → s2, gap [200, 300), [300, ..) → s3;
- range rule on timestamptz `created_at`: [.., 2026-01-01) → s1, [2026-01-01, 2026-07-01) → s2,
  [2026-07-01, ..) → s3;
- range rule on date `day`: [.., 2025-01-01) → s1, [2025-01-01, 2025-06-01) → s2, [2025-06-01, ..)
  → s3;
- hash rule on uuid `session_id` over s1, s2, s3;
- a reference table (the same rows on every shard) and an unsharded table (on s1 only).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import os
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import asyncpg
import psycopg
import pytest
from conftest import (
    APP_PASSWORD,
    DATABASE,
    PROXY_ENV,
    SESSION_PASSWORD,
    assert_nothing_left_behind,
    base_config,
    on_shard,
)
from wire import SYNC, RawClient, bind, data_rows, errors, execute, kinds, parse
from wire import close as close_message

from shardwire.testing import PostgresCluster
from shardwire.testing.proxy import ProxyProcess

UTC = dt.UTC
SHARD_NAMES = ("s1", "s2", "s3")
SUFFIX = uuid.uuid4().hex[:8]
# How long a client waits for an answer before the test calls it a hang.
CLIENT_DEADLINE = 10.0

ORDERS = f"rt_orders_{SUFFIX}"
ITEMS = f"rt_items_{SUFFIX}"
TENANTS = f"rt_tenants_{SUFFIX}"
SCHEMA = f"rt_sch_{SUFFIX}"
SCHEMA_ORDERS = f"{SCHEMA}.orders"
ACCOUNTS = f"RtAccounts_{SUFFIX}"  # created with double quotes: the name keeps its case
PRODUCTS = f"rt_products_{SUFFIX}"
EVENTS = f"rt_events_{SUFFIX}"
LOG = f"rt_log_{SUFFIX}"
VISITS = f"rt_visits_{SUFFIX}"
SESSIONS = f"rt_sessions_{SUFFIX}"
COUNTRIES = f"rt_countries_{SUFFIX}"
NOTES = f"rt_notes_{SUFFIX}"  # unsharded: on the default shard s1 only
KV = f"rt_kv_{SUFFIX}"  # tenant rule, with a primary key (ON CONFLICT)

SHARDED_TABLES = (ORDERS, ITEMS, TENANTS, SCHEMA_ORDERS, f'"{ACCOUNTS}"', PRODUCTS, EVENTS, LOG,
                  VISITS, SESSIONS, KV)

SCHEMA_SQL = f"""
create table {ORDERS} (id int, tenant_id int, amount int, country text, note text);
create table {ITEMS} (order_id int, tenant_id int, sku text, note text);
create table {TENANTS} (id int, name text, note text);
create schema {SCHEMA};
create table {SCHEMA_ORDERS} (id int, tenant_id int, note text);
create table "{ACCOUNTS}" ("TenantId" int, note text);
create table {PRODUCTS} (sku text, category text, price int, note text);
create table {EVENTS} (id bigint, note text);
create table {LOG} (created_at timestamptz, note text);
create table {VISITS} (day date, note text);
create table {SESSIONS} (session_id uuid, note text);
create table {COUNTRIES} (code text primary key, name text);
create table {KV} (tenant_id int, k int, v text, primary key (tenant_id, k));
insert into {COUNTRIES} values ('fr', 'France'), ('jp', 'Japan'), ('br', 'Brazil');
"""

SHARD_MAP: dict[str, Any] = {
    "rules": {
        "rt_by_tenant": {
            "kind": "tenant", "column": "tenant_id", "type": "integer",
            "tables": [{TENANTS: {"column": "id"}}, ORDERS, ITEMS, SCHEMA_ORDERS, KV,
                       {f'"{ACCOUNTS}"': {"column": '"TenantId"'}}],
            "tenants": {1: "s1", 2: "s2", 3: "s3", 42: "s3"},
            "default": "s2",
        },
        "rt_by_category": {
            "kind": "category", "column": "category", "type": "text", "tables": [PRODUCTS],
            "values": {"books": "s1", "music": "s2", "games": "s3"},
        },
        "rt_by_id": {
            "kind": "range", "column": "id", "type": "integer", "tables": [EVENTS],
            "ranges": [{"to": 100, "shard": "s1"},
                       {"from": 100, "to": 200, "shard": "s2"},
                       {"from": 300, "shard": "s3"}],  # [200, 300) is a gap
        },
        "rt_by_time": {
            "kind": "range", "column": "created_at", "type": "timestamptz", "tables": [LOG],
            "ranges": [{"to": "2026-01-01", "shard": "s1"},
                       {"from": "2026-01-01", "to": "2026-07-01", "shard": "s2"},
                       {"from": "2026-07-01", "shard": "s3"}],
        },
        "rt_by_day": {
            "kind": "range", "column": "day", "type": "date", "tables": [VISITS],
            "ranges": [{"to": "2025-01-01", "shard": "s1"},
                       {"from": "2025-01-01", "to": "2025-06-01", "shard": "s2"},
                       {"from": "2025-06-01", "shard": "s3"}],
        },
        "rt_by_session": {
            "kind": "hash", "column": "session_id", "type": "uuid", "tables": [SESSIONS],
            "shards": list(SHARD_NAMES),
        },
    },
    "reference": [COUNTRIES],
}


def hash_shard(text: str) -> str:
    """The shard of a hash-rule key, as docs/sharding.md defines it."""
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return SHARD_NAMES[int.from_bytes(digest, "big") % len(SHARD_NAMES)]


# Session ids with at least one on every shard (the hash is deterministic).
SESSION_IDS = [uuid.uuid5(uuid.NAMESPACE_URL, f"shardwire-routing-{i}") for i in range(12)]
assert {hash_shard(str(u)) for u in SESSION_IDS} == set(SHARD_NAMES)


# --- helpers -------------------------------------------------------------------------------


def notes_by_shard(shards: list[PostgresCluster], table: str, where: str = "true",
                   params: Sequence[Any] | None = None) -> dict[str, list[str]]:
    """The `note` of every row of `table` (matching `where`), per shard, sorted."""
    return {name: sorted(r[0] for r in on_shard(c, f"select note from {table} where {where}",
                                                params))
            for name, c in zip(SHARD_NAMES, shards, strict=True)}


def snapshot(shards: list[PostgresCluster], table: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of `table` on every shard, to show that a refused statement changed nothing."""
    return {name: sorted(on_shard(c, f"select * from {table}"), key=repr)
            for name, c in zip(SHARD_NAMES, shards, strict=True)}


def plant(shards: list[PostgresCluster], shard_names: Sequence[str], table: str, columns: str,
          values: Sequence[Any]) -> None:
    """Insert one row directly on each named shard."""
    marks = ", ".join(["%s"] * len(values))
    for name in shard_names:
        on_shard(shards[SHARD_NAMES.index(name)],
                 f"insert into {table} ({columns}) values ({marks})", values)


def assert_multi(conn: psycopg.Connection[Any], sql: str) -> None:
    """`sql` names no key: it runs on several shards (SHOW ROUTE FOR, without running it)."""
    route = conn.execute(f"show route for {sql}").fetchone()
    assert route is not None and route[0] == "multi", (sql, route)


def others(owner: str) -> list[str]:
    return [s for s in SHARD_NAMES if s != owner]


@contextlib.contextmanager
def refused(sqlstate: str, *fragments: str) -> Iterator[pytest.ExceptionInfo[psycopg.Error]]:
    """The block raises a psycopg error with this SQLSTATE whose message contains `fragments`."""
    with pytest.raises(psycopg.Error) as info:
        yield info
    assert info.value.sqlstate == sqlstate, (info.value.sqlstate, str(info.value))
    for fragment in fragments:
        assert fragment in (info.value.diag.message_primary or ""), str(info.value)


def psql(dsn: str, *args: str, stdin: str | None = None,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    """psql against the proxy, as a user runs it."""
    env = {"PGPASSWORD": APP_PASSWORD, "PGCONNECT_TIMEOUT": "10", "LC_ALL": "C",
           "PATH": "/usr/bin:/bin"}
    result = subprocess.run(["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", *args, dsn],
                            input=stdin, env=env, capture_output=True, text=True,
                            timeout=CLIENT_DEADLINE)
    if check and result.returncode != 0:
        raise AssertionError(f"psql exited with {result.returncode}\n{result.stdout}\n"
                             f"{result.stderr}")
    return result


def run(coro: Any, deadline: float = CLIENT_DEADLINE) -> Any:
    return asyncio.run(asyncio.wait_for(coro, deadline))


async def close(conn: asyncpg.Connection) -> None:
    try:
        await asyncio.wait_for(conn.close(), 3)
    except (Exception, asyncio.CancelledError):
        conn.terminate()


# psycopg connections of the running test; `cut_clients` ends a wait that would never end.
_clients: list[psycopg.Connection[Any]] = []


def connect(dsn: str, **kwargs: Any) -> psycopg.Connection[Any]:
    conn = psycopg.connect(dsn, connect_timeout=10, **kwargs)
    _clients.append(conn)
    return conn


def cut_clients() -> None:
    """Shut the sockets of the test's psycopg connections: a client blocked on a proxy that
    never answers gets an error, and the test fails instead of hanging the run."""
    for conn in _clients:
        try:
            fd = conn.pgconn.socket
        except psycopg.Error:
            continue  # already closed
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def routing_proxy(shards: list[PostgresCluster],
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """A proxy with the module's shard map, its tables on every shard (dropped afterwards)."""
    try:
        for cluster in shards:
            cluster.sql(SCHEMA_SQL, dbname=DATABASE)
        shards[0].sql(f"create table {NOTES} (id int, tenant_id int, note text)",
                      dbname=DATABASE)
        cfg = base_config(shards)
        cfg["sharding"] = SHARD_MAP
        proc = ProxyProcess(cfg, tmp_path_factory.mktemp("routing"), env=PROXY_ENV)
        proc.start()
        try:
            # Every shard answers through the proxy before the tests start. (Reaching each
            # shard once also leaves a server connection in its pool: the tests below are
            # about routing; what the first statement on a cold pool does is
            # test_first_extended_statement_on_a_fresh_proxy's job.)
            with psycopg.connect(proc.dsn("app", APP_PASSWORD), autocommit=True,
                                 connect_timeout=10) as conn:
                for name in SHARD_NAMES:
                    assert conn.execute(f"/* shard: {name} */ select 1").fetchone() == (1,)
            yield proc
        finally:
            proc.stop()
    finally:
        tables = ", ".join([*SHARDED_TABLES, COUNTRIES, NOTES])
        for cluster in shards:
            on_shard(cluster, f"drop table if exists {tables} cascade")
            on_shard(cluster, f"drop schema if exists {SCHEMA} cascade")


@pytest.fixture
def dsn(routing_proxy: ProxyProcess) -> str:
    return routing_proxy.dsn("app", APP_PASSWORD)


@pytest.fixture
def uri(routing_proxy: ProxyProcess) -> str:
    """The proxy's address without password, for psql (PGPASSWORD carries it)."""
    return routing_proxy.dsn("app")


@pytest.fixture(autouse=True)
def hang_guard() -> Iterator[None]:
    """A test whose client waits longer than CLIENT_DEADLINE has its sockets cut (and fails)."""
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        cut_clients()

    timer = threading.Timer(CLIENT_DEADLINE, fire)
    timer.start()
    yield
    timer.cancel()
    _clients.clear()
    assert not fired.is_set(), (
        f"a client waited more than {CLIENT_DEADLINE} s for the proxy's answer: it hung")


@pytest.fixture(autouse=True)
def empty_tables_and_nothing_left_behind(routing_proxy: ProxyProcess,
                                         shards: list[PostgresCluster]) -> Iterator[None]:
    """Before each test: every sharded table empty on every shard. After it (TESTING idea 4):
    no session idle in transaction on any shard, and the proxy serves a fresh connection."""
    for cluster in shards:
        on_shard(cluster, f"truncate {', '.join(SHARDED_TABLES)}")
    on_shard(shards[0], f"truncate {NOTES}")
    yield
    assert_nothing_left_behind(routing_proxy, shards)


# --- placement -----------------------------------------------------------------------------


def test_tenant_rows_land_on_the_mapped_shard(dsn: str, uri: str,
                                              shards: list[PostgresCluster]) -> None:
    with connect(dsn, autocommit=True) as conn:
        for tenant in (1, 2, 3, 7, 42):
            conn.execute(f"insert into {ORDERS} (id, tenant_id, note) "
                         f"values ({tenant * 10}, {tenant}, 'o{tenant}')")  # simple protocol
        # A multi-row INSERT whose rows are all on one shard (2 and 99 → s2) runs there.
        cur = conn.execute(f"insert into {ORDERS} (id, tenant_id, note) values "
                           f"(20, 2, 'o2b'), (990, 99, 'o99')")
        assert cur.rowcount == 2
        for tenant in (1, 3):
            conn.execute(f"insert into {TENANTS} (id, name, note) values (%s, %s, %s)",
                         [tenant, f"tenant {tenant}", f"t{tenant}"])
    out = psql(uri, "-c", f"insert into {TENANTS} (id, name, note) values (2, 'two', 't2')")
    assert out.stdout.strip() == "INSERT 0 1"

    assert notes_by_shard(shards, ORDERS) == {
        "s1": ["o1"], "s2": ["o2", "o2b", "o7", "o99"], "s3": ["o3", "o42"]}
    assert notes_by_shard(shards, TENANTS) == {"s1": ["t1"], "s2": ["t2"], "s3": ["t3"]}


def test_category_rows_land_on_the_mapped_shard(dsn: str, shards: list[PostgresCluster]) -> None:
    with connect(dsn, autocommit=True) as conn:
        for sku, category in (("b1", "books"), ("m1", "music"), ("g1", "games")):
            conn.execute(f"insert into {PRODUCTS} (sku, category, note) values (%s, %s, %s)",
                         [sku, category, sku])
        conn.execute(f"insert into {PRODUCTS} (sku, category, note) "
                     f"values ('b2', 'books', 'b2')")
        # No default: a category that is not listed, or NULL, has no shard.
        with refused("23514"):
            conn.execute(f"insert into {PRODUCTS} (sku, category, note) "
                         f"values ('t1', 'toys', 't1')")
        with refused("23514"):
            conn.execute(f"insert into {PRODUCTS} (sku, category, note) values (%s, %s, %s)",
                         ["t2", "toys", "t2"])
        with refused("23514"):
            conn.execute(f"insert into {PRODUCTS} (sku, category, note) "
                         f"values ('n1', NULL, 'n1')")
        # Reading an unlisted category finds nothing; the connection is fine after refusals.
        assert conn.execute(f"select sku from {PRODUCTS} where category = 'toys'"
                            ).fetchall() == []
        assert conn.execute(f"select sku from {PRODUCTS} where category = %s order by sku",
                            ["books"]).fetchall() == [("b1",), ("b2",)]
    assert notes_by_shard(shards, PRODUCTS) == {"s1": ["b1", "b2"], "s2": ["m1"], "s3": ["g1"]}


def test_integer_range_boundaries_and_gap(dsn: str, shards: list[PostgresCluster]) -> None:
    # Poison rows on both sides of every boundary: each key planted on the shards that do
    # not own it.
    for key, owner in ((99, "s1"), (100, "s2"), (199, "s2"), (300, "s3")):
        plant(shards, others(owner), EVENTS, "id, note", [key, f"poison {key}"])
    with connect(dsn, autocommit=True) as conn:
        for key in (-5, 0, 99, 100, 199, 300, 10**12):
            conn.execute(f"insert into {EVENTS} (id, note) values ({key}, 'e{key}')")
        # A key in the gap [200, 300) has no shard.
        for key in (200, 250, 299):
            with refused("23514"):
                conn.execute(f"insert into {EVENTS} (id, note) values ({key}, 'gap')")
            with refused("23514"):
                conn.execute(f"insert into {EVENTS} (id, note) values (%s, 'gap')", [key])
        assert conn.execute(f"select note from {EVENTS} where id = 250").fetchall() == []
        assert conn.execute(f"select note from {EVENTS} where id = %s", [200]).fetchall() == []

        def notes(where: str, params: Sequence[Any] | None = None) -> list[str]:
            return sorted(r[0] for r in conn.execute(
                f"select note from {EVENTS} where {where}", params).fetchall())

        # Lower bound inclusive, upper bound exclusive.
        assert notes("id = 99") == ["e99"]
        assert notes("id = 100") == ["e100"]
        assert notes("id = %s", [199]) == ["e199"]
        assert notes("id = 300") == ["e300"]
        # Predicates inside one range run on its shard alone.
        assert notes("id < 100") == ["e-5", "e0", "e99"]
        assert notes("id >= 100 and id < 200") == ["e100", "e199"]
        assert notes("id between 100 and 199") == ["e100", "e199"]
        assert notes("id >= 300") == ["e1000000000000", "e300"]
        # [150, 250] meets s2 and the gap, which holds nothing: s2 alone.
        assert notes("id between 150 and 250") == ["e199"]
        # Across a boundary: the two shards whose ranges meet the condition, and no other.
        for where in ("id between 50 and 150", "id <= 100", "id >= 99 and id < 101"):
            route = conn.execute(f"show route for select note from {EVENTS} where {where}"
                                 ).fetchone()
            assert route is not None and route[:2] == ("multi", "s1, s2"), (where, route)
        assert conn.execute("select 1").fetchone() == (1,)

    assert notes_by_shard(shards, EVENTS) == {
        "s1": ["e-5", "e0", "e99", "poison 100", "poison 199", "poison 300"],
        "s2": ["e100", "e199", "poison 300", "poison 99"],
        "s3": ["e1000000000000", "e300", "poison 100", "poison 199", "poison 99"],
    }


def test_gap_key_reads_and_changes_no_rows(dsn: str, shards: list[PostgresCluster]) -> None:
    """docs/sharding.md: a key in a gap maps to no shard; a read of it returns no rows and a
    write changes none (it runs on the rule's first shard, where, the map being right, no row
    has such a key). Rows placed against the map are not looked for: see docs/routing.md."""
    plant(shards, ["s2"], EVENTS, "id, note", [250, "misplaced 250"])
    with connect(dsn, autocommit=True) as conn:
        assert conn.execute(f"select note from {EVENTS} where id = 250").fetchall() == []
        assert conn.execute(f"select note from {EVENTS} where id = %s", [250]).fetchall() == []
        assert conn.execute(f"update {EVENTS} set note = 'changed' where id = 250").rowcount == 0
        assert conn.execute(f"delete from {EVENTS} where id = %s", [250]).rowcount == 0
    assert notes_by_shard(shards, EVENTS) == {"s1": [], "s2": ["misplaced 250"], "s3": []}


def test_timestamptz_range_boundaries(dsn: str, shards: list[PostgresCluster]) -> None:
    rows = [  # (literal, the same instant as a Python value, owner)
        ("2025-12-31 23:59:59.999999+00", dt.datetime(2025, 12, 31, 23, 59, 59, 999999, UTC),
         "s1"),
        ("2026-01-01 00:00:00+00", dt.datetime(2026, 1, 1, tzinfo=UTC), "s2"),
        # 01:00 at +02 is 23:00 UTC the day before: still s1.
        ("2026-01-01 01:00:00+02", dt.datetime(2025, 12, 31, 23, tzinfo=UTC), "s1"),
        ("2026-06-30 23:59:59+00", dt.datetime(2026, 6, 30, 23, 59, 59, tzinfo=UTC), "s2"),
        ("2026-07-01 00:00:00+00", dt.datetime(2026, 7, 1, tzinfo=UTC), "s3"),
        ("2026-07-01 01:00:00+02", dt.datetime(2026, 6, 30, 23, tzinfo=UTC), "s2"),
    ]
    for i, (_, value, owner) in enumerate(rows):
        plant(shards, others(owner), LOG, "created_at, note", [value, f"poison {i}"])
    with connect(dsn, autocommit=True) as conn:
        for i, (literal, value, _) in enumerate(rows):
            if i % 2:
                conn.execute(f"insert into {LOG} (created_at, note) values ('{literal}', 'r{i}')")
            else:
                conn.execute(f"insert into {LOG} (created_at, note) values (%s, %s)",
                             [value, f"r{i}"])
        for i, (literal, value, _) in enumerate(rows):
            assert conn.execute(f"select note from {LOG} where created_at = '{literal}'"
                                ).fetchall() == [(f"r{i}",)]
            assert conn.execute(f"select note from {LOG} where created_at = %s",
                                [value]).fetchall() == [(f"r{i}",)]
        # A literal without an offset is in the session's TimeZone, as PostgreSQL reads it.
        conn.execute("set timezone = 'Asia/Tokyo'")
        conn.execute(f"insert into {LOG} (created_at, note) "
                     f"values ('2026-01-01 08:30:00', 'tokyo 23:30Z')")  # 2025-12-31 23:30 UTC
        conn.execute(f"insert into {LOG} (created_at, note) "
                     f"values ('2026-01-01 09:30:00', 'tokyo 00:30Z')")  # 2026-01-01 00:30 UTC
        assert conn.execute(f"select note from {LOG} where created_at = '2026-01-01 08:30:00'"
                            ).fetchall() == [("tokyo 23:30Z",)]

    def real(name: str) -> list[str]:
        return sorted(f"r{i}" for i, row in enumerate(rows) if row[2] == name)

    placed = notes_by_shard(shards, LOG, "note not like 'poison%%'")
    assert placed == {"s1": [*real("s1"), "tokyo 23:30Z"], "s2": [*real("s2"), "tokyo 00:30Z"],
                      "s3": real("s3")}


def test_hash_rows_land_on_the_shard_of_their_hash(dsn: str,
                                                   shards: list[PostgresCluster]) -> None:
    with connect(dsn, autocommit=True) as conn:
        for i, sid in enumerate(SESSION_IDS):
            if i % 3 == 0:
                conn.execute(f"insert into {SESSIONS} (session_id, note) values ('{sid}', '{sid}')")
            elif i % 3 == 1:
                conn.execute(f"insert into {SESSIONS} (session_id, note) values (%s, %s)",
                             [sid, str(sid)])
            else:
                conn.execute(f"insert into {SESSIONS} (session_id, note) values (%b, %b)",
                             [sid, str(sid)], binary=True)
        # An upper-case literal is the same uuid.
        probe = SESSION_IDS[0]
        assert conn.execute(f"select note from {SESSIONS} where session_id = "
                            f"'{str(probe).upper()}'").fetchall() == [(str(probe),)]
    assert notes_by_shard(shards, SESSIONS) == {
        name: sorted(str(u) for u in SESSION_IDS if hash_shard(str(u)) == name)
        for name in SHARD_NAMES}


# --- poison rows: statements by key see and change only the owner's rows -----------------


@dataclass(frozen=True)
class KeyCase:
    table: str
    column: str
    literal: str  # the key as an SQL literal
    value: Any  # the key as a Python value
    owner: str


KEY_CASES = {
    "tenant-listed": KeyCase(ORDERS, "tenant_id", "3", 3, "s3"),
    "tenant-default": KeyCase(ORDERS, "tenant_id", "7", 7, "s2"),
    "tenant-own-column": KeyCase(TENANTS, "id", "1", 1, "s1"),
    "category": KeyCase(PRODUCTS, "category", "'music'", "music", "s2"),
    "range-lower-bound": KeyCase(EVENTS, "id", "100", 100, "s2"),
    "range-below-bound": KeyCase(EVENTS, "id", "99", 99, "s1"),
    "range-bigint": KeyCase(EVENTS, "id", "5000000000", 5_000_000_000, "s3"),
    "range-timestamptz": KeyCase(LOG, "created_at", "'2026-07-01 00:00:00+00'",
                                 dt.datetime(2026, 7, 1, tzinfo=UTC), "s3"),
    "range-date": KeyCase(VISITS, "day", "'2025-06-01'", dt.date(2025, 6, 1), "s3"),
    "hash-uuid": KeyCase(SESSIONS, "session_id", f"'{SESSION_IDS[1]}'", SESSION_IDS[1],
                         hash_shard(str(SESSION_IDS[1]))),
}


@pytest.mark.parametrize("protocol", ["simple", "extended", "binary"])
@pytest.mark.parametrize("case", list(KEY_CASES.values()), ids=list(KEY_CASES))
def test_statements_by_key_never_touch_poison_rows(dsn: str, shards: list[PostgresCluster],
                                                   case: KeyCase, protocol: str) -> None:
    plant(shards, others(case.owner), case.table, f"{case.column}, note", [case.value, "poison"])

    with connect(dsn, autocommit=True) as conn:
        def execute(sql: str) -> psycopg.Cursor[Any]:
            if protocol == "simple":
                return conn.execute(sql.replace("{k}", case.literal))
            if protocol == "extended":
                return conn.execute(sql.replace("{k}", "%s"), [case.value])
            return conn.execute(sql.replace("{k}", "%b"), [case.value], binary=True)

        key = f"{case.column} = {{k}}"
        execute(f"insert into {case.table} ({case.column}, note) values ({{k}}, 'real a')")
        execute(f"insert into {case.table} ({case.column}, note) values ({{k}}, 'real b')")
        assert notes_by_shard(shards, case.table) == {
            s: ["real a", "real b"] if s == case.owner else ["poison"] for s in SHARD_NAMES}

        assert execute(f"select note from {case.table} where {key} order by note"
                       ).fetchall() == [("real a",), ("real b",)]
        assert execute(f"select count(*) from {case.table} where {key}").fetchone() == (2,)
        assert execute(f"update {case.table} set note = note || ' updated' where {key}"
                       ).rowcount == 2
        assert execute(f"select note from {case.table} where {key} and note like 'real%%' "
                       "order by note").fetchall() == [("real a updated",), ("real b updated",)]
        assert execute(f"delete from {case.table} where {key}").rowcount == 2
        assert execute(f"select note from {case.table} where {key}").fetchall() == []

    assert notes_by_shard(shards, case.table) == {
        s: [] if s == case.owner else ["poison"] for s in SHARD_NAMES}


# --- joins ---------------------------------------------------------------------------------


def _orders_and_items(conn: psycopg.Connection[Any], shards: list[PostgresCluster]) -> None:
    """Orders and items of tenants 1 (s1) and 3 (s3) through the proxy; poison copies of
    tenant 3's rows on s1 and s2, of tenant 1's on s2 and s3."""
    for tenant, country in ((1, "fr"), (3, "jp")):
        for n in (1, 2):
            oid = tenant * 100 + n
            conn.execute(f"insert into {ORDERS} (id, tenant_id, amount, country, note) "
                         f"values (%s, %s, %s, %s, %s)", [oid, tenant, n * 10, country, "real"])
            conn.execute(f"insert into {ITEMS} (order_id, tenant_id, sku, note) "
                         f"values ({oid}, {tenant}, 'sku-{oid}', 'real')")
        owner = "s1" if tenant == 1 else "s3"
        plant(shards, others(owner), ORDERS, "id, tenant_id, amount, country, note",
              [tenant * 100 + 1, tenant, 999, "br", "poison"])
        plant(shards, others(owner), ITEMS, "order_id, tenant_id, sku, note",
              [tenant * 100 + 1, tenant, "poison-sku", "poison"])


def test_join_on_the_key_of_colocated_tables(dsn: str, shards: list[PostgresCluster]) -> None:
    with connect(dsn, autocommit=True) as conn:
        _orders_and_items(conn, shards)
        join = (f"select o.id, i.sku from {ORDERS} o join {ITEMS} i "
                f"on i.tenant_id = o.tenant_id and i.order_id = o.id ")
        assert conn.execute(join + "where o.tenant_id = 3 order by 1").fetchall() == [
            (301, "sku-301"), (302, "sku-302")]
        assert conn.execute(join + "where o.tenant_id = %s order by 1", [1]).fetchall() == [
            (101, "sku-101"), (102, "sku-102")]
        assert conn.execute(join + "where i.tenant_id = %b order by 1", [3],
                            binary=True).fetchall() == [(301, "sku-301"), (302, "sku-302")]
        # USING and a subquery on the key stay on one shard too.
        assert conn.execute(
            f"select count(*) from {ORDERS} o join {ITEMS} i using (tenant_id) "
            "where tenant_id = 1").fetchone() == (4,)
        assert conn.execute(
            f"select id from {ORDERS} where tenant_id = 3 and id in "
            f"(select order_id from {ITEMS} where tenant_id = 3 and sku = 'sku-302')"
        ).fetchall() == [(302,)]
        # Both tables restricted to keys of one shard: that shard holds all their rows.
        assert conn.execute(
            f"select o.id, i.sku from {ORDERS} o join {ITEMS} i on i.order_id = o.id "
            "where o.tenant_id = 1 and i.tenant_id = 1 order by 1").fetchall() == [
            (101, "sku-101"), (102, "sku-102")]


def test_join_with_a_reference_table(dsn: str, shards: list[PostgresCluster]) -> None:
    with connect(dsn, autocommit=True) as conn:
        _orders_and_items(conn, shards)
        sql = (f"select o.id, c.name from {ORDERS} o join {COUNTRIES} c on c.code = o.country "
               "where o.tenant_id = %s order by 1")
        assert conn.execute(sql, [3]).fetchall() == [(301, "Japan"), (302, "Japan")]
        assert conn.execute(sql, [1]).fetchall() == [(101, "France"), (102, "France")]
        assert conn.execute(f"select name from {COUNTRIES} where code = 'br'"
                            ).fetchall() == [("Brazil",)]
    # The reference table is still identical on every shard.
    copies = [on_shard(c, f"select * from {COUNTRIES} order by code") for c in shards]
    assert copies[0] == copies[1] == copies[2] == [("br", "Brazil"), ("fr", "France"),
                                                   ("jp", "Japan")]


def test_join_not_on_the_key_is_refused(dsn: str, shards: list[PostgresCluster]) -> None:
    with connect(dsn, autocommit=True) as conn:
        _orders_and_items(conn, shards)
        for sql in (
            f"select o.id, i.sku from {ORDERS} o join {ITEMS} i on i.order_id = o.id "
            "where o.tenant_id = 1",
            f"select o.id, i.sku from {ORDERS} o join {ITEMS} i on i.order_id = o.id "
            "where o.tenant_id = 1 and i.tenant_id = 3",
            f"select o.id from {ORDERS} o, {ITEMS} i where o.tenant_id = 3",
        ):
            with refused("0A000") as info:
                conn.execute(sql)
            assert "tenant_id" in (info.value.diag.message_hint or ""), str(info.value)
        assert conn.execute(f"select count(*) from {ORDERS} where tenant_id = 3"
                            ).fetchone() == (2,)


def test_tables_of_two_rules_are_refused(dsn: str) -> None:
    with connect(dsn, autocommit=True) as conn:
        with refused("0A000", "two sharding rules") as info:
            # Both keys map to s1, but the tables are not co-located by any rule.
            conn.execute(f"select o.id from {ORDERS} o join {PRODUCTS} p on p.sku = o.note "
                         "where o.tenant_id = 1 and p.category = 'books'")
        assert info.value.diag.message_hint
        with refused("0A000", "two sharding rules"):
            conn.execute(f"select id from {EVENTS} where id = 1 and exists "
                         f"(select 1 from {ORDERS} where tenant_id = 1)")
        assert conn.execute("select 1").fetchone() == (1,)


# --- statements without a key, writes across shards ----------------------------------------


def test_reads_without_a_key_run_on_every_shard_of_their_rule(
        dsn: str, uri: str, shards: list[PostgresCluster]) -> None:
    """The rows of every shard, merged (tests/oracle checks merging at scale)."""
    for tenant, shard in ((1, "s1"), (2, "s2"), (3, "s3")):
        plant(shards, [shard], ORDERS, "id, tenant_id, amount, note",
              [tenant, tenant, tenant * 10, f"t{tenant}"])
    with connect(dsn, autocommit=True) as conn:
        assert conn.execute(f"select note from {ORDERS} order by note").fetchall() == [
            ("t1",), ("t2",), ("t3",)]
        assert conn.execute(f"select count(*), sum(amount) from {ORDERS} where amount > %s",
                            [10]).fetchone() == (2, 50)
        assert conn.execute(f"select note from {ORDERS} where tenant_id = 1 or amount = 30 "
                            "order by 1").fetchall() == [("t1",), ("t3",)]
        with conn.cursor() as cur:
            assert cur.execute(f"select note from {ORDERS} where amount = %s", [20],
                               prepare=True).fetchall() == [("t2",)]

    async def with_asyncpg() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval(f"select max(amount) from {ORDERS} where amount > $1",
                                       0) == 30
        finally:
            await close(conn)

    run(with_asyncpg())
    assert psql(uri, "-c", f"select note from {ORDERS} order by 1 desc limit 2"
                ).stdout.split() == ["t3", "t2"]


def test_writes_across_shards(dsn: str, shards: list[PostgresCluster]) -> None:
    """UPDATE and DELETE without one key run on every shard the map allows, as one distributed
    transaction (test_transactions.py checks atomicity); a key change that moves rows is
    refused and changes nothing."""
    for tenant, owner in ((1, "s1"), (2, "s2"), (3, "s3")):
        plant(shards, [owner], ORDERS, "id, tenant_id, amount, note", [tenant, tenant, 10, "x"])
    before = snapshot(shards, ORDERS)
    with connect(dsn, autocommit=True) as conn:
        # An UPDATE that would move rows to another shard by changing their key.
        with refused("0A000"):
            conn.execute(f"update {ORDERS} set tenant_id = 3 where tenant_id = 1")
        with refused("0A000"):
            conn.execute(f"update {ORDERS} set tenant_id = %s where tenant_id = %s", [2, 3])
        # Inserts the proxy cannot place, inside one statement: nothing lands anywhere.
        with refused("23514"):
            conn.execute(f"insert into {EVENTS} (id, note) values (1, 'a'), (250, 'gap')")
        assert snapshot(shards, ORDERS) == before
        assert conn.execute(f"update {ORDERS} set amount = 0 where tenant_id in (1, 3)"
                            ).rowcount == 2
        assert conn.execute(f"update {ORDERS} set amount = %s where amount = 10",
                            [5]).rowcount == 1
        assert conn.execute(f"delete from {ORDERS} where tenant_id = 1 or tenant_id = 2"
                            ).rowcount == 2
    assert {s: [r[2] for r in rows] for s, rows in snapshot(shards, ORDERS).items()} == {
        "s1": [], "s2": [], "s3": [0]}
    assert notes_by_shard(shards, EVENTS) == {s: [] for s in SHARD_NAMES}


# --- a multi-row INSERT split by shard -------------------------------------------------------


def test_multi_row_insert_is_split_by_shard(dsn: str, shards: list[PostgresCluster]) -> None:
    """Each row lands on its key's shard; RETURNING comes back in the VALUES order and the
    tag counts every row, as from one server; text that looks like SQL inside strings,
    comments and dollar quotes does not confuse the split."""
    with connect(dsn, autocommit=True) as conn:
        cur = conn.execute(
            f"insert into {ORDERS} (id, tenant_id, note) values (11, 1, 'a, (b)'), "
            f"/* ), (9, 9 */ (13, 3, E'it\\'s ), (x'), (12, 1, $q$ $1 ) $q$), (21, 2, 'd') "
            "returning id, note")
        assert cur.rowcount == 4
        assert cur.fetchall() == [(11, "a, (b)"), (13, "it's ), (x"), (12, " $1 ) "),
                                  (21, "d")]
        # Parameters: each shard gets its rows' parameters, renumbered; the ones after VALUES
        # (here in RETURNING) go to every shard.
        cur = conn.execute(
            f"insert into {ORDERS} (note, tenant_id, id) values (%s, %s, %s), ('lit', %s, %s), "
            "(%s, %s, %s) returning id, note || %s",
            ["p1", 2, 22, 3, 23, "p3", 42, 24, "!"])
        assert cur.fetchall() == [(22, "p1!"), (23, "lit!"), (24, "p3!")]
    assert notes_by_shard(shards, ORDERS) == {
        "s1": [" $1 ) ", "a, (b)"], "s2": ["d", "p1"], "s3": ["it's ), (x", "lit", "p3"]}


def test_multi_row_insert_from_prepared_statements(dsn: str,
                                                   shards: list[PostgresCluster]) -> None:
    """A prepared multi-row INSERT is split anew at each execution, by its parameters."""
    sql = f"insert into {ORDERS} (id, tenant_id, note) values ($1, $2, $3), ($4, $5, $3)"

    async def main() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            statement = await conn.prepare(sql + " returning tenant_id")
            assert [r[0] for r in await statement.fetch(1, 1, "a", 2, 3)] == [1, 3]
            assert [r[0] for r in await statement.fetch(3, 2, "b", 4, 2)] == [2, 2]
            await statement.fetch(5, 1, "c", 6, 2)
            await statement.fetch(7, 3, "d", 8, 42)
        finally:
            await close(conn)

    run(main())
    with connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(f"insert into {ORDERS} (id, tenant_id, note) values (%s, %s, %s), "
                    "(%s, %s, %s)", [9, 1, "e", 10, 3, "e"], prepare=True)
        assert cur.rowcount == 2
    assert notes_by_shard(shards, ORDERS) == {
        "s1": ["a", "c", "e"], "s2": ["b", "b", "c"], "s3": ["a", "d", "d", "e"]}


def test_a_pipeline_across_shards_is_one_transaction(dsn: str,
                                                    shards: list[PostgresCluster]) -> None:
    """Statements between two Syncs are one implicit transaction: when they need several
    shards, each runs on its own shard and they commit together at the Sync; an error in any
    of them (on the first shard or a later one) undoes them all, as on one server."""
    sql = f"insert into {ORDERS} (id, tenant_id, note) values ($1, $2, $3)"
    kv = f"insert into {KV} (tenant_id, k, v) values ($1, $2, $3)"
    plant(shards, ["s3"], KV, "tenant_id, k, v", [3, 1, "taken"])
    plant(shards, ["s1"], KV, "tenant_id, k, v", [1, 1, "taken"])

    async def main() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.executemany(sql, [(1, 1, "a"), (2, 1, "a"), (3, 3, "a"), (4, 2, "a"),
                                         (5, 1, "a")])
            # The duplicate is on the third shard the pipeline reaches: nothing stays.
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.executemany(kv, [(1, 2, "lost"), (2, 2, "lost"), (3, 1, "lost")])
            # ... and on the first shard, before the pipeline moves on: nothing stays either.
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.executemany(kv, [(1, 1, "lost"), (2, 3, "lost"), (3, 3, "lost")])
            assert await conn.fetchval("select 1") == 1
            # Inside a transaction block the pipeline's statements are the block's.
            async with conn.transaction():
                await conn.executemany(sql, [(6, 2, "b"), (7, 3, "b")])
                assert await conn.fetchval(
                    f"select count(*) from {ORDERS} where note = 'b'") == 2
        finally:
            await close(conn)

    run(main())
    with connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany(sql.replace("$1", "%s").replace("$2", "%s").replace("$3", "%s"),
                        [(8, 3, "c"), (9, 1, "c")])
        with refused("23505"), conn.pipeline():
            cur.execute(kv.replace("$1", "%s").replace("$2", "%s").replace("$3", "%s"),
                        [2, 5, "lost"])
            cur.execute(kv.replace("$1", "%s").replace("$2", "%s").replace("$3", "%s"),
                        [3, 1, "lost"])
        assert conn.execute("select 1").fetchone() == (1,)
    assert notes_by_shard(shards, ORDERS) == {
        "s1": ["a", "a", "a", "c"], "s2": ["a", "b"], "s3": ["a", "b", "c"]}
    assert {name: on_shard(c, f"select tenant_id, k, v from {KV} order by 1, 2")
            for name, c in zip(SHARD_NAMES, shards, strict=True)} == {
        "s1": [(1, 1, "taken")], "s2": [], "s3": [(3, 1, "taken")]}


def test_a_pipeline_across_shards_with_its_own_begin_is_refused(
        dsn: str, shards: list[PostgresCluster]) -> None:
    """A pipeline that opens its own transaction block part-way and then needs another shard
    is refused with 0A000 (where its transaction starts is the client's), and nothing of it
    stays."""
    sql = f"insert into {ORDERS} (id, tenant_id, note) values (%s, %s, 'p')"
    with connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        with refused("0A000", "needs shard s3"), conn.pipeline():
            cur.execute(sql, [1, 1])
            cur.execute("begin")
            cur.execute(sql, [2, 3])
        conn.execute("rollback")
        assert conn.execute("select 1").fetchone() == (1,)
    assert notes_by_shard(shards, ORDERS) == {"s1": [], "s2": [], "s3": []}


def test_a_pipeline_hop_while_earlier_replies_are_due_is_refused(
        routing_proxy: ProxyProcess, shards: list[PostgresCluster]) -> None:
    """Two pipelines in one write: the second reaches another shard while the replies to the
    first's Sync are still on their way, so whether the first ended a transaction block is
    not known yet. The hop is refused with 0A000 and the second pipeline leaves nothing; the
    first, committed by its own Sync, stays; the connection goes on."""
    ins = f"insert into {ORDERS} (id, tenant_id, note) values ($1, $2, 'q')"
    raw = RawClient(routing_proxy.host, routing_proxy.port)
    try:
        raw.login("app", APP_PASSWORD, DATABASE)
        raw.send(parse("ins", ins, [23, 23]), bind("", "ins", [b"1", b"1"]), execute(), SYNC,
                 bind("", "ins", [b"2", b"1"]), execute(),  # s1, as the first pipeline
                 bind("", "ins", [b"3", b"3"]), execute(), SYNC)  # s3: the hop
        replies = raw.read_syncs(2)
        assert kinds(replies) == "12CZ" + "2CEZ"
        (error,) = errors(replies)
        assert error["C"] == "0A000" and "needs shard s3" in error["M"]
        assert "earlier Syncs are still due" in error["M"] and error["H"]
        raw.send(bind("", "ins", [b"4", b"3"]), execute(), SYNC)
        assert kinds(raw.read_until_ready()) == "2CZ"
    finally:
        raw.sock.close()
    assert notes_by_shard(shards, ORDERS) == {"s1": ["q"], "s2": [], "s3": ["q"]}
    assert on_shard(shards[0], f"select id from {ORDERS}") == [(1,)]


def test_a_query_string_across_shards_is_one_transaction(
        dsn: str, uri: str, shards: list[PostgresCluster]) -> None:
    """Statements of one simple Query for different shards run each on its own shard, in
    order, and commit together; an error in any of them undoes them all, as on one server."""
    out = psql(uri, "-c", f"insert into {ORDERS} (id, tenant_id, note) values (1, 1, 'a'); "
               f"insert into {ORDERS} (id, tenant_id, note) values (2, 3, 'b'), (3, 2, 'c'); "
               f"select note from {ORDERS} where tenant_id = 3").stdout
    assert out.split() == ["INSERT", "0", "1", "INSERT", "0", "2", "b"]
    script = (f"BEGIN; UPDATE {ORDERS} SET amount = 7 WHERE tenant_id = 1; "
              f"UPDATE {ORDERS} SET amount = 8 WHERE tenant_id IN (2, 3); COMMIT;")

    async def main() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(script)  # no arguments: the simple protocol
            with pytest.raises(asyncpg.DivisionByZeroError):
                await conn.execute(
                    f"update {ORDERS} set note = 'lost' where tenant_id = 1; "
                    f"update {ORDERS} set note = 'lost' where tenant_id = 2; "
                    f"select 1 / (amount - 8) from {ORDERS} where tenant_id = 3")
            assert await conn.fetchval("select 1") == 1
            await conn.execute("begin")
            with pytest.raises(asyncpg.FeatureNotSupportedError):
                await conn.execute(f"update {ORDERS} set note = 'no' where tenant_id = 1; "
                                   f"update {ORDERS} set note = 'no' where tenant_id = 2")
            await conn.execute("rollback")
        finally:
            await close(conn)

    run(main())
    assert {name: on_shard(c, f"select id, amount, note from {ORDERS} order by id")
            for name, c in zip(SHARD_NAMES, shards, strict=True)} == {
        "s1": [(1, 7, "a")], "s2": [(3, 8, "c")], "s3": [(2, 8, "b")]}
    tags = psql(uri, stdin=f"{script}\n", check=True).stdout.split()
    assert tags == ["BEGIN", "UPDATE", "1", "UPDATE", "2", "COMMIT"], tags


def test_reads_across_shards_inside_a_transaction(
        dsn: str, shards: list[PostgresCluster]) -> None:
    """A read without a key inside a transaction block runs, merged, on the transaction's
    own connections: it sees the transaction's uncommitted rows on every shard, and an error
    or a refusal in it aborts the transaction as on one server."""
    plant(shards, ["s2"], ORDERS, "id, tenant_id, amount, note", [1, 2, 5, "old"])
    with connect(dsn) as conn:  # not autocommit: psycopg sends BEGIN
        conn.execute(f"insert into {ORDERS} (id, tenant_id, amount, note) "
                     "values (2, 1, 10, 'a'), (3, 3, 20, 'b')")
        assert conn.execute(f"select note, amount from {ORDERS} order by amount desc"
                            ).fetchall() == [("b", 20), ("a", 10), ("old", 5)]
        assert conn.execute(f"select count(*), sum(amount) from {ORDERS} where amount > %s",
                            [6]).fetchone() == (2, 30)
        # A shard first reached by the read joins the transaction: tenant 2's shard now.
        conn.execute(f"update {ORDERS} set amount = 6 where tenant_id = 2")
        assert conn.execute(f"select sum(amount) from {ORDERS}").fetchone() == (36,)
        conn.rollback()
        assert conn.execute(f"select note from {ORDERS} order by 1").fetchall() == [("old",)]
        conn.rollback()
        # An error on one shard aborts the whole transaction.
        conn.execute(f"insert into {ORDERS} (id, tenant_id, amount, note) "
                     "values (4, 3, 0, 'zero')")
        with refused("22012"):
            conn.execute(f"select 100 / amount from {ORDERS}")
        for sql in (f"select note from {ORDERS} where tenant_id = 1",
                    f"select note from {ORDERS} where tenant_id = 3", f"select * from {ORDERS}"):
            with refused("25P02"):
                conn.execute(sql)
        conn.rollback()
        # So does a read the merge refuses.
        conn.execute(f"select note from {ORDERS} where tenant_id = 1")
        with refused("0A000"):
            conn.execute(f"select note, row_number() over () from {ORDERS}")
        with refused("25P02"):
            conn.execute(f"select note from {ORDERS} where tenant_id = 1")
        conn.rollback()

    async def with_asyncpg() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            async with conn.transaction(isolation="repeatable_read"):
                assert await conn.fetchval(f"select count(*) from {ORDERS}") == 1
                # Another client's commit after the snapshots were taken stays unseen.
                other = await asyncpg.connect(dsn)
                try:
                    await other.execute(f"insert into {ORDERS} (id, tenant_id, note) "
                                        "values (9, 1, 'later'), (10, 3, 'later')")
                finally:
                    await close(other)
                assert await conn.fetchval(f"select count(*) from {ORDERS} where id > $1",
                                           0) == 1
            assert await conn.fetchval(f"select count(*) from {ORDERS}") == 3
        finally:
            await close(conn)

    run(with_asyncpg())
    assert notes_by_shard(shards, ORDERS) == {"s1": ["later"], "s2": ["old"], "s3": ["later"]}


def test_multi_row_insert_is_all_or_nothing(dsn: str, shards: list[PostgresCluster]) -> None:
    """A row failing on one shard undoes the rows of the others; inside a transaction block
    the split rows are the transaction's, on every shard, until it ends."""
    with connect(dsn, autocommit=True) as conn:
        with refused("22012"):
            conn.execute(f"insert into {ORDERS} (id, tenant_id, amount, note) values "
                         "(1, 1, 5, 'a'), (2, 3, 1 / 0, 'b'), (3, 2, 5, 'c')")
        assert notes_by_shard(shards, ORDERS) == {s: [] for s in SHARD_NAMES}
        with conn.transaction():
            conn.execute(f"insert into {KV} (tenant_id, k, v) values (1, 1, 'a'), (3, 1, 'b')")
            assert on_shard(shards[0], f"select count(*) from {KV}") == [(0,)]  # not yet
            conn.execute(f"insert into {KV} (tenant_id, k, v) values (%s, 1, 'x'), "
                         "(2, 1, 'c'), (%s, 2, 'd') on conflict (tenant_id, k) "
                         "do update set v = excluded.v || %s", [3, 1, "!"])
        with conn.transaction():
            conn.execute(f"insert into {KV} (tenant_id, k, v) values (1, 9, 'gone'), "
                         "(2, 9, 'gone')")
            raise psycopg.Rollback()
        # A conflict skipped on one shard: the tag counts the rows inserted.
        cur = conn.execute(f"insert into {KV} (tenant_id, k, v) values (1, 1, 'no'), "
                           "(2, 5, 'yes'), (3, 5, 'yes') on conflict do nothing returning k")
        assert cur.rowcount == 2 and sorted(cur.fetchall()) == [(5,), (5,)]
    assert {name: on_shard(c, f"select tenant_id, k, v from {KV} order by 1, 2")
            for name, c in zip(SHARD_NAMES, shards, strict=True)} == {
        "s1": [(1, 1, "a"), (1, 2, "d")],
        "s2": [(2, 1, "c"), (2, 5, "yes")],
        "s3": [(3, 1, "x!"), (3, 5, "yes")]}


def test_multi_row_insert_that_cannot_be_placed_is_refused(
        dsn: str, shards: list[PostgresCluster]) -> None:
    with connect(dsn, autocommit=True) as conn:
        # One row in the range rule's gap: nothing lands anywhere.
        with refused("23514"):
            conn.execute(f"insert into {EVENTS} (id, note) values (1, 'a'), (250, 'gap')")
        # A key computed by an expression: the proxy cannot tell the row's shard.
        with refused("0A000"):
            conn.execute(f"insert into {ORDERS} (id, tenant_id, note) values "
                         "(1, 1, 'a'), (2, 1 + 2, 'b')")
        assert conn.execute("select 1").fetchone() == (1,)
    assert notes_by_shard(shards, ORDERS) == {s: [] for s in SHARD_NAMES}
    assert notes_by_shard(shards, EVENTS) == {s: [] for s in SHARD_NAMES}


def test_update_of_the_key_within_its_shard(dsn: str, shards: list[PostgresCluster]) -> None:
    plant(shards, ["s3"], ORDERS, "id, tenant_id, note", [1, 3, "x"])
    with connect(dsn, autocommit=True) as conn:
        # 3 and 42 are both on s3: the row stays where its new key maps.
        assert conn.execute(f"update {ORDERS} set tenant_id = 42 where tenant_id = 3"
                            ).rowcount == 1
        assert conn.execute(f"select note from {ORDERS} where tenant_id = 42"
                            ).fetchall() == [("x",)]
    assert on_shard(shards[2], f"select tenant_id from {ORDERS}") == [(42,)]


# --- the extended protocol -----------------------------------------------------------------

# Keys of every type asyncpg and psycopg bind, with their owners.
TYPED_CASES: dict[str, tuple[str, str, list[tuple[Any, str]]]] = {
    "int": (ORDERS, "tenant_id", [(1, "s1"), (2, "s2"), (3, "s3"), (7, "s2"), (42, "s3")]),
    "bigint": (EVENTS, "id", [(5, "s1"), (150, "s2"), (5_000_000_000, "s3"), (100, "s2"),
                              (-(2**40), "s1")]),
    "text": (PRODUCTS, "category", [("books", "s1"), ("music", "s2"), ("games", "s3")]),
    "uuid": (SESSIONS, "session_id", [(u, hash_shard(str(u))) for u in SESSION_IDS[:6]]),
    "date": (VISITS, "day", [(dt.date(2024, 12, 31), "s1"), (dt.date(2025, 1, 1), "s2"),
                             (dt.date(2025, 5, 31), "s2"), (dt.date(2025, 6, 1), "s3")]),
    "timestamptz": (LOG, "created_at", [
        (dt.datetime(2025, 12, 31, 23, 59, 59, tzinfo=UTC), "s1"),
        (dt.datetime(2026, 1, 1, tzinfo=UTC), "s2"),
        (dt.datetime(2026, 7, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=2))), "s2"),
        (dt.datetime(2026, 7, 1, tzinfo=UTC), "s3")]),
}


def _expected_placement(keys: list[tuple[Any, str]]) -> dict[str, list[str]]:
    return {s: sorted(f"real {i}" for i, (_, owner) in enumerate(keys) if owner == s)
            for s in SHARD_NAMES}


def _plant_poison_for(shards: list[PostgresCluster], table: str, column: str,
                      keys: list[tuple[Any, str]]) -> None:
    for i, (value, owner) in enumerate(keys):
        plant(shards, others(owner), table, f"{column}, note", [value, f"poison {i}"])


@pytest.mark.parametrize("binary", [False, True], ids=["text-params", "binary-params"])
@pytest.mark.parametrize("kind", list(TYPED_CASES))
def test_psycopg_prepared_statement_routes_each_execution(
        dsn: str, shards: list[PostgresCluster], kind: str, binary: bool) -> None:
    table, column, keys = TYPED_CASES[kind]
    mark = "%b" if binary else "%s"
    with connect(dsn, autocommit=True) as conn, conn.cursor(binary=binary) as cur:
        for i, (value, _) in enumerate(keys):
            cur.execute(f"insert into {table} ({column}, note) values ({mark}, {mark})",
                        [value, f"real {i}"], prepare=True)
        assert notes_by_shard(shards, table) == _expected_placement(keys)
        _plant_poison_for(shards, table, column, keys)
        # The same prepared statement, executed with keys of different shards, twice over.
        for i, (value, _) in [*enumerate(keys), *reversed(list(enumerate(keys)))]:
            cur.execute(f"select note from {table} where {column} = {mark}", [value],
                        prepare=True)
            assert cur.fetchall() == [(f"real {i}",)], (value, i)
    assert {s: [n for n in notes if n.startswith("real")]
            for s, notes in notes_by_shard(shards, table).items()} == _expected_placement(keys)


def test_asyncpg_prepared_statements_route_each_execution(
        dsn: str, shards: list[PostgresCluster]) -> None:
    async def main() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            for table, column, keys in TYPED_CASES.values():
                insert = f"insert into {table} ({column}, note) values ($1, $2)"
                for i, (value, _) in enumerate(keys):
                    await conn.execute(insert, value, f"real {i}")  # one cached statement
                assert notes_by_shard(shards, table) == _expected_placement(keys), table
                _plant_poison_for(shards, table, column, keys)
                stmt = await conn.prepare(f"select note from {table} where {column} = $1")
                for i, (value, _) in [*enumerate(keys), *reversed(list(enumerate(keys)))]:
                    assert [r[0] for r in await stmt.fetch(value)] == [f"real {i}"], (
                        table, value)
                    assert [tuple(r) for r in await conn.fetch(
                        f"select note from {table} where {column} = $1 and note like 'real%'",
                        value)] == [(f"real {i}",)], (table, value)
        finally:
            await close(conn)

    run(main())


def test_a_statement_made_again_under_its_name_routes_by_its_new_text(
        routing_proxy: ProxyProcess, shards: list[PostgresCluster]) -> None:
    """The proxy remembers the lane of the statement a client bound last (routing.md,
    Speed): Binds of it that look alike are routed at once. A statement closed and made
    again under the same name is routed by its new text, never by the old one's lane."""
    for shard, key in (("s1", 50), ("s2", 150), ("s3", 350)):
        plant(shards, [shard], EVENTS, "id, note", [key, f"event {key}"])
    plant(shards, ["s1", "s3"], EVENTS, "id, note", [150, "poison"])
    for shard, tenant in (("s1", 1), ("s2", 2), ("s3", 3)):
        plant(shards, [shard], ORDERS, "id, tenant_id, note", [150, tenant, f"order {shard}"])
    raw = RawClient(routing_proxy.host, routing_proxy.port)
    try:
        raw.login("app", APP_PASSWORD, DATABASE)
        raw.send(parse("st", f"select note from {EVENTS} where id = $1", [20]), SYNC)
        assert kinds(raw.read_until_ready()) == "1Z"
        for key in (150, 50, 150, 350, 150):  # the same layout each time, keys of all shards
            raw.send(bind("", "st", [str(key).encode()]), execute(), SYNC)
            assert data_rows(raw.read_until_ready()) == [(f"event {key}",)]
        # The same name, another text of the same layout: `id` is not the orders' key, so
        # the read runs on every shard.
        raw.send(close_message("S", "st"), SYNC)
        assert kinds(raw.read_until_ready()) == "3Z"
        raw.send(parse("st", f"select note from {ORDERS} where id = $1 order by note", [20]),
                 SYNC)
        assert kinds(raw.read_until_ready()) == "1Z"
        raw.send(bind("", "st", [b"150"]), execute(), SYNC)
        assert data_rows(raw.read_until_ready()) == [("order s1",), ("order s2",), ("order s3",)]
    finally:
        raw.close()


def test_in_list_of_parameters_without_spaces(dsn: str, shards: list[PostgresCluster]) -> None:
    for tenant, owner in ((2, "s2"), (7, "s2"), (1, "s1"), (3, "s3")):
        plant(shards, [owner], ORDERS, "id, tenant_id, note", [tenant, tenant, f"t{tenant}"])
        plant(shards, others(owner), ORDERS, "id, tenant_id, note", [tenant, tenant, "poison"])
    sql = f"select note from {ORDERS} where tenant_id IN (%s,%s) order by note"
    with connect(dsn, autocommit=True) as conn:
        # 2 and 7 are both on s2 (7 by default).
        assert conn.execute(sql, [2, 7]).fetchall() == [("t2",), ("t7",)]
        assert conn.execute(sql, [7, 2], prepare=True).fetchall() == [("t2",), ("t7",)]
        assert conn.execute(sql.replace("%s", "%b"), [2, 7], binary=True
                            ).fetchall() == [("t2",), ("t7",)]
        assert conn.execute(f"select note from {ORDERS} where tenant_id IN (2,7) "
                            "order by note").fetchall() == [("t2",), ("t7",)]
        route = conn.execute(f"show route for select note from {ORDERS} "
                             "where tenant_id IN (1,3)").fetchone()
        assert route is not None and route[:2] == ("multi", "s1, s3")
        assert conn.execute(sql, [3, 42]).fetchall() == [("t3",)]

    async def main() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            q = f"select note from {ORDERS} where tenant_id IN ($1,$2) order by note"
            assert [r[0] for r in await conn.fetch(q, 2, 7)] == ["t2", "t7"]
            assert [r[0] for r in await conn.fetch(q, 1, 1)] == ["t1"]
            # 1 and 2: read on s1 and s2, each holding a poison row of the other's tenant
            assert sorted(r[0] for r in await conn.fetch(q, 1, 2)) == [
                "poison", "poison", "t1", "t2"]
            assert [r[0] for r in await conn.fetch(q, 3, 3)] == ["t3"]
        finally:
            await close(conn)

    run(main())


def test_first_extended_statement_on_a_fresh_proxy(
        routing_proxy: ProxyProcess, make_proxy: Callable[..., ProxyProcess],
        shards: list[PostgresCluster]) -> None:
    """What an application does right after the proxy starts: its first statements carry
    parameters, for shards that no client has used yet."""
    plant(shards, ["s3"], ORDERS, "id, tenant_id, note", [1, 3, "three"])
    plant(shards, ["s2"], ORDERS, "id, tenant_id, note", [2, 2, "two"])
    fresh = make_proxy(lambda cfg: cfg.update(sharding=SHARD_MAP))
    dsn = fresh.dsn("app", APP_PASSWORD)
    timer = threading.Timer(5, cut_clients)
    timer.start()
    try:
        with connect(dsn, autocommit=True) as conn:
            assert conn.execute(f"select note from {ORDERS} where tenant_id = %s",
                                [3]).fetchall() == [("three",)]
    except psycopg.OperationalError as e:
        pytest.fail(f"psycopg got no answer within 5 s to its first statement: {e}")
    finally:
        timer.cancel()

    async def main() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval(f"select note from {ORDERS} where tenant_id = $1",
                                       2) == "two"
        finally:
            await close(conn)

    try:
        run(main(), deadline=5)
    except TimeoutError:
        pytest.fail("asyncpg got no answer within 5 s to its first statement on s2")


def test_more_clients_than_server_connections_with_parameters(
        routing_proxy: ProxyProcess, make_proxy: Callable[..., ProxyProcess],
        shards: list[PostgresCluster]) -> None:
    """16 clients at once (the pool has 10 server connections per shard), each running
    parameterised statements for keys of every shard. (A proxy of its own: clients that
    wait for a server connection must not disturb the other tests' pools.)"""
    dsn = make_proxy(lambda cfg: cfg.update(sharding=SHARD_MAP)).dsn("app", APP_PASSWORD)
    for tenant, owner in ((1, "s1"), (2, "s2"), (3, "s3")):
        plant(shards, [owner], ORDERS, "id, tenant_id, note", [tenant, tenant, f"t{tenant}"])
        plant(shards, others(owner), ORDERS, "id, tenant_id, note", [tenant, tenant, "poison"])
    clients = [connect(dsn, autocommit=True) for _ in range(16)]
    try:
        def work(n: int) -> list[str]:
            conn = clients[n]
            return [row[0] for i in range(6)
                    for row in conn.execute(f"select note from {ORDERS} where tenant_id = %s",
                                            [1 + (n + i) % 3])]

        with ThreadPoolExecutor(max_workers=16) as pool:
            results = list(pool.map(work, range(16)))
    finally:
        for conn in clients:
            conn.close()
    assert results == [[f"t{1 + (n + i) % 3}" for i in range(6)] for n in range(16)]


# --- transactions --------------------------------------------------------------------------


@pytest.mark.parametrize("params", [False, True], ids=["literals", "parameters"])
def test_transaction_joins_another_shard_and_an_error_aborts_it(
        dsn: str, shards: list[PostgresCluster], params: bool) -> None:
    def key(conn: psycopg.Connection[Any], sql: str, tenant: int) -> psycopg.Cursor[Any]:
        if params:
            return conn.execute(sql.replace("{k}", "%s"), [tenant])
        return conn.execute(sql.replace("{k}", str(tenant)))

    with connect(dsn) as conn:  # not autocommit: psycopg sends BEGIN first
        key(conn, f"insert into {ORDERS} (id, tenant_id, note) values (1, {{k}}, 'in tx')", 1)
        assert key(conn, f"select note from {ORDERS} where tenant_id = {{k}}", 1
                   ).fetchall() == [("in tx",)]
        # Not visible outside the transaction yet.
        assert on_shard(shards[0], f"select count(*) from {ORDERS}") == [(0,)]
        # Another shard joins the transaction (test_transactions.py goes further).
        assert key(conn, f"select note from {ORDERS} where tenant_id = {{k}}", 3
                   ).fetchall() == []
        with refused("22012"):
            key(conn, f"select 1 / (tenant_id - 1) from {ORDERS} where tenant_id = {{k}}", 1)
        for sql in ("select 1", f"select note from {ORDERS} where tenant_id = 1",
                    f"select note from {ORDERS} where tenant_id = 3",
                    f"insert into {ORDERS} (id, tenant_id, note) values (2, 1, 'after')"):
            with refused("25P02"):
                conn.execute(sql)
        conn.rollback()
        # The connection works again, on any shard.
        assert key(conn, f"select count(*) from {ORDERS} where tenant_id = {{k}}", 3
                   ).fetchone() == (0,)
        conn.rollback()
    assert notes_by_shard(shards, ORDERS) == {s: [] for s in SHARD_NAMES}


def test_transaction_on_one_shard_commits(dsn: str, shards: list[PostgresCluster]) -> None:
    plant(shards, ["s1", "s2"], ORDERS, "id, tenant_id, amount, note", [1, 3, 5, "poison"])
    with connect(dsn) as conn:
        with conn.transaction():
            conn.execute(f"insert into {ORDERS} (id, tenant_id, amount, note) "
                         "values (1, 3, 10, 'a')")
            conn.execute(f"insert into {ORDERS} (id, tenant_id, amount, note) "
                         "values (%s, %s, %s, %s)", [2, 42, 20, "b"])  # 42 is on s3 too
            assert conn.execute(f"update {ORDERS} set amount = amount + 1 where tenant_id = %s",
                                [3]).rowcount == 1
            assert conn.execute(f"select sum(amount) from {ORDERS} where tenant_id in (3, 42)"
                                ).fetchone() == (31,)
        # Consecutive transactions of one client may each use another shard.
        for tenant in (1, 2, 3):
            with conn.transaction():
                conn.execute(f"insert into {ORDERS} (id, tenant_id, amount, note) "
                             "values (%s, %s, 0, %s)", [10 + tenant, tenant, f"t{tenant}"])
        conn.commit()
    assert sorted(on_shard(shards[2], f"select id, tenant_id, amount, note from {ORDERS}")) == [
        (1, 3, 11, "a"), (2, 42, 20, "b"), (13, 3, 0, "t3")]
    assert notes_by_shard(shards, ORDERS) == {"s1": ["poison", "t1"], "s2": ["poison", "t2"],
                                              "s3": ["a", "b", "t3"]}


def test_begin_then_commit_with_nothing_in_between(dsn: str, uri: str) -> None:
    out = psql(uri, stdin="BEGIN;\nCOMMIT;\nBEGIN;\nROLLBACK;\nSELECT 1;\n").stdout
    assert out.split() == ["BEGIN", "COMMIT", "BEGIN", "ROLLBACK", "1"]
    with connect(dsn, autocommit=True) as conn:
        conn.execute("begin")
        conn.execute("commit")
        assert conn.execute(f"select count(*) from {ORDERS} where tenant_id = 3"
                            ).fetchone() == (0,)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_pgbench_like_transaction_on_one_key(uri: str, shards: list[PostgresCluster]) -> None:
    plant(shards, ["s3"], ORDERS, "id, tenant_id, amount, note", [30, 3, 10, "real"])
    plant(shards, ["s1", "s2"], ORDERS, "id, tenant_id, amount, note", [30, 3, 10, "poison"])
    script = (f"BEGIN;\n"
              f"UPDATE {ORDERS} SET amount = amount + 5 WHERE tenant_id = 3 AND id = 30;\n"
              f"SELECT amount FROM {ORDERS} WHERE tenant_id = 3 AND id = 30;\n"
              f"INSERT INTO {ITEMS} (order_id, tenant_id, sku, note) "
              f"VALUES (30, 3, 'history', 'h');\n"
              f"END;\n")
    out = psql(uri, stdin=script).stdout
    assert out.split() == ["BEGIN", "UPDATE", "1", "15", "INSERT", "0", "1", "COMMIT"]
    assert [on_shard(c, f"select amount, note from {ORDERS}") for c in shards] == [
        [(10, "poison")], [(10, "poison")], [(15, "real")]]
    assert notes_by_shard(shards, ITEMS) == {"s1": [], "s2": [], "s3": ["h"]}


def test_asyncpg_transaction_on_two_shards_fails_then_rolls_back(
        dsn: str, shards: list[PostgresCluster]) -> None:
    async def main() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            tx = conn.transaction()
            await tx.start()
            await conn.execute(f"insert into {ORDERS} (id, tenant_id, note) "
                               "values ($1, $2, 'in tx')", 1, 3)
            assert await conn.fetchval(
                f"select note from {ORDERS} where tenant_id = $1", 3) == "in tx"
            # tenant 1's shard joins the transaction, then fails it
            assert await conn.fetch(f"select note from {ORDERS} where tenant_id = $1", 1) == []
            with pytest.raises(asyncpg.DivisionByZeroError):
                await conn.fetch(f"select 1 / (tenant_id - $1) from {ORDERS} "
                                 "where tenant_id = 3", 3)
            with pytest.raises(asyncpg.InFailedSQLTransactionError):
                await conn.fetch(f"select note from {ORDERS} where tenant_id = $1", 1)
            await tx.rollback()
            assert await conn.fetchval(
                f"select count(*) from {ORDERS} where tenant_id = $1", 1) == 0
        finally:
            await close(conn)

    run(main())
    assert notes_by_shard(shards, ORDERS) == {s: [] for s in SHARD_NAMES}


def test_a_replayed_setting_follows_the_client_to_every_shard(
        routing_proxy: ProxyProcess, shards: list[PostgresCluster]) -> None:
    """A session-level SET outside a transaction is replayed (docs/pooling.md): the client
    still reaches every shard by key, with its setting in effect there."""
    for tenant, owner in ((1, "s1"), (2, "s2"), (3, "s3")):
        plant(shards, [owner], ORDERS, "id, tenant_id, note", [tenant, tenant, f"t{tenant}"])
    with connect(routing_proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
        conn.execute("SET statement_timeout = '5s'")
        for tenant in (3, 1, 2, 3):
            assert conn.execute(
                f"select note, current_setting('statement_timeout') from {ORDERS} "
                "where tenant_id = %s", [tenant]).fetchall() == [(f"t{tenant}", "5s")]


def test_a_session_mode_client_stays_on_the_shard_it_started_on(
        routing_proxy: ProxyProcess, shards: list[PostgresCluster]) -> None:
    """docs/pooling.md: a session-mode client holds one server connection, so it reaches the
    shard of its first statement only; other shards are refused clearly."""
    for tenant, owner in ((1, "s1"), (3, "s3")):
        plant(shards, [owner], ORDERS, "id, tenant_id, note", [tenant, tenant, f"t{tenant}"])
    with connect(routing_proxy.dsn("sess", SESSION_PASSWORD), autocommit=True) as conn:
        assert conn.execute(f"select note from {ORDERS} where tenant_id = %s",
                            [3]).fetchall() == [("t3",)]
        with refused("0A000", "tied to a server connection of shard s3"):
            conn.execute(f"select note from {ORDERS} where tenant_id = %s", [1])
        assert conn.execute(f"select note from {ORDERS} where tenant_id = %s",
                            [3]).fetchall() == [("t3",)]


# --- overrides -----------------------------------------------------------------------------


def _rows_per_shard(shards: list[PostgresCluster]) -> None:
    """s1 holds 1 order, s2 2, s3 3 (each with a key the shard owns)."""
    for count, (tenant, owner) in enumerate(((1, "s1"), (2, "s2"), (3, "s3")), start=1):
        for n in range(count):
            plant(shards, [owner], ORDERS, "id, tenant_id, amount, note", [n, tenant, 1, owner])


def test_shard_hint_comment(dsn: str, shards: list[PostgresCluster]) -> None:
    _rows_per_shard(shards)
    with connect(dsn, autocommit=True) as conn:
        for name, count in (("s1", 1), ("s2", 2), ("s3", 3)):
            assert conn.execute(f"/* shard: {name} */ SELECT count(*) FROM {ORDERS}"
                                ).fetchone() == (count,)
        assert conn.execute(f"/* shard: s2 */ SELECT count(*) FROM {ORDERS} "
                            "WHERE amount >= %s", [1]).fetchone() == (2,)
        assert conn.execute(f"SELECT count(*) FROM {ORDERS} /* shard: s3 */"
                            ).fetchone() == (3,)
        # The hint lasts for its statement only.
        assert_multi(conn, f"SELECT count(*) FROM {ORDERS}")
        with refused("22023"):
            conn.execute(f"/* shard: s9 */ SELECT count(*) FROM {ORDERS}")
        assert conn.execute("select 1").fetchone() == (1,)


def test_set_shardwire_shard_show_and_reset(dsn: str, uri: str,
                                            shards: list[PostgresCluster]) -> None:
    _rows_per_shard(shards)
    count = f"SELECT count(*) FROM {ORDERS}"
    with connect(dsn, autocommit=True) as conn:
        assert conn.execute("SHOW shardwire.shard").fetchone() == ("",)
        conn.execute("SET shardwire.shard = 's3'")
        assert conn.execute("SHOW shardwire.shard").fetchone() == ("s3",)
        assert conn.execute(count).fetchone() == (3,)
        assert conn.execute(count + " WHERE amount = %s", [1]).fetchone() == (3,)
        # An unknown shard is refused, and the setting keeps its value.
        with refused("22023"):
            conn.execute("SET shardwire.shard = 's9'")
        assert conn.execute("SHOW shardwire.shard").fetchone() == ("s3",)
        conn.execute("SET shardwire.shard TO 's2'")
        assert conn.execute(count).fetchone() == (2,)
        conn.execute("RESET shardwire.shard")
        assert conn.execute("SHOW shardwire.shard").fetchone() == ("",)
        assert_multi(conn, count)
        assert conn.execute(count + " WHERE tenant_id = 3").fetchone() == (3,)
    # The setting belongs to its session: a new connection starts without it.
    out = psql(uri, "-c", "SET shardwire.shard = 's1'", "-c", count, "-c",
               "SHOW shardwire.shard").stdout.split()
    assert out == ["SET", "1", "s1"]
    with connect(dsn, autocommit=True) as conn:
        assert conn.execute("SHOW shardwire.shard").fetchone() == ("",)


def test_set_shardwire_key(dsn: str, shards: list[PostgresCluster]) -> None:
    _rows_per_shard(shards)
    count = f"SELECT count(*) FROM {ORDERS}"
    with connect(dsn, autocommit=True) as conn:
        conn.execute("SET shardwire.key = '3'")
        assert conn.execute(count).fetchone() == (3,)
        conn.execute("SET shardwire.key = '7'")  # the default tenant shard s2
        assert conn.execute(count).fetchone() == (2,)
        assert conn.execute(count + " WHERE amount = %s", [1], prepare=True).fetchone() == (2,)
        conn.execute("SET shardwire.key = '1'")
        assert conn.execute(count + " WHERE amount = %s", [1], prepare=True).fetchone() == (1,)
        conn.execute("RESET shardwire.key")
        assert_multi(conn, count)


def test_set_local_ends_with_its_transaction(dsn: str, shards: list[PostgresCluster]) -> None:
    _rows_per_shard(shards)
    count = f"SELECT count(*) FROM {ORDERS}"
    with connect(dsn, autocommit=True) as conn:
        for end in ("COMMIT", "ROLLBACK"):
            conn.execute("BEGIN")
            conn.execute("SET LOCAL shardwire.shard = 's3'")
            assert conn.execute("SHOW shardwire.shard").fetchone() == ("s3",)
            assert conn.execute(count).fetchone() == (3,)
            conn.execute(end)
            assert conn.execute("SHOW shardwire.shard").fetchone() == ("",)
            assert_multi(conn, count)
        # SET LOCAL over a session value: the session value comes back after the transaction.
        conn.execute("SET shardwire.shard = 's2'")
        conn.execute("BEGIN")
        conn.execute("SET LOCAL shardwire.shard = 's1'")
        assert conn.execute(count).fetchone() == (1,)
        conn.execute("COMMIT")
        assert conn.execute("SHOW shardwire.shard").fetchone() == ("s2",)
        assert conn.execute(count).fetchone() == (2,)
        # SET LOCAL of the key, too.
        conn.execute("RESET shardwire.shard")
        conn.execute("BEGIN")
        conn.execute("SET LOCAL shardwire.key = '3'")
        assert conn.execute(count).fetchone() == (3,)
        conn.execute("COMMIT")
        assert_multi(conn, count)


# --- identifiers ---------------------------------------------------------------------------


def test_quoted_mixed_case_table_and_key_column(dsn: str,
                                                shards: list[PostgresCluster]) -> None:
    table = f'"{ACCOUNTS}"'
    plant(shards, ["s1", "s2"], table, '"TenantId", note', [3, "poison"])
    with connect(dsn, autocommit=True) as conn:
        conn.execute(f'insert into {table} ("TenantId", note) values (3, \'c\')')
        conn.execute(f'insert into {table} ("TenantId", note) values (%s, %s)', [1, "a"])
        assert conn.execute(f'select note from {table} where "TenantId" = 3').fetchall() == [
            ("c",)]
        assert conn.execute(f'select a.note from {table} a where a."TenantId" = %s',
                            [3]).fetchall() == [("c",)]
        assert_multi(conn, f"select note from {table}")
    assert notes_by_shard(shards, table) == {"s1": ["a", "poison"], "s2": ["poison"],
                                             "s3": ["c"]}


def test_schema_qualified_table(dsn: str, shards: list[PostgresCluster]) -> None:
    plant(shards, ["s1", "s2"], SCHEMA_ORDERS, "tenant_id, note", [3, "poison"])
    upper = SCHEMA_ORDERS.upper()
    with connect(dsn, autocommit=True) as conn:
        conn.execute(f"insert into {SCHEMA_ORDERS} (tenant_id, note) values (3, 'plain')")
        conn.execute(f'insert into "{SCHEMA}"."orders" (tenant_id, note) values (3, \'quoted\')')
        conn.execute(f"insert into {upper} (TENANT_ID, NOTE) values (%s, 'upper')", [3])
        conn.execute(f"insert into {SCHEMA_ORDERS} (tenant_id, note) values (1, 'one')")
        assert conn.execute(f"select note from {upper} where tenant_id = 3 order by note"
                            ).fetchall() == [("plain",), ("quoted",), ("upper",)]
        assert_multi(conn, f"select note from {SCHEMA}.ORDERS")
    assert notes_by_shard(shards, SCHEMA_ORDERS) == {
        "s1": ["one", "poison"], "s2": ["poison"], "s3": ["plain", "quoted", "upper"]}


def test_unquoted_upper_case_sql_folds_to_the_mapped_name(
        dsn: str, shards: list[PostgresCluster]) -> None:
    plant(shards, ["s1", "s2"], ORDERS, "id, tenant_id, note", [5, 3, "poison"])
    upper, mixed = ORDERS.upper(), ORDERS.title()
    with connect(dsn, autocommit=True) as conn:
        conn.execute(f"INSERT INTO {upper} (ID, TENANT_ID, NOTE) VALUES (5, 3, 'upper')")
        conn.execute(f'INSERT INTO "{ORDERS}" (id, "tenant_id", note) VALUES (%s, %s, %s)',
                     [6, 3, "quoted"])
        assert conn.execute(f"SELECT NOTE FROM {mixed} WHERE Tenant_Id = 3 ORDER BY NOTE"
                            ).fetchall() == [("quoted",), ("upper",)]
        assert conn.execute(f"UPDATE {upper} SET NOTE = NOTE || '!' WHERE TENANT_ID = %s",
                            [3]).rowcount == 2
        # Recognised as the sharded table: without a key it is refused, not sent to s1.
        assert_multi(conn, f"SELECT NOTE FROM {upper}")
    assert notes_by_shard(shards, ORDERS) == {"s1": ["poison"], "s2": ["poison"],
                                              "s3": ["quoted!", "upper!"]}


# --- unsharded tables ----------------------------------------------------------------------


def test_unsharded_table_lives_on_the_default_shard(dsn: str,
                                                    shards: list[PostgresCluster]) -> None:
    with connect(dsn, autocommit=True) as conn:
        conn.execute(f"insert into {NOTES} (id, tenant_id, note) values (1, 1, 'for one')")
        conn.execute(f"insert into {NOTES} (id, tenant_id, note) values (%s, %s, %s)",
                     [3, 3, "for three"])
        assert conn.execute(f"select note from {NOTES} order by id").fetchall() == [
            ("for one",), ("for three",)]
        conn.execute(f"insert into {ORDERS} (id, tenant_id, note) values (1, 1, 'o1')")
        conn.execute(f"insert into {ORDERS} (id, tenant_id, note) values (3, 3, 'o3')")
        join = (f"select n.note, o.note from {NOTES} n join {ORDERS} o "
                "on o.tenant_id = n.tenant_id where o.tenant_id = %s")
        # Tenant 1 is on s1, the default shard, with the unsharded table.
        assert conn.execute(join, [1]).fetchall() == [("for one", "o1")]
        # Tenant 3 is on s3: the unsharded table is not there.
        for tenant in (3, 2):
            with refused("0A000") as info:
                conn.execute(join, [tenant])
            assert info.value.diag.message_hint
        with refused("0A000"):
            conn.execute(f"select n.note from {NOTES} n join {ORDERS} o using (tenant_id)")
        assert conn.execute(f"select count(*) from {NOTES}").fetchone() == (2,)
    assert on_shard(shards[0], f"select note from {NOTES} order by id") == [
        ("for one",), ("for three",)]
    for cluster in shards[1:]:
        assert on_shard(cluster, "select to_regclass(%s)", [NOTES]) == [(None,)]
