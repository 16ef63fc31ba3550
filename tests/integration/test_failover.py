"""Health checks and failover with real primaries and streaming replicas (docs/operations.md,
"Health checks and failover"). Each test crashes servers, so each gets clusters of its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import ADMIN_PASSWORD
from replication import (
    TABLE,
    ReplicatedShards,
    app_connect,
    server_row,
    start_proxy,
    wait_for,
    where,
)

from shardwire.testing.proxy import ProxyProcess


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ReplicatedShards]:
    shards = ReplicatedShards.create(tmp_path / "pg")
    yield shards
    shards.stop()


@pytest.fixture
def proxy(cluster: ReplicatedShards, tmp_path: Path) -> Iterator[ProxyProcess]:
    proc = start_proxy(cluster.config(), tmp_path / "proxy")
    yield proc
    proc.stop()


class Readers:
    """Threads reading one tenant's rows over and over, each on its own connection,
    recording every error."""

    def __init__(self, proxy: ProxyProcess, tenant: int, count: int) -> None:
        self.proxy = proxy
        self.tenant = tenant
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.reads = 0
        self.ports: set[int] = set()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(count)]

    def run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        while not self.stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = app_connect(self.proxy)
                self.ports.add(where(conn, self.tenant)[0])
                self.reads += 1
            except psycopg.Error as e:
                self.errors.append(f"{e.sqlstate}: {e}")
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.05)
        if conn is not None:
            conn.close()

    def __enter__(self) -> Readers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


def test_a_replica_killed_under_load_is_ejected(cluster: ReplicatedShards,
                                                proxy: ProxyProcess) -> None:
    p1, r1 = cluster.primaries[0], cluster.replicas[0]
    with Readers(proxy, 2, 3) as other_shard, Readers(proxy, 1, 3) as same_shard:
        wait_for(lambda: other_shard.reads > 30 and same_shard.reads > 30, "reads flow")
        assert same_shard.ports == {r1.port}
        r1.kill()
        wait_for(lambda: server_row(proxy, r1)["health"] == "down",
                 "SHOW SHARDS says r1 is down", timeout=5)
        # Out of rotation: shard 1's reads go to its primary now, without errors.
        errors_then, reads_then = len(same_shard.errors), same_shard.reads
        same_shard.ports.clear()
        wait_for(lambda: same_shard.reads > reads_then + 30, "shard 1 reads go on")
        assert same_shard.ports == {p1.port}
        assert len(same_shard.errors) == errors_then, same_shard.errors
    # Clients of the other shard never noticed.
    assert other_shard.errors == []
    assert other_shard.reads > 60
    # The killed replica's own clients at most lost the statement they were running then.
    assert all(e.startswith(("08", "57")) for e in same_shard.errors), same_shard.errors
    row = server_row(proxy, r1)
    assert row["failures"] >= 1 and row["health_error"]

    # Restarted, it is found by the health check (backoff capped at 1s here) and used again.
    r1.start()
    with app_connect(proxy) as conn:
        wait_for(lambda: where(conn, 1)[0] == r1.port, "reads go back to r1", timeout=10)


def test_a_killed_primary_fails_fast_with_a_clear_error(cluster: ReplicatedShards,
                                                        proxy: ProxyProcess) -> None:
    p1, r1 = cluster.primaries[0], cluster.replicas[0]
    p2 = cluster.primaries[1]
    with app_connect(proxy) as conn, app_connect(proxy) as other:
        assert where(other, 2)[1] is True
        p1.kill()
        wait_for(lambda: server_row(proxy, p1)["health"] == "down", "p1 is marked down",
                 timeout=5)
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(psycopg.OperationalError) as err:
                conn.execute(f"insert into {TABLE} (tenant_id, id, note) values (1, 5, 'x')")
            elapsed = time.monotonic() - started
            assert elapsed < 1, f"the error took {elapsed:.2f}s"
            assert err.value.sqlstate in ("57P03", "08006"), err.value
            assert "shard s1" in str(err.value)
            if err.value.sqlstate == "57P03":
                assert err.value.diag.message_hint and "RELOAD" in err.value.diag.message_hint
            if conn.closed:
                conn = app_connect(proxy)
        # Plain reads of shard 1 still work, from its replica; shard 2 is untouched.
        assert where(conn, 1) == (r1.port, True)
        assert where(other, 2)[1] is True
        row = other.execute(f"insert into {TABLE} (tenant_id, id, note) values (2, 5, 'y') "
                            "returning inet_server_port()").fetchone()
        assert row == (p2.port,)
        # A client that connects now still logs in (the default shard's primary is down).
        with app_connect(proxy) as fresh:
            assert where(fresh, 1) == (r1.port, True)


def test_promote_and_reload_switch_the_primary(cluster: ReplicatedShards,
                                               proxy: ProxyProcess) -> None:
    p1, r1 = cluster.primaries[0], cluster.replicas[0]
    with app_connect(proxy) as other, app_connect(proxy) as conn:
        other.execute("begin")  # a transaction of another shard, open across the reload
        assert where(other, 2)[1] is False
        p1.kill()
        r1.promote()
        assert not r1.is_in_recovery()
        # The promoted replica is no longer a standby: it gets no reads as a replica.
        wait_for(lambda: server_row(proxy, r1)["in_recovery"] == "false",
                 "the health check sees r1 promoted", timeout=5)
        config = dict(proxy.config)
        config["shards"] = dict(config["shards"])
        config["shards"]["s1"] = {"primary": r1.dsn("app")}
        proxy.write_config(config)
        with psycopg.connect(proxy.dsn("admin", ADMIN_PASSWORD, database="shardwire"),
                             autocommit=True) as admin:
            admin.execute("RELOAD")
        row = conn.execute(f"insert into {TABLE} (tenant_id, id, note) values (1, 7, 'new') "
                           "returning inet_server_port(), pg_is_in_recovery()").fetchone()
        assert row == (r1.port, False)
        assert where(conn, 1) == (r1.port, False)
        # The other client's transaction went on through the reload.
        assert where(other, 2)[1] is False
        other.execute("commit")
    assert server_row(proxy, r1)["role"] == "primary"
