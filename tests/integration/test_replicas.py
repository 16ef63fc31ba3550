"""The read/write split over real streaming replicas (docs/operations.md, "Replicas and the
read/write split").

Which server ran a statement is read from the statement itself: `inet_server_port()` names
the server, `pg_is_in_recovery()` says whether it is a standby.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
from conftest import ADMIN_PASSWORD, APP_PASSWORD, SESSION_PASSWORD
from replication import (
    TABLE,
    ReplicatedShards,
    app_connect,
    server_row,
    shard_rows,
    start_proxy,
    wait_for,
    where,
)

from shardwire.testing.proxy import ProxyProcess


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplicatedShards]:
    shards = ReplicatedShards.create(tmp_path_factory.mktemp("replicas"))
    yield shards
    shards.stop()


@pytest.fixture(scope="module")
def proxy(cluster: ReplicatedShards, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[ProxyProcess]:
    proc = start_proxy(cluster.config(replicas={"max_lag": 1}),
                       tmp_path_factory.mktemp("proxy"))
    yield proc
    proc.stop()


def test_the_harness_makes_streaming_replicas(cluster: ReplicatedShards) -> None:
    for primary, replica in zip(cluster.primaries, cluster.replicas, strict=True):
        assert replica.is_in_recovery()
        assert not primary.is_in_recovery()
        assert primary.sql("select application_name, state from pg_stat_replication") == (
            f"{replica.name}|streaming")
        primary.sql(f"insert into {TABLE} values (9, 9, 'replicated')", dbname="app")
        primary.wait_streaming(replica)
        assert replica.sql(f"select note from {TABLE} where tenant_id = 9",
                           dbname="app") == "replicated"
        primary.sql(f"delete from {TABLE} where tenant_id = 9", dbname="app")


def test_reads_go_to_replicas_and_writes_to_primaries(
        cluster: ReplicatedShards, proxy: ProxyProcess) -> None:
    p1, p2 = cluster.primaries
    r1, r2 = cluster.replicas
    with app_connect(proxy) as conn:
        assert where(conn, 1) == (r1.port, True)
        assert where(conn, 2) == (r2.port, True)
        # Writes, and reads that lock or may write, go to the primary.
        row = conn.execute(f"insert into {TABLE} (tenant_id, id, note) values (1, 100, 'w') "
                           "returning inet_server_port(), pg_is_in_recovery()").fetchone()
        assert row == (p1.port, False)
        for locking in ("for update", "for share", "for no key update"):
            assert where(conn, 2, f"select inet_server_port(), pg_is_in_recovery() from "
                                  f"{TABLE} where tenant_id = %s {locking}") == (p2.port, False)
        # A function the proxy does not know to be read-only may write: primary.
        conn.execute("create or replace function rw_port() returns int language sql "
                     "as 'select inet_server_port()'")
        assert conn.execute(f"select rw_port(), pg_is_in_recovery() from {TABLE} "
                            "where tenant_id = 1 limit 1").fetchone() == (p1.port, False)
        conn.execute(f"delete from {TABLE} where id = 100")


def test_transactions(cluster: ReplicatedShards, proxy: ProxyProcess) -> None:
    p1 = cluster.primaries[0]
    r1 = cluster.replicas[0]
    with app_connect(proxy) as conn:
        with conn.transaction():  # read-write: everything on the primary
            assert where(conn, 1) == (p1.port, False)
        conn.execute("begin read only")
        assert where(conn, 1) == (r1.port, True)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute(f"insert into {TABLE} (tenant_id, id, note) values (1, 101, 'x')")
        conn.execute("rollback")
        assert where(conn, 1) == (r1.port, True)  # the connection is fine after it


def test_prepared_statements_run_on_replicas(cluster: ReplicatedShards,
                                             proxy: ProxyProcess) -> None:
    r1, r2 = cluster.replicas
    p1, p2 = cluster.primaries

    async def run() -> None:
        conn = await asyncpg.connect(proxy.dsn("app", APP_PASSWORD), statement_cache_size=0)
        try:
            read = await conn.prepare(f"select inet_server_port() from {TABLE} "
                                      "where tenant_id = $1 limit 1")
            write = await conn.prepare(f"update {TABLE} set note = note where tenant_id = $1 "
                                       "returning inet_server_port()")

            async def read_on(tenant: int, replica: int, primary: int) -> None:
                """The read runs on the tenant's replica. Right after a write that follows a
                quiet spell, a health check may find the replica behind by that spell until
                it has replayed the write (health.py): then, and only then, the primary
                answers instead, never another shard's server."""
                deadline = time.monotonic() + 10
                while (port := await read.fetchval(tenant)) != replica:
                    assert port == primary, (port, replica, primary)
                    assert time.monotonic() < deadline, "reads stayed on the primary"
                    await asyncio.sleep(0.05)

            for _ in range(5):  # prepared once, run on whichever connection comes
                await read_on(1, r1.port, p1.port)
                await read_on(2, r2.port, p2.port)
                assert await write.fetchval(1) == p1.port
        finally:
            await conn.close()

    asyncio.run(run())
    with app_connect(proxy) as conn:  # psycopg's server-side prepared statements
        wait_for(lambda: where(conn, 1) == (r1.port, True), "r1 to take reads after the write")
        for _ in range(8):
            assert conn.execute(f"select inet_server_port() from {TABLE} where tenant_id = %s",
                                [1], prepare=True).fetchone() == (r1.port,)


def test_session_target(cluster: ReplicatedShards, proxy: ProxyProcess) -> None:
    p1 = cluster.primaries[0]
    r1 = cluster.replicas[0]
    with app_connect(proxy) as conn:
        assert conn.execute("show shardwire.target").fetchone() == ("replica",)
        conn.execute("set shardwire.target = 'primary'")
        assert conn.execute("show shardwire.target").fetchone() == ("primary",)
        assert where(conn, 1) == (p1.port, False)
        conn.execute("set shardwire.target = any")
        seen = {where(conn, 1)[0] for _ in range(12)}
        assert seen == {p1.port, r1.port}
        conn.execute("reset shardwire.target")
        assert where(conn, 1) == (r1.port, True)
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="primary, replica"):
            conn.execute("set shardwire.target = 'elsewhere'")
        assert where(conn, 1) == (r1.port, True)
    # Another session is not affected by the first one's SET.
    with app_connect(proxy) as a, app_connect(proxy) as b:
        a.execute("set shardwire.target = 'primary'")
        assert where(a, 1)[0] == p1.port
        assert where(b, 1)[0] == r1.port


def test_session_pool_mode_stays_on_the_primary(cluster: ReplicatedShards,
                                                proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn("sess", SESSION_PASSWORD), autocommit=True) as conn:
        assert where(conn, 1) == (cluster.primaries[0].port, False)


def test_reads_on_several_shards_use_the_primaries(cluster: ReplicatedShards,
                                                   proxy: ProxyProcess) -> None:
    with app_connect(proxy) as conn:
        row = conn.execute(f"select max(inet_server_port()), bool_or(pg_is_in_recovery()) "
                           f"from {TABLE}").fetchone()
    assert row == (max(p.port for p in cluster.primaries), False)


def test_read_your_writes(cluster: ReplicatedShards, tmp_path: Path) -> None:
    p1 = cluster.primaries[0]
    r1 = cluster.replicas[0]
    proxy = start_proxy(cluster.config(replicas={"read_your_writes": 1.5}), tmp_path)
    try:
        with app_connect(proxy) as writer, app_connect(proxy) as other:
            assert where(writer, 1) == (r1.port, True)
            writer.execute(f"insert into {TABLE} (tenant_id, id, note) values (1, 200, 'mine')")
            written = time.monotonic()
            # The writer reads its own write from the primary; another session is not held.
            assert writer.execute(f"select inet_server_port(), note from {TABLE} "
                                  "where tenant_id = 1 and id = 200").fetchone() == (
                p1.port, "mine")
            assert where(other, 1)[0] == r1.port
            time.sleep(max(0.0, written + 1.6 - time.monotonic()))
            assert where(writer, 1) == (r1.port, True)
            writer.execute(f"delete from {TABLE} where id = 200")
    finally:
        proxy.stop()


def test_read_your_writes_per_rule(cluster: ReplicatedShards, tmp_path: Path) -> None:
    """A rule's own `read_your_writes` decides for reads by one key of that rule; other
    reads follow `replicas.read_your_writes`; any write of the session starts the time."""
    (p1, p2), (r1, r2) = cluster.primaries, cluster.replicas
    notes = "rw_notes"  # the table of a second rule, without the option
    for i, (p, r) in enumerate(zip(cluster.primaries, cluster.replicas, strict=True), 1):
        p.sql(f"create table {notes} (tenant_id int not null, id int not null, note text, "
              f"primary key (tenant_id, id)); insert into {notes} values ({i}, 0, 'seed')",
              dbname="app")
        p.wait_streaming(r)  # the replicas have the table before any read of it
    read_notes = (f"select inet_server_port(), pg_is_in_recovery() from {notes} "
                  "where tenant_id = %s limit 1")
    hold = 3.0
    rules = cluster.config()["sharding"]["rules"]
    rules["by_tenant"]["read_your_writes"] = hold
    rules["by_note"] = {"kind": "tenant", "column": "tenant_id", "tables": [notes],
                        "tenants": {1: "s1", 2: "s2"}, "default": "s1"}
    # A generous max_lag: only read-your-writes may send a read to a primary here.
    config = cluster.config(replicas={"read_your_writes": 0, "max_lag": 60},
                            sharding={"rules": rules})
    proxy = start_proxy(config, tmp_path)
    try:
        with app_connect(proxy) as conn:
            assert where(conn, 1) == (r1.port, True)  # no write yet
            conn.execute(f"insert into {TABLE} (tenant_id, id, note) values (1, 400, 'mine')")
            written = time.monotonic()
            # The rule's reads go to the primary (of any shard: the session wrote) and see
            # the write.
            assert conn.execute(f"select inet_server_port(), note from {TABLE} "
                                "where tenant_id = %s and id = 400", [1]).fetchone() == (
                p1.port, "mine")
            assert where(conn, 2) == (p2.port, False)
            # Another rule's table: the global option (0) lets its reads go to a replica.
            assert where(conn, 1, read_notes) == (r1.port, True)
            assert where(conn, 2, read_notes) == (r2.port, True)
            # A read of the rule's table that names no single key follows the global option.
            assert conn.execute(f"select inet_server_port(), pg_is_in_recovery() from {TABLE} "
                                "where tenant_id in (1, 3) limit 1").fetchone() == (
                r1.port, True)
            assert time.monotonic() - written < hold, "too slow to show the hold"
            time.sleep(max(0.0, written + hold + 0.2 - time.monotonic()))
            assert where(conn, 1) == (r1.port, True)  # the time is over
            assert where(conn, 2) == (r2.port, True)
            # A write through the other rule starts the rule's time as well.
            conn.execute(f"insert into {notes} (tenant_id, id, note) values (1, 1, 'other')")
            assert where(conn, 1) == (p1.port, False)
            assert where(conn, 1, read_notes) == (r1.port, True)
            conn.execute(f"delete from {TABLE} where id = 400")
        # The other way round, after a RELOAD: the global option holds reads on primaries,
        # the rule's 0 does not.
        rules["by_tenant"]["read_your_writes"] = 0
        config["replicas"] = {"read_your_writes": hold, "max_lag": 60}
        proxy.write_config(config)
        with psycopg.connect(proxy.dsn("admin", ADMIN_PASSWORD, database="shardwire"),
                             autocommit=True) as admin:
            admin.execute("RELOAD")
        with app_connect(proxy) as conn:
            conn.execute(f"update {TABLE} set note = note where tenant_id = %s", [1])
            assert where(conn, 1) == (r1.port, True)
            assert where(conn, 1, read_notes) == (p1.port, False)
    finally:
        proxy.stop()
        for p in cluster.primaries:
            p.sql(f"drop table if exists {notes}", dbname="app")


def test_a_lagging_replica_is_skipped(cluster: ReplicatedShards, proxy: ProxyProcess) -> None:
    p1, r1 = cluster.primaries[0], cluster.replicas[0]
    r2 = cluster.replicas[1]
    with app_connect(proxy) as conn:
        assert where(conn, 1) == (r1.port, True)
        r1.sql("select pg_wal_replay_pause()")
        try:
            p1.sql(f"insert into {TABLE} values (1, 300, 'after the pause')", dbname="app")
            # Replay stopped before this row: the lag grows past replicas.max_lag (1s).
            wait_for(lambda: float(server_row(proxy, r1)["lag_s"] or 0) > 1,
                     "SHOW SHARDS reports r1's lag above max_lag")
            assert conn.execute(f"select inet_server_port(), note from {TABLE} "
                                "where tenant_id = 1 and id = 300").fetchone() == (
                p1.port, "after the pause")
            assert where(conn, 2) == (r2.port, True)  # the other shard's replica is fine
            row = server_row(proxy, r1)
            assert (row["role"], row["health"], row["in_recovery"]) == ("replica", "up", "true")
        finally:
            r1.sql("select pg_wal_replay_resume()")
        wait_for(lambda: where(conn, 1)[0] == r1.port, "reads go back to the caught-up r1")
        assert conn.execute(f"select note from {TABLE} where tenant_id = 1 and id = 300"
                            ).fetchone() == ("after the pause",)
        conn.execute(f"delete from {TABLE} where id = 300")


def test_show_shards_names_roles_and_health(cluster: ReplicatedShards,
                                            proxy: ProxyProcess) -> None:
    rows = {(r["shard"], r["port"]): r for r in shard_rows(proxy)}
    for i, (p, r) in enumerate(zip(cluster.primaries, cluster.replicas, strict=True)):
        primary, replica = rows[(f"s{i + 1}", p.port)], rows[(f"s{i + 1}", r.port)]
        assert (primary["role"], primary["health"], primary["in_recovery"]) == (
            "primary", "up", "false")
        assert (replica["role"], replica["health"], replica["in_recovery"]) == (
            "replica", "up", "true")
        assert float(replica["lag_s"]) < 1


def test_a_pipeline_that_reads_then_writes(cluster: ReplicatedShards,
                                           proxy: ProxyProcess) -> None:
    r1, p1 = cluster.replicas[0], cluster.primaries[0]
    read = f"select inet_server_port() from {TABLE} where tenant_id = %s limit 1"
    write = f"update {TABLE} set note = note where tenant_id = %s returning inet_server_port()"
    with app_connect(proxy) as conn:
        # With a Sync after each statement, the read runs on the replica, the write on the
        # primary.
        with conn.pipeline() as pipeline:
            first = conn.execute(read, [1])
            pipeline.sync()
            second = conn.execute(write, [1])
        assert first.fetchone() == (r1.port,) and second.fetchone() == (p1.port,)
        # Without one, they are one implicit transaction, already begun on the replica.
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="replicas"):
            with conn.pipeline():
                conn.execute(read, [1])
                conn.execute(write, [1])
        assert where(conn, 1) == (r1.port, True)  # the session goes on
        conn.execute("set shardwire.target = 'primary'")
        with conn.pipeline():
            first = conn.execute(read, [1])
            second = conn.execute(write, [1])
        assert first.fetchone() == (p1.port,) and second.fetchone() == (p1.port,)
