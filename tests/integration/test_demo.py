"""`shardwire demo` as a newcomer runs it: start, connect with the printed URL, Ctrl-C, again."""

from __future__ import annotations

import datetime
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest

from shardwire.config import load_config
from shardwire.ids import decode_id
from shardwire.testing import PostgresCluster, free_port

READY_TIMEOUT = 60
STOP_TIMEOUT = 60
ANSWER_TIMEOUT = 30  # for a group of statements through the proxy
SHARDS = 2


class Demo:
    """One `shardwire demo` child process; stderr goes to a file shown when a test fails."""

    def __init__(self, data_dir: Path, port: int, log: Path) -> None:
        self.log = log
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "shardwire.cli", "demo", "--port", str(port),
                 "--data-dir", str(data_dir), "--shards", str(SHARDS)],
                stdout=subprocess.PIPE, stderr=err, text=True,
                env={k: v for k, v in os.environ.items() if not k.startswith("PG")})
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_ready(self) -> str:
        """The ready line."""
        deadline = time.monotonic() + READY_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                pytest.fail(f"the demo exited with {self.proc.wait()} before it was ready:\n"
                            f"{self.stderr()}")
            if "ready" in line:
                return line
        pytest.fail(f"no ready line within {READY_TIMEOUT}s:\n{self.stderr()}")

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the demo did not exit within {STOP_TIMEOUT}s of SIGINT:\n"
                        f"{self.stderr()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def demo_dir(tmp_path: Path) -> Iterator[Path]:
    data_dir = tmp_path / "demo"
    yield data_dir
    # Whatever happened in the test, no server of the demo outlives it.
    for i in range(1, SHARDS + 1):
        if (data_dir / f"shard{i}").is_dir():
            PostgresCluster(data_dir / f"shard{i}", name=f"shard{i}").stop(mode="immediate")


def urls(ready_line: str) -> tuple[str, str]:
    found = re.findall(r"postgresql://\S+", ready_line)
    assert len(found) == 2, ready_line
    app, admin = (u.rstrip(")") for u in found)
    return app, admin


SAMPLE_TABLES = ("countries", "tenants", "customers", "products", "orders", "order_items",
                 "events", "users")
TENANT_TABLES = ("tenants", "customers", "orders", "order_items")
# Tables whose id column defaults to shardwire_next_id(), and that column.
GENERATED_IDS = {"customers": "customer_id", "products": "product_id", "orders": "order_id",
                 "events": "event_id", "users": "user_id"}
Q3 = "occurred_at >= '2026-07-01' AND occurred_at < '2026-10-01'"
NEW_USER = (2, "clerk@bluebird-games.example", "Nina Berg", "staff")  # inserted through the proxy


class DemoShards:
    """The demo's shard map, and connections straight to its shards (not through the proxy)."""

    def __init__(self, data_dir: Path) -> None:
        self.config = load_config(data_dir / "shardwire.yaml")
        self.names = list(self.config.shards)
        self.dsns = {name: PostgresCluster(data_dir / name, name=name).dsn("demo")
                     for name in self.names}
        self.rules = self.config.sharding.rules
        catalog = self.config.catalog
        assert catalog is not None
        self.catalog_dsn = f"postgresql://{catalog.user}@{catalog.host}:{catalog.port}/" \
                           f"{catalog.database}"

    def query(self, shard: str, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsns[shard], connect_timeout=10) as conn:
            return conn.execute(sql, params).fetchall()

    def count(self, shard: str, sql: str, params: Sequence[object] = ()) -> int:
        return int(self.query(shard, sql, params)[0][0])

    def tenant_shard(self, tenant: int) -> str:
        shard = self.rules["by_tenant"].shard_for(tenant)
        assert shard is not None
        return shard

    def directory(self) -> dict[int, str]:
        """The users' directory in the catalog database: user_id -> shard."""
        with psycopg.connect(self.catalog_dsn, connect_timeout=10) as conn:
            rows = conn.execute(
                f"SELECT key, shard FROM {self.rules['by_user'].directory}").fetchall()
        return dict(rows)

    def users(self, shard: str) -> set[int]:
        return {user_id for (user_id,) in self.query(shard, "SELECT user_id FROM users")}

    def counts(self) -> dict[str, dict[str, int]]:
        """Rows of each table on each shard."""
        return {shard: {t: self.count(shard, f"SELECT count(*) FROM {t}") for t in SAMPLE_TABLES}
                for shard in self.names}

    def ids(self) -> dict[str, set[int]]:
        """Every generated id on each shard."""
        return {shard: {row[0] for table, column in GENERATED_IDS.items()
                        for row in self.query(shard, f"SELECT {column} FROM {table}")}
                for shard in self.names}


def assert_rows_where_the_map_says(demo: DemoShards) -> None:
    """Read through each shard's own connection: every row is on the shard its key maps to."""
    rules = demo.rules
    directory = demo.directory()
    totals = dict.fromkeys(SAMPLE_TABLES, 0)
    tenants_with_orders = set()
    for number, shard in enumerate(demo.names):
        for table in TENANT_TABLES:
            for (tenant,) in demo.query(shard, f"SELECT DISTINCT tenant_id FROM {table}"):
                assert demo.tenant_shard(tenant) == shard, (table, tenant, shard)
        tenants_with_orders |= {t for (t,) in demo.query(shard, "SELECT tenant_id FROM orders")}
        for (category,) in demo.query(shard, "SELECT DISTINCT category FROM products"):
            assert rules["by_category"].shard_for(category) == shard, (category, shard)
        for (at,) in demo.query(shard, "SELECT occurred_at FROM events"):
            assert rules["by_time"].shard_for(at) == shard, (at, shard)
        # Users are where the directory says, and every user in it is on its shard.
        on_shard = demo.users(shard)
        assert on_shard == {u for u, s in directory.items() if s == shard}, shard
        assert on_shard, f"no users on {shard}"
        assert demo.query(shard, "SELECT code FROM countries ORDER BY code") == \
            demo.query(demo.names[0], "SELECT code FROM countries ORDER BY code")
        # Ids made on a shard carry its number.
        for table, column in GENERATED_IDS.items():
            for (value,) in demo.query(shard, f"SELECT {column} FROM {table}"):
                assert decode_id(value).shard_number == number, (table, value, shard)
        for table in SAMPLE_TABLES:
            if table != "countries" or number == 0:
                totals[table] += demo.count(shard, f"SELECT count(*) FROM {table}")
    assert all(n > 0 for n in totals.values()), totals
    assert 200 <= sum(totals.values()) <= 2000, totals
    # Every shard holds some of the sharded rows, and every tenant has orders.
    assert all(demo.count(s, "SELECT count(*) FROM orders") > 0 for s in demo.names)
    assert all(demo.count(s, "SELECT count(*) FROM events") > 0 for s in demo.names)
    tenants = {t for s in demo.names for (t,) in demo.query(s, "SELECT tenant_id FROM tenants")}
    assert tenants_with_orders == tenants


def assert_keyed_queries_work(url: str, demo: DemoShards) -> None:
    """Through the proxy, a query with a key reads exactly what that key's shard holds."""
    q3_shard = demo.rules["by_time"].shard_for(datetime.datetime(2026, 8, 1, tzinfo=datetime.UTC))
    games_shard = demo.rules["by_category"].shard_for("games")
    assert q3_shard is not None and games_shard is not None
    cases = [
        (f"SELECT count(*) FROM {table} WHERE tenant_id = %s", (tenant,),
         demo.tenant_shard(tenant))
        for table in TENANT_TABLES for tenant in (1, 2, 8)  # 8: the rule's default
    ] + [
        ("SELECT count(*) FROM products WHERE category = %s", ("games",), games_shard),
        (f"SELECT count(*) FROM events WHERE {Q3}", (), q3_shard),
        ("SELECT count(*) FROM countries", (), demo.names[-1]),
    ]
    # One user of each shard, looked up by user_id: the directory's shard answers.
    directory = demo.directory()
    users = {shard: min(u for u, s in directory.items() if s == shard) for shard in demo.names}
    user_sql = "SELECT user_id, tenant_id, email, name, role FROM users WHERE user_id = %s"
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        for sql, params, shard in cases:
            through_proxy = conn.execute(sql, params).fetchone()
            assert through_proxy is not None
            assert through_proxy[0] == demo.count(shard, sql, params) > 0, sql
        for shard, user_id in users.items():
            found = conn.execute(user_sql, (user_id,)).fetchall()
            assert len(found) == 1 and found == demo.query(shard, user_sql, (user_id,)), shard
            # The lookup above put the key in the proxy's cache: the route names the shard.
            route = conn.execute(f"SHOW ROUTE FOR SELECT * FROM users WHERE user_id = {user_id}"
                                 ).fetchone()
            assert route is not None and route[:2] == ("single", shard), route
        # A user_id that no directory row names has no rows anywhere.
        assert conn.execute(user_sql, (1,)).fetchall() == []
        # Joins on the key, and with a reference table, run on the key's shard.
        row = conn.execute(
            "SELECT t.name, c.currency, count(o.order_id) FROM tenants t"
            " JOIN countries c ON c.code = t.country_code"
            " JOIN orders o ON o.tenant_id = t.tenant_id"
            " WHERE t.tenant_id = 2 GROUP BY t.name, c.currency").fetchone()
        assert row == ("Bluebird Games", "USD", demo.count(
            demo.tenant_shard(2), "SELECT count(*) FROM orders WHERE tenant_id = 2"))
        orphans = conn.execute(
            "SELECT count(*) FROM orders o LEFT JOIN customers c"
            " ON c.tenant_id = o.tenant_id AND c.customer_id = o.customer_id"
            " WHERE o.tenant_id = 3 AND c.customer_id IS NULL").fetchone()
        assert orphans == (0,)


def assert_key_less_queries(url: str, demo: DemoShards) -> None:
    """Reads without a key run on every shard, merged; a multi-row INSERT is split by shard;
    a new user whose id the shard would make is refused."""
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        for table in ("orders", "events", "users"):  # tenant, range and lookup rules
            total = sum(demo.count(shard, f"SELECT count(*) FROM {table}")
                        for shard in demo.names)
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (total,)
        # users' ids default to shardwire_next_id() on the shard, but the directory must
        # place a new user before the row exists
        with pytest.raises(psycopg.errors.FeatureNotSupported) as refused:
            conn.execute("INSERT INTO users (tenant_id, email, name, role)"
                         " VALUES (1, 'x@acme-books.example', 'X', 'staff')")
        assert refused.value.diag.sqlstate == "0A000"
        assert refused.value.diag.message_hint
        # Rows of two time ranges in one INSERT: each lands on its range's shard (the
        # transaction is rolled back, so the demo data stays as it was).
        where = "kind = 'split-check'"
        before = [demo.count(shard, f"SELECT count(*) FROM events WHERE {where}")
                  for shard in demo.names]
        with conn.transaction(force_rollback=True):
            cur = conn.execute("INSERT INTO events (tenant_id, occurred_at, kind) VALUES"
                               " (1, '2026-02-01', 'split-check'),"
                               " (1, '2026-08-01', 'split-check') RETURNING occurred_at")
            assert [r[0].month for r in cur.fetchall()] == [2, 8]
        assert [demo.count(shard, f"SELECT count(*) FROM events WHERE {where}")
                for shard in demo.names] == before
        # The connection is still usable.
        assert conn.execute("SELECT count(*) FROM tenants WHERE tenant_id = 1").fetchone() == (1,)


def insert_through_proxy(url: str, demo: DemoShards) -> None:
    """An INSERT through the proxy lands on its key's shard, with an id made there."""
    tenant = 2
    shard = demo.tenant_shard(tenant)
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        customer = conn.execute("SELECT min(customer_id) FROM customers WHERE tenant_id = %s",
                                (tenant,)).fetchone()
        assert customer is not None
        row = conn.execute(
            "INSERT INTO orders (tenant_id, order_no, customer_id, status, ordered_at)"
            " VALUES (%s, 9001, %s, 'paid', now()) RETURNING order_id",
            (tenant, customer[0])).fetchone()
        assert row is not None
        order_id = row[0]
        event = conn.execute(
            "INSERT INTO events (tenant_id, occurred_at, kind)"
            " VALUES (1, '2026-08-15 12:00+00', 'signup') RETURNING event_id").fetchone()
        assert event is not None
    for name in demo.names:
        on_it = demo.count(name, "SELECT count(*) FROM orders WHERE order_id = %s", (order_id,))
        assert on_it == (1 if name == shard else 0), name
    assert decode_id(order_id).shard_number == demo.names.index(shard)
    q3_shard = demo.rules["by_time"].shard_for(datetime.datetime(2026, 8, 15, 12,
                                                                 tzinfo=datetime.UTC))
    assert q3_shard is not None
    assert demo.count(q3_shard, "SELECT count(*) FROM events WHERE event_id = %s",
                      (event[0],)) == 1
    assert decode_id(event[0]).shard_number == demo.names.index(q3_shard)


def insert_user_through_proxy(url: str, demo: DemoShards) -> None:
    """A new user through the proxy: the directory places the new user_id (on the shard with
    the fewest users) before the row goes there, and a lookup finds it."""
    rule = demo.rules["by_user"]
    before = demo.directory()
    loads = list(before.values())
    emptiest = min(rule.shards, key=lambda s: (loads.count(s), rule.shards.index(s)))
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        made = conn.execute("SELECT shardwire_next_id()").fetchone()
        assert made is not None
        user_id = made[0]
        assert user_id not in before
        row = conn.execute(
            "INSERT INTO users (user_id, tenant_id, email, name, role)"
            " VALUES (%s, %s, %s, %s, %s) RETURNING user_id", (user_id, *NEW_USER)).fetchone()
        assert row == (user_id,)
        found = conn.execute("SELECT tenant_id, email, name, role FROM users WHERE user_id = %s",
                             (user_id,)).fetchall()
        assert found == [NEW_USER]
    after = demo.directory()
    assert after == {**before, user_id: emptiest}
    for name in demo.names:
        assert (user_id in demo.users(name)) == (name == emptiest), name


def within(seconds: float, check: Callable[..., None], *args: object) -> None:
    """Run `check`, which talks to the proxy; a statement left without an answer fails the
    test instead of hanging it (the thread ends when the demo is stopped)."""
    outcome: queue.Queue[BaseException | None] = queue.Queue()

    def run() -> None:
        try:
            check(*args)
        except BaseException as e:  # handed to the test's thread
            outcome.put(e)
        else:
            outcome.put(None)

    threading.Thread(target=run, daemon=True).start()
    try:
        error = outcome.get(timeout=seconds)
    except queue.Empty:
        pytest.fail(f"{check.__name__}: the proxy did not answer within {seconds}s")
    if error is not None:
        raise error


def show_shards(admin_url: str) -> list[tuple[object, ...]]:
    # The admin console speaks the simple query protocol, as psql does.
    with psycopg.connect(admin_url, autocommit=True, cursor_factory=psycopg.ClientCursor,
                         connect_timeout=10) as conn:
        return conn.execute("SHOW SHARDS").fetchall()


def assert_servers_gone(data_dir: Path) -> None:
    for i in range(1, SHARDS + 1):
        cluster = PostgresCluster(data_dir / f"shard{i}", name=f"shard{i}")
        assert cluster.exists()
        assert not cluster.is_running(), f"{cluster} still runs after the demo exited"
        assert not (cluster.data_dir / "postmaster.pid").exists()


def test_demo_starts_serves_stops_and_restarts(demo_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "demo.log"

    first = Demo(demo_dir, port, log)
    try:
        app_url, admin_url = urls(first.wait_ready())
        assert app_url == f"postgresql://demo:demo@127.0.0.1:{port}/demo"
        assert admin_url == f"postgresql://demo:demo@127.0.0.1:{port}/shardwire"
        shards = show_shards(admin_url)
        assert [row[0] for row in shards] == ["shard1", "shard2"]
        assert (demo_dir / "shardwire.yaml").is_file()
        demo = DemoShards(demo_dir)
        assert_rows_where_the_map_says(demo)
        within(ANSWER_TIMEOUT, assert_keyed_queries_work, app_url, demo)
        within(ANSWER_TIMEOUT, assert_key_less_queries, app_url, demo)
        within(ANSWER_TIMEOUT, insert_through_proxy, app_url, demo)
        within(ANSWER_TIMEOUT, insert_user_through_proxy, app_url, demo)
        counts, ids, directory = demo.counts(), demo.ids(), demo.directory()
        assert first.interrupt() == 0
    finally:
        first.kill()
    assert_servers_gone(demo_dir)

    version_file = demo_dir / "shard1" / "PG_VERSION"
    created = version_file.stat()
    config = (demo_dir / "shardwire.yaml").read_text()

    second = Demo(demo_dir, port, log)
    try:
        app_url, admin_url = urls(second.wait_ready())
        # The same servers on the same ports, and the sample data was not loaded again: the
        # same rows with the same ids, and the rows inserted through the proxy are kept.
        assert version_file.stat().st_ino == created.st_ino
        assert version_file.stat().st_mtime_ns == created.st_mtime_ns
        assert (demo_dir / "shardwire.yaml").read_text() == config
        assert demo.counts() == counts
        assert demo.ids() == ids
        assert demo.directory() == directory
        within(ANSWER_TIMEOUT, assert_keyed_queries_work, app_url, demo)
        assert len(show_shards(admin_url)) == SHARDS
        assert second.interrupt() == 0
    finally:
        second.kill()
    assert_servers_gone(demo_dir)


def test_demo_refuses_a_taken_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "shardwire.cli", "demo", "--port", str(port),
             "--data-dir", str(tmp_path / "demo")],
            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"port {port} is taken; use --port" in result.stderr
    assert "ready" not in result.stdout
    # It gave up before creating any server.
    assert not (tmp_path / "demo" / "shard1").exists()


def test_demo_config_keeps_tenants_that_rebalance_moved(tmp_path: Path) -> None:
    """`rebalance apply` rewrites the demo's config when it moves a tenant; the demo writes the
    config anew at every start, and must keep the move (the rows are on the new shard)."""
    from shardwire.demo import _write_config

    clusters = [PostgresCluster(tmp_path / f"shard{i}", port=free_port(), name=f"shard{i}")
                for i in (1, 2)]
    first = _write_config(tmp_path, free_port(), clusters)
    rule = first.sharding.rules["by_tenant"]
    assert (rule.shard_for(3), rule.shard_for(8)) == ("shard1", "shard2")
    path = tmp_path / "shardwire.yaml"
    text = path.read_text()
    # As apply leaves it: tenant 3 and tenant 8 (not listed before) on shard2, books on shard2.
    moved = text.replace("3: shard1", "3: shard2").replace("6: shard2}", "6: shard2, 8: shard1}")
    moved = moved.replace("books: shard1", "books: shard2")
    assert moved != text
    path.write_text(moved)
    again = _write_config(tmp_path, free_port(), clusters)
    rules = again.sharding.rules
    assert rules["by_tenant"].shard_for(3) == "shard2"
    assert rules["by_tenant"].shard_for(8) == "shard1"
    assert rules["by_tenant"].shard_for(1) == "shard1"  # the others as the demo places them
    assert rules["by_category"].shard_for("books") == "shard2"
    assert "# A shop (tenant) and everything it owns" in path.read_text()  # comments rewritten
    # Another number of shards: the data is loaded afresh, with the demo's own placement.
    three = [*clusters, PostgresCluster(tmp_path / "shard3", port=free_port(), name="shard3")]
    fresh = _write_config(tmp_path, free_port(), three)
    assert fresh.sharding.rules["by_tenant"].shard_for(3) == "shard3"
    assert fresh.sharding.rules["by_category"].shard_for("books") == "shard1"


@pytest.mark.parametrize(("args", "message"), [
    (["--hot-tenant", "1,99"], "the sample shop has tenants 1 to 8, not 99"),
    (["--hot-tenant", "one"], "--hot-tenant takes tenant ids"),
    (["--hot-share", "1.5"], "--hot-share must be between 0 and 1"),
])
def test_demo_load_refuses_bad_options(args: list[str], message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "shardwire.cli", "demo-load", *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr


def test_demo_load_says_when_the_demo_is_not_running() -> None:
    url = f"postgresql://demo:demo@127.0.0.1:{free_port()}/demo"
    result = subprocess.run([sys.executable, "-m", "shardwire.cli", "demo-load", "--url", url,
                             "--seconds", "1"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "is `shardwire demo` running?" in result.stderr
