"""PAUSE and RESUME in the admin console (docs/operations.md#shutting-down-pause-and-resume),
with a real proxy process and real clients.

PAUSE answers once every transaction running has finished (and lets them finish); after
it, clients stay connected and new ones may log in, but their statements wait; RESUME lets
them run. SHOW STATE says what the proxy is doing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from conftest import APP_PASSWORD, admin_console, on_shard, show_state

from shardwire.testing import PostgresCluster
from shardwire.testing.proxy import ProxyProcess

TABLE = "pause_items"


@pytest.fixture
def table(shards: list[PostgresCluster]) -> Iterator[PostgresCluster]:
    on_shard(shards[0], f"create table {TABLE} (id int primary key)")
    yield shards[0]
    on_shard(shards[0], f"drop table if exists {TABLE}")


def connect(proxy: ProxyProcess, **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(proxy.dsn("app", APP_PASSWORD), connect_timeout=3, **kwargs)


class Background:
    """Runs `work` in a thread; `result` is its return value or its exception."""

    def __init__(self, work: Callable[[], object]) -> None:
        self.result: list[object] = []

        def run() -> None:
            try:
                self.result.append(work())
            except Exception as e:
                self.result.append(e)

        self.thread = threading.Thread(target=run)
        self.thread.start()

    def wait(self, seconds: float) -> object:
        self.thread.join(seconds)
        assert self.result, f"still waiting after {seconds} s"
        return self.result[0]


def test_pause_waits_for_transactions_then_holds_new_work(
        proxy: ProxyProcess, table: PostgresCluster) -> None:
    running = connect(proxy)
    idle = connect(proxy, autocommit=True)
    console = admin_console(proxy)
    try:
        idle.execute("select 1")
        running.execute(f"insert into {TABLE} values (1)")  # BEGIN; INSERT: open
        pause = Background(lambda: console.execute("PAUSE").statusmessage)
        time.sleep(0.5)
        assert pause.result == []  # waits for the running transaction
        assert show_state(proxy)["state"] == "pausing"
        late = Background(lambda: idle.execute("select 'after resume'").fetchone())
        running.execute(f"insert into {TABLE} values (2)")  # still runs while pausing
        running.commit()
        assert pause.wait(3) == "PAUSE"
        s = show_state(proxy)
        assert s["state"] == "paused" and s["paused_databases"] == "(all)"
        # clients stay connected, new ones log in, but their statements wait
        newcomer = connect(proxy, autocommit=True)
        fresh = Background(lambda: newcomer.execute("select 'newcomer'").fetchone())
        time.sleep(1)
        assert late.result == [] and fresh.result == []
        assert show_state(proxy)["held_by_pause"] == 2
        assert on_shard(table, f"select id from {TABLE} order by id") == [(1,), (2,)]
        assert console.execute("RESUME").statusmessage == "RESUME"
        assert late.wait(3) == ("after resume",)
        assert fresh.wait(3) == ("newcomer",)
        assert show_state(proxy)["state"] == "running"
        newcomer.close()
    finally:
        console.execute("RESUME")
        for conn in (running, idle, console):
            conn.close()


def test_pause_of_one_database(proxy: ProxyProcess) -> None:
    with admin_console(proxy) as console, connect(proxy, autocommit=True) as client:
        with pytest.raises(psycopg.Error) as err:
            console.execute("PAUSE nosuchdb")
        assert err.value.sqlstate == "3D000"
        assert console.execute("PAUSE app").statusmessage == "PAUSE"
        try:
            assert show_state(proxy)["paused_databases"] == "app"
            held = Background(lambda: client.execute("select 'held'").fetchone())
            time.sleep(0.5)
            assert held.result == []
            # the admin console is never paused
            assert console.execute("SHOW VERSION").fetchone() is not None
            assert console.execute("RESUME app").statusmessage == "RESUME"
            assert held.wait(3) == ("held",)
        finally:
            console.execute("RESUME")


def test_a_paused_client_that_leaves_frees_nothing_it_did_not_hold(proxy: ProxyProcess) -> None:
    with admin_console(proxy) as console:
        console.execute("PAUSE")
        try:
            leaver = connect(proxy, autocommit=True)
            gone = Background(lambda: leaver.execute("select 1").fetchone())
            time.sleep(0.3)
            leaver.close()  # while held
            gone.thread.join(3)
            assert show_state(proxy)["held_by_pause"] == 0
        finally:
            console.execute("RESUME")
    with connect(proxy, autocommit=True) as conn:
        assert conn.execute("select 'serving'").fetchone() == ("serving",)
