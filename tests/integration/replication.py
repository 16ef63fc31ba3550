"""Shards with real streaming replicas, and a proxy in front of them (test_replicas.py,
test_failover.py).

`ReplicatedShards.create(base)` makes two primaries with the database `app` and the table
`rw_items` (tenant 1 on s1, tenant 2 on s2), and one `pg_basebackup -R` replica of each,
checked to be streaming before it is handed out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from conftest import ADMIN_PASSWORD, APP_PASSWORD, DATABASE, PROXY_ENV

from shardwire.testing import PostgresCluster
from shardwire.testing.cluster import stop_clusters
from shardwire.testing.proxy import ProxyProcess

TABLE = "rw_items"
SCHEMA = f"create table {TABLE} (tenant_id int not null, id int not null, note text, "\
         "primary key (tenant_id, id));"


@dataclass
class ReplicatedShards:
    primaries: list[PostgresCluster]
    replicas: list[PostgresCluster]

    @classmethod
    def create(cls, base: Path) -> ReplicatedShards:
        primaries: list[PostgresCluster] = []
        replicas: list[PostgresCluster] = []
        try:
            for i in (1, 2):
                primary = PostgresCluster(base / f"p{i}", name=f"p{i}")
                primaries.append(primary)
                primary.init()
                primary.start()
                primary.create_database(DATABASE)
                primary.sql(SCHEMA + f"insert into {TABLE} values ({i}, 0, 'seed');",
                            dbname=DATABASE)
                replicas.append(primary.create_replica(base / f"r{i}", name=f"r{i}"))
                primary.wait_streaming(replicas[-1])
        except BaseException:
            stop_clusters([*replicas, *primaries], mode="immediate")
            raise
        return cls(primaries, replicas)

    def stop(self) -> None:
        stop_clusters([*self.replicas, *self.primaries], mode="immediate")

    def config(self, **sections: Any) -> dict[str, Any]:
        """A proxy config for these shards (tenant i on s<i>), with `sections` added."""
        cfg: dict[str, Any] = {
            "auth": {"method": "scram-sha-256"},
            "database": DATABASE,
            "users": {
                "app": {"password": "${SW_APP_PASSWORD}"},
                "admin": {"password": "${SW_ADMIN_PASSWORD}", "admin": True},
                "sess": {"password": "${SW_SESSION_PASSWORD}", "pool_mode": "session"},
            },
            "shards": {
                f"s{i + 1}": {"primary": p.dsn(DATABASE), "replicas": [r.dsn(DATABASE)]}
                for i, (p, r) in enumerate(zip(self.primaries, self.replicas, strict=True))
            },
            "default_shard": "s1",
            "pool": {"size": 8, "checkout_timeout": 5, "connect_timeout": 3},
            "health": {"interval": 0.2, "timeout": 1, "max_backoff": 1},
            "sharding": {"rules": {"by_tenant": {
                "kind": "tenant", "column": "tenant_id", "type": "integer", "tables": [TABLE],
                "tenants": {1: "s1", 2: "s2"}, "default": "s1"}}},
        }
        cfg.update(sections)
        return cfg


def start_proxy(config: dict[str, Any], workdir: Path) -> ProxyProcess:
    proxy = ProxyProcess(config, workdir, env=PROXY_ENV).start()
    try:
        wait_for(lambda: all(r["health"] == "up" for r in shard_rows(proxy)),
                 "every server passes its first health check")
    except BaseException:
        proxy.stop()
        raise
    return proxy


def app_connect(proxy: ProxyProcess, **kwargs: Any) -> psycopg.Connection[Any]:
    kwargs.setdefault("autocommit", True)
    return psycopg.connect(proxy.dsn("app", APP_PASSWORD), connect_timeout=5, **kwargs)


def shard_rows(proxy: ProxyProcess) -> list[dict[str, Any]]:
    """SHOW SHARDS of the admin console, one dict per server."""
    with psycopg.connect(proxy.dsn("admin", ADMIN_PASSWORD, database="shardwire"),
                         autocommit=True, connect_timeout=5) as conn:
        cur = conn.execute("SHOW SHARDS")
        assert cur.description is not None
        names = [c.name for c in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def server_row(proxy: ProxyProcess, cluster: PostgresCluster) -> dict[str, Any]:
    (row,) = [r for r in shard_rows(proxy) if r["port"] == cluster.port]
    return row


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting until {what}")
        time.sleep(0.05)


def where(conn: psycopg.Connection[Any], tenant: int, sql: str = "") -> tuple[int, bool]:
    """(port, in recovery) of the server that ran a plain read of `tenant`'s rows."""
    row = conn.execute(sql or f"select inet_server_port(), pg_is_in_recovery() from {TABLE} "
                       "where tenant_id = %s limit 1", [tenant]).fetchone()
    assert row is not None
    return int(row[0]), bool(row[1])
