"""Graceful shutdown (docs/operations.md#shutting-down-pause-and-resume), with a real proxy
process receiving real signals.

SIGTERM: new connections are refused at once, idle clients are closed at once with 57P01, a
transaction running commits, its client is closed when it ends, and the process exits
within `shutdown_timeout` even when a transaction never ends. SIGINT is immediate.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from conftest import APP_PASSWORD, MakeProxy, on_shard

from shardwire.testing import PostgresCluster
from shardwire.testing.proxy import ProxyProcess

TABLE = "shutdown_items"


@pytest.fixture
def table(shards: list[PostgresCluster]) -> Iterator[PostgresCluster]:
    on_shard(shards[0], f"create table {TABLE} (id int primary key)")
    yield shards[0]
    on_shard(shards[0], f"drop table if exists {TABLE}")


def connect(proxy: ProxyProcess, **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(proxy.dsn("app", APP_PASSWORD), connect_timeout=3, **kwargs)


def timeout(seconds: float) -> Any:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["shutdown_timeout"] = seconds
    return edit


def exit_time(proxy: ProxyProcess, limit: float) -> float:
    """Seconds until the process exits (it must within `limit`)."""
    assert proxy.proc is not None
    started = time.monotonic()
    try:
        proxy.proc.wait(limit)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the proxy did not exit within {limit} s:\n"
                             f"{proxy.log_tail()}") from None
    return time.monotonic() - started


def test_sigterm_lets_the_running_transaction_commit(make_proxy: MakeProxy,
                                                     table: PostgresCluster) -> None:
    proxy = make_proxy(timeout(10))
    running = connect(proxy)
    idle = connect(proxy, autocommit=True)
    try:
        idle.execute("select 1")
        running.execute(f"insert into {TABLE} values (1)")  # BEGIN; INSERT: open
        proxy.signal(signal.SIGTERM)
        time.sleep(0.5)
        # a new connection during the drain is refused
        with pytest.raises(psycopg.OperationalError):
            connect(proxy).close()
        # the idle client was closed at once, with 57P01
        with pytest.raises(psycopg.OperationalError) as err:
            idle.execute("select 1")
        assert "shutting down" in str(err.value)
        assert proxy.running  # still draining
        # the running transaction goes on and commits
        running.execute(f"insert into {TABLE} values (2)")
        running.commit()
        took = exit_time(proxy, 3)  # its end was the last thing the proxy waited for
        assert took < 3
        with pytest.raises(psycopg.OperationalError):
            running.execute("select 1")  # closed after its transaction
    finally:
        running.close()
        idle.close()
    assert on_shard(table, f"select id from {TABLE} order by id") == [(1,), (2,)]
    assert proxy.proc is not None and proxy.proc.returncode == 0
    assert "shutting down: 1 transactions may run" in proxy.log_path.read_text()


def test_sigterm_ends_a_transaction_that_outlives_shutdown_timeout(
        make_proxy: MakeProxy, table: PostgresCluster) -> None:
    proxy = make_proxy(timeout(1.5))
    stuck = connect(proxy)
    try:
        stuck.execute(f"insert into {TABLE} values (3)")  # and never commits
        started = time.monotonic()
        proxy.signal(signal.SIGTERM)
        exit_time(proxy, 5)
        assert 1.3 < time.monotonic() - started < 4
        with pytest.raises(psycopg.OperationalError) as err:
            stuck.execute("select 1")
        assert "shutting down" in str(err.value)
    finally:
        stuck.close()
    # its server connection was closed: PostgreSQL rolled the transaction back
    deadline = time.monotonic() + 3
    while on_shard(table, "select count(*) from pg_stat_activity where datname = 'app' and "
                          "state like 'idle in transaction%%'") != [(0,)]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert on_shard(table, f"select id from {TABLE}") == []


def test_sigint_is_immediate(make_proxy: MakeProxy, table: PostgresCluster) -> None:
    proxy = make_proxy(timeout(30))
    open_tx = connect(proxy)
    try:
        open_tx.execute(f"insert into {TABLE} values (4)")
        proxy.signal(signal.SIGINT)
        assert exit_time(proxy, 3) < 3
        with pytest.raises(psycopg.OperationalError):
            open_tx.execute("select 1")
    finally:
        open_tx.close()


def test_sigint_during_the_drain_ends_it(make_proxy: MakeProxy,
                                         table: PostgresCluster) -> None:
    proxy = make_proxy(timeout(30))
    open_tx = connect(proxy)
    try:
        open_tx.execute(f"insert into {TABLE} values (5)")
        proxy.signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proxy.running  # waiting for the transaction
        proxy.signal(signal.SIGINT)
        assert exit_time(proxy, 3) < 3
    finally:
        open_tx.close()
