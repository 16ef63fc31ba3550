"""DDL on sharded and reference tables goes to every shard, all or nothing; statements that
cannot run in a transaction block (VACUUM, CREATE INDEX CONCURRENTLY) go to each shard alone.
Checked through each shard's own connection."""

from __future__ import annotations

import subprocess
import uuid
from typing import Any

import asyncpg
import psycopg
import pytest
from conftest import APP_PASSWORD, MakeProxy, assert_nothing_left_behind, on_shard

from shardwire.testing import PostgresCluster
from shardwire.testing.proxy import ProxyProcess

SUFFIX = uuid.uuid4().hex[:8]
ORDERS = f"ddl_orders_{SUFFIX}"
COUNTRIES = f"ddl_countries_{SUFFIX}"
LOCAL = f"ddl_local_{SUFFIX}"  # in no rule: unsharded, on the default shard


@pytest.fixture(scope="module")
def ddl_proxy(shards: list[PostgresCluster], tmp_path_factory: pytest.TempPathFactory) -> Any:
    from conftest import PROXY_ENV, base_config
    cfg = base_config(shards)
    cfg["sharding"] = {
        "rules": {"ddl_by_tenant": {"kind": "tenant", "column": "tenant_id", "type": "integer",
                                    "tables": [ORDERS], "tenants": {1: "s1", 2: "s2", 3: "s3"},
                                    "default": "s1"}},
        "reference": [COUNTRIES],
    }
    proc = ProxyProcess(cfg, tmp_path_factory.mktemp("ddl-proxy"), env=PROXY_ENV)
    proc.start()
    yield proc
    proc.stop()
    for cluster in shards:
        on_shard(cluster, f"drop table if exists {ORDERS}, {COUNTRIES}, {LOCAL}")


def tables_on(cluster: PostgresCluster, name: str) -> list[str]:
    return [r[0] for r in on_shard(
        cluster, "select column_name from information_schema.columns where table_name = %s "
        "order by ordinal_position", [name])]


def test_create_alter_index_drop_reach_every_shard(ddl_proxy: ProxyProcess,
                                                   shards: list[PostgresCluster]) -> None:
    dsn = ddl_proxy.dsn("app", APP_PASSWORD)
    with psycopg.connect(dsn, autocommit=True) as conn:  # the extended protocol
        cur = conn.execute(f"create table {ORDERS} (id int, tenant_id int, note text)")
        assert cur.statusmessage == "CREATE TABLE"
        conn.execute(f"create table {COUNTRIES} (code text primary key, name text)")
        conn.execute(f"create table {LOCAL} (x int)")
        conn.execute(f"alter table {ORDERS} add column amount numeric")
        conn.execute(f"create index {ORDERS}_tenant on {ORDERS} (tenant_id)")
    for cluster in shards:
        assert tables_on(cluster, ORDERS) == ["id", "tenant_id", "note", "amount"]
        assert tables_on(cluster, COUNTRIES) == ["code", "name"]
        assert on_shard(cluster, "select count(*) from pg_indexes where indexname = %s",
                        [f"{ORDERS}_tenant"]) == [(1,)]
    # the unsharded table exists on the default shard only
    assert [bool(tables_on(c, LOCAL)) for c in shards] == [True, False, False]
    # psql: the simple protocol, the same result
    out = subprocess.run(["psql", ddl_proxy.dsn("app", APP_PASSWORD), "-X", "-v",
                          "ON_ERROR_STOP=1", "-c", f"comment on table {ORDERS} is 'sharded'"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "COMMENT"
    for cluster in shards:
        assert on_shard(cluster, "select obj_description(%s::regclass)", [ORDERS]) == [
            ("sharded",)]
    assert_nothing_left_behind(ddl_proxy, shards)


def test_a_failure_on_one_shard_changes_no_shard(make_proxy: MakeProxy,
                                                 shards: list[PostgresCluster]) -> None:
    name = f"ddl_half_{SUFFIX}"
    table = f"ddl_fail_{SUFFIX}"
    for cluster in shards:
        on_shard(cluster, f"drop table if exists {table}")
        on_shard(cluster, f"create table {table} (tenant_id int)")
    # a column of that name already exists on s3 only: the ALTER fails there
    on_shard(shards[2], f"alter table {table} add column {name} int")

    def edit(cfg: dict[str, Any]) -> None:
        cfg["sharding"] = {"rules": {"ddl_fail": {
            "kind": "tenant", "column": "tenant_id", "type": "integer", "tables": [table],
            "tenants": {1: "s1", 2: "s2", 3: "s3"}, "default": "s1"}}}

    try:
        proxy = make_proxy(edit)
        with psycopg.connect(proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.DuplicateColumn) as info:
                conn.execute(f"alter table {table} add column {name} int, "
                             f"add column other_{SUFFIX} int")
            assert "s3:" in str(info.value)
            assert conn.execute("select 1").fetchone() == (1,)  # the session goes on
        for cluster in shards[:2]:
            assert tables_on(cluster, table) == ["tenant_id"]  # rolled back there
        assert tables_on(shards[2], table) == ["tenant_id", name]
        assert_nothing_left_behind(proxy, shards)
    finally:
        for cluster in shards:
            on_shard(cluster, f"drop table if exists {table}")


def test_outside_a_transaction_block(ddl_proxy: ProxyProcess,
                                     shards: list[PostgresCluster]) -> None:
    dsn = ddl_proxy.dsn("app", APP_PASSWORD)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"create table if not exists {ORDERS} (id int, tenant_id int)")
        conn.execute(f"create index concurrently {ORDERS}_id on {ORDERS} (id)")
        conn.execute(f"vacuum {ORDERS}")
        conn.execute(f"analyze {ORDERS}")
        # in a transaction block: every shard joins it, and it commits on all or none
        with pytest.raises(psycopg.errors.DuplicateColumn):
            with conn.transaction():
                conn.execute(f"insert into {ORDERS} (id, tenant_id) values (1, 1)")
                conn.execute(f"alter table {ORDERS} add column y int")
                conn.execute(f"alter table {ORDERS} add column y int")
        with conn.transaction():
            conn.execute(f"insert into {ORDERS} (id, tenant_id) values (2, 1)")
            conn.execute(f"alter table {ORDERS} add column z int")
    for cluster in shards:
        assert on_shard(cluster, "select count(*) from pg_indexes where indexname = %s",
                        [f"{ORDERS}_id"]) == [(1,)]
        assert "y" not in tables_on(cluster, ORDERS)
        assert "z" in tables_on(cluster, ORDERS)
    assert on_shard(shards[0], f"select id from {ORDERS}") == [(2,)]


async def _asyncpg_ddl(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return [await conn.execute(f"alter table {COUNTRIES} add column if not exists "
                                   "currency text"),
                await conn.execute(f"drop index if exists {COUNTRIES}_name"),
                await conn.execute(f"create index {COUNTRIES}_name on {COUNTRIES} (name)")]
    finally:
        await conn.close()


def test_asyncpg(ddl_proxy: ProxyProcess, shards: list[PostgresCluster]) -> None:
    import asyncio
    with psycopg.connect(ddl_proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
        conn.execute(f"create table if not exists {COUNTRIES} (code text primary key, name text)")
    tags = asyncio.run(_asyncpg_ddl(ddl_proxy.dsn("app", APP_PASSWORD)))
    assert tags == ["ALTER TABLE", "DROP INDEX", "CREATE INDEX"]
    for cluster in shards:
        assert "currency" in tables_on(cluster, COUNTRIES)
