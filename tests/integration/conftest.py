"""Fixtures that put a real Shardwire process in front of the real clusters of `pg_clusters`.

`proxy` is shared by the whole session (users below, transaction pooling, default shard s1 =
cluster shard1). Tests that need other settings build their own with `make_proxy`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest

from shardwire.testing import PostgresCluster
from shardwire.testing.proxy import ProxyProcess

APP_PASSWORD = "app-secret"
ADMIN_PASSWORD = "admin-secret"
SESSION_PASSWORD = "session-secret"
DATABASE = "app"

PROXY_ENV = {
    "SW_APP_PASSWORD": APP_PASSWORD,
    "SW_ADMIN_PASSWORD": ADMIN_PASSWORD,
    "SW_SESSION_PASSWORD": SESSION_PASSWORD,
}


@pytest.fixture(scope="session")
def shards(pg_clusters: list[PostgresCluster]) -> list[PostgresCluster]:
    """The clusters, each with the database `app` that the proxy serves."""
    for cluster in pg_clusters:
        cluster.create_database(DATABASE)
    return pg_clusters


def base_config(shards: list[PostgresCluster]) -> dict[str, Any]:
    return {
        "auth": {"method": "scram-sha-256"},
        "database": DATABASE,
        "users": {
            "app": {"password": "${SW_APP_PASSWORD}"},
            "admin": {"password": "${SW_ADMIN_PASSWORD}", "admin": True},
            "sess": {"password": "${SW_SESSION_PASSWORD}", "pool_mode": "session"},
        },
        "shards": {f"s{i + 1}": {"primary": c.dsn(DATABASE)} for i, c in enumerate(shards)},
        "default_shard": "s1",
        "pool": {"size": 10, "checkout_timeout": 5},
    }


@pytest.fixture(scope="session")
def proxy(shards: list[PostgresCluster],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    proc = ProxyProcess(base_config(shards), tmp_path_factory.mktemp("proxy"), env=PROXY_ENV)
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def app_dsn(proxy: ProxyProcess) -> str:
    return proxy.dsn("app", APP_PASSWORD)


@pytest.fixture
def admin_dsn(proxy: ProxyProcess) -> str:
    return proxy.dsn("admin", ADMIN_PASSWORD, database="shardwire")


MakeProxy = Callable[..., ProxyProcess]


@pytest.fixture
def make_proxy(shards: list[PostgresCluster], tmp_path: Path) -> Iterator[MakeProxy]:
    """Start a proxy of one's own: `make_proxy(edit)` where `edit(config_dict)` changes the
    base config in place."""
    started: list[ProxyProcess] = []

    def make(edit: Callable[[dict[str, Any]], None] | None = None, *,
             start: bool = True) -> ProxyProcess:
        cfg = copy.deepcopy(base_config(shards))
        if edit is not None:
            edit(cfg)
        proc = ProxyProcess(cfg, tmp_path / f"proxy{len(started)}", env=PROXY_ENV)
        started.append(proc)
        return proc.start() if start else proc

    yield make
    for proc in started:
        proc.stop()


def on_shard(cluster: PostgresCluster, sql: str, params: Sequence[Any] | None = None
             ) -> list[tuple[Any, ...]]:
    """Rows of `sql` run directly on one shard, bypassing the proxy."""
    with psycopg.connect(cluster.dsn(DATABASE), autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


def admin_console(proxy: ProxyProcess) -> psycopg.Connection[Any]:
    """A connection to the proxy's admin console (database shardwire) as the admin user."""
    return psycopg.connect(proxy.dsn("admin", ADMIN_PASSWORD, database="shardwire"),
                           autocommit=True, connect_timeout=5)


def show_state(proxy: ProxyProcess) -> dict[str, Any]:
    """SHOW STATE on the admin console, as {column: value}."""
    with admin_console(proxy) as conn:
        cur = conn.execute("SHOW STATE")
        assert cur.description is not None
        row = cur.fetchone()
        assert row is not None
        return dict(zip([c.name for c in cur.description], row, strict=True))


def assert_nothing_left_behind(proxy: ProxyProcess, shards: list[PostgresCluster]) -> None:
    """TESTING idea 4: no session idle in transaction on any shard (within a few seconds),
    and the proxy still serves a fresh connection."""
    deadline = time.monotonic() + 3
    while True:
        stuck = {c.name: on_shard(c, "select pid, state, left(query, 80) from pg_stat_activity "
                                     "where datname = %s and state like 'idle in transaction%%' "
                                     "and pid <> pg_backend_pid()", [DATABASE])
                 for c in shards}
        stuck = {k: v for k, v in stuck.items() if v}
        if not stuck or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not stuck, f"sessions left idle in transaction: {stuck}"
    with psycopg.connect(proxy.dsn("app", APP_PASSWORD), connect_timeout=10) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
