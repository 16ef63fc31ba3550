"""Admission control (docs/operations.md#limits-and-admission-control), against a real proxy
process, real PostgreSQL shards and real clients.

A limit on concurrent transactions holds (checked on the shard itself, in pg_stat_activity);
work past a full queue gets 53300 at once, work that waits too long 57014; a flood of clients
is refused quickly without the proxy's memory growing; other users and the admin console are
not held up; a tenant over its rate gets 53400. Limits show in SHOW CONFIG and RELOAD applies
them.
"""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import APP_PASSWORD, MakeProxy, admin_console, on_shard, show_state
from wire import RawClient, errors

from shardwire.testing import PostgresCluster
from shardwire.testing.proxy import ProxyProcess

OTHER_PASSWORD = "other-secret"
RATED = "admission_rated"


def limits(**values: Any) -> Any:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["limits"] = values
        cfg["users"]["other"] = {"password": OTHER_PASSWORD}
    return edit


def connect(proxy: ProxyProcess, user: str = "app", **kwargs: Any) -> psycopg.Connection[Any]:
    password = {"app": APP_PASSWORD, "other": OTHER_PASSWORD}[user]
    return psycopg.connect(proxy.dsn(user, password), connect_timeout=5, **kwargs)


def sleepers_on(cluster: PostgresCluster, marker: str) -> int:
    """Sessions on the shard running the statement tagged `marker` now."""
    rows = on_shard(cluster, "select count(*) from pg_stat_activity where query like %s "
                             "and pid <> pg_backend_pid()", [f"%{marker}%"])
    return int(rows[0][0])


def in_background(work: list[Any]) -> list[threading.Thread]:
    threads = [threading.Thread(target=w) for w in work]
    for t in threads:
        t.start()
    return threads


def test_user_limit_holds_with_concurrent_clients(make_proxy: MakeProxy,
                                                  shards: list[PostgresCluster]) -> None:
    proxy = make_proxy(limits(max_transactions_per_user=2, wait_timeout=10))
    results: list[object] = []

    def transaction(i: int) -> None:
        try:
            with connect(proxy) as conn:  # psycopg: BEGIN, two statements, COMMIT
                conn.execute("select pg_sleep(0.4) /* limit-user */")
                results.append(conn.execute("select %s::int", (i,)).fetchone())
                conn.commit()
        except psycopg.Error as e:
            results.append(e)

    started = time.monotonic()
    threads = in_background([lambda i=i: transaction(i) for i in range(6)])
    peak = 0
    other_took = None
    while any(t.is_alive() for t in threads):
        peak = max(peak, sleepers_on(shards[0], "limit-user"))
        if other_took is None and peak == 2:
            # another user is not held up by app's limit
            t0 = time.monotonic()
            with connect(proxy, "other", autocommit=True) as conn:
                assert conn.execute("select 'not held'").fetchone() == ("not held",)
            other_took = time.monotonic() - t0
        time.sleep(0.02)
    elapsed = time.monotonic() - started
    assert sorted(r for r in results if isinstance(r, tuple)) == [(i,) for i in range(6)], results
    assert peak == 2  # never more than the limit at once, and the limit was reached
    assert elapsed >= 3 * 0.4  # six transactions, two at a time
    assert other_took is not None and other_took < 1.0


def test_a_full_queue_refuses_at_once_with_53300(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(limits(max_transactions_per_user=1, max_waiting_transactions=1,
                              wait_timeout=10))
    holder = connect(proxy)
    first, second = connect(proxy, autocommit=True), connect(proxy, autocommit=True)
    result: list[object] = []
    try:
        holder.execute("select 1")  # BEGIN; select 1 -- the transaction stays open

        def wait_in_line() -> None:
            try:
                result.append(first.execute("select 'waited'").fetchone())
            except psycopg.Error as e:
                result.append(e)

        thread = threading.Thread(target=wait_in_line)
        thread.start()
        time.sleep(0.5)
        assert result == []  # queued
        for attempt in ("select 1", "select %s::int"):  # simple, then extended protocol
            started = time.monotonic()
            with pytest.raises(psycopg.errors.TooManyConnections) as err:
                second.execute(attempt, (1,) if "%s" in attempt else None)
            assert time.monotonic() - started < 0.5
            assert "user 'app'" in str(err.value) and "1 are running" in str(err.value)
            assert "limits.max_transactions_per_user" in (err.value.diag.message_hint or "")
        holder.commit()
        thread.join(5)
        assert result == [("waited",)]
        # the refused connection is still usable
        assert second.execute("select 'my turn'").fetchone() == ("my turn",)
        assert second.execute("select %s::text", ("extended",)).fetchone() == ("extended",)
    finally:
        for conn in (holder, first, second):
            conn.close()
    assert show_state(proxy)["rejected_queue_full"] == 2


def test_waiting_too_long_gets_57014(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(limits(max_transactions_per_database=1, wait_timeout=1))
    holder = connect(proxy)
    waiter = connect(proxy, "other", autocommit=True)  # the database limit covers every user
    try:
        holder.execute("select 1")
        for attempt in ("select 1", "select %s::int"):
            started = time.monotonic()
            with pytest.raises(psycopg.errors.QueryCanceled) as err:
                waiter.execute(attempt, (1,) if "%s" in attempt else None)
            elapsed = time.monotonic() - started
            assert 0.8 < elapsed < 2.5, elapsed
            assert "database 'app'" in str(err.value)
            assert "limits.max_transactions_per_database" in (
                err.value.diag.message_hint or "")
        # the admin console is not behind the limit
        assert show_state(proxy)["rejected_timeout"] == 2
        holder.commit()
        assert waiter.execute("select 'after'").fetchone() == ("after",)
    finally:
        holder.close()
        waiter.close()


def proxy_rss_mb(proxy: ProxyProcess) -> float:
    assert proxy.proc is not None
    for line in Path(f"/proc/{proxy.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def many_files() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))


def test_a_flood_is_refused_quickly_without_growing_memory(
        make_proxy: MakeProxy, many_files: None, record_property: Any) -> None:
    flood = 400
    queue = 20
    proxy = make_proxy(limits(max_transactions_per_user=2, max_waiting_transactions=queue,
                              wait_timeout=2))
    holders = [connect(proxy) for _ in range(2)]
    clients: list[RawClient] = []
    try:
        for conn in holders:
            conn.execute("select 1")  # both of app's transactions are taken
        before = proxy_rss_mb(proxy)
        started = time.monotonic()
        for _ in range(flood):  # a bounded loop: each client logs in and tries work
            client = RawClient(proxy.host, proxy.port)
            client.login("app", APP_PASSWORD)
            # a big statement: held whole while it waits, not copied
            client.send(b"Q" + (len(b"select 1 /*" + b"x" * 20000 + b"*/") + 5).to_bytes(4, "big")
                        + b"select 1 /*" + b"x" * 20000 + b"*/\x00")
            clients.append(client)
        sent = time.monotonic() - started
        codes = []
        for client in clients:
            replies, _ = client.read_until_ready_or_eof(timeout=10)
            codes.append([e["C"] for e in errors(replies)])
        elapsed = time.monotonic() - started
        after = proxy_rss_mb(proxy)
        print(f"\nflood of {flood} clients: sent in {sent:.1f} s, all answered in "
              f"{elapsed:.1f} s; proxy RSS {before:.1f} -> {after:.1f} MB")
        record_property("admission_flood_rss_growth_mb", round(after - before, 1))
        assert codes.count(["53300"]) == flood - queue
        assert codes.count(["57014"]) == queue  # the queue waited its 2 s, then gave up
        assert elapsed < sent + 2 + 3
        assert after - before < 40, (before, after)
        # other users go on while app is flooded
        with connect(proxy, "other", autocommit=True) as conn:
            assert conn.execute("select 'fine'").fetchone() == ("fine",)
        s = show_state(proxy)
        assert s["rejected_queue_full"] == flood - queue and s["rejected_timeout"] == queue
        assert s["waiting_for_limits"] == 0
    finally:
        for client in clients:
            client.sock.close()
        for conn in holders:
            conn.close()
    with connect(proxy, autocommit=True) as conn:  # app's own work runs again
        assert conn.execute("select 'after the flood'").fetchone() == ("after the flood",)


@pytest.fixture
def rated_table(shards: list[PostgresCluster]) -> Iterator[None]:
    for cluster in shards:
        on_shard(cluster, f"create table {RATED} (id int primary key, tenant_id int)")
    for tenant, cluster in zip((1, 2), shards, strict=False):
        on_shard(cluster, f"insert into {RATED} values (%s, %s)", [tenant, tenant])
    yield
    for cluster in shards:
        on_shard(cluster, f"drop table if exists {RATED}")


def test_a_tenant_over_its_rate_gets_53400(make_proxy: MakeProxy, rated_table: None) -> None:
    def edit(cfg: dict[str, Any]) -> None:
        limits(tenant_statements_per_second=5, tenant_burst=5)(cfg)
        cfg["sharding"] = {"rules": {"rated_by_tenant": {
            "kind": "tenant", "column": "tenant_id", "type": "integer", "tables": [RATED],
            "tenants": {1: "s1", 2: "s2"}, "default": "s1"}}}

    proxy = make_proxy(edit)
    with connect(proxy, autocommit=True) as conn:
        ok = 0
        refused: psycopg.Error | None = None
        for _ in range(20):  # much faster than 5 a second
            try:
                conn.execute(f"select id from {RATED} where tenant_id = %s", (1,)).fetchall()
                ok += 1
            except psycopg.errors.ConfigurationLimitExceeded as e:
                refused = e
                break
        assert ok == 5 and refused is not None  # the burst, then refused
        assert "tenant_id" in str(refused) or "rated_by_tenant" in str(refused)
        assert "limits.tenant_statements_per_second" in (refused.diag.message_hint or "")
        # another tenant has its own bucket; so do statements with no key
        assert conn.execute(f"select id from {RATED} where tenant_id = 2").fetchall() == [(2,)]
        assert conn.execute(f"select count(*) from {RATED}").fetchone() == (2,)
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded):
            conn.execute(f"select id from {RATED} where tenant_id = 1")  # simple protocol too
        time.sleep(0.5)  # 2.5 tokens back
        assert conn.execute(f"select id from {RATED} where tenant_id = 1").fetchall() == [(1,)]
    assert show_state(proxy)["rejected_rate"] == 2


def test_limits_show_in_show_config_and_reload_applies_them(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(limits(max_transactions_per_user=1, wait_timeout=10))
    with admin_console(proxy) as conn:
        rows = {r[0]: r for r in conn.execute("SHOW CONFIG").fetchall()}
    assert rows["limits.max_transactions_per_user"][1:] == ("1", "0", "yes")
    assert rows["limits.wait_timeout"][1:3] == ("10", "5")
    assert rows["shutdown_timeout"][1:] == ("20", "20", "yes")

    holder = connect(proxy)
    waiter = connect(proxy, autocommit=True)
    result: list[object] = []
    try:
        holder.execute("select 1")
        thread = threading.Thread(target=lambda: result.append(
            waiter.execute("select 'let in'").fetchone()))
        thread.start()
        time.sleep(0.5)
        assert result == []
        cfg = dict(proxy.config)
        cfg["limits"] = {"max_transactions_per_user": -1}
        proxy.write_config(cfg)
        with admin_console(proxy) as conn, pytest.raises(psycopg.Error) as err:
            conn.execute("RELOAD")
        assert err.value.sqlstate == "F0000"
        assert "limits.max_transactions_per_user" in (err.value.diag.message_detail or "")
        cfg["limits"] = {"max_transactions_per_user": 2, "wait_timeout": 10}
        proxy.write_config(cfg)
        with admin_console(proxy) as conn:
            conn.execute("RELOAD")
        thread.join(3)
        assert result == [("let in",)]  # the raised limit let the waiter in at once
        holder.commit()
    finally:
        holder.close()
        waiter.close()


def test_a_queued_client_that_leaves_gives_up_its_place(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(limits(max_transactions_per_user=1, max_waiting_transactions=1,
                              wait_timeout=10))
    holder = connect(proxy)
    try:
        holder.execute("select 1")
        leaver = RawClient(proxy.host, proxy.port)
        leaver.login("app", APP_PASSWORD)
        leaver.send(b"Q" + (len(b"select 1") + 5).to_bytes(4, "big") + b"select 1\x00")
        time.sleep(0.3)
        assert show_state(proxy)["waiting_for_limits"] == 1
        leaver.close()
        time.sleep(0.3)
        assert show_state(proxy)["waiting_for_limits"] == 0
        # the place is free: the next one queues (no 53300) and runs after the holder
        with connect(proxy, autocommit=True) as waiter:
            queued = threading.Thread(target=lambda: waiter.execute("select 1"))
            queued.start()
            time.sleep(0.3)
            assert queued.is_alive()
            holder.commit()
            queued.join(3)
            assert not queued.is_alive()
    finally:
        holder.close()


def test_the_place_is_given_back_after_every_kind_of_work(
        make_proxy: MakeProxy, rated_table: None) -> None:
    """With one transaction allowed in the database, a second client runs right after each
    kind of work of the first: a place not given back would make it wait and fail (57014)."""
    from conftest import SESSION_PASSWORD

    def edit(cfg: dict[str, Any]) -> None:
        limits(max_transactions_per_database=1, wait_timeout=1)(cfg)
        cfg["sharding"] = {"rules": {"rated_by_tenant": {
            "kind": "tenant", "column": "tenant_id", "type": "integer", "tables": [RATED],
            "tenants": {1: "s1", 2: "s2"}, "default": "s1"}}}

    proxy = make_proxy(edit)
    with connect(proxy, autocommit=True) as other:
        def other_runs() -> None:
            t0 = time.monotonic()
            assert other.execute("select 'next'").fetchone() == ("next",)
            assert time.monotonic() - t0 < 0.5

        with connect(proxy) as conn:  # a transaction on two shards: two-phase commit
            conn.execute(f"insert into {RATED} (id, tenant_id) values (11, 1)")
            conn.execute(f"insert into {RATED} (id, tenant_id) values (12, 2)")
            conn.commit()
            other_runs()
            conn.execute(f"select id from {RATED} where tenant_id = 1")  # one shard
            conn.rollback()
            other_runs()
        with connect(proxy, autocommit=True) as conn:
            conn.execute(f"select count(*) from {RATED}")  # merged from both shards
            other_runs()
            conn.execute("set application_name = 'admission'")  # answered by the proxy
            other_runs()
            conn.execute("show application_name")
            other_runs()
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute("select 1 / 0")
            other_runs()
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute("select 1 / %s::int", (0,))  # extended protocol
            other_runs()
            assert conn.execute(f"select id from {RATED} where tenant_id = %s",
                                (2,)).fetchall() == [(2,), (12,)]
            other_runs()
        session_dsn = proxy.dsn("sess", SESSION_PASSWORD)  # session pooling: pinned
        with psycopg.connect(session_dsn, connect_timeout=5) as conn:
            conn.execute("select 1")
            conn.commit()
            other_runs()  # the session keeps its server connection, not the place
            conn.execute("select 2")
            conn.commit()
            other_runs()
