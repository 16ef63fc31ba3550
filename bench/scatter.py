"""Reads across shards (scatter-gather): the issue's three targets, measured side by side.

Setups, all on this machine:

- single: one PostgreSQL server holding all of table ``t`` (1,000,000 rows), queried
  directly, no proxy;
- pgbouncer: PgBouncer in transaction mode in front of that same server (another proxy hop,
  for scale: what any hop costs here);
- one-shard: Shardwire with one shard, that same server, and no sharding rules;
- 4-shard: Shardwire over four more servers; ``t`` range-sharded on ``k`` (250,000 rows each).

``t`` is ``(k bigint PRIMARY KEY, g integer, x integer, pad text)``: g = k % 100, x a
scrambled k, pad the md5 of k. Every server is filled with generate_series directly (its
own range of k on a shard, all of them on the single server), then VACUUM ANALYZE.

What is measured, in rounds with the order of the setups rotating:

1. ``SELECT k, g, x, pad FROM t ORDER BY k LIMIT 10``: one client runs it over and over
   (psycopg, prepared statement, rows fetched); p50 of the per-query times, 4-shard ÷ single
   ≤ 1.5. Next to it, with no proxy: an asyncpg client sends the same query to the four
   shard servers at once and merges the 4 × 10 rows itself (the floor of any 4-way fan-out
   on this machine), against the same client on the single server.
2. Fan-outs of 1,000,000 rows (``SELECT k, g, x, pad FROM t``, and the same ``ORDER BY k``)
   fetched by psql into /dev/null: the proxy process's CPU time (user + system, from
   /proc/<pid>/stat) per row ≤ 2 µs, and its RSS (VmRSS from /proc/<pid>/status, sampled
   every 10 ms during the query) < 150 MB at peak and not growing with the row count
   (compared with the same fan-out of 100,000 rows, every tenth k).
3. ``SELECT count(*) FROM t`` and ``SELECT g, count(*), sum(x) FROM t GROUP BY g``: 4-shard
   p50 ≤ single p50.

Context, no target: PgBouncer's p50 ÷ single for every query of 1. and 3., the client fan-out
above, ``... ORDER BY x LIMIT 10`` (x has no index, so every server reads all its rows) next
to 1., and the fan-outs through the one-shard proxy (forwarding, no merge) and
straight from the single server (psql's own time).

Usage: ``.venv/bin/python bench/scatter.py``. Environment: BENCH_SECONDS (how long one client
repeats one query through one setup, default 2; at least 20 executions), BENCH_ROUNDS
(default 3), BENCH_KEEP=1 to keep the work directory (server and proxy logs, configs).

Writes a table to stdout, the figures to bench/results/scatter.json and the section between
``<!-- bench:scatter:start -->`` and ``<!-- bench:scatter:end -->`` of docs/benchmarks.md.
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pgbouncer
import psycopg
import report
from cpu_share import machine_busy, process_cpu, server_cpu
from direct import FanoutClient, Server, percentile
from report import (
    max_of,
    median_of,
    ms,
    num,
    percent,
    rotate,
    round3,
    table_markdown,
    table_text,
    write_json,
)
from run import (
    DATABASE,
    DOCS,
    RESULTS,
    USER,
    _env_int,
    _interrupt,
    _loadavg,
    _progress,
    proxy_settings,
)

import shardwire
from shardwire.testing import (
    PostgresCluster,
    free_port,
    pg_bindir,
    start_clusters,
    stop_clusters,
)
from shardwire.testing.proxy import ProxyProcess

BENCHMARK = "scatter-gather"
SINGLE, PGBOUNCER, ONE_SHARD, SHARDED = "single", "pgbouncer", "one-shard", "4-shard"
LATENCY_SETUPS = (SINGLE, PGBOUNCER, ONE_SHARD, SHARDED)
# The client fan-out, no proxy: an asyncpg client on the single server, and on the four shard
# servers at once (merging their rows itself).
CLIENT_SINGLE, CLIENT_FANOUT = "client-single", "client-4-shard"
CLIENT_SETUPS = (CLIENT_SINGLE, CLIENT_FANOUT)
JSON_KEY = {SINGLE: "single", PGBOUNCER: "pgbouncer", ONE_SHARD: "one_shard",
            SHARDED: "sharded", CLIENT_SINGLE: "client_single",
            CLIENT_FANOUT: "client_fanout"}  # fmt: skip
SHARDS = 4
ROWS = 1_000_000
PER_SHARD = ROWS // SHARDS
GROUPS = 100
SMALL_EVERY = 10  # the small fan-out reads every tenth k: 100,000 rows
POOL_SIZE = 4
# PgBouncer before 1.21 does not follow prepared statements in transaction mode: with one
# server connection the client's statements stay where it prepared them. One client needs no
# more.
PGBOUNCER_POOL_SIZE = 1
MIN_EXECUTIONS = 20
WARMUP_SECONDS = 0.5
RSS_INTERVAL = 0.01
SERVER_SETTINGS = {"shared_buffers": "256MB"}  # the single server's whole table stays cached

LIMIT_RATIO_TARGET = 1.5
PARALLEL_RATIO_TARGET = 1.0
CPU_TARGET_US = 2.0
RSS_TARGET_MB = 150
# "Does not grow with the row count": ten times the rows may add at most this much to what
# the proxy's RSS grows by during the query (under 10 bytes a row: nothing is kept per row).
RSS_GROWTH_SLACK_MIB = 8

START_MARKER = "<!-- bench:scatter:start -->"
END_MARKER = "<!-- bench:scatter:end -->"

COLUMNS = "k, g, x, pad"


@dataclass(frozen=True, slots=True)
class LatencyQuery:
    name: str
    sql: str
    bound: float | None  # the 4-shard ÷ single p50 ratio must be at most this; None: context
    ordered: bool  # whether the rows come in a defined order (else compared as a set)
    client: bool = False  # sent by the asyncpg client straight to the servers, no proxy

    @property
    def setups(self) -> tuple[str, ...]:
        return CLIENT_SETUPS if self.client else LATENCY_SETUPS

    @property
    def columns(self) -> tuple[str | None, ...]:
        """The setup in each column of the latency table (single, PgBouncer, one-shard,
        4-shard); None where the row has nothing."""
        return (CLIENT_SINGLE, None, None, CLIENT_FANOUT) if self.client else LATENCY_SETUPS

    @property
    def base(self) -> str:
        """What the ratios divide by: the one server."""
        return CLIENT_SINGLE if self.client else SINGLE

    @property
    def label(self) -> str:
        if self.client:
            return (
                f"`{self.sql}` by an asyncpg client, no proxy: single = the one server, "
                "4-shard = the four shard servers at once, merged by the client"
            )
        return f"`{self.sql}`"


LATENCY_QUERIES = (
    LatencyQuery("order-by-limit", f"SELECT {COLUMNS} FROM t ORDER BY k LIMIT 10",
                 LIMIT_RATIO_TARGET, True),
    # Context, no target: the floor of a 4-way fan-out on this machine, without a proxy.
    LatencyQuery("order-by-limit-client", f"SELECT {COLUMNS} FROM t ORDER BY k LIMIT 10",
                 None, True, client=True),
    LatencyQuery("count", "SELECT count(*) FROM t", PARALLEL_RATIO_TARGET, True),
    LatencyQuery("group-by", "SELECT g, count(*), sum(x) FROM t GROUP BY g",
                 PARALLEL_RATIO_TARGET, False),
    # Context, no target: the same shape on a column without an index, so that every server
    # reads all its rows (x is unique: the ten rows are the same everywhere).
    LatencyQuery("order-by-x-limit", f"SELECT {COLUMNS} FROM t ORDER BY x LIMIT 10",
                 None, True),
)  # fmt: skip
# The two queries of target 3, whose plans (parallel or not) the checks record.
PARALLEL_QUERIES = ("count", "group-by")
CLIENT_LIMIT = 10  # the client fan-out's LIMIT, applied again after its merge


@dataclass(frozen=True, slots=True)
class FanoutQuery:
    name: str
    full: str  # 1,000,000 rows
    small: str  # every tenth k: 100,000 rows


FANOUT_QUERIES = (
    FanoutQuery("union", f"SELECT {COLUMNS} FROM t",
                f"SELECT {COLUMNS} FROM t WHERE k % {SMALL_EVERY} = 0"),
    FanoutQuery("order-by", f"SELECT {COLUMNS} FROM t ORDER BY k",
                f"SELECT {COLUMNS} FROM t WHERE k % {SMALL_EVERY} = 0 ORDER BY k"),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class FanoutRun:
    """Where a fan-out goes and how many rows it reads."""

    setup: str
    small: bool

    @property
    def label(self) -> str:
        rows = ROWS // SMALL_EVERY if self.small else ROWS
        return f"{self.setup}, {rows:,} rows"


FANOUT_RUNS = (
    FanoutRun(SHARDED, small=False),
    FanoutRun(SHARDED, small=True),
    FanoutRun(ONE_SHARD, small=False),
    FanoutRun(SINGLE, small=False),
)


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    host: str
    port: int
    proxy_pid: int | None  # None: the server itself


@dataclass(frozen=True, slots=True)
class Timing:
    """One client repeating one query through one setup."""

    executions: int
    p50_ms: float
    p90_ms: float
    other_cpu: float | None  # share of the machine's CPU that others took meanwhile


@dataclass(frozen=True, slots=True)
class Fetch:
    """One fan-out through one setup, fetched by psql."""

    rows: int
    wall_s: float
    proxy_cpu_s: float | None
    rss_before_kib: int | None
    rss_peak_kib: int | None
    other_cpu: float | None

    @property
    def us_per_row(self) -> float | None:
        if self.proxy_cpu_s is None or not self.rows:
            return None
        return self.proxy_cpu_s / self.rows * 1e6

    @property
    def rss_growth_kib(self) -> int | None:
        if self.rss_before_kib is None or self.rss_peak_kib is None:
            return None
        return self.rss_peak_kib - self.rss_before_kib


@dataclass(frozen=True, slots=True)
class LatencyRow:
    query: LatencyQuery
    rounds: tuple[Mapping[str, Timing], ...]

    def timings(self, setup: str | None) -> list[Timing]:
        """``setup``'s timing in each round; none for a setup the row does not run."""
        return [r[setup] for r in self.rounds if setup is not None and setup in r]

    def p50(self, setup: str | None) -> float | None:
        return median_of([t.p50_ms for t in self.timings(setup)])

    def p90(self, setup: str | None) -> float | None:
        return median_of([t.p90_ms for t in self.timings(setup)])

    def executions(self, setup: str | None) -> float | None:
        return median_of([t.executions for t in self.timings(setup)])

    def ratio(self, setup: str | None = SHARDED) -> float | None:
        """``setup`` ÷ the one server's p50 (single, or the client's on it), within each
        round, then the median."""
        base = self.query.base
        return median_of([r[setup].p50_ms / r[base].p50_ms for r in self.rounds
                        if setup is not None and setup in r
                        and r[base].p50_ms > 0])  # fmt: skip

    def other_cpu(self) -> float | None:
        return max_of([r[s].other_cpu for r in self.rounds for s in self.query.setups])

    @property
    def met(self) -> bool | None:
        ratio = self.ratio()
        bound = self.query.bound
        return None if ratio is None or bound is None else ratio <= bound

    @property
    def name(self) -> str:
        return f"{BENCHMARK}/latency/{self.query.name}"


@dataclass(frozen=True, slots=True)
class FanoutRow:
    query: FanoutQuery
    run: FanoutRun
    rounds: tuple[Fetch, ...]

    @property
    def rows(self) -> int:
        return self.rounds[0].rows if self.rounds else 0

    def median(self, pick: Callable[[Fetch], float | None]) -> float | None:
        return median_of([pick(f) for f in self.rounds])

    def peak_mib(self) -> float | None:
        """The highest RSS seen in any round."""
        peak = max_of([f.rss_peak_kib for f in self.rounds])
        return None if peak is None else peak / 1024

    def growth_mib(self) -> float | None:
        """How much the RSS grew during the query (peak − before), the largest of the rounds."""
        growth = max_of([f.rss_growth_kib for f in self.rounds])
        return None if growth is None else growth / 1024

    def other_cpu(self) -> float | None:
        return max_of([f.other_cpu for f in self.rounds])

    @property
    def name(self) -> str:
        size = "100k" if self.run.small else "1M"
        return f"{BENCHMARK}/fanout/{self.query.name}/{JSON_KEY[self.run.setup]}/{size}"


@dataclass(frozen=True, slots=True)
class Verdict:
    target: str
    measured: str
    met: bool | None

    @property
    def word(self) -> str:
        return "n/a" if self.met is None else "PASS" if self.met else "MISSED"


# --- what the machine does meanwhile ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    at: float
    busy: float  # CPU seconds the machine spent busy, all cores
    ours: float  # CPU seconds of the benchmark's processes


class Machine:
    """How much of the machine's CPU went to processes outside the benchmark.

    Ours: this process and what it reaped (psql), the proxies, every server's postmaster
    with its reaped and live backends.
    """

    def __init__(
        self, proxies: Callable[[], Sequence[int]], postmasters: Callable[[], Sequence[int]]
    ) -> None:
        self._proxies = proxies
        self._postmasters = postmasters
        self._cores = len(os.sched_getaffinity(0))

    def sample(self) -> Sample:
        times = os.times()
        ours = times.user + times.system + times.children_user + times.children_system
        ours += sum(process_cpu(pid) for pid in self._proxies())
        ours += sum(server_cpu(pid) for pid in self._postmasters())
        return Sample(time.monotonic(), machine_busy(), ours)

    def other_fraction(self, before: Sample, after: Sample) -> float | None:
        elapsed = (after.at - before.at) * self._cores
        if elapsed <= 0:
            return None
        return max(0.0, ((after.busy - before.busy) - (after.ours - before.ours)) / elapsed)


def rss_kib(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


class RssPeak:
    """Samples a process's VmRSS on a thread until stopped; keeps the highest."""

    def __init__(self, pid: int, interval: float = RSS_INTERVAL) -> None:
        self.pid = pid
        self.interval = interval
        self.peak: int | None = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while True:
            value = rss_kib(self.pid)
            if value is not None:
                self.samples += 1
                self.peak = value if self.peak is None else max(self.peak, value)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        value = rss_kib(self.pid)  # the last moment counts too
        if value is not None:
            self.peak = value if self.peak is None else max(self.peak, value)


# --- the setups ----------------------------------------------------------------------------


@dataclass
class Bench:
    """Everything started; ``stop`` ends it all."""

    workdir: Path
    clusters: list[PostgresCluster]
    proxies: dict[str, ProxyProcess]
    bouncer: pgbouncer.PgBouncer | None = None

    @property
    def single(self) -> PostgresCluster:
        return self.clusters[0]

    @property
    def shards(self) -> list[PostgresCluster]:
        return self.clusters[1:]

    def targets(self) -> dict[str, Target]:
        out = {SINGLE: Target(SINGLE, self.single.host, self.single.port, None)}
        if self.bouncer is not None:
            out[PGBOUNCER] = Target(
                PGBOUNCER, self.bouncer.host, self.bouncer.port, self.bouncer.pid
            )
        for name, proxy in self.proxies.items():
            assert proxy.proc is not None
            out[name] = Target(name, proxy.host, proxy.port, int(proxy.proc.pid))
        return out

    def postmasters(self) -> list[int]:
        pids = (report.postmaster_pid(cluster) for cluster in self.clusters)
        return [pid for pid in pids if pid is not None]

    def stop(self) -> None:
        report.stop_all([
            *(p.stop for p in self.proxies.values()),
            self.bouncer.stop if self.bouncer else None,
            (lambda: stop_clusters(self.clusters, mode="immediate")) if self.clusters else None,
        ])  # fmt: skip


def shard_bounds(index: int) -> tuple[int, int]:
    """The k of shard ``index`` (0-based): from <= k < to."""
    return 1 + index * PER_SHARD, 1 + (index + 1) * PER_SHARD


def _fill(cluster: PostgresCluster, low: int, high: int) -> None:
    cluster.sql(f"CREATE ROLE {USER} LOGIN")
    cluster.sql(f"CREATE DATABASE {DATABASE} OWNER {USER}")
    cluster.sql(
        "CREATE TABLE t (k bigint NOT NULL, g integer NOT NULL, x integer NOT NULL, "
        "pad text NOT NULL);\n"
        f"INSERT INTO t SELECT k, k % {GROUPS}, ((k * 7919) % 1000003)::integer, md5(k::text) "
        f"FROM generate_series({low}::bigint, {high - 1}) AS k;\n"
        "ALTER TABLE t ADD PRIMARY KEY (k);\n"
        "VACUUM ANALYZE t;",
        dbname=DATABASE, user=USER, timeout=600,
    )  # fmt: skip


def build(workdir: Path) -> Bench:
    """Five servers filled, PgBouncer and two Shardwires started. On failure, what started
    is stopped."""
    program = pgbouncer.ensure_installed()
    bench = Bench(workdir, [], {})
    try:
        bench.clusters = start_clusters(
            workdir / "pg", 1 + SHARDS, prefix="pg", settings=SERVER_SETTINGS
        )
        _progress(f"filling t: {ROWS:,} rows on the single server, {PER_SHARD:,} on each shard")
        with ThreadPoolExecutor(max_workers=len(bench.clusters)) as pool:
            futures = [pool.submit(_fill, bench.single, 1, ROWS + 1)]
            futures += [pool.submit(_fill, c, *shard_bounds(i)) for i, c in enumerate(bench.shards)]
            for future in futures:
                future.result()
        names = [f"s{i + 1}" for i in range(SHARDS)]
        ranges: list[dict[str, Any]] = []
        for i, name in enumerate(names):
            low, high = shard_bounds(i)
            entry: dict[str, Any] = {"shard": name}
            if i > 0:
                entry["from"] = low
            if i < SHARDS - 1:
                entry["to"] = high
            ranges.append(entry)
        pool_settings = {"size": POOL_SIZE}
        bench.proxies[ONE_SHARD] = ProxyProcess(
            proxy_settings({"s1": bench.single.dsn(DATABASE, user=USER)}, pool=pool_settings),
            workdir / ONE_SHARD,
            log_level="warning",
        )
        by_k = {
            "kind": "range",
            "column": "k",
            "type": "integer",
            "tables": ["t"],
            "ranges": ranges,
        }
        bench.proxies[SHARDED] = ProxyProcess(
            proxy_settings(
                {
                    name: c.dsn(DATABASE, user=USER)
                    for name, c in zip(names, bench.shards, strict=True)
                },
                pool=pool_settings,
                sharding={"rules": {"by_k": by_k}},
            ),
            workdir / SHARDED,
            log_level="warning",
        )
        for proxy in bench.proxies.values():
            proxy.start()
        bench.bouncer = pgbouncer.PgBouncer(
            program,
            workdir / PGBOUNCER,
            port=free_port(),
            server_host=bench.single.host,
            server_port=bench.single.port,
            database=DATABASE,
            user=USER,
            pool_size=PGBOUNCER_POOL_SIZE,
            max_client_conn=100,
            max_prepared_statements=100,
        )
        bench.bouncer.start()
        return bench
    except BaseException:
        bench.stop()
        raise


# --- checks --------------------------------------------------------------------------------


def _connect(target: Target) -> psycopg.Connection[Any]:
    return report.connect(target.host, target.port, user=USER, database=DATABASE)


def open_clients(bench: Bench) -> dict[str, FanoutClient]:
    """The asyncpg clients of the client fan-out: on the single server, on the four shards."""
    clients: dict[str, FanoutClient] = {}
    try:
        for name, clusters in ((CLIENT_SINGLE, [bench.single]), (CLIENT_FANOUT, bench.shards)):
            servers = [Server(c.host, c.port) for c in clusters]
            clients[name] = FanoutClient(servers, user=USER, database=DATABASE)
    except BaseException:
        for client in clients.values():
            client.close()
        raise
    return clients


def check(
    bench: Bench, targets: Mapping[str, Target], clients: Mapping[str, FanoutClient]
) -> list[str]:
    """Every shard holds its rows; every query goes to every shard through the 4-shard proxy
    and returns the single server's rows through PgBouncer and both proxies, and the client
    fan-out merges the same rows. Raises on the first wrong answer (a benchmark of wrong
    answers means nothing); returns what it checked."""
    lines = []
    counts = [int(c.sql("SELECT count(*) FROM t", dbname=DATABASE)) for c in bench.shards]
    if counts != [PER_SHARD] * SHARDS:
        raise RuntimeError(f"the shards hold {counts} rows of t, not {PER_SHARD} each")
    lines.append(f"the shards hold {', '.join(f'{n:,}' for n in counts)} rows of t")
    every = [f"s{i + 1}" for i in range(SHARDS)]
    sqls = list(dict.fromkeys(q.sql for q in LATENCY_QUERIES))
    sqls += [s for q in FANOUT_QUERIES for s in (q.full, q.small)]
    for sql in sqls:
        sharded = targets[SHARDED]
        route = report.show_route(sharded.host, sharded.port, sql, user=USER, database=DATABASE)
        if report.route_shards(route) != every or route.get("sqlstate"):
            raise RuntimeError(f"{sql!r} does not run on every shard: {route}")
    lines.append(f"SHOW ROUTE: all {len(sqls)} queries run on {', '.join(every)}")
    expected: dict[str, list[Any]] = {}
    for query in LATENCY_QUERIES:
        answers: dict[str, list[Any]] = {}
        for name in query.setups:
            if query.client:
                rows = clients[name].merged(query.sql, limit=CLIENT_LIMIT)
            else:
                with _connect(targets[name]) as conn:
                    rows = conn.execute(query.sql).fetchall()
            answers[name] = rows if query.ordered else sorted(rows)
        want = expected.setdefault(query.sql, answers[query.base])
        for name in query.setups:
            if answers[name] != want:
                raise RuntimeError(
                    f"{query.sql!r} through {name} returned {answers[name][:3]}..., the "
                    f"single server {want[:3]}..."
                )
        n = len(want)
        lines.append(
            f"`{query.sql}`: the same {n} row{'' if n == 1 else 's'} "
            + ("from the asyncpg client on the single server and merged from the four shards"
               if query.client else "directly, through PgBouncer and through both Shardwires")
        )  # fmt: skip
    for query in LATENCY_QUERIES:
        if query.name in PARALLEL_QUERIES:
            lines.append(
                f"PostgreSQL's plan for `{query.sql}`: {_workers(bench.single, query.sql)} on "
                f"the single server, {_workers(bench.shards[0], query.sql)} on a shard (s1)"
            )
    return lines


def _workers(cluster: PostgresCluster, sql: str) -> str:
    """How many parallel workers the server plans for ``sql``."""
    plan = cluster.sql(f"EXPLAIN (COSTS OFF) {sql}", dbname=DATABASE, user=USER)
    for line in plan.splitlines():
        if "Workers Planned:" in line:
            count = line.split(":", 1)[1].strip()
            return f"{count} parallel worker{'' if count == '1' else 's'}"
    return "no parallel workers"


# --- measuring -----------------------------------------------------------------------------


def repeat(conn: psycopg.Connection[Any], sql: str, *, seconds: float, minimum: int) -> list[float]:
    """Milliseconds per execution: prepared statement, rows fetched, one after the other."""
    cursor = conn.cursor()
    times: list[float] = []
    clock = time.perf_counter_ns
    deadline = time.monotonic() + seconds
    while len(times) < minimum or time.monotonic() < deadline:
        started = clock()
        cursor.execute(sql, prepare=True)  # type: ignore[call-overload]
        cursor.fetchall()
        times.append((clock() - started) / 1e6)
    return times


def psql_program() -> str:
    candidate = pg_bindir() / "psql"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("psql")
    if found is None:
        raise RuntimeError("psql not found: install the PostgreSQL client programs")
    return found


def fetch_all(target: Target, sql: str, machine: Machine) -> Fetch:
    """``sql`` through ``target`` by psql (simple protocol), its rows written to /dev/null;
    psql reports the row count. The proxy's CPU and RSS are read meanwhile."""
    script = f"\\o /dev/null\n{sql};\n\\o\n\\echo :ROW_COUNT\n"
    args = [
        psql_program(), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
        "-h", target.host, "-p", str(target.port), "-U", USER, "-d", DATABASE, "-f", "-",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"LC_ALL": "C"}
    pid = target.proxy_pid
    before = machine.sample()
    cpu_before = None if pid is None else process_cpu(pid)
    rss_before = None if pid is None else rss_kib(pid)
    started = time.monotonic()
    peak: int | None = None
    if pid is None:
        result = subprocess.run(
            args, input=script, env=env, capture_output=True, text=True, timeout=600
        )
    else:
        with RssPeak(pid) as watch:
            result = subprocess.run(
                args, input=script, env=env, capture_output=True, text=True, timeout=600
            )
        peak = watch.peak
    wall = time.monotonic() - started
    cpu = None if pid is None or cpu_before is None else process_cpu(pid) - cpu_before
    after = machine.sample()
    if result.returncode != 0:
        raise RuntimeError(f"psql through {target.name} failed: {result.stderr.strip()}")
    return Fetch(
        rows=int(result.stdout.strip().splitlines()[-1]),
        wall_s=wall,
        proxy_cpu_s=cpu,
        rss_before_kib=rss_before,
        rss_peak_kib=peak,
        other_cpu=machine.other_fraction(before, after),
    )


def run_rounds(
    targets: Mapping[str, Target],
    clients: Mapping[str, FanoutClient],
    machine: Machine,
    *,
    seconds: float,
    rounds: int,
) -> tuple[list[LatencyRow], list[FanoutRow]]:
    conns = {name: _connect(targets[name]) for name in LATENCY_SETUPS}

    def times(query: LatencyQuery, setup: str, seconds: float, minimum: int) -> list[float]:
        if query.client:
            return clients[setup].repeat(
                query.sql, limit=CLIENT_LIMIT, seconds=seconds, minimum=minimum
            )
        return repeat(conns[setup], query.sql, seconds=seconds, minimum=minimum)

    try:
        _progress("warm-up")
        for query in LATENCY_QUERIES:
            for name in query.setups:
                times(query, name, WARMUP_SECONDS, 3)
        fetch_all(targets[SHARDED], FANOUT_QUERIES[0].small, machine)

        latency: dict[str, list[dict[str, Timing]]] = {q.name: [] for q in LATENCY_QUERIES}
        fanout: dict[tuple[str, FanoutRun], list[Fetch]] = {
            (q.name, run): [] for q in FANOUT_QUERIES for run in FANOUT_RUNS
        }
        started = time.monotonic()
        for number in range(rounds):
            for index, query in enumerate(LATENCY_QUERIES):
                this_round: dict[str, Timing] = {}
                for name in rotate(query.setups, number + index):
                    before = machine.sample()
                    taken = times(query, name, seconds, MIN_EXECUTIONS)
                    after = machine.sample()
                    timing = Timing(
                        executions=len(taken),
                        p50_ms=statistics.median(taken),
                        p90_ms=percentile(taken, 0.9),
                        other_cpu=machine.other_fraction(before, after),
                    )
                    this_round[name] = timing
                    _progress(
                        f"[{time.monotonic() - started:.0f}s] round {number + 1} {query.name} "
                        f"{name}: p50 {timing.p50_ms:.3f} ms, p90 {timing.p90_ms:.3f} ms over "
                        f"{timing.executions} executions{_others(timing.other_cpu)}"
                    )
                latency[query.name].append(this_round)
            for index, fquery in enumerate(FANOUT_QUERIES):
                for run in rotate(FANOUT_RUNS, number + index):
                    sql = fquery.small if run.small else fquery.full
                    fetch = fetch_all(targets[run.setup], sql, machine)
                    fanout[(fquery.name, run)].append(fetch)
                    _progress(
                        f"[{time.monotonic() - started:.0f}s] round {number + 1} fan-out "
                        f"{fquery.name} {run.label}: {_fetch_brief(fetch)}"
                    )
    finally:
        for conn in conns.values():
            conn.close()
    latency_rows = [LatencyRow(q, tuple(latency[q.name])) for q in LATENCY_QUERIES]
    fanout_rows = [
        FanoutRow(q, run, tuple(fanout[(q.name, run)]))
        for q in FANOUT_QUERIES for run in FANOUT_RUNS
    ]  # fmt: skip
    return latency_rows, fanout_rows


def _others(share: float | None) -> str:
    return "" if share is None else f", others took {share * 100:.0f}% of the CPU"


def _fetch_brief(fetch: Fetch) -> str:
    text = f"{fetch.rows:,} rows in {fetch.wall_s:.2f} s"
    if fetch.proxy_cpu_s is not None and fetch.us_per_row is not None:
        text += f", proxy CPU {fetch.proxy_cpu_s:.2f} s ({fetch.us_per_row:.2f} µs a row)"
    if fetch.rss_before_kib is not None and fetch.rss_peak_kib is not None:
        text += (
            f", proxy RSS {fetch.rss_before_kib / 1024:.1f} → peak "
            f"{fetch.rss_peak_kib / 1024:.1f} MiB"
        )
    return text + _others(fetch.other_cpu)


# --- targets -------------------------------------------------------------------------------


def verdicts(latency: Sequence[LatencyRow], fanout: Sequence[FanoutRow]) -> list[Verdict]:
    out = []
    by_name = {row.query.name: row for row in latency}
    limit, client = by_name["order-by-limit"], by_name["order-by-limit-client"]
    # Side by side with the target, for scale (no verdict of their own): one PgBouncer hop,
    # and a 4-way fan-out by the client itself, no proxy.
    scale = (
        f"; next to it, PgBouncer {num(limit.ratio(PGBOUNCER), 2)}× the single server's, and "
        "the asyncpg client's own fan-out to the four shards "
        f"{num(client.ratio(CLIENT_FANOUT), 2)}× the same client on the single server"
    )
    out.append(Verdict(
        f"4 shards, `{limit.query.sql}`, 1 client: p50 ≤ {LIMIT_RATIO_TARGET}× the single "
        "server's",
        _ratio_text(limit) + scale, limit.met,
    ))  # fmt: skip
    for fan in fanout:
        if fan.run != FanoutRun(SHARDED, small=False):
            continue
        us = fan.median(lambda f: f.us_per_row)
        out.append(Verdict(
            f"fan-out of {fan.rows:,} rows ({fan.query.name}, `{fan.query.full}`): proxy CPU "
            f"≤ {CPU_TARGET_US:g} µs a row",
            "—" if us is None else f"{us:.2f} µs a row",
            None if us is None else us <= CPU_TARGET_US,
        ))  # fmt: skip
    for query in FANOUT_QUERIES:
        full = _fanout_row(fanout, query, FanoutRun(SHARDED, small=False))
        small = _fanout_row(fanout, query, FanoutRun(SHARDED, small=True))
        peak, grew, grew_small = full.peak_mib(), full.growth_mib(), small.growth_mib()
        met = None
        if peak is not None and grew is not None and grew_small is not None:
            met = peak * 1024 * 1024 < RSS_TARGET_MB * 1e6 and (
                grew <= grew_small + RSS_GROWTH_SLACK_MIB
            )
        out.append(Verdict(
            f"fan-out of {full.rows:,} rows ({query.name}): proxy peak RSS < {RSS_TARGET_MB} MB "
            f"and growing no more than {RSS_GROWTH_SLACK_MIB} MiB beyond what {small.rows:,} "
            "rows add",
            "—" if peak is None else
            f"peak {peak:.1f} MiB ({peak * 1.048576:.1f} MB); grew {_mib(grew)} MiB during the "
            f"query, {_mib(grew_small)} MiB with {small.rows:,} rows",
            met,
        ))  # fmt: skip
    for name in PARALLEL_QUERIES:
        parallel = by_name[name]
        out.append(Verdict(
            f"4 shards, `{parallel.query.sql}`, 1 client: p50 ≤ the single server's",
            _ratio_text(parallel), parallel.met,
        ))  # fmt: skip
    return out


def _fanout_row(rows: Sequence[FanoutRow], query: FanoutQuery, run: FanoutRun) -> FanoutRow:
    return next(r for r in rows if r.query.name == query.name and r.run == run)


def _mib(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _ratio_text(row: LatencyRow) -> str:
    ratio = row.ratio()
    if ratio is None:
        return "—"
    return f"{ratio:.2f}× ({ms(row.p50(SHARDED))} ms against {ms(row.p50(SINGLE))} ms, medians)"


# --- output --------------------------------------------------------------------------------


LATENCY_HEADERS = (
    "query", "executions s/b/1/4", "p50 ms single", "p50 ms pgbouncer", "p50 ms one-shard",
    "p50 ms 4-shard", "p90 ms s/b/1/4", "pgbouncer ÷ single", "one-shard ÷ single",
    "4-shard ÷ single", "others' cpu", "target",
)  # fmt: skip


def latency_cells(row: LatencyRow, *, markdown: bool) -> list[str]:
    query = row.query.label if markdown else row.query.name
    met = row.met
    single, bouncer, one, four = row.query.columns
    return [
        query,
        " / ".join(num(row.executions(s)) for s in row.query.columns),
        ms(row.p50(single)),
        ms(row.p50(bouncer)),
        ms(row.p50(one)),
        ms(row.p50(four)),
        " / ".join(ms(row.p90(s)) for s in row.query.columns),
        num(row.ratio(bouncer), 2),
        num(row.ratio(one), 2),
        num(row.ratio(four), 2),
        percent(row.other_cpu()),
        "context, no target"
        if row.query.bound is None
        else f"≤ {row.query.bound:g}: " + ("n/a" if met is None else "PASS" if met else "MISSED"),
    ]


FANOUT_HEADERS = (
    "query", "through", "rows", "wall s", "rows/s", "proxy cpu s", "proxy µs/row",
    "proxy RSS before MiB", "proxy RSS peak MiB", "others' cpu",
)  # fmt: skip


def fanout_cells(row: FanoutRow) -> list[str]:
    before = row.median(lambda f: f.rss_before_kib)
    wall = row.median(lambda f: f.wall_s)
    return [
        row.query.name,
        row.run.setup,
        num(row.rows),
        num(wall, 2),
        "—" if not wall else num(row.rows / wall),
        num(row.median(lambda f: f.proxy_cpu_s), 2),
        num(row.median(lambda f: f.us_per_row), 2),
        "—" if before is None else num(before / 1024, 1),
        num(row.peak_mib(), 1),
        percent(row.other_cpu()),
    ]


def json_document(
    latency: Sequence[LatencyRow],
    fanout: Sequence[FanoutRow],
    results: Sequence[Verdict],
    *,
    env: Mapping[str, str],
    checks: Sequence[str],
    notes: Sequence[str],
) -> dict[str, Any]:
    return {
        "benchmark": BENCHMARK,
        **env,
        "latency": [
            {
                "name": row.name,
                "query": row.query.sql,
                **{f"{JSON_KEY[s]}_p50_ms": round3(row.p50(s)) for s in row.query.setups},
                **{f"{JSON_KEY[s]}_p90_ms": round3(row.p90(s)) for s in row.query.setups},
                **{f"{JSON_KEY[s]}_to_{JSON_KEY[row.query.base]}": round3(row.ratio(s))
                   for s in row.query.setups if s != row.query.base},
                "bound": row.query.bound,
                "met": row.met,
                "rounds": [
                    {JSON_KEY[s]: {"p50_ms": round3(r[s].p50_ms),
                                   "executions": r[s].executions,
                                   "other_cpu": round3(r[s].other_cpu)}
                     for s in row.query.setups}
                    for r in row.rounds
                ],
            }
            for row in latency
        ],
        "fanout": [
            {
                "name": row.name,
                "query": row.query.small if row.run.small else row.query.full,
                "through": JSON_KEY[row.run.setup],
                "rows": row.rows,
                "wall_s": round3(row.median(lambda f: f.wall_s)),
                "proxy_cpu_s": round3(row.median(lambda f: f.proxy_cpu_s)),
                "proxy_us_per_row": round3(row.median(lambda f: f.us_per_row)),
                "proxy_rss_peak_mib": round3(row.peak_mib()),
                "proxy_rss_growth_mib": round3(row.growth_mib()),
                "rounds": [
                    {"wall_s": round3(f.wall_s), "proxy_cpu_s": round3(f.proxy_cpu_s),
                     "rss_before_kib": f.rss_before_kib, "rss_peak_kib": f.rss_peak_kib,
                     "other_cpu": round3(f.other_cpu)}
                    for f in row.rounds
                ],
            }
            for row in fanout
        ],
        "targets": [{"target": v.target, "measured": v.measured, "result": v.word}
                    for v in results],
        "checks": list(checks),
        "notes": list(notes),
    }  # fmt: skip


def markdown_section(
    latency: Sequence[LatencyRow],
    fanout: Sequence[FanoutRow],
    results: Sequence[Verdict],
    *,
    env: Mapping[str, str],
    checks: Sequence[str],
    notes: Sequence[str],
) -> str:
    plural = "" if env["rounds"] == "1" else "s"
    ranges = ", ".join(
        f"s{i + 1} {lo:,}–{hi - 1:,}" for i, (lo, hi) in enumerate(map(shard_bounds, range(SHARDS)))
    )
    parts = [
        START_MARKER,
        "## Reads across shards (scatter-gather)",
        "",
        f"Written by `.venv/bin/python bench/scatter.py` on {env['date']}. Figures as JSON: "
        "`bench/results/scatter.json`. `BENCH_SECONDS` sets how long one client repeats one "
        f"query through one setup (default 2, at least {MIN_EXECUTIONS} executions), "
        "`BENCH_ROUNDS` the rounds (default 3), and `BENCH_KEEP=1` keeps the work directory.",
        "",
        f"- Machine: {env['machine']}",
        f"- Software: {env['software']}",
        f"- Run: BENCH_SECONDS={env['seconds']}, {env['rounds']} round{plural}; load average "
        f"{env['loadavg']} before the run, {env['loadavg_after']} after (other work on the "
        "machine skews the figures; *others' cpu* is the largest share of the machine's CPU "
        "that processes outside the benchmark took during any measurement of the row)",
        "",
        "What ran: five PostgreSQL servers on this machine (fsync off, shared_buffers "
        f"{SERVER_SETTINGS['shared_buffers']}, parallel query at its defaults), each with a "
        f"table `t (k bigint PRIMARY KEY, g integer, x integer, pad text)`; g = k % {GROUPS}, "
        "x a scrambled k, pad md5(k), filled with generate_series on each server and "
        f"vacuumed. *single*: one server holding all {ROWS:,} rows, queried directly. "
        "*pgbouncer*: PgBouncer (transaction mode, default_pool_size "
        f"{PGBOUNCER_POOL_SIZE}: before 1.21 it does not follow prepared statements, and one "
        "server connection keeps them where the one client prepared them) in front of that "
        "server. *one-shard*: Shardwire with that server as its only shard and no rules. "
        "*4-shard*: Shardwire over the other four servers, `t` range-sharded on `k` "
        f"({ranges}). Both Shardwires: transaction mode, pool.size {POOL_SIZE}, log level "
        "warning. In each round every measurement ran once, the order of the setups rotating "
        "from one query and round to the next.",
        "",
        "Latency: one client (psycopg "
        f"{psycopg.__version__}, a prepared statement executed and its rows fetched, one "
        f"execution after the other over TCP) repeats a query for BENCH_SECONDS; p50 and p90 "
        "of the per-query times. Figures are medians over the rounds; ratios are computed "
        "within each round, then the median taken. *pgbouncer ÷ single* is what one proxy "
        "hop that does no more than pass the query on costs this machine, next to what "
        "Shardwire's one-shard and 4-shard hops cost. The second row has no proxy: an asyncpg "
        f"{asyncpg.__version__} client (uvloop, statements prepared at their first execution) "
        "sends the query to the four shard servers at once, merges the 4 × 10 rows on k and "
        "keeps the first 10, against the same client sending it to the single server: what a "
        "4-way fan-out costs on this machine before any proxy adds to it. It and the last "
        "row are context, not targets; the last row is the same shape ordered by x, which "
        "has no index, so that every server reads all its rows.",
        "",
        table_markdown(
            LATENCY_HEADERS,
            [latency_cells(r, markdown=True) for r in latency],
            text=(0, len(LATENCY_HEADERS) - 1),
        ),
        "",
        "Fan-out: psql (simple protocol, its output to /dev/null; psql holds the whole "
        "result in its memory before printing) reads every row of t, or every tenth k. "
        "*proxy cpu* is the proxy process's user + system time from /proc/<pid>/stat during "
        "the query; *proxy RSS* is its VmRSS from /proc/<pid>/status, before the query "
        f"(median) and its peak over all rounds, sampled every {RSS_INTERVAL * 1000:.0f} ms "
        "during the query. The one-shard proxy forwards a single shard's rows untouched; "
        "single is psql alone, for the client's own time.",
        "",
        table_markdown(FANOUT_HEADERS, [fanout_cells(r) for r in fanout], text=(0, 1)),
        "",
        "Targets (medians on this machine):",
        "",
        *(f"- {v.target}: {v.measured} — **{v.word}**" for v in results),
        "",
        "Checks before the runs (a wrong answer stops the benchmark):",
        "",
        *(f"- {line}" for line in checks),
    ]
    if notes:
        parts += ["", "Notes:", "", *(f"- {n}" for n in notes)]
    parts.append(END_MARKER)
    return "\n".join(parts) + "\n"


def _notes(bench: Bench) -> list[str]:
    notes = []
    for name, proxy in bench.proxies.items():
        note = report.proxy_log_note(f"the {name} Shardwire", proxy)
        if note:
            notes.append(note)
    return notes


def _describe(bench: Bench, *, seconds: int, rounds: int, loadavg: str) -> dict[str, str]:
    cluster = bench.single
    psql = subprocess.run(
        [psql_program(), "--version"], capture_output=True, text=True, timeout=10
    ).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": report.machine_line(),
        "software": "PostgreSQL "
        + cluster.sql("SHOW server_version")
        + f", {psql}, {_bouncer_version(bench)}, psycopg {psycopg.__version__}, asyncpg "
        f"{asyncpg.__version__}, Python {platform.python_version()}, "
        f"Shardwire {shardwire.__version__} ({report.shardwire_source()})",
        "seconds": str(seconds),
        "rounds": str(rounds),
        "loadavg": loadavg,
        "loadavg_after": "",
    }


def _bouncer_version(bench: Bench) -> str:
    if bench.bouncer is None:
        return "no PgBouncer"
    return "PgBouncer " + ".".join(map(str, bench.bouncer.version))


@contextmanager
def _signals() -> Iterator[None]:
    # SIGTERM and SIGHUP take the same way out as Ctrl-C, through the cleanup.
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main() -> int:
    seconds = _env_int("BENCH_SECONDS", 2)
    rounds = _env_int("BENCH_ROUNDS", 3)
    keep = os.environ.get("BENCH_KEEP", "") not in ("", "0")
    loadavg = _loadavg()
    workdir = Path(tempfile.mkdtemp(prefix="shardwire-bench-scatter-"))
    os.chmod(workdir, 0o711)  # the postgres OS user runs the servers in here
    bench: Bench | None = None
    clients: dict[str, FanoutClient] = {}
    with _signals():
        try:
            _progress(f"work directory {workdir}")
            bench = build(workdir)
            targets = bench.targets()
            proxy_pids = [t.proxy_pid for t in targets.values() if t.proxy_pid is not None]
            machine = Machine(lambda: proxy_pids, bench.postmasters)
            clients = open_clients(bench)
            checks = check(bench, targets, clients)
            for line in checks:
                _progress(f"check: {line}")
            env = _describe(bench, seconds=seconds, rounds=rounds, loadavg=loadavg)
            latency, fanout = run_rounds(targets, clients, machine, seconds=seconds, rounds=rounds)
            env["loadavg_after"] = _loadavg()
            results = verdicts(latency, fanout)
            notes = _notes(bench)

            print(table_text(LATENCY_HEADERS, [latency_cells(r, markdown=False) for r in latency]))
            print()
            print(table_text(FANOUT_HEADERS, [fanout_cells(r) for r in fanout]))
            print()
            for v in results:
                print(f"{v.word}: {v.target}: {v.measured}")
            for note in notes:
                print(f"note: {note}")
            document = json_document(latency, fanout, results, env=env, checks=checks, notes=notes)
            write_json(RESULTS / "scatter.json", document)
            report.write_docs(
                DOCS,
                markdown_section(latency, fanout, results, env=env, checks=checks, notes=notes),
            )
            _progress(f"wrote {RESULTS / 'scatter.json'} and {DOCS}")
            return 0
        except KeyboardInterrupt:
            _progress("interrupted; stopping everything")
            return 130
        finally:
            for client in clients.values():
                client.close()
            if bench is not None:
                bench.stop()
            if keep:
                _progress(f"kept {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
