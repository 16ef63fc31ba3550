"""Limits, failing shards and the admin console, each against a real proxy process.

Every limit answers with PostgreSQL's own SQLSTATE (53300, 57014, 08006...) quickly, never a
hang, and the proxy goes on serving once the cause is gone.
"""

from __future__ import annotations

import resource
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import ADMIN_PASSWORD, APP_PASSWORD, MakeProxy
from wire import RawClient, ServerError, data_rows, errors, sqlstates

from shardwire.testing import PostgresCluster, free_port
from shardwire.testing.proxy import ProxyProcess

Row = tuple[Any, ...]


def app_connect(proxy: ProxyProcess, **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(proxy.dsn("app", APP_PASSWORD), connect_timeout=5, **kwargs)


def admin_connect(proxy: ProxyProcess) -> psycopg.Connection[Any]:
    return psycopg.connect(proxy.dsn("admin", ADMIN_PASSWORD, database="shardwire"),
                           autocommit=True, connect_timeout=5)


def admin_rows(proxy: ProxyProcess, command: str) -> tuple[list[str], list[Row]]:
    with admin_connect(proxy) as conn:
        cur = conn.execute(command)
        assert cur.description is not None
        return [c.name for c in cur.description], cur.fetchall()


def as_dicts(columns: list[str], rows: list[Row]) -> list[dict[str, Any]]:
    return [dict(zip(columns, row, strict=True)) for row in rows]


def assert_proxy_serves(proxy: ProxyProcess) -> None:
    assert proxy.running, f"the proxy exited:\n{proxy.log_tail()}"
    with app_connect(proxy) as conn:
        assert conn.execute("select 41 + 1").fetchone() == (42,)


# --- client connection limit ------------------------------------------------------------------


def test_max_client_connections(make_proxy: MakeProxy) -> None:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["listen"] = {"max_client_connections": 3}

    proxy = make_proxy(edit)
    conns = [app_connect(proxy, autocommit=True) for _ in range(3)]
    try:
        for conn in conns:
            assert conn.execute("select 1").fetchone() == (1,)
        refused = RawClient(proxy.host, proxy.port)
        with pytest.raises(ServerError) as err:
            refused.login("app", APP_PASSWORD)
        assert err.value.sqlstate == "53300"
        assert err.value.fields["S"] == "FATAL"
        assert err.value.message == "sorry, too many clients already"
        # One leaves: the next gets in (the proxy may take a moment to see the close).
        conns.pop().close()
        deadline = time.monotonic() + 3
        while True:
            try:
                conns.append(app_connect(proxy, autocommit=True))
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        assert conns[-1].execute("select 'back in'").fetchone() == ("back in",)
        # A driver with libpq's default sslmode=prefer starts with an SSLRequest; it must
        # see PostgreSQL's message too, not a failed SSL exchange.
        with pytest.raises(psycopg.OperationalError, match="sorry, too many clients already"):
            app_connect(proxy)
    finally:
        for conn in conns:
            conn.close()


# --- pool exhaustion ---------------------------------------------------------------------------


def test_checkout_timeout(make_proxy: MakeProxy) -> None:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["pool"].update(size=2, checkout_timeout=1)

    proxy = make_proxy(edit)
    holders = [app_connect(proxy) for _ in range(2)]
    waiter = app_connect(proxy, autocommit=True)
    try:
        for conn in holders:
            conn.execute("select 1")  # BEGIN; select 1 -- the transaction stays open
        for attempt in ("select 1", "select %s::int"):
            started = time.monotonic()
            with pytest.raises(psycopg.errors.QueryCanceled) as err:
                waiter.execute(attempt, (1,) if "%s" in attempt else None)
            elapsed = time.monotonic() - started
            assert 0.8 < elapsed < 3, f"{attempt!r} failed after {elapsed:.2f}s"
            assert "s1" in str(err.value)
        for conn in holders:
            conn.commit()
        assert waiter.execute("select 'got one'").fetchone() == ("got one",)
        assert waiter.execute("select %s::text", ("extended",)).fetchone() == ("extended",)
    finally:
        for conn in [*holders, waiter]:
            conn.close()


def test_max_waiting_clients(make_proxy: MakeProxy) -> None:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["pool"].update(size=2, checkout_timeout=10, max_waiting_clients=1)

    proxy = make_proxy(edit)
    holders = [app_connect(proxy) for _ in range(2)]
    first_waiter = app_connect(proxy, autocommit=True)
    second_waiter = app_connect(proxy, autocommit=True)
    result: list[object] = []
    try:
        for conn in holders:
            conn.execute("select 1")

        def wait_in_line() -> None:
            try:
                result.append(first_waiter.execute("select 'waited'").fetchone())
            except psycopg.Error as e:
                result.append(e)

        thread = threading.Thread(target=wait_in_line)
        thread.start()
        time.sleep(0.5)
        assert result == []  # still waiting
        started = time.monotonic()
        with pytest.raises(psycopg.errors.TooManyConnections):
            second_waiter.execute("select 1")
        assert time.monotonic() - started < 0.5
        holders[0].commit()
        thread.join(5)
        assert result == [("waited",)]
        holders[1].commit()
        assert second_waiter.execute("select 'my turn'").fetchone() == ("my turn",)
    finally:
        for conn in [*holders, first_waiter, second_waiter]:
            conn.close()


# --- shards that are down or crash ---------------------------------------------------------------


def test_shard_down(make_proxy: MakeProxy) -> None:
    dead_port = free_port()

    def edit(cfg: dict[str, Any]) -> None:
        cfg["shards"]["s1"]["primary"] = f"postgresql://postgres@127.0.0.1:{dead_port}/app"

    proxy = make_proxy(edit)
    for _ in range(2):  # and again: nothing is left waiting or half-open
        started = time.monotonic()
        client = RawClient(proxy.host, proxy.port)
        try:
            client.login("app", APP_PASSWORD)
        except ServerError as e:
            failure = e.fields  # refused at login, as PgBouncer does without a server
        else:
            replies = client.query("select 1")
            assert len(sqlstates(replies)) == 1
            (failure,) = errors(replies)
        elapsed = time.monotonic() - started
        assert failure["C"] == "08006"
        assert "s1" in failure["M"]
        assert elapsed < 3, f"the error took {elapsed:.1f}s"
        client.sock.close()
    # The admin console still answers, and says what is wrong with s1.
    columns, rows = admin_rows(proxy, "SHOW POOLS")
    pools = {p["shard"]: p for p in as_dicts(columns, rows)}
    assert set(pools) == {"s1", "s2", "s3"}
    assert pools["s1"]["last_error"]
    columns, rows = admin_rows(proxy, "SHOW SHARDS")
    assert {r["shard"]: r["port"] for r in as_dicts(columns, rows)}["s1"] == dead_port


@pytest.fixture
def victim(tmp_path: Path) -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster of this test's own, to crash."""
    cluster = PostgresCluster(tmp_path / "pg", name="victim")
    cluster.init()
    cluster.start()
    cluster.create_database("app")
    yield cluster
    cluster.stop(mode="immediate")


def test_shard_killed_and_restarted(make_proxy: MakeProxy, victim: PostgresCluster) -> None:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["shards"]["s1"]["primary"] = victim.dsn("app")

    proxy = make_proxy(edit)
    idle = [app_connect(proxy, autocommit=True) for _ in range(3)]
    in_tx = app_connect(proxy)
    try:
        for conn in idle:
            assert conn.execute("select 1").fetchone() == (1,)
        in_tx.execute("select 1")
        victim.kill()
        for conn in [*idle, in_tx]:
            started = time.monotonic()
            with pytest.raises(psycopg.OperationalError) as err:
                conn.execute("select 1")
            elapsed = time.monotonic() - started
            assert elapsed < 5, f"the error took {elapsed:.1f}s"
            code = err.value.sqlstate
            assert code is None or code[:2] in ("08", "57"), err.value
        victim.start()
        # The pool recovers without a restart of the proxy: open connections work again,
        # new ones too.
        for i, conn in enumerate(idle):
            if conn.closed:
                idle[i] = conn = app_connect(proxy, autocommit=True)
            assert conn.execute("select 'recovered'").fetchone() == ("recovered",)
        with app_connect(proxy) as fresh:
            assert fresh.execute("select 'fresh'").fetchone() == ("fresh",)
            fresh.commit()
        columns, rows = admin_rows(proxy, "SHOW POOLS")
        s1 = [p for p in as_dicts(columns, rows) if p["shard"] == "s1"][0]
        assert s1["waiting_clients"] == 0
    finally:
        for conn in [*idle, in_tx]:
            conn.close()


# --- admin console ------------------------------------------------------------------------------


def psql(dsn: str, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["psql", "-X", "-A", "-t", "-F", "|", "-d", dsn, "-c", command],
                          capture_output=True, text=True, timeout=20)


def test_admin_show_commands(proxy: ProxyProcess, shards: list[PostgresCluster]) -> None:
    expected = {f"s{i + 1}": (c.host, c.port) for i, c in enumerate(shards)}
    with app_connect(proxy, autocommit=True) as app, admin_connect(proxy) as admin:
        app.execute("select 1")

        cur = admin.execute("SHOW SHARDS")
        shard_rows = as_dicts([c.name for c in cur.description or []], cur.fetchall())
        assert {r["shard"]: (r["host"], r["port"]) for r in shard_rows} == expected
        assert [r["shard"] for r in shard_rows if r["default"]] == ["s1"]

        cur = admin.execute("SHOW POOLS")
        pools = as_dicts([c.name for c in cur.description or []], cur.fetchall())
        assert {p["shard"] for p in pools} == set(expected)
        assert all(p["pool_size"] == 10 for p in pools)

        cur = admin.execute("SHOW CLIENTS")
        clients = as_dicts([c.name for c in cur.description or []], cur.fetchall())
        assert app.info.backend_pid in [c["pid"] for c in clients if c["user"] == "app"]
        mine = [c for c in clients if c["pid"] == app.info.backend_pid][0]
        assert mine["database"] == "app"
        assert any(c["user"] == "admin" and c["database"] == "shardwire" for c in clients)

        app.execute("begin")
        app.execute("select 1")
        cur = admin.execute("SHOW SERVERS")
        servers = as_dicts([c.name for c in cur.description or []], cur.fetchall())
        assert [s["client_pid"] for s in servers if s["shard"] == "s1"
                and s["state"] == "active"] == [app.info.backend_pid]
        app.execute("commit")

        def s1_transactions() -> int:
            cur = admin.execute("SHOW STATS")
            stats = as_dicts([c.name for c in cur.description or []], cur.fetchall())
            return int([s for s in stats if s["shard"] == "s1"][0]["transactions"])

        before = s1_transactions()
        for _ in range(5):
            app.execute("select 1")
        assert s1_transactions() >= before + 5

        config = dict((k, v) for k, v, *_ in admin.execute("SHOW CONFIG").fetchall())
        assert config["pool.size"] == "10"
        assert config["pool.checkout_timeout"] == "5"
        assert config["database"] == "app"

        ((version,),) = admin.execute("SHOW VERSION").fetchall()
        assert version.startswith("Shardwire ")

        commands = [r[0] for r in admin.execute("SHOW HELP").fetchall()]
        for name in ("SHOW SHARDS", "SHOW POOLS", "SHOW CLIENTS", "SHOW SERVERS",
                     "SHOW STATS", "SHOW CONFIG", "SHOW VERSION", "RELOAD"):
            assert name in commands

        # Lower case, a trailing semicolon and two commands in one Query are fine too.
        assert admin.execute("show version;").fetchone() == (version,)

        for bad in ("SHOW NONSENSE", "FROBNICATE", "SELECT 1"):
            with pytest.raises(psycopg.errors.SyntaxError):
                admin.execute(bad)
        assert admin.execute("SHOW VERSION").fetchone() == (version,)


def test_admin_console_with_psql(proxy: ProxyProcess, shards: list[PostgresCluster]) -> None:
    dsn = proxy.dsn("admin", ADMIN_PASSWORD, database="shardwire")
    done = psql(dsn, "SHOW SHARDS")
    assert done.returncode == 0, done.stderr
    lines = [line.split("|") for line in done.stdout.splitlines() if line]
    assert [(f[0], f[2], int(f[3])) for f in lines] == [
        (f"s{i + 1}", c.host, c.port) for i, c in enumerate(shards)]
    for command in ("SHOW POOLS", "SHOW CLIENTS", "SHOW SERVERS", "SHOW STATS", "SHOW CONFIG",
                    "SHOW VERSION", "SHOW HELP"):
        done = psql(dsn, command)
        assert done.returncode == 0, f"{command}: {done.stderr}"
        assert done.stdout.strip(), command
    done = psql(dsn, "SHOW NOTHING")
    assert done.returncode != 0
    assert "unknown admin command" in done.stderr


def test_admin_reload(make_proxy: MakeProxy) -> None:
    proxy = make_proxy()
    cfg = proxy.config
    cfg["pool"]["size"] = 7
    proxy.write_config(cfg)
    with admin_connect(proxy) as admin:
        admin.execute("RELOAD")
        config = dict((k, v) for k, v, *_ in admin.execute("SHOW CONFIG").fetchall())
        assert config["pool.size"] == "7"
        cur = admin.execute("SHOW POOLS")
        pools = as_dicts([c.name for c in cur.description or []], cur.fetchall())
        assert {p["pool_size"] for p in pools} == {7}

        cfg["pool"]["size"] = -3
        proxy.write_config(cfg)
        with pytest.raises(psycopg.Error) as err:
            admin.execute("RELOAD")
        assert err.value.sqlstate == "F0000"
        assert "pool.size" in (err.value.diag.message_detail or "")
        config = dict((k, v) for k, v, *_ in admin.execute("SHOW CONFIG").fetchall())
        assert config["pool.size"] == "7"

        proxy.config_path.write_text("pool: [unclosed\n")
        with pytest.raises(psycopg.Error) as err:
            admin.execute("RELOAD")
        assert err.value.sqlstate == "F0000"
        assert err.value.diag.message_detail
    assert_proxy_serves(proxy)


# --- many idle clients ---------------------------------------------------------------------------


def proxy_rss_mb(proxy: ProxyProcess) -> float:
    assert proxy.proc is not None
    for line in Path(f"/proc/{proxy.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_thousand_idle_clients(make_proxy: MakeProxy,
                               record_property: Any) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))

    def edit(cfg: dict[str, Any]) -> None:
        cfg["listen"] = {"max_client_connections": 1100}

    proxy = make_proxy(edit)
    before = proxy_rss_mb(proxy)
    clients: list[RawClient] = []
    try:
        for _ in range(1000):
            client = RawClient(proxy.host, proxy.port)
            clients.append(client)
            client.login("app", APP_PASSWORD)
        rss = proxy_rss_mb(proxy)
        print(f"\nproxy RSS: {before:.1f} MB at start, {rss:.1f} MB with 1000 idle clients")
        record_property("proxy_rss_mb_1000_idle_clients", round(rss, 1))
        assert rss < 100
        for client in clients[::100]:
            assert data_rows(client.query("select 'alive'")) == [("alive",)]
        assert_proxy_serves(proxy)
        columns, rows = admin_rows(proxy, "SHOW CLIENTS")
        assert len([c for c in as_dicts(columns, rows) if c["user"] == "app"]) >= 1000
    finally:
        for client in clients:
            client.sock.close()
