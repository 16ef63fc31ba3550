"""The wire protocol as clients speak it: raw bytes and real drivers against the proxy.

Every statement goes to the default shard for now, so the proxy must behave exactly like that
PostgreSQL server would: same message order, same SQLSTATEs, same ReadyForQuery states. Bad
input gets an error and a closed connection at worst; the proxy keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from conftest import ADMIN_PASSWORD, APP_PASSWORD, DATABASE, MakeProxy
from wire import (
    FLUSH,
    GSSENC_REQUEST,
    SYNC,
    RawClient,
    ServerError,
    bind,
    close,
    column_names,
    command_tags,
    data_rows,
    describe,
    errors,
    execute,
    kinds,
    parameter_types,
    parse,
    query,
    ready_status,
    sqlstates,
    startup,
)

from shardwire.proxy.protocol import messages as m
from shardwire.testing import PostgresCluster
from shardwire.testing.proxy import ProxyProcess

_I32 = struct.Struct("!i")


@pytest.fixture(autouse=True)
def nothing_left_behind(shards: list[PostgresCluster]) -> Iterator[None]:
    """After each test no server session of the default shard is stuck in a transaction
    (TESTING idea 4): whatever a client did, the proxy ended or reset it."""
    yield
    deadline = time.monotonic() + 5
    while True:
        stuck = shard_backends(shards[0], "%", state_like="idle in transaction%")
        if not stuck or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert stuck == []


@pytest.fixture
def direct(shards: list[PostgresCluster]) -> Iterator[RawClient]:
    """A raw connection straight to the default shard, to compare the proxy with."""
    client = RawClient(shards[0].host, shards[0].port)
    client.login("postgres", None, DATABASE)
    yield client
    client.close()


@pytest.fixture
def raw(proxy: ProxyProcess) -> Iterator[RawClient]:
    """A logged-in raw connection as user app."""
    client = RawClient(proxy.host, proxy.port)
    client.login("app", APP_PASSWORD)
    yield client
    client.sock.close()


def connect(proxy: ProxyProcess) -> RawClient:
    return RawClient(proxy.host, proxy.port)


def assert_proxy_serves(proxy: ProxyProcess) -> None:
    """The proxy process is alive and a fresh driver connection works."""
    assert proxy.running, f"the proxy exited:\n{proxy.log_tail()}"
    with psycopg.connect(proxy.dsn("app", APP_PASSWORD), connect_timeout=5) as conn:
        assert conn.execute("select 41 + 1").fetchone() == (42,)


def assert_pool_settles(proxy: ProxyProcess, timeout: float = 5) -> None:
    """No server connection of the default shard stays checked out once its client is gone
    (nobody else uses the session proxy while a test runs)."""
    dsn = proxy.dsn("admin", ADMIN_PASSWORD, database="shardwire")
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as admin:
        while True:
            cur = admin.execute("SHOW POOLS")
            names = [c.name for c in cur.description or []]
            pools = {row[0]: dict(zip(names, row, strict=True)) for row in cur.fetchall()}
            if pools["s1"]["active"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert pools["s1"]["active"] == 0, pools["s1"]


def assert_fatal_protocol_error(client: RawClient, timeout: float = 5) -> None:
    """The connection gets an ErrorResponse with 08P01 and is then closed by the proxy."""
    replies = client.read_to_eof(timeout)
    assert sqlstates(replies) == ["08P01"], replies
    assert errors(replies)[0]["S"] == "FATAL", replies


def shard_backends(shard: PostgresCluster, like: str,
                   state_like: str = "%") -> list[tuple[Any, ...]]:
    """Client sessions on the shard whose last query and state match the patterns."""
    with psycopg.connect(shard.dsn(DATABASE), autocommit=True) as conn:
        return conn.execute(
            "select pid, state, query from pg_stat_activity "
            "where backend_type = 'client backend' and datname = %s and query like %s "
            "and state like %s and pid <> pg_backend_pid()",
            (DATABASE, like, state_like)).fetchall()


# --- bad input --------------------------------------------------------------------------------


def test_http_request_instead_of_startup(proxy: ProxyProcess) -> None:
    client = connect(proxy)
    client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert_fatal_protocol_error(client)
    assert_proxy_serves(proxy)


def test_absurd_startup_length(proxy: ProxyProcess) -> None:
    client = connect(proxy)
    client.send(_I32.pack(0x7FFFFFFF) + _I32.pack(m.PROTOCOL_V3) + b"user\x00app\x00")
    assert_fatal_protocol_error(client)
    assert_proxy_serves(proxy)


def test_startup_length_below_minimum(proxy: ProxyProcess) -> None:
    client = connect(proxy)
    client.send(_I32.pack(3) + b"\x00\x03\x00\x00")
    assert_fatal_protocol_error(client)
    assert_proxy_serves(proxy)


def test_absurd_message_length_after_login(proxy: ProxyProcess, raw: RawClient) -> None:
    raw.send(b"Q" + struct.pack("!I", 0x7FFFFFFF) + b"select 1")
    assert_fatal_protocol_error(raw)
    assert_proxy_serves(proxy)


@pytest.mark.parametrize("length", [0, 3])
def test_message_length_below_four(proxy: ProxyProcess, raw: RawClient, length: int) -> None:
    raw.send(b"Q" + struct.pack("!I", length) + b"select 1\x00")
    assert_fatal_protocol_error(raw)
    assert_proxy_serves(proxy)


def test_absurd_message_length_during_authentication(proxy: ProxyProcess) -> None:
    client = connect(proxy)
    client.send(startup({"user": "app", "database": "app"}))
    assert client.read_message()[0] == b"R"  # AuthenticationSASL
    client.send(b"p" + struct.pack("!I", 0x7FFFFFFF) + b"SCRAM-SHA-256\x00")
    assert_fatal_protocol_error(client)
    assert_proxy_serves(proxy)


def test_unknown_message_type_after_login(proxy: ProxyProcess, raw: RawClient) -> None:
    raw.send(m.message(b"y", b"whatever"))
    replies = raw.read_to_eof()
    assert sqlstates(replies) == ["08P01"]
    assert "invalid frontend message type" in errors(replies)[0]["M"]
    assert_proxy_serves(proxy)


MALFORMED = {
    "query_without_terminator": m.message(b"Q", b"select 1"),
    "parse_without_terminators": m.message(b"P", b"abc") + SYNC,
    "bind_cut_short": parse("", "select 1") + m.message(b"B", b"\x00") + SYNC,
    "bind_named_cut_short": parse("n1", "select 1") + m.message(b"B", b"\x00n1") + SYNC,
    "describe_empty": m.message(b"D", b"") + SYNC,
    "close_empty": m.message(b"C", b"") + SYNC,
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_message_after_login(proxy: ProxyProcess, raw: RawClient,
                                       direct: RawClient, data: bytes) -> None:
    # PostgreSQL answers ERROR 08P01 and goes on (the message boundaries are intact). The
    # proxy may instead end the connection, but with the error, not silently or never.
    direct.send(data)
    assert "08P01" in sqlstates(direct.read_until_ready())
    raw.send(data)
    replies, closed = raw.read_until_ready_or_eof(5)
    assert "08P01" in sqlstates(replies), f"got {replies}, closed={closed}"
    if not closed:
        assert data_rows(raw.query("select 'usable'")) == [("usable",)]
    assert_proxy_serves(proxy)
    assert_pool_settles(proxy)


@pytest.mark.parametrize("name", ["parse_without_terminators", "bind_named_cut_short",
                                  "close_empty"])
def test_malformed_message_while_waiting_for_a_server(make_proxy: MakeProxy,
                                                      name: str) -> None:
    # The same, when the message waits in the proxy for a server connection to free up.
    def edit(cfg: dict[str, Any]) -> None:
        cfg["pool"].update(size=1, checkout_timeout=2)

    small = make_proxy(edit)
    holder = psycopg.connect(small.dsn("app", APP_PASSWORD))
    holder.execute("select 1")  # holds the only server connection in its transaction
    client = RawClient(small.host, small.port)
    client.login("app", APP_PASSWORD)
    client.send(MALFORMED[name])
    time.sleep(0.2)
    holder.commit()
    try:
        replies, closed = client.read_until_ready_or_eof(3)
    except TimeoutError:
        # Say what the hang costs the others too: the only server connection is stuck.
        try:
            assert_proxy_serves(small)
            others = "other clients are served"
        except psycopg.Error as e:
            others = f"other clients fail: {e.sqlstate} {e}"
        pytest.fail(f"no reply and no close within 3 s; {others}\n{small.log_tail(20)}")
    finally:
        holder.close()
    assert "08P01" in sqlstates(replies), f"got {replies}, closed={closed}"
    assert_proxy_serves(small)


def test_non_utf8_startup_parameter(proxy: ProxyProcess,
                                    shards: list[PostgresCluster]) -> None:
    # libpq sends application_name in the client's encoding; PostgreSQL accepts it.
    name = b"caf\xe9"
    check = RawClient(shards[0].host, shards[0].port)
    check.login("postgres", None, DATABASE, params={"application_name": name})
    check.close()
    client = connect(proxy)
    client.login("app", APP_PASSWORD, params={"application_name": name})
    assert data_rows(client.query("select 'latin1 name'")) == [("latin1 name",)]
    client.close()


def test_truncated_message_then_disconnect(proxy: ProxyProcess, raw: RawClient) -> None:
    raw.send(b"Q" + struct.pack("!I", 100) + b"select")
    time.sleep(0.1)
    raw.sock.close()
    # And the same half-way through a startup packet.
    half = connect(proxy)
    half.send(startup({"user": "app", "database": "app"})[:10])
    time.sleep(0.1)
    half.sock.close()
    assert_proxy_serves(proxy)


def test_client_vanishes_mid_extended_batch(proxy: ProxyProcess, raw: RawClient) -> None:
    # A batch whose Sync never comes, then a reset: the server connection must not leak.
    raw.send(query("select 1"))
    raw.read_until_ready()
    raw.send(parse("", "select pg_sleep(0)"), bind(), execute())
    time.sleep(0.2)
    raw.abort()
    assert_proxy_serves(proxy)
    assert_pool_settles(proxy)


def test_client_vanishes_mid_result(proxy: ProxyProcess, shards: list[PostgresCluster],
                                    raw: RawClient) -> None:
    marker = "vanishing_client_marker"
    raw.send(query(f"select repeat('x', 1000) as {marker} from generate_series(1, 200000)"))
    first = raw.read_message()
    assert first[0] == b"T"
    raw.abort()
    assert_proxy_serves(proxy)
    # The server stops working for the vanished client soon: its connection is dropped or
    # finished, never left streaming or idle in transaction.
    deadline = time.monotonic() + 10
    while shard_backends(shards[0], f"%{marker}%") and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [r for r in shard_backends(shards[0], f"%{marker}%") if r[1] != "idle"]
    assert left == []
    assert_pool_settles(proxy)


def test_client_vanishes_inside_transaction(proxy: ProxyProcess, raw: RawClient) -> None:
    assert ready_status(raw.query("begin")) == "T"
    assert sqlstates(raw.query("select pg_advisory_xact_lock(4242)")) == []
    raw.abort()
    # Its transaction ends with it: the lock is free again, soon.
    with psycopg.connect(proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
        deadline = time.monotonic() + 5
        while conn.execute("select pg_try_advisory_lock(4242)").fetchone() != (True,):
            assert time.monotonic() < deadline, "the vanished client's transaction lives on"
            time.sleep(0.1)
        conn.execute("select pg_advisory_unlock(4242)")
    assert_pool_settles(proxy)


def test_invalid_utf8_in_query(raw: RawClient, direct: RawClient) -> None:
    replies = raw.query(b"select 'caf\xe9 \xff'")
    assert sqlstates(replies) == ["22021"]
    assert ready_status(replies) == "I"
    # PostgreSQL's own message, unchanged.
    assert errors(replies)[0]["M"] == errors(direct.query(b"select 'caf\xe9 \xff'"))[0]["M"]
    assert data_rows(raw.query("select 'still usable'")) == [("still usable",)]


def test_invalid_utf8_in_parse(raw: RawClient) -> None:
    raw.send(parse("bad", b"select '\xc3\x28'"), SYNC)
    replies = raw.read_until_ready()
    assert sqlstates(replies) == ["22021"]
    raw.send(parse("bad", "select 'good'"), bind("", "bad"), execute(), SYNC)
    assert data_rows(raw.read_until_ready()) == [("good",)]


def test_syntax_error_a_thousand_times(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
        for _ in range(1000):
            with pytest.raises(psycopg.errors.SyntaxError):
                conn.execute("selec 1")
        assert conn.execute("select 'after 1000 errors'").fetchone() == ("after 1000 errors",)
    assert_proxy_serves(proxy)


def test_deeply_nested_sql(proxy: ProxyProcess, raw: RawClient, direct: RawClient) -> None:
    sql = "select " + "(" * 10000 + "1" + ")" * 10000
    replies = raw.query(sql)
    expected = direct.query(sql)
    assert kinds(replies) == kinds(expected)
    assert sqlstates(replies) == sqlstates(expected)
    assert data_rows(raw.query("select 1")) == [("1",)]
    assert_proxy_serves(proxy)


def test_five_thousand_bind_parameters(proxy: ProxyProcess) -> None:
    n = 5000
    sql = "select array_length(array[" + ",".join(["%s::int"] * n) + "], 1), %s::int"
    params = [*range(n), 7]
    with psycopg.connect(proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
        assert conn.execute(sql, params).fetchone() == (n, 7)
        assert conn.execute(sql, params, prepare=True).fetchone() == (n, 7)
        assert conn.execute(sql, params, prepare=True).fetchone() == (n, 7)
        assert conn.execute(sql, params, binary=True).fetchone() == (n, 7)


def test_fifty_megabyte_query(proxy: ProxyProcess, raw: RawClient, direct: RawClient) -> None:
    size = 50 * 1024 * 1024
    sql = query("select length('" + "x" * size + "')")
    direct.sock.settimeout(60)
    started = time.monotonic()
    direct.send(sql)
    assert data_rows(direct.read_until_ready()) == [(str(size),)]
    direct_elapsed = time.monotonic() - started
    raw.sock.settimeout(60)
    started = time.monotonic()
    raw.send(sql)
    replies = raw.read_until_ready()
    elapsed = time.monotonic() - started
    if sqlstates(replies):
        # A refusal must say so clearly (and be quick); the connection may end.
        assert sqlstates(replies)[0] in ("54000", "08P01"), replies
    else:
        assert data_rows(replies) == [(str(size),)]
        assert data_rows(raw.query("select 1")) == [("1",)]
    # Not a hang: a bound loose enough for a loaded machine (PostgreSQL alone needs ~1 s).
    assert elapsed < 10 + 10 * direct_elapsed, (
        f"a 50 MB query took {elapsed:.1f}s through the proxy, {direct_elapsed:.1f}s direct")
    assert_proxy_serves(proxy)


# --- extended protocol sequences ---------------------------------------------------------------


def test_error_in_batch_skips_to_sync(raw: RawClient, direct: RawClient) -> None:
    batch = [parse("", "select 1"), bind(), execute(),
             # Division by zero while executing (a constant 1/0 would fail at Bind already).
             parse("", "select 1/g from generate_series(0, 0) g"), bind(), execute(),
             parse("", "select 2"), bind(), execute(),
             parse("later", "select 3"), describe("S", "later"), SYNC]
    raw.send(*batch)
    replies = raw.read_until_ready()
    direct.send(*batch)
    assert kinds(replies) == kinds(direct.read_until_ready()) == "12DC" + "12EZ"
    assert data_rows(replies) == [("1",)]
    assert sqlstates(replies) == ["22012"]
    assert ready_status(replies) == "I"
    # "later" was never parsed: the server skipped it.
    raw.send(bind("", "later"), execute(), SYNC)
    assert sqlstates(raw.read_until_ready()) == ["26000"]
    raw.send(parse("", "select 3"), bind(), execute(), SYNC)
    replies = raw.read_until_ready()
    assert kinds(replies) == "12DCZ"
    assert data_rows(replies) == [("3",)]


def test_execute_row_limit_suspends_and_resumes_portal(raw: RawClient) -> None:
    assert ready_status(raw.query("begin")) == "T"
    raw.send(parse("", "select g from generate_series(1, 5) g"), bind("cur", ""),
             execute("cur", 2), SYNC)
    replies = raw.read_until_ready()
    assert kinds(replies) == "12DDsZ"
    assert data_rows(replies) == [("1",), ("2",)]
    assert ready_status(replies) == "T"
    raw.send(execute("cur", 2), SYNC)
    replies = raw.read_until_ready()
    assert kinds(replies) == "DDsZ"
    assert data_rows(replies) == [("3",), ("4",)]
    raw.send(execute("cur", 2), SYNC)
    replies = raw.read_until_ready()
    assert kinds(replies) == "DCZ"
    assert data_rows(replies) == [("5",)]
    assert ready_status(raw.query("commit")) == "I"


def test_failed_parse_frees_its_name(raw: RawClient) -> None:
    raw.send(parse("stmt_f", "select no_such_column"), SYNC)
    replies = raw.read_until_ready()
    assert sqlstates(replies) == ["42703"]
    raw.send(parse("stmt_f", "select 'second try'"), SYNC)
    replies = raw.read_until_ready()
    assert kinds(replies) == "1Z", errors(replies)
    raw.send(bind("", "stmt_f"), execute(), SYNC)
    assert data_rows(raw.read_until_ready()) == [("second try",)]


def test_failed_parse_in_later_message_of_batch_frees_its_name(raw: RawClient) -> None:
    # The named Parse itself is fine, but an earlier error makes the server skip it.
    raw.send(parse("", "select 1/0"), bind(), execute(), parse("stmt_g", "select 'g'"), SYNC)
    assert sqlstates(raw.read_until_ready()) == ["22012"]
    raw.send(parse("stmt_g", "select 'g again'"), bind("", "stmt_g"), execute(), SYNC)
    replies = raw.read_until_ready()
    assert kinds(replies) == "12DCZ", errors(replies)
    assert data_rows(replies) == [("g again",)]


def test_bind_with_format_count_disagreeing(raw: RawClient, direct: RawClient) -> None:
    def attempt(client: RawClient) -> list[tuple[bytes, bytes]]:
        client.send(parse("", "select $1::int + 1", [23]),
                    bind("", "", [b"41"], param_formats=[0, 0]), execute(), SYNC)
        return client.read_until_ready()

    replies = attempt(raw)
    expected = attempt(direct)
    assert sqlstates(replies) == ["08P01"]
    assert errors(replies)[0]["M"] == errors(expected)[0]["M"]
    assert kinds(replies) == kinds(expected) == "1EZ"
    # An ERROR, not FATAL: the connection goes on.
    raw.send(parse("", "select $1::int + 1", [23]), bind("", "", [b"41"]), execute(), SYNC)
    assert data_rows(raw.read_until_ready()) == [("42",)]


def test_pipeline_of_several_syncs_in_one_write(raw: RawClient) -> None:
    batches = []
    for i in range(5):
        batches += [parse("", f"select {i} as n"), bind(), execute(), SYNC]
    batches += [query("select 'simple'")]
    batches += [parse("", "select 1/0"), bind(), execute(), SYNC]
    batches += [parse("piped", "select 'after error'"), bind("", "piped"), execute(), SYNC]
    raw.send(*batches)
    replies = raw.read_syncs(8)
    assert data_rows(replies) == [(str(i),) for i in range(5)] + [("simple",),
                                                                  ("after error",)]
    assert sqlstates(replies) == ["22012"]
    assert kinds(replies) == "12DCZ" * 5 + "TDCZ" + "1EZ" + "12DCZ"


def test_named_statement_survives_server_shuffling(proxy: ProxyProcess,
                                                   raw: RawClient) -> None:
    raw.send(parse("a", "select $1::int * 2, pg_backend_pid()"), SYNC)
    assert kinds(raw.read_until_ready()) == "1Z"
    raw.send(bind("", "a", [b"1"]), execute(), SYNC)
    ((_, first_pid),) = data_rows(raw.read_until_ready())
    # Twelve other clients: eight hold a server connection each in a transaction (so the
    # raw client's next batch must get another one), four more run queries meanwhile.
    others = [psycopg.connect(proxy.dsn("app", APP_PASSWORD)) for _ in range(12)]
    try:
        held = set()
        for conn in others[:8]:
            (pid,) = conn.execute("select pg_backend_pid()").fetchone() or (None,)
            held.add(pid)
            conn.execute("prepare other_stmt as select 2")

        def work(conn: psycopg.Connection[Any]) -> None:
            conn.autocommit = True
            for i in range(20):
                conn.execute("select %s::int", (i,), prepare=True)

        threads = [threading.Thread(target=work, args=(c,)) for c in others[8:]]
        for t in threads:
            t.start()
        raw.send(bind("", "a", [b"21"]), execute(), SYNC)
        replies = raw.read_until_ready()
        for t in threads:
            t.join()
        assert sqlstates(replies) == []
        ((doubled, pid),) = data_rows(replies)
        assert doubled == "42"
        if first_pid in {str(p) for p in held}:
            assert pid != first_pid
        for conn in others[:8]:
            conn.commit()
        for i in range(10):
            raw.send(bind("", "a", [str(i).encode()]), execute(), SYNC)
            assert data_rows(raw.read_until_ready())[0][0] == str(2 * i)
    finally:
        for conn in others:
            conn.close()


def test_close_statement_then_bind(raw: RawClient) -> None:
    raw.send(parse("closing", "select 1"), SYNC)
    assert kinds(raw.read_until_ready()) == "1Z"
    raw.send(close("S", "closing"), SYNC)
    assert kinds(raw.read_until_ready()) == "3Z"
    raw.send(bind("", "closing"), execute(), SYNC)
    replies = raw.read_until_ready()
    assert sqlstates(replies) == ["26000"]
    assert errors(replies)[0]["M"] == 'prepared statement "closing" does not exist'
    # Closing a name that does not exist is not an error in PostgreSQL.
    raw.send(close("S", "never_was"), close("P", "no_portal"), SYNC)
    assert kinds(raw.read_until_ready()) == "33Z"


def test_parse_same_name_twice(raw: RawClient) -> None:
    raw.send(parse("twice", "select 1"), SYNC)
    assert kinds(raw.read_until_ready()) == "1Z"
    raw.send(parse("twice", "select 2"), SYNC)
    replies = raw.read_until_ready()
    assert sqlstates(replies) == ["42P05"]
    assert errors(replies)[0]["M"] == 'prepared statement "twice" already exists'
    # The first definition stays.
    raw.send(bind("", "twice"), execute(), SYNC)
    assert data_rows(raw.read_until_ready()) == [("1",)]


def test_describe_statement(raw: RawClient) -> None:
    raw.send(parse("described", "select $1::int as x, $2::text as y"),
             describe("S", "described"), SYNC)
    replies = raw.read_until_ready()
    assert kinds(replies) == "1tTZ"
    assert parameter_types(replies) == [[23, 25]]
    assert column_names(replies) == [["x", "y"]]
    # A statement returning nothing describes as NoData; a portal too.
    raw.send(parse("nodata", "set search_path = public"), describe("S", "nodata"),
             bind("p", "described", [b"1", b"one"]), describe("P", "p"), execute("p"), SYNC)
    replies = raw.read_until_ready()
    assert kinds(replies) == "1tn2TDCZ"
    assert data_rows(replies) == [("1", "one")]


def test_flush_without_sync(raw: RawClient) -> None:
    raw.send(parse("", "select 'flushed'"), bind(), execute(), FLUSH)
    replies: list[tuple[bytes, bytes]] = []
    deadline = time.monotonic() + 5
    while kinds(replies) != "12DC" and time.monotonic() < deadline:
        replies += raw.read_available(0.2)
    assert kinds(replies) == "12DC"
    assert data_rows(replies) == [("flushed",)]
    raw.send(SYNC)
    assert kinds(raw.read_until_ready()) == "Z"


# --- ReadyForQuery and the simple protocol ---------------------------------------------------


def test_ready_for_query_status(proxy: ProxyProcess) -> None:
    client = connect(proxy)
    assert ready_status(client.login("app", APP_PASSWORD)) == "I"
    assert ready_status(client.query("begin")) == "T"
    assert ready_status(client.query("select 1")) == "T"
    replies = client.query("select 1/0")
    assert sqlstates(replies) == ["22012"]
    assert ready_status(replies) == "E"
    replies = client.query("select 1")
    assert sqlstates(replies) == ["25P02"]
    assert ready_status(replies) == "E"
    assert ready_status(client.query("rollback")) == "I"
    # Extended protocol: the status at Sync is the same.
    client.send(query("begin"), parse("", "select 1/0"), bind(), execute(), SYNC)
    replies = client.read_syncs(2)
    assert ready_status(replies) == "E"
    client.send(parse("", "rollback"), bind(), execute(), SYNC)
    assert ready_status(client.read_until_ready()) == "I"
    client.close()


def test_multiple_statements_in_one_query(raw: RawClient) -> None:
    replies = raw.query("select 1; select 2, 3")
    assert kinds(replies) == "TDCTDCZ"
    assert data_rows(replies) == [("1",), ("2", "3")]
    assert command_tags(replies) == ["SELECT 1", "SELECT 1"]
    # An error in the middle stops the rest, as one implicit transaction.
    replies = raw.query("select 1; select 1/0; select 3")
    assert kinds(replies) == "TDCEZ"
    assert ready_status(replies) == "I"


def test_empty_query(raw: RawClient) -> None:
    assert kinds(raw.query("")) == "IZ"
    assert kinds(raw.query("  ;  ")) == "IZ"
    raw.send(parse("", ""), bind(), execute(), SYNC)
    assert kinds(raw.read_until_ready()) == "12IZ"


# --- protocol version negotiation, TLS and GSS requests ------------------------------------


def _negotiation(replies: list[tuple[bytes, bytes]]) -> tuple[int, list[str]]:
    (payload,) = [p for k, p in replies if k == b"v"]
    newest, count = struct.unpack_from("!ii", payload, 0)
    names = payload[8:].split(b"\x00")[:count]
    return newest, [n.decode() for n in names]


def test_protocol_3_2_is_negotiated_down(proxy: ProxyProcess) -> None:
    client = connect(proxy)
    replies = client.login("app", APP_PASSWORD, version=(3 << 16) | 2)
    newest, options = _negotiation(replies)
    assert newest >> 16 == 3 and newest & 0xFFFF < 2
    assert options == []
    assert data_rows(client.query("select 'negotiated'")) == [("negotiated",)]
    client.close()


def test_unknown_protocol_option_is_negotiated(proxy: ProxyProcess) -> None:
    client = connect(proxy)
    replies = client.login("app", APP_PASSWORD, params={"_pq_.foo": "bar"})
    newest, options = _negotiation(replies)
    assert newest == m.PROTOCOL_V3
    assert options == ["_pq_.foo"]
    assert data_rows(client.query("select 'negotiated'")) == [("negotiated",)]
    client.close()


def test_protocol_2_is_refused(proxy: ProxyProcess) -> None:
    client = connect(proxy)
    client.send(startup({"user": "app", "database": "app"}, version=2 << 16))
    replies = client.read_to_eof()
    assert sqlstates(replies) == ["0A000"]
    assert "unsupported frontend protocol 2.0" in errors(replies)[0]["M"]


def test_ssl_request_without_tls_gets_n(proxy: ProxyProcess) -> None:
    client = connect(proxy)
    client.send(m.ssl_request())
    assert client.read_byte() == b"N"
    client.login("app", APP_PASSWORD)
    assert data_rows(client.query("select 'plain'")) == [("plain",)]
    client.close()


def test_gssenc_request_gets_n(proxy: ProxyProcess) -> None:
    client = connect(proxy)
    client.send(GSSENC_REQUEST)
    assert client.read_byte() == b"N"
    client.send(m.ssl_request())
    assert client.read_byte() == b"N"
    client.login("app", APP_PASSWORD)
    assert data_rows(client.query("select 'plain'")) == [("plain",)]
    client.close()


def test_driver_with_sslmode_prefer_without_tls(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn("app", APP_PASSWORD, sslmode="prefer")) as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("select 1").fetchone() == (1,)


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True)
    return cert, key


def test_tls(make_proxy: MakeProxy, tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files

    def edit(cfg: dict[str, Any]) -> None:
        cfg["tls"] = {"cert_file": str(cert), "key_file": str(key)}

    tls_proxy = make_proxy(edit)
    with psycopg.connect(tls_proxy.dsn("app", APP_PASSWORD, sslmode="require")) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select 'over tls'").fetchone() == ("over tls",)
        # Something large, so TLS records split messages.
        assert conn.execute("select length(string_agg(repeat('y', 1000), '')) "
                            "from generate_series(1, 1000)").fetchone() == (1_000_000,)
        rows = conn.execute("select repeat('z', 100000) from generate_series(1, 20)").fetchall()
        assert len(rows) == 20
    with psycopg.connect(tls_proxy.dsn("app", APP_PASSWORD, sslmode="disable")) as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("select 'plain'").fetchone() == ("plain",)
    # Bytes sent after the SSLRequest before the handshake must not be taken as plain text.
    client = RawClient(tls_proxy.host, tls_proxy.port)
    client.send(m.ssl_request() + startup({"user": "app", "database": "app"}))
    replies = client.read_to_eof()
    assert sqlstates(replies) == ["08P01"]
    assert_proxy_serves(tls_proxy)


# --- authentication and databases -------------------------------------------------------------


def test_scram_right_password(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn("app", APP_PASSWORD)) as conn:
        assert conn.execute("select current_database()").fetchone() == ("app",)


@pytest.mark.parametrize("user", ["app", "nobody"])
def test_scram_wrong_password_or_unknown_user(proxy: ProxyProcess, user: str) -> None:
    client = connect(proxy)
    with pytest.raises(ServerError) as refused:
        client.login(user, "wrong-password")
    assert refused.value.sqlstate == "28P01"
    assert refused.value.message == f'password authentication failed for user "{user}"'
    assert refused.value.fields["S"] == "FATAL"
    client.read_to_eof()
    with pytest.raises(psycopg.OperationalError,
                       match=f'password authentication failed for user "{user}"'):
        psycopg.connect(proxy.dsn(user, "wrong-password"))


def test_trust_mode(make_proxy: MakeProxy) -> None:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["auth"] = {"method": "trust"}

    trusting = make_proxy(edit)
    with psycopg.connect(trusting.dsn("app")) as conn:
        assert conn.execute("select 'trusted'").fetchone() == ("trusted",)
    client = RawClient(trusting.host, trusting.port)
    replies = client.login("app", None)
    assert (b"R", _I32.pack(0)) in replies
    client.close()
    # A user that is not configured does not get in, with or without a password.
    stranger = RawClient(trusting.host, trusting.port)
    stranger.send(startup({"user": "stranger", "database": "app"}))
    first = stranger.read_message()
    assert first != (b"R", _I32.pack(0))
    stranger.sock.close()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(trusting.dsn("stranger", "whatever"))
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(trusting.dsn("stranger"))


def test_unknown_database(proxy: ProxyProcess) -> None:
    client = connect(proxy)
    with pytest.raises(ServerError) as refused:
        client.login("app", APP_PASSWORD, database="other")
    assert refused.value.sqlstate == "3D000"
    assert refused.value.message == 'database "other" does not exist'


def test_admin_database_refuses_non_admin(proxy: ProxyProcess) -> None:
    client = connect(proxy)
    with pytest.raises(ServerError) as refused:
        client.login("app", APP_PASSWORD, database="shardwire")
    assert refused.value.sqlstate == "42501"
    admin = connect(proxy)
    admin.login("admin", ADMIN_PASSWORD, database="shardwire")
    assert sqlstates(admin.query("show version")) == []
    admin.close()


# --- cancellation -----------------------------------------------------------------------------


def test_cancel_running_query(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(10)")
        elapsed = time.monotonic() - started
        timer.join()
        assert elapsed < 2.5
        assert conn.execute("select 'after cancel'").fetchone() == ("after cancel",)
        # And inside a transaction: the transaction fails, ROLLBACK recovers.
        conn.execute("begin")
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(10)")
        timer.join()
        conn.execute("rollback")
        assert conn.execute("select 1").fetchone() == (1,)


def test_asyncpg_timeout_cancels(proxy: ProxyProcess) -> None:
    async def scenario() -> None:
        conn = await asyncpg.connect(proxy.dsn("app", APP_PASSWORD))
        try:
            started = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await conn.fetchval("select pg_sleep(10)", timeout=0.5)
            assert time.monotonic() - started < 2.5
            # asyncpg's own named statements keep working on whatever server comes next.
            assert await conn.fetchval("select $1::int + 1", 41) == 42
            assert await conn.fetchval("select $1::int + 1", 1) == 2
        finally:
            await conn.close()

    asyncio.run(scenario())


def test_cancel_with_wrong_key_does_nothing(proxy: ProxyProcess, raw: RawClient) -> None:
    assert raw.pid is not None and raw.secret is not None
    raw.send(query("select pg_sleep(1.5), 'finished'"))
    time.sleep(0.3)
    for pid, secret in [(raw.pid, raw.secret ^ 1), (raw.pid + 100000, raw.secret)]:
        canceller = connect(proxy)
        canceller.send(m.cancel_request(pid, secret))
        assert canceller.read_to_eof() == []
    replies = raw.read_until_ready()
    assert sqlstates(replies) == []
    assert data_rows(replies) == [("", "finished")]
    # The right key does cancel, from a raw socket too.
    raw.send(query("select pg_sleep(10)"))
    time.sleep(0.3)
    canceller = connect(proxy)
    canceller.send(m.cancel_request(raw.pid, raw.secret))
    canceller.read_to_eof()
    started = time.monotonic()
    replies = raw.read_until_ready()
    assert sqlstates(replies) == ["57014"]
    assert time.monotonic() - started < 2
