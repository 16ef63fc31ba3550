"""`shardwire rebalance apply` end to end: a tenant moves from s1 to s2 while a writer keeps
inserting and updating rows of that tenant and of others through the real proxy. Every write
the proxy acknowledged must be on the tenant's new shard exactly once, nothing of the tenant
may stay on the old one, and the proxy must route the tenant to the new shard. The same after
`apply` is killed at a step and run again; `abort` leaves the source intact; refusals."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from conftest import APP_PASSWORD, PROXY_ENV, MakeProxy, on_shard
from writers import KeyWriter

from shardwire.rebalancer.move import STEPS
from shardwire.testing import PostgresCluster
from shardwire.testing.proxy import ProxyProcess

CATALOG = "apply_catalog"
MOVING = 1
OTHERS = [2, 3]  # 2 stays on s1, 3 lives on s2
ROWS = 300  # rows per tenant in the main table before the move


def _cleanup(shards: list[PostgresCluster]) -> None:
    """Whatever an earlier failed run left: subscriptions, slots, publications, catalog."""
    s1, s2 = shards[0], shards[1]
    for sub in on_shard(s2, "SELECT subname FROM pg_subscription WHERE subname LIKE "
                            "'shardwire_move_%'"):
        s2.sql(f"ALTER SUBSCRIPTION {sub[0]} DISABLE; "
               f"ALTER SUBSCRIPTION {sub[0]} SET (slot_name = NONE); "
               f"DROP SUBSCRIPTION {sub[0]}", dbname="app")
    s1.sql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
           "WHERE slot_name LIKE 'shardwire_move_%' OR slot_name LIKE 'pg_%_sync_%'",
           dbname="app")
    for pub in on_shard(s1, "SELECT pubname FROM pg_publication WHERE pubname LIKE "
                            "'shardwire_move_%'"):
        s1.sql(f"DROP PUBLICATION {pub[0]}", dbname="app")
    s1.create_database(CATALOG)
    s1.sql("DROP TABLE IF EXISTS shardwire_moves, shardwire_fences, shardwire_acks, "
           "shardwire_map_versions, shardwire_proxies", dbname=CATALOG)


@dataclass
class Tables:
    orders: str
    notes: str  # exists on s1 only: apply creates it on s2


@pytest.fixture
def tables(shards: list[PostgresCluster]) -> Iterator[Tables]:
    _cleanup(shards)
    suffix = uuid.uuid4().hex[:8]
    t = Tables(f"ap_orders_{suffix}", f"ap_notes_{suffix}")
    for shard in shards[:2]:
        shard.sql(f"CREATE TABLE {t.orders} (tenant_id int NOT NULL, id int NOT NULL, "
                  "v int NOT NULL, pad text NOT NULL DEFAULT '', PRIMARY KEY (tenant_id, id))",
                  dbname="app")
    shards[0].sql(f"CREATE TABLE {t.notes} (tenant_id int NOT NULL, note_id int NOT NULL, "
                  "body text, PRIMARY KEY (tenant_id, note_id))", dbname="app")
    rows = ", ".join(f"({tenant}, {i}, 0, 'x')" for tenant in (MOVING, 2) for i in range(ROWS))
    shards[0].sql(f"INSERT INTO {t.orders} VALUES {rows}", dbname="app")
    shards[1].sql(f"INSERT INTO {t.orders} SELECT 3, g, 0, 'x' FROM generate_series(0, "
                  f"{ROWS - 1}) g", dbname="app")
    shards[0].sql(f"INSERT INTO {t.notes} SELECT t, g, 'note ' || g FROM "
                  "(VALUES (1), (2)) v(t), generate_series(1, 20) g", dbname="app")
    yield t
    _cleanup(shards)
    for shard in shards[:2]:
        shard.sql(f"DROP TABLE IF EXISTS {t.orders}, {t.notes}", dbname="app")


CONFIG_COMMENT = "# operator's note: tenant 1 is our biggest customer\n"


def start_proxy(make_proxy: MakeProxy, shards: list[PostgresCluster], t: Tables,
                rebalance: dict[str, Any] | None = None) -> ProxyProcess:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["shards"] = {name: cfg["shards"][name] for name in ("s1", "s2")}
        cfg["catalog"] = shards[0].dsn(CATALOG)
        if rebalance:
            cfg["rebalance"] = rebalance
        cfg["sharding"] = {"rules": {"by_tenant": {
            "kind": "tenant", "column": "tenant_id", "tables": [t.orders, t.notes],
            "tenants": {1: "s1", 2: "s1", 3: "s2"}, "default": "s1"}}}
    proxy = make_proxy(edit, start=False)
    text = proxy.config_path.read_text()
    proxy.config_path.write_text(CONFIG_COMMENT + text.replace(
        "  by_tenant:\n", "  by_tenant:  # keep this comment\n"))
    proxy.start()
    wait_registered(shards)
    return proxy


def wait_registered(shards: list[PostgresCluster]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if on_shard_db(shards[0], CATALOG, "SELECT count(*) FROM shardwire_proxies")[0][0]:
                return
        except psycopg.errors.UndefinedTable:
            pass
        time.sleep(0.1)
    raise AssertionError("the proxy did not register in the catalog")


def on_shard_db(cluster: PostgresCluster, db: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(cluster.dsn(db), autocommit=True) as conn:
        return conn.execute(sql).fetchall()


def rebalance(proxy: ProxyProcess, *args: str, fault: str | None = None
              ) -> subprocess.CompletedProcess[str]:
    env = {**proxy.env, **PROXY_ENV}
    env.pop("SHARDWIRE_REBALANCE_FAULT", None)
    if fault:
        env["SHARDWIRE_REBALANCE_FAULT"] = fault
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardwire.cli", "rebalance", *args,
         "--config", str(proxy.config_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"rebalance {args} did not finish:\n{out}\n{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def tenant_writer(dsn: str, table: str) -> KeyWriter:
    """Inserts and updates rows of every tenant (the rows from before too) through the
    proxy, half of them of the moving tenant."""
    return KeyWriter(dsn, table, "tenant_id", [MOVING], OTHERS, first_id=ROWS, existing=ROWS)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def check_moved(shards: list[PostgresCluster], proxy: ProxyProcess, t: Tables,
                writer: KeyWriter) -> None:
    s1, s2 = shards[0], shards[1]
    assert not writer.errors, writer.errors[:5]
    for tenant, shard, gone in ((MOVING, s2, s1), (2, s1, s2), (3, s2, s1)):
        got = {(r[0], r[1]): r[2] for r in on_shard(
            shard, f"SELECT tenant_id, id, v FROM {t.orders} WHERE tenant_id = %s", [tenant])}
        want = {k: v for k, v in writer.acked.items() if k[0] == tenant}
        bad = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        assert not bad, (f"tenant {tenant}: {len(got)} rows on {shard.name}, {len(want)} "
                         "acknowledged; (key, found, acknowledged): "
                         f"{[(k, got.get(k), want.get(k)) for k in bad[:10]]}")
        assert on_shard(gone, f"SELECT count(*) FROM {t.orders} WHERE tenant_id = %s",
                        [tenant]) == [(0,)]
    assert on_shard(s2, f"SELECT count(*) FROM {t.notes} WHERE tenant_id = 1") == [(20,)]
    assert on_shard(s1, f"SELECT count(*) FROM {t.notes} WHERE tenant_id = 1") == [(0,)]
    assert on_shard(s1, f"SELECT count(*) FROM {t.notes} WHERE tenant_id = 2") == [(20,)]
    # The proxy routes the tenant to s2 now, and writes land there.
    with psycopg.connect(proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
        route = conn.execute(f"SHOW ROUTE FOR SELECT * FROM {t.orders} WHERE tenant_id = 1"
                             ).fetchone()
        assert route is not None and route[1] == "s2", route
        conn.execute(f"INSERT INTO {t.notes} (tenant_id, note_id, body) VALUES (1, 999, 'after')")
    assert on_shard(s2, f"SELECT body FROM {t.notes} WHERE note_id = 999") == [("after",)]
    # The config file: the tenant's new shard, the operator's comments kept.
    text = proxy.config_path.read_text()
    assert text.startswith(CONFIG_COMMENT) and "by_tenant:  # keep this comment" in text
    assert "1: s2" in text
    # Nothing of the move left behind.
    assert on_shard(s2, "SELECT count(*) FROM pg_subscription") == [(0,)]
    assert on_shard(s1, "SELECT count(*) FROM pg_replication_slots") == [(0,)]
    assert on_shard(s1, "SELECT count(*) FROM pg_publication") == [(0,)]
    assert on_shard_db(s1, CATALOG, "SELECT state, step FROM shardwire_moves") == [
        ("done", "done")]
    assert on_shard_db(s1, CATALOG, "SELECT count(*) FROM shardwire_fences "
                                    "WHERE released_at IS NULL") == [(0,)]


def test_a_tenant_moves_online_and_no_acknowledged_write_is_lost_or_doubled(
        make_proxy: MakeProxy, shards: list[PostgresCluster], tables: Tables) -> None:
    proxy = start_proxy(make_proxy, shards, tables)
    with tenant_writer(proxy.dsn("app", APP_PASSWORD), tables.orders) as writer:
        done = rebalance(proxy, "apply", "--move", "by_tenant:1:s2")
        assert done.returncode == 0, done.stdout + done.stderr
    assert "1 move(s) done" in done.stdout
    assert "rows copied" in done.stderr and "caught up" in done.stderr
    assert "notes" in done.stderr  # created on s2
    check_moved(shards, proxy, tables, writer)
    moving, others = writer.latencies[MOVING], writer.latencies[2] + writer.latencies[3]
    report = (f"write latency during the move: tenant {MOVING} (moving) p99 "
              f"{p99(moving) * 1000:.0f} ms, max {max(moving) * 1000:.0f} ms over "
              f"{len(moving)} writes; other tenants p99 {p99(others) * 1000:.0f} ms, max "
              f"{max(others) * 1000:.0f} ms; {done.stdout.strip()}\n{done.stderr}")
    print(report)
    assert max(moving) < 5


@pytest.mark.parametrize("step", STEPS)
def test_apply_killed_at_a_step_resumes_when_run_again(
        make_proxy: MakeProxy, shards: list[PostgresCluster], tables: Tables,
        step: str) -> None:
    proxy = start_proxy(make_proxy, shards, tables)
    with tenant_writer(proxy.dsn("app", APP_PASSWORD), tables.orders) as writer:
        killed = rebalance(proxy, "apply", "--move", "by_tenant:1:s2", fault=step)
        assert killed.returncode == -9, killed.stdout + killed.stderr
        assert on_shard_db(shards[0], CATALOG, "SELECT step FROM shardwire_moves") == [
            (step,)]
        again = rebalance(proxy, "apply", "--move", "by_tenant:1:s2")
        assert again.returncode == 0, again.stdout + again.stderr
        assert "resuming" in again.stderr
    check_moved(shards, proxy, tables, writer)


def test_statements_across_shards_of_a_moving_rule_are_refused_until_the_move_is_done(
        make_proxy: MakeProxy, shards: list[PostgresCluster], tables: Tables) -> None:
    """From the copy to the clean-up the moving rows are on both shards: a read (or write)
    across shards of the rule's tables would count them twice, so it is refused; statements
    by key are served. Once the move is done, the count is right."""
    proxy = start_proxy(make_proxy, shards, tables)
    killed = rebalance(proxy, "apply", "--move", "by_tenant:1:s2", fault="streaming")
    assert killed.returncode == -9
    deadline = time.monotonic() + 15  # the subscription copies on, without apply
    while on_shard(shards[1], f"SELECT count(*) FROM {tables.orders} WHERE tenant_id = 1"
                   ) != [(ROWS,)]:
        assert time.monotonic() < deadline, "the copy did not reach the target"
        time.sleep(0.1)
    with psycopg.connect(proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
        for sql in (f"SELECT count(*) FROM {tables.orders}",
                    f"UPDATE {tables.orders} SET v = v WHERE id = 1"):
            with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as refused:
                conn.execute(sql)
            assert "being moved" in str(refused.value) and refused.value.diag.message_hint
        assert conn.execute(f"SELECT count(*) FROM {tables.orders} WHERE tenant_id = 1"
                            ).fetchone() == (ROWS,)
        # A split INSERT places each row by the map: served.
        conn.execute(f"INSERT INTO {tables.orders} (tenant_id, id, v) VALUES "
                     f"(2, {ROWS}, 1), (3, {ROWS}, 1)")
    # A proxy started during the move knows of it from its first statement on.
    late = start_proxy(make_proxy, shards, tables)
    try:
        with psycopg.connect(late.dsn("app", APP_PASSWORD), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
                conn.execute(f"SELECT count(*) FROM {tables.orders}")
    finally:
        late.stop()  # apply waits for the acknowledgements of every live proxy
    again = rebalance(proxy, "apply", "--move", "by_tenant:1:s2")
    assert again.returncode == 0, again.stdout + again.stderr
    deadline = time.monotonic() + 10
    with psycopg.connect(proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
        while True:
            try:
                count = conn.execute(f"SELECT count(*) FROM {tables.orders}").fetchone()
                break
            except psycopg.errors.ObjectNotInPrerequisiteState:
                assert time.monotonic() < deadline, "still refused after the move"
                time.sleep(0.1)
    assert count == (3 * ROWS + 2,)


def test_abort_before_the_flip_leaves_the_source_intact(
        make_proxy: MakeProxy, shards: list[PostgresCluster], tables: Tables) -> None:
    proxy = start_proxy(make_proxy, shards, tables)
    s1, s2 = shards[0], shards[1]
    with tenant_writer(proxy.dsn("app", APP_PASSWORD), tables.orders) as writer:
        killed = rebalance(proxy, "apply", "--move", "by_tenant:1:s2", fault="fenced")
        assert killed.returncode == -9
        aborted = rebalance(proxy, "abort")
        assert aborted.returncode == 0, aborted.stdout + aborted.stderr
        assert "aborted at step fenced" in aborted.stderr
    assert not writer.errors, writer.errors[:5]
    for tenant in (MOVING, 2):
        got = {(r[0], r[1]): r[2] for r in on_shard(
            s1, f"SELECT tenant_id, id, v FROM {tables.orders} WHERE tenant_id = %s",
            [tenant])}
        assert got == {k: v for k, v in writer.acked.items() if k[0] == tenant}
    assert on_shard(s2, f"SELECT count(*) FROM {tables.orders} WHERE tenant_id = 1") == [(0,)]
    assert on_shard(s2, f"SELECT to_regclass('{tables.notes}')") == [(None,)]  # created: gone
    assert on_shard(s1, f"SELECT count(*) FROM {tables.notes} WHERE tenant_id = 1") == [(20,)]
    assert on_shard(s2, "SELECT count(*) FROM pg_subscription") == [(0,)]
    assert on_shard(s1, "SELECT count(*) FROM pg_replication_slots") == [(0,)]
    assert on_shard(s1, "SELECT count(*) FROM pg_publication") == [(0,)]
    assert "1: s1" in proxy.config_path.read_text()
    assert on_shard_db(s1, CATALOG, "SELECT state FROM shardwire_moves") == [("aborted",)]
    with psycopg.connect(proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
        conn.execute(f"INSERT INTO {tables.orders} (tenant_id, id, v) VALUES (1, 100000, 7)")
    assert on_shard(s1, f"SELECT v FROM {tables.orders} WHERE id = 100000") == [(7,)]


def test_a_write_held_too_long_fails_with_55P03_while_reads_and_other_keys_go_on(
        make_proxy: MakeProxy, shards: list[PostgresCluster], tables: Tables) -> None:
    proxy = start_proxy(make_proxy, shards, tables, {"fence_timeout": 1})
    # apply dies with the fence up: the proxy holds writes of tenant 1 until it is run again.
    killed = rebalance(proxy, "apply", "--move", "by_tenant:1:s2", fault="fenced")
    assert killed.returncode == -9
    with psycopg.connect(proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
        started = time.monotonic()
        assert conn.execute(f"SELECT count(*) FROM {tables.orders} WHERE tenant_id = 1"
                            ).fetchone() == (ROWS,)
        conn.execute(f"UPDATE {tables.orders} SET v = 5 WHERE tenant_id = 2 AND id = 1")
        assert time.monotonic() - started < 0.5
        with pytest.raises(psycopg.errors.LockNotAvailable) as held:
            conn.execute(f"UPDATE {tables.orders} SET v = 5 WHERE tenant_id = 1 AND id = 1")
        assert 0.9 < time.monotonic() - started < 5
        assert "rebalance" in str(held.value) and held.value.diag.message_hint
        with pytest.raises(psycopg.errors.LockNotAvailable):  # prepared, in a transaction
            with conn.transaction():
                conn.execute(f"INSERT INTO {tables.orders} (tenant_id, id, v) VALUES (%s, %s, "
                             "%s)", (1, 5000, 1), prepare=True)
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the connection goes on
    aborted = rebalance(proxy, "abort")
    assert aborted.returncode == 0, aborted.stderr
    with psycopg.connect(proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
        conn.execute(f"UPDATE {tables.orders} SET v = 6 WHERE tenant_id = 1 AND id = 1")
    assert on_shard(shards[0], f"SELECT v FROM {tables.orders} WHERE tenant_id = 1 AND id = 1"
                    ) == [(6,)]
    assert on_shard(shards[0], f"SELECT count(*) FROM {tables.orders} WHERE id = 5000") == [
        (0,)]


def test_refusals_say_how_to_fix(make_proxy: MakeProxy, shards: list[PostgresCluster],
                                 tables: Tables) -> None:
    proxy = start_proxy(make_proxy, shards, tables)
    s1 = shards[0]
    # A replica identity that does not cover the key column.
    s1.sql(f"ALTER TABLE {tables.notes} DROP CONSTRAINT {tables.notes}_pkey; "
           f"ALTER TABLE {tables.notes} ADD PRIMARY KEY (note_id, tenant_id); "
           f"ALTER TABLE {tables.notes} REPLICA IDENTITY NOTHING", dbname="app")
    refused = rebalance(proxy, "apply", "--move", "by_tenant:1:s2")
    assert refused.returncode == 1
    assert "REPLICA IDENTITY NOTHING" in refused.stderr and "Fix:" in refused.stderr
    s1.sql(f"ALTER TABLE {tables.notes} ADD COLUMN uid bigserial; "
           f"CREATE UNIQUE INDEX {tables.notes}_uid ON {tables.notes} (uid); "
           f"ALTER TABLE {tables.notes} REPLICA IDENTITY USING INDEX {tables.notes}_uid",
           dbname="app")
    refused = rebalance(proxy, "apply", "--move", "by_tenant:1:s2")
    assert refused.returncode == 1
    assert "does not cover the key column tenant_id" in refused.stderr, refused.stderr
    assert "REPLICA IDENTITY FULL" in refused.stderr
    # Rows of the moving tenant already on the target (planted around the proxy).
    s1.sql(f"ALTER TABLE {tables.notes} REPLICA IDENTITY FULL", dbname="app")
    shards[1].sql(f"INSERT INTO {tables.orders} VALUES (1, 424242, 0, 'stray')", dbname="app")
    refused = rebalance(proxy, "apply", "--move", "by_tenant:1:s2")
    assert refused.returncode == 1
    assert "already holds 1 row(s)" in refused.stderr, refused.stderr
    # Nothing started: no publication, slot or subscription; the map unchanged.
    assert on_shard(s1, "SELECT count(*) FROM pg_publication") == [(0,)]
    assert on_shard(s1, "SELECT count(*) FROM pg_replication_slots") == [(0,)]
    assert "1: s1" in proxy.config_path.read_text()
    # Hash rules and unknown keys: refused before anything is recorded.
    bad = rebalance(proxy, "apply", "--move", "by_tenant:1:s9")
    assert bad.returncode == 1 and "unknown shard 's9'" in bad.stderr, bad.stderr
    bad = rebalance(proxy, "apply", "--move", "nope:1:s2")
    assert bad.returncode == 1 and "no rule 'nope'" in bad.stderr


def test_a_category_value_moves(make_proxy: MakeProxy, shards: list[PostgresCluster],
                                tables: Tables) -> None:
    s1, s2 = shards[0], shards[1]
    products = tables.orders.replace("orders", "products")
    for shard in (s1, s2):
        shard.sql(f"CREATE TABLE {products} (category text NOT NULL, sku int NOT NULL, "
                  "price numeric, PRIMARY KEY (category, sku))", dbname="app")
    s1.sql(f"INSERT INTO {products} SELECT c, g, g * 1.5 FROM (VALUES ('books'), ('music')) "
           "v(c), generate_series(1, 500) g", dbname="app")
    before = on_shard(s1, f"SELECT sku, price FROM {products} WHERE category = 'books' "
                          "ORDER BY sku")

    def edit(cfg: dict[str, Any]) -> None:
        cfg["shards"] = {name: cfg["shards"][name] for name in ("s1", "s2")}
        cfg["catalog"] = s1.dsn(CATALOG)
        cfg["sharding"] = {"rules": {"by_line": {
            "kind": "category", "type": "text", "column": "category", "tables": [products],
            "values": {"books": "s1", "music": "s1", "games": "s2"}}}}
    try:
        proxy = make_proxy(edit)
        wait_registered(shards)
        done = rebalance(proxy, "apply", "--move", "by_line:books:s2")
        assert done.returncode == 0, done.stdout + done.stderr
        assert on_shard(s2, f"SELECT sku, price FROM {products} WHERE category = 'books' "
                            "ORDER BY sku") == before
        assert on_shard(s1, f"SELECT count(*) FROM {products} WHERE category = 'books'") == [
            (0,)]
        assert on_shard(s1, f"SELECT count(*) FROM {products} WHERE category = 'music'") == [
            (500,)]
        with psycopg.connect(proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
            assert conn.execute(f"SELECT count(*) FROM {products} WHERE category = 'books'"
                                ).fetchone() == (500,)
        assert "books: s2" in proxy.config_path.read_text()
        again = rebalance(proxy, "apply", "--move", "by_line:books:s2")
        assert again.returncode == 0 and "already done" in again.stderr, again.stderr
    finally:
        for shard in (s1, s2):
            shard.sql(f"DROP TABLE IF EXISTS {products}", dbname="app")


@pytest.mark.slow
@pytest.mark.parametrize("rows", [10_000, pytest.param(1_000_000, marks=pytest.mark.skipif(
    not os.environ.get("SHARDWIRE_BIG_MOVES"), reason="set SHARDWIRE_BIG_MOVES=1: about a "
    "minute"))])
def test_the_write_pause_does_not_grow_with_the_data(
        make_proxy: MakeProxy, shards: list[PostgresCluster], tables: Tables,
        rows: int) -> None:
    """The moving tenant gets `rows` more rows; the writer runs as above. Reports the longest
    wait of a write of the moving tenant (SHARDWIRE_PAUSE_REPORT: a file to append to)."""
    s1, s2 = shards[0], shards[1]
    s1.sql(f"INSERT INTO {tables.orders} (tenant_id, id, v, pad) SELECT 1, 10000000 + g, 0, "
           f"repeat('x', 100) FROM generate_series(1, {rows}) g", dbname="app")
    proxy = start_proxy(make_proxy, shards, tables)
    started = time.monotonic()
    with tenant_writer(proxy.dsn("app", APP_PASSWORD), tables.orders) as writer:
        done = rebalance(proxy, "apply", "--move", "by_tenant:1:s2")
        assert done.returncode == 0, done.stdout + done.stderr
    took = time.monotonic() - started
    assert not writer.errors, writer.errors[:5]
    got = {(r[0], r[1]): r[2] for r in on_shard(
        s2, f"SELECT tenant_id, id, v FROM {tables.orders} WHERE tenant_id = 1 "
            "AND id < 10000000")}
    assert got == {k: v for k, v in writer.acked.items() if k[0] == MOVING}
    assert on_shard(s2, f"SELECT count(*) FROM {tables.orders} WHERE id > 10000000") == [
        (rows,)]
    assert on_shard(s1, f"SELECT count(*) FROM {tables.orders} WHERE tenant_id = 1") == [(0,)]
    moving, others = writer.latencies[MOVING], writer.latencies[2] + writer.latencies[3]
    held = done.stdout.strip().rsplit("writes held ", 1)[-1]
    report = (f"{rows + ROWS} rows of the moving tenant: move took {took:.1f} s, writes held "
              f"{held}; longest write of the moving tenant {max(moving) * 1000:.0f} ms "
              f"(p99 {p99(moving) * 1000:.0f} ms over {len(moving)}), of others "
              f"{max(others) * 1000:.0f} ms (p99 {p99(others) * 1000:.0f} ms)")
    print(report)
    target = os.environ.get("SHARDWIRE_PAUSE_REPORT")
    if target:
        with open(target, "a") as f:
            f.write(report + "\n")
