"""Transactions across shards (issue 5): two-phase commit next to one-shard transactions through
the same proxy, and pgbench's TPC-B-like script on two shards, in interleaved rounds.

Servers, all on this machine (fsync off): *single* holds all of pgbench's tables at scale 10;
*s1* and *s2* are two shards, each filled with ``pgbench -i`` and then cut down to the rows it
owns. Proxies, both in transaction mode with pool.size 20 and log level warning: *one-shard*
(the single server as its only shard, no rules) and *sharded* (s1 and s2; no catalog, so the
two-phase commit decisions live in s1's database). The sharded map:

- ``pgbench_accounts`` and ``pgbench_history`` range-sharded on ``aid`` (aid < 500001 on s1);
- ``pgbench_tellers`` on ``tid`` (tid < 51 on s1), ``pgbench_branches`` on ``bid`` (bid < 6 on
  s1).

Every statement of pgbench's TPC-B-like script names the key of the one table it touches, so
each goes to exactly one shard (the docs section says why no other map runs the script).

What is measured, in rounds, the order of the runs rotating:

1. Two UPDATEs of pgbench_accounts in one transaction, through the sharded proxy (custom
   pgbench scripts): *cross-shard*, one row on s1 and one on s2 (two-phase commit), against
   *same-shard*, both rows on one shard (a plain COMMIT; half the transactions on s1, half on
   s2, as two scripts). Each moves ``delta`` from one account to the other, the lower aid
   first: the money invariant holds, and concurrent transactions take their row locks in one
   order (no deadlock; the proxy would break one across shards with 40P01 after about a
   second). Targets: p50 cross ÷ same ≤ 1.8 with 1 client; TPS cross ÷ same ≥ 0.5 with 8.
2. pgbench's built-in TPC-B-like script, unmodified (``pgbench -n``): against the single server
   directly, through the one-shard proxy and through the sharded proxy. Context, no target.

Each run through the sharded proxy counts its two-phase commits in s2's WAL
(``pg_waldump --stats=record``: Transaction/COMMIT_PREPARED records between the WAL positions
before and after the run; s1 holds the decisions and commits its part with them, unprepared).
After all runs: no prepared transaction is left on any server, and
pgbench's money invariant holds, sum(abalance) = sum(bbalance) = sum(tbalance) = sum(delta) of
pgbench_history, on the single server and summed over the two shards.

Usage: ``.venv/bin/python bench/transactions.py``. Environment: BENCH_SECONDS (length of one
pgbench run, default 4), BENCH_ROUNDS (default 3), BENCH_KEEP=1 to keep the work directory
(pgbench's output and scripts, the servers' and proxies' logs).

Writes tables to stdout, the figures to bench/results/transactions.json and the section between
``<!-- bench:transactions:start -->`` and ``<!-- bench:transactions:end -->`` of
docs/benchmarks.md. Exits 1 when a check after the runs fails (the outputs are written all the
same, with the failure).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import report
from cpu_share import process_cpu
from pgbench_run import (
    Target,
    clean_env,
    initialise,
    parse_summary,
    percentile_ms,
    pgbench_program,
)
from report import (
    Workload,
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
    POOL_SIZE,
    RESULTS,
    SCALE,
    USER,
    WARMUP_SECONDS,
    WORKLOADS,
    _env_int,
    _interrupt,
    _loadavg,
    _progress,
    proxy_settings,
)
from scatter import Machine, Verdict

import shardwire
from shardwire.testing import PostgresCluster, pg_bindir, start_clusters, stop_clusters
from shardwire.testing.proxy import ProxyProcess

BENCHMARK = "transactions"
DIRECT, ONE_SHARD, SHARDED = "direct", "one-shard", "sharded"
TPCB_SETUPS = (DIRECT, ONE_SHARD, SHARDED)
SAME, CROSS = "same-shard", "cross-shard"
TRANSFERS = (SAME, CROSS)
SHARDS = ("s1", "s2")
JSON_KEY = {DIRECT: "direct", ONE_SHARD: "one_shard", SHARDED: "sharded", SAME: "same_shard",
            CROSS: "cross_shard"}  # fmt: skip

ACCOUNTS, TELLERS, BRANCHES = 100_000 * SCALE, 10 * SCALE, SCALE
# The first key of each table on s2: s1 holds the lower half of the keys, s2 the upper.
AID_SPLIT, TID_SPLIT, BID_SPLIT = ACCOUNTS // 2 + 1, TELLERS // 2 + 1, BRANCHES // 2 + 1
TABLES = (  # table, key column, first key on s2, rows in all
    ("pgbench_accounts", "aid", AID_SPLIT, ACCOUNTS),
    ("pgbench_tellers", "tid", TID_SPLIT, TELLERS),
    ("pgbench_branches", "bid", BID_SPLIT, BRANCHES),
)

LATENCY_TARGET = 1.8  # cross ÷ same p50, 1 client
TPS_TARGET = 0.5  # cross ÷ same TPS, 8 clients
WAL_WAIT = 10.0  # seconds to wait for the WAL of a run to reach the files

START_MARKER = "<!-- bench:transactions:start -->"
END_MARKER = "<!-- bench:transactions:end -->"


# --- the scripts ----------------------------------------------------------------------------


def transfer_script(x: tuple[int, int], y: tuple[int, int]) -> str:
    """A pgbench script moving :delta between two accounts drawn from the aid ranges ``x`` and
    ``y``, the lower aid first (one lock order for every client: no deadlocks).

    >>> print(transfer_script((1, 10), (11, 20)))
    \\set x random(1, 10)
    \\set y random(11, 20)
    \\set a least(:x, :y)
    \\set b greatest(:x, :y)
    \\set delta random(-5000, 5000)
    BEGIN;
    UPDATE pgbench_accounts SET abalance = abalance - :delta WHERE aid = :a;
    UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :b;
    COMMIT;
    <BLANKLINE>
    """
    return (
        f"\\set x random({x[0]}, {x[1]})\n"
        f"\\set y random({y[0]}, {y[1]})\n"
        "\\set a least(:x, :y)\n"
        "\\set b greatest(:x, :y)\n"
        "\\set delta random(-5000, 5000)\n"
        "BEGIN;\n"
        "UPDATE pgbench_accounts SET abalance = abalance - :delta WHERE aid = :a;\n"
        "UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :b;\n"
        "COMMIT;\n"
    )


ON_S1, ON_S2 = (1, AID_SPLIT - 1), (AID_SPLIT, ACCOUNTS)
# One file per script; a workload with several runs them with equal weights, and the
# per-transaction log tells them apart (same-shard: on s1, on s2).
SCRIPTS: Mapping[str, tuple[tuple[str, str], ...]] = {
    SAME: (("s1", transfer_script(ON_S1, ON_S1)), ("s2", transfer_script(ON_S2, ON_S2))),
    CROSS: (("s1+s2", transfer_script(ON_S1, ON_S2)),),
}


# --- one pgbench run -------------------------------------------------------------------------

_SERIALIZATION = re.compile(r"^number of serialization failures: (\d+)", re.M)
_DEADLOCK = re.compile(r"^number of deadlock failures: (\d+)", re.M)
_SCALE = re.compile(r"^scaling factor: (\d+)", re.M)
_WAL_RECORD = re.compile(r"^(Transaction/[A-Z_]+)\s+(\d+)\s", re.M)


@dataclass(frozen=True, slots=True)
class Run:
    """One pgbench run against one setup."""

    tps: float | None
    transactions: int
    failed: int  # transactions pgbench counted as failed (deadlock, serialization)
    deadlocks: int
    serialization: int
    aborted_clients: int
    errors: tuple[tuple[str, int], ...]
    p50_ms: float | None
    p99_ms: float | None
    script_p50_ms: tuple[float | None, ...]  # per script (-f), in the order given
    returncode: int
    scale: int | None  # the scaling factor pgbench found (built-in script only)
    proxy_cpu: float | None = None  # share of one core; None: no proxy
    proxy_cpu_s: float | None = None  # CPU seconds the proxy used during the run
    other_cpu: float | None = None  # share of the machine's CPU others took meanwhile
    # Transaction/* WAL records per shard during the run (sharded proxy only).
    wal: Mapping[str, Mapping[str, int]] | None = None

    @property
    def two_phase(self) -> int | None:
        """Two-phase commits: COMMIT PREPARED records of s2. Each such transaction here has
        both shards as participants, and s1, whose database holds the decisions, is not
        prepared: it commits its part with the decision (docs/transactions.md)."""
        if self.wal is None:
            return None
        return self.wal.get("s2", {}).get("Transaction/COMMIT_PREPARED", 0)

    @property
    def two_phase_aborted(self) -> int | None:
        if self.wal is None:
            return None
        return max(w.get("Transaction/ABORT_PREPARED", 0) for w in self.wal.values())


    @property
    def proxy_us_per_transaction(self) -> float | None:
        if self.proxy_cpu_s is None or not self.transactions:
            return None
        return self.proxy_cpu_s / self.transactions * 1e6

    def failures(self) -> int:
        return self.failed + self.aborted_clients + (1 if self.returncode else 0)


def latencies_by_script(lines: Iterable[str]) -> dict[int, list[int]]:
    """Transaction latencies (µs) from pgbench's per-transaction log, by script number.

    Failed transactions have a word instead of the time and are left out.

    >>> latencies_by_script(["0 1 250 0 1700000000 12\\n", "1 7 deadlock 1 1700000000 13\\n",
    ...                      "1 8 300 1 1700000000 14\\n", "0 2 200 0 1700000000 15\\n"])
    {0: [250, 200], 1: [300]}
    """
    found: dict[int, list[int]] = {}
    for line in lines:
        fields = line.split()
        if len(fields) >= 4 and fields[2].isdigit() and fields[3].isdigit():
            found.setdefault(int(fields[3]), []).append(int(fields[2]))
    return found


def wal_records(text: str) -> dict[str, int]:
    """The Transaction/* record counts from ``pg_waldump --stats=record``.

    >>> wal_records("Type  N  (%)\\n----  -  ---\\n"
    ...             "Transaction/COMMIT                 12 ( 40.00)  1 (1) 0 (0) 1 (1)\\n"
    ...             "Transaction/COMMIT_PREPARED         3 ( 10.00)  1 (1) 0 (0) 1 (1)\\n"
    ...             "Heap/UPDATE                        15 ( 50.00)  1 (1) 0 (0) 1 (1)\\n")
    {'Transaction/COMMIT': 12, 'Transaction/COMMIT_PREPARED': 3}
    """
    return {name: int(count) for name, count in _WAL_RECORD.findall(text)}


def run_pgbench(
    target: Target,
    *,
    protocol: str,
    clients: int,
    seconds: float,
    scripts: Sequence[Path],
    log_dir: Path,
    tag: str,
) -> Run:
    """pgbench against ``target``: the scripts given (equal weights), or the built-in TPC-B-like
    one. Its output stays in ``log_dir/<tag>.out``; the per-transaction logs are read and
    removed."""
    log_dir.mkdir(parents=True, exist_ok=True)
    prefix = log_dir / "x"
    files = [arg for path in scripts for arg in ("-f", f"{path}@1")]
    args = [
        pgbench_program(), "-n", "-M", protocol, "-c", str(clients), "-j", str(min(clients, 2)),
        "-T", str(seconds), "-l", f"--log-prefix={prefix}", "--max-tries=1",
        "--failures-detailed", *files,
        "-h", target.host, "-p", str(target.port), "-U", USER, DATABASE,
    ]  # fmt: skip
    result = subprocess.run(
        args,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=seconds + 120,
    )
    (log_dir / f"{tag}.out").write_text(
        f"$ {' '.join(args)}\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )
    logs = sorted(log_dir.glob("x.*"))
    by_script: dict[int, list[int]] = {}
    for log in logs:
        with log.open(encoding="ascii", errors="replace") as lines:
            for number, values in latencies_by_script(lines).items():
                by_script.setdefault(number, []).extend(values)
        log.unlink()
    every = sorted(v for values in by_script.values() for v in values)
    summary = parse_summary(result.stdout, result.stderr)

    def count(pattern: re.Pattern[str]) -> int:
        found = pattern.search(result.stdout)
        return int(found.group(1)) if found else 0

    scale = _SCALE.search(result.stdout)
    return Run(
        tps=summary.tps,
        transactions=summary.transactions,
        failed=summary.failed,
        deadlocks=count(_DEADLOCK),
        serialization=count(_SERIALIZATION),
        aborted_clients=summary.aborted_clients,
        errors=summary.errors,
        p50_ms=percentile_ms(every, 0.50),
        p99_ms=percentile_ms(every, 0.99),
        script_p50_ms=tuple(
            percentile_ms(sorted(by_script.get(n, [])), 0.50) for n in range(max(1, len(scripts)))
        ),
        returncode=result.returncode,
        scale=int(scale.group(1)) if scale and not scripts else None,
    )


# --- the servers and proxies ---------------------------------------------------------------


@dataclass
class Bench:
    """Everything started; ``stop`` ends it all."""

    workdir: Path
    clusters: list[PostgresCluster]
    proxies: dict[str, ProxyProcess]

    @property
    def single(self) -> PostgresCluster:
        return self.clusters[0]

    @property
    def shards(self) -> dict[str, PostgresCluster]:
        return dict(zip(SHARDS, self.clusters[1:], strict=True))

    def targets(self) -> dict[str, Target]:
        out = {DIRECT: Target(DIRECT, self.single.host, self.single.port)}
        for name, proxy in self.proxies.items():
            out[name] = Target(name, proxy.host, proxy.port)
        return out

    def proxy_pid(self, name: str) -> int | None:
        proxy = self.proxies.get(name)
        return None if proxy is None or proxy.proc is None else int(proxy.proc.pid)

    def postmasters(self) -> list[int]:
        pids = (report.postmaster_pid(cluster) for cluster in self.clusters)
        return [pid for pid in pids if pid is not None]

    def stop(self) -> None:
        report.stop_all([
            *(p.stop for p in self.proxies.values()),
            (lambda: stop_clusters(self.clusters, mode="immediate")) if self.clusters else None,
        ])  # fmt: skip


def _fill(cluster: PostgresCluster) -> None:
    cluster.sql(f"CREATE ROLE {USER} LOGIN")
    cluster.sql(f"CREATE DATABASE {DATABASE} OWNER {USER}")
    initialise(Target(cluster.name, cluster.host, cluster.port), user=USER, database=DATABASE,
               scale=SCALE)  # fmt: skip


def _keep_owned(cluster: PostgresCluster, shard: str) -> None:
    """Delete the rows of the other shard, then VACUUM FULL ANALYZE the three tables."""
    deletes = []
    for table, column, split, _ in TABLES:
        not_owned = f"{column} >= {split}" if shard == "s1" else f"{column} < {split}"
        deletes.append(f"DELETE FROM {table} WHERE {not_owned};")
    cluster.sql("\n".join(deletes), dbname=DATABASE, user=USER, timeout=600)
    cluster.sql(
        "VACUUM FULL ANALYZE " + ", ".join(t for t, *_ in TABLES),
        dbname=DATABASE, user=USER, timeout=600,
    )  # fmt: skip


def shard_map() -> dict[str, Any]:
    def rule(column: str, tables: list[str], split: int) -> dict[str, Any]:
        return {
            "kind": "range",
            "column": column,
            "type": "integer",
            "tables": tables,
            "ranges": [{"to": split, "shard": "s1"}, {"from": split, "shard": "s2"}],
        }

    return {
        "rules": {
            "by_aid": rule("aid", ["pgbench_accounts", "pgbench_history"], AID_SPLIT),
            "by_tid": rule("tid", ["pgbench_tellers"], TID_SPLIT),
            "by_bid": rule("bid", ["pgbench_branches"], BID_SPLIT),
        }
    }


def build(workdir: Path) -> Bench:
    """Three servers filled, two proxies started. On failure, what started is stopped."""
    bench = Bench(workdir, [], {})
    try:
        bench.clusters = start_clusters(workdir / "pg", 3, prefix="pg")
        _progress(f"pgbench -i -s {SCALE} on {len(bench.clusters)} servers")
        with ThreadPoolExecutor(max_workers=len(bench.clusters)) as pool:
            for future in [pool.submit(_fill, c) for c in bench.clusters]:
                future.result()
        _progress("keeping on each shard only the rows it owns")
        with ThreadPoolExecutor(max_workers=len(SHARDS)) as pool:
            for future in [pool.submit(_keep_owned, c, s) for s, c in bench.shards.items()]:
                future.result()
        bench.proxies[ONE_SHARD] = ProxyProcess(
            proxy_settings({"s1": bench.single.dsn(DATABASE, user=USER)}),
            workdir / ONE_SHARD,
            log_level="warning",
        )
        bench.proxies[SHARDED] = ProxyProcess(
            proxy_settings(
                {name: c.dsn(DATABASE, user=USER) for name, c in bench.shards.items()},
                sharding=shard_map(),
            ),
            workdir / SHARDED,
            log_level="warning",
        )
        for proxy in bench.proxies.values():
            proxy.start()
        return bench
    except BaseException:
        bench.stop()
        raise


# --- checks --------------------------------------------------------------------------------


def _connect(target: Target) -> psycopg.Connection[Any]:
    return report.connect(target.host, target.port, user=USER, database=DATABASE)


def tpcb_statements(aid: int, tid: int, bid: int) -> list[str]:
    """The statements of pgbench's TPC-B-like script, with these keys written in."""
    return [
        f"UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = {aid}",
        f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid}",
        f"UPDATE pgbench_tellers SET tbalance = tbalance + 1 WHERE tid = {tid}",
        f"UPDATE pgbench_branches SET bbalance = bbalance + 1 WHERE bid = {bid}",
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
        f"VALUES ({tid}, {bid}, {aid}, 1, CURRENT_TIMESTAMP)",
    ]


def check_before(bench: Bench) -> list[str]:
    """Each shard holds its rows; each statement of the scripts goes to the shard of its key
    (the keys either side of each boundary); pgbench's scale query sees every branch. Raises
    on the first wrong answer (a benchmark of wrong answers means nothing)."""
    lines = []
    counts: dict[str, list[int]] = {}
    for table, _, _, total in TABLES:
        found = [
            int(c.sql(f"SELECT count(*) FROM {table}", dbname=DATABASE))
            for c in bench.shards.values()
        ]
        if sum(found) != total or not all(found):
            raise RuntimeError(f"the shards hold {found} rows of {table}, not {total:,} in all")
        counts[table] = found
    lines.append(
        "rows on s1 / s2: "
        + "; ".join(f"{table} {a:,} / {b:,}" for table, (a, b) in counts.items())
    )
    sharded = bench.targets()[SHARDED]
    checked = 0
    for shard, (aid, tid, bid) in (
        ("s1", (AID_SPLIT - 1, TID_SPLIT - 1, BID_SPLIT - 1)),
        ("s2", (AID_SPLIT, TID_SPLIT, BID_SPLIT)),
    ):
        for sql in tpcb_statements(aid, tid, bid):
            route = report.show_route(sharded.host, sharded.port, sql, user=USER, database=DATABASE)
            if route.get("route") != "single" or report.route_shards(route) != [shard]:
                raise RuntimeError(f"{sql!r} should run on {shard} alone: {route}")
            checked += 1
    lines.append(
        f"SHOW ROUTE through the sharded proxy: the {checked} statements of the TPC-B-like "
        "script, with the keys either side of each boundary (aid "
        f"{AID_SPLIT - 1}/{AID_SPLIT}, tid {TID_SPLIT - 1}/{TID_SPLIT}, bid "
        f"{BID_SPLIT - 1}/{BID_SPLIT}), each run on the one shard of its key"
    )
    with _connect(sharded) as conn:
        row = conn.execute("select count(*) from pgbench_branches").fetchone()
    if row is None or row[0] != BRANCHES:
        raise RuntimeError(f"count(*) of pgbench_branches through the sharded proxy: {row}")
    lines.append(
        f"pgbench's scale query (`select count(*) from pgbench_branches`) through the sharded "
        f"proxy: {BRANCHES}, the branches of both shards"
    )
    return lines


def _sums(cluster: PostgresCluster) -> tuple[int, int, int, int]:
    out = cluster.sql(
        "SELECT (SELECT coalesce(sum(abalance), 0) FROM pgbench_accounts), "
        "(SELECT coalesce(sum(bbalance), 0) FROM pgbench_branches), "
        "(SELECT coalesce(sum(tbalance), 0) FROM pgbench_tellers), "
        "(SELECT coalesce(sum(delta), 0) FROM pgbench_history)",
        dbname=DATABASE,
    )
    a, b, t, h = (int(v) for v in out.split("|"))
    return a, b, t, h


def _decisions_left(cluster: PostgresCluster) -> int:
    exists = cluster.sql("SELECT to_regclass('shardwire_decisions') IS NOT NULL", dbname=DATABASE)
    if exists != "t":
        return 0
    return int(cluster.sql("SELECT count(*) FROM shardwire_decisions", dbname=DATABASE))


def check_after(bench: Bench) -> tuple[list[str], bool]:
    """What must hold once every run is over: (lines to report, all good)."""
    lines = []
    ok = True
    servers = {"single": bench.single, **bench.shards}
    prepared = {
        name: int(c.sql("SELECT count(*) FROM pg_prepared_xacts")) for name, c in servers.items()
    }
    good = not any(prepared.values())
    ok &= good
    lines.append(
        "prepared transactions left (pg_prepared_xacts, all databases): "
        + ", ".join(f"{n} {v}" for n, v in prepared.items())
        + ("" if good else " — LEFT BEHIND")
    )
    single = _sums(bench.single)
    shards = [_sums(c) for c in bench.shards.values()]
    over_shards = tuple(sum(column) for column in zip(*shards, strict=True))
    for name, sums in (("the single server", single), ("s1 + s2", over_shards)):
        good = len(set(sums)) == 1
        ok &= good
        lines.append(
            f"money invariant on {name}: sum(abalance) {sums[0]:,}, sum(bbalance) {sums[1]:,}, "
            f"sum(tbalance) {sums[2]:,}, sum(delta) of pgbench_history {sums[3]:,} — "
            + ("equal" if good else "BROKEN")
        )
    accounts = sum(
        int(c.sql("SELECT count(*) FROM pgbench_accounts", dbname=DATABASE))
        for c in bench.shards.values()
    )
    good = accounts == ACCOUNTS
    ok &= good
    lines.append(f"accounts over the shards: {accounts:,}" + ("" if good else " — WRONG"))
    # The proxy deletes a decision after the last COMMIT PREPARED, in the background.
    deadline = time.monotonic() + 5
    left = _decisions_left(bench.shards["s1"])
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = _decisions_left(bench.shards["s1"])
    lines.append(f"commit decisions still in shardwire_decisions (s1's database): {left}")
    return lines, ok


# --- the runs ------------------------------------------------------------------------------


def _wal_position(cluster: PostgresCluster) -> str:
    return cluster.sql("SELECT pg_current_wal_insert_lsn()")


def wal_since(cluster: PostgresCluster, start: str) -> dict[str, int] | None:
    """Transaction/* WAL records written since ``start``; None if the WAL cannot be read (a
    checkpoint may have recycled it)."""
    end = _wal_position(cluster)
    if end == start:
        return {}
    deadline = time.monotonic() + WAL_WAIT
    while cluster.sql(f"SELECT pg_current_wal_flush_lsn() >= '{end}'::pg_lsn") != "t":
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)
    result = subprocess.run(
        [str(pg_bindir() / "pg_waldump"), "--stats=record", "-p",
         str(cluster.data_dir / "pg_wal"), "-s", start, "-e", end],
        env=clean_env(), capture_output=True, text=True, errors="replace", timeout=120,
    )  # fmt: skip
    if result.returncode != 0:
        _progress(f"pg_waldump on {cluster.name} failed: {result.stderr.strip()[:300]}")
        return None
    return wal_records(result.stdout)


@dataclass
class Runner:
    bench: Bench
    machine: Machine
    seconds: int
    logs: Path
    scripts: Mapping[str, list[Path]]

    def measure(self, setup: str, workload: Workload, *, variant: str | None, tag: str) -> Run:
        """One run through ``setup``: a transfer ``variant``, or (None) the TPC-B-like script."""
        target = self.bench.targets()[setup]
        pid = self.bench.proxy_pid(setup)
        starts = (
            {n: _wal_position(c) for n, c in self.bench.shards.items()}
            if setup == SHARDED else None
        )  # fmt: skip
        before = self.machine.sample()
        cpu_before = None if pid is None else process_cpu(pid)
        run = run_pgbench(
            target,
            protocol=workload.protocol,
            clients=workload.clients,
            seconds=self.seconds,
            scripts=self.scripts[variant] if variant else [],
            log_dir=self.logs,
            tag=tag,
        )
        after = self.machine.sample()
        proxy_cpu = proxy_cpu_s = None
        if pid is not None and cpu_before is not None and after.at > before.at:
            proxy_cpu_s = process_cpu(pid) - cpu_before
            proxy_cpu = proxy_cpu_s / (after.at - before.at)
        wal = None
        if starts is not None:
            counts = {n: wal_since(c, starts[n]) for n, c in self.bench.shards.items()}
            if all(v is not None for v in counts.values()):
                wal = {n: v for n, v in counts.items() if v is not None}
        return dataclasses.replace(
            run,
            proxy_cpu=proxy_cpu,
            proxy_cpu_s=proxy_cpu_s,
            other_cpu=self.machine.other_fraction(before, after),
            wal=wal,
        )


def run_rounds(
    runner: Runner, *, rounds: int
) -> tuple[dict[Workload, list[dict[str, Run]]], dict[Workload, list[dict[str, Run]]], set[int]]:
    """Every workload through every setup, round after round; the order rotates from one
    workload to the next and from one round to the next. Returns the transfer runs, the TPC-B
    runs, and the scaling factors pgbench found."""
    warmup = Workload("simple", 8)
    scales: set[int] = set()
    seconds, runner.seconds = runner.seconds, min(runner.seconds, WARMUP_SECONDS)
    try:
        for variant in TRANSFERS:
            _progress(f"warm-up {variant} through {SHARDED}")
            runner.measure(SHARDED, warmup, variant=variant, tag=f"warmup-{variant}")
        for setup in TPCB_SETUPS:
            _progress(f"warm-up TPC-B {setup}")
            run = runner.measure(setup, warmup, variant=None, tag=f"warmup-tpcb-{setup}")
            if run.scale is not None:
                scales.add(run.scale)
    finally:
        runner.seconds = seconds
    transfers: dict[Workload, list[dict[str, Run]]] = {w: [] for w in WORKLOADS}
    tpcb: dict[Workload, list[dict[str, Run]]] = {w: [] for w in WORKLOADS}
    total = rounds * len(WORKLOADS) * (len(TRANSFERS) + len(TPCB_SETUPS))
    done = 0
    started = time.monotonic()

    def progress(number: int, workload: Workload, what: str, run: Run) -> None:
        nonlocal done
        done += 1
        _progress(
            f"[{done}/{total} {time.monotonic() - started:.0f}s] round {number + 1} "
            f"{workload.protocol} c{workload.clients} {what}: {_brief(run)}"
        )

    for number in range(rounds):
        for index, workload in enumerate(WORKLOADS):
            name = f"r{number + 1}-{workload.protocol}-c{workload.clients}"
            this: dict[str, Run] = {}
            for variant in rotate(TRANSFERS, number + index):
                this[variant] = runner.measure(SHARDED, workload, variant=variant,
                                               tag=f"{name}-{variant}")  # fmt: skip
                progress(number, workload, variant, this[variant])
            transfers[workload].append(this)
            this = {}
            for setup in rotate(TPCB_SETUPS, number + index):
                this[setup] = runner.measure(setup, workload, variant=None,
                                             tag=f"{name}-tpcb-{setup}")  # fmt: skip
                scale = this[setup].scale
                if scale is not None:
                    scales.add(scale)
                progress(number, workload, f"TPC-B {setup}", this[setup])
            tpcb[workload].append(this)
    return transfers, tpcb, scales


def _brief(run: Run) -> str:
    tps = "no result" if run.tps is None else f"{run.tps:,.0f} tps"
    text = f"{tps}, p50 {run.p50_ms} ms, p99 {run.p99_ms} ms"
    if run.two_phase is not None:
        text += f", {run.two_phase:,} two-phase commits of {run.transactions:,}"
    if run.failures():
        text += (
            f", {run.failed} failed ({run.deadlocks} deadlocks), {run.aborted_clients} clients "
            f"aborted, exit {run.returncode}"
        )
    if run.proxy_cpu is not None:
        text += f", proxy {run.proxy_cpu * 100:.0f}% of a core"
    if run.other_cpu is not None:
        text += f", others took {run.other_cpu * 100:.0f}% of the CPU"
    if run.errors:
        text += "; " + "; ".join(f"{n}× {t}" for t, n in run.errors)
    return text


# --- rows and targets ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    """One workload (protocol, clients): a run per setup in each round."""

    workload: Workload
    setups: tuple[str, ...]
    rounds: tuple[Mapping[str, Run], ...]

    def median(self, pick: Callable[[Mapping[str, Run]], float | None]) -> float | None:
        return median_of(pick(r) for r in self.rounds)

    def tps(self, setup: str) -> float | None:
        return self.median(lambda r: r[setup].tps)

    def p50(self, setup: str) -> float | None:
        return self.median(lambda r: r[setup].p50_ms)

    def p99(self, setup: str) -> float | None:
        return self.median(lambda r: r[setup].p99_ms)

    def script_p50(self, setup: str, index: int) -> float | None:
        return self.median(lambda r: r[setup].script_p50_ms[index])

    def proxy_cpu(self, setup: str) -> float | None:
        return self.median(lambda r: r[setup].proxy_cpu)

    def proxy_us(self, setup: str) -> float | None:
        """The proxy's CPU time per transaction, in µs."""
        return self.median(lambda r: r[setup].proxy_us_per_transaction)

    def tps_ratio(self, ours: str, base: str) -> float | None:
        """``ours`` ÷ ``base`` TPS, within each round, then the median."""

        def ratio(r: Mapping[str, Run]) -> float | None:
            a, b = r[ours].tps, r[base].tps
            return None if a is None or not b else a / b

        return self.median(ratio)

    def p50_ratio(self, ours: str, base: str) -> float | None:
        def ratio(r: Mapping[str, Run]) -> float | None:
            a, b = r[ours].p50_ms, r[base].p50_ms
            return None if a is None or not b else a / b

        return self.median(ratio)

    def two_phase_share(self, setup: str) -> float | None:
        """Two-phase commits ÷ pgbench's transactions, over all rounds."""
        runs = [r[setup] for r in self.rounds]
        if any(run.two_phase is None for run in runs):
            return None
        transactions = sum(run.transactions for run in runs)
        return sum(run.two_phase or 0 for run in runs) / transactions if transactions else None

    def failures(self, setup: str) -> str:
        failed = sum(r[setup].failed for r in self.rounds)
        aborted = sum(r[setup].aborted_clients for r in self.rounds)
        exits = sum(1 for r in self.rounds if r[setup].returncode)
        text = str(failed)
        if aborted:
            text += f" (+{aborted} aborted)"
        if exits:
            text += f" ({exits} exit≠0)"
        return text

    def other_cpu(self) -> float | None:
        known = [r[s].other_cpu for r in self.rounds for s in self.setups]
        values = [v for v in known if v is not None]
        return max(values) if values else None

    def errors(self, setup: str) -> list[tuple[str, int]]:
        counts: dict[str, int] = {}
        for r in self.rounds:
            for text, n in r[setup].errors:
                counts[text] = counts.get(text, 0) + n
        return list(counts.items())

    def label(self) -> str:
        c = self.workload.clients
        return f"-M {self.workload.protocol}, {c} client{'' if c == 1 else 's'}"


def transfer_verdict(row: Row) -> Verdict | None:
    """Issue 5's target for this row, if it has one."""
    c = row.workload.clients
    if c == 1:
        ratio = row.p50_ratio(CROSS, SAME)
        return Verdict(
            f"{row.label()}: p50 of a two-shard write transaction (2PC) ≤ {LATENCY_TARGET}× the "
            "same two UPDATEs on one shard",
            "—" if ratio is None else f"{ratio:.2f}× ({ms(row.p50(CROSS))} ms against "
            f"{ms(row.p50(SAME))} ms, medians)",
            None if ratio is None else ratio <= LATENCY_TARGET,
        )
    if c == 8:
        ratio = row.tps_ratio(CROSS, SAME)
        return Verdict(
            f"{row.label()}: TPS of two-shard write transactions (2PC) ≥ {TPS_TARGET}× the "
            "same two UPDATEs on one shard",
            "—" if ratio is None else f"{ratio:.2f}× ({num(row.tps(CROSS))} against "
            f"{num(row.tps(SAME))} tps, medians)",
            None if ratio is None else ratio >= TPS_TARGET,
        )
    return None


# --- output --------------------------------------------------------------------------------


TRANSFER_HEADERS = (
    "protocol", "clients", "same-shard tps", "cross-shard tps", "cross/same tps",
    "p50 ms same/cross", "cross/same p50", "p99 ms same/cross", "same-shard p50 ms on s1/s2",
    "2PC same/cross", "failed same/cross", "proxy cpu same/cross", "proxy µs/txn same/cross",
    "others' cpu", "target",
)  # fmt: skip


def transfer_cells(row: Row) -> list[str]:
    verdict = transfer_verdict(row)
    if verdict is None:
        target = ""
    elif row.workload.clients == 1:
        target = f"p50 ≤ {LATENCY_TARGET}×: {verdict.word}"
    else:
        target = f"TPS ≥ {TPS_TARGET}×: {verdict.word}"
    return [
        row.workload.protocol,
        str(row.workload.clients),
        num(row.tps(SAME)),
        num(row.tps(CROSS)),
        num(row.tps_ratio(CROSS, SAME), 2),
        f"{ms(row.p50(SAME))} / {ms(row.p50(CROSS))}",
        num(row.p50_ratio(CROSS, SAME), 2),
        f"{ms(row.p99(SAME))} / {ms(row.p99(CROSS))}",
        f"{ms(row.script_p50(SAME, 0))} / {ms(row.script_p50(SAME, 1))}",
        f"{percent(row.two_phase_share(SAME))} / {percent(row.two_phase_share(CROSS))}",
        f"{row.failures(SAME)} / {row.failures(CROSS)}",
        f"{percent(row.proxy_cpu(SAME))} / {percent(row.proxy_cpu(CROSS))}",
        f"{num(row.proxy_us(SAME))} / {num(row.proxy_us(CROSS))}",
        percent(row.other_cpu()),
        target,
    ]


TPCB_HEADERS = (
    "protocol", "clients", "direct tps", "one-shard tps", "sharded tps", "sharded/direct",
    "sharded/one-shard", "p50 ms d/1/2", "p99 ms d/1/2", "2PC", "failed d/1/2",
    "proxy cpu 1/2", "proxy µs/txn 1/2", "others' cpu",
)  # fmt: skip


def tpcb_cells(row: Row) -> list[str]:
    return [
        row.workload.protocol,
        str(row.workload.clients),
        num(row.tps(DIRECT)),
        num(row.tps(ONE_SHARD)),
        num(row.tps(SHARDED)),
        num(row.tps_ratio(SHARDED, DIRECT), 2),
        num(row.tps_ratio(SHARDED, ONE_SHARD), 2),
        " / ".join(ms(row.p50(s)) for s in TPCB_SETUPS),
        " / ".join(ms(row.p99(s)) for s in TPCB_SETUPS),
        percent(row.two_phase_share(SHARDED)),
        " / ".join(row.failures(s) for s in TPCB_SETUPS),
        f"{percent(row.proxy_cpu(ONE_SHARD))} / {percent(row.proxy_cpu(SHARDED))}",
        f"{num(row.proxy_us(ONE_SHARD))} / {num(row.proxy_us(SHARDED))}",
        percent(row.other_cpu()),
    ]


def _run_json(run: Run) -> dict[str, Any]:
    return {
        "tps": round3(run.tps),
        "transactions": run.transactions,
        "p50_ms": run.p50_ms,
        "p99_ms": run.p99_ms,
        "script_p50_ms": list(run.script_p50_ms),
        "failed": run.failed,
        "deadlocks": run.deadlocks,
        "serialization_failures": run.serialization,
        "aborted_clients": run.aborted_clients,
        "exit": run.returncode,
        "two_phase_commits": run.two_phase,
        "two_phase_rolled_back": run.two_phase_aborted,
        "wal_records": None if run.wal is None else {k: dict(v) for k, v in run.wal.items()},
        "proxy_cpu_pct": None if run.proxy_cpu is None else round(run.proxy_cpu * 100, 1),
        "proxy_us_per_transaction": round3(run.proxy_us_per_transaction),
        "other_cpu_pct": None if run.other_cpu is None else round(run.other_cpu * 100, 1),
        "errors": [{"message": t, "count": n} for t, n in run.errors],
    }


def _row_json(row: Row, part: str) -> dict[str, Any]:
    item: dict[str, Any] = {
        "name": f"{BENCHMARK}/{part}/{row.workload.protocol}/c{row.workload.clients}",
        "protocol": row.workload.protocol,
        "clients": row.workload.clients,
    }
    for setup in row.setups:
        key = JSON_KEY[setup]
        item[f"{key}_tps"] = round3(row.tps(setup))
        item[f"{key}_p50_ms"] = round3(row.p50(setup))
        item[f"{key}_p99_ms"] = round3(row.p99(setup))
        item[f"{key}_two_phase_share"] = round3(row.two_phase_share(setup))
        item[f"{key}_failed"] = row.failures(setup)
        cpu = row.proxy_cpu(setup)
        item[f"{key}_proxy_cpu_pct"] = None if cpu is None else round(cpu * 100, 1)
        item[f"{key}_proxy_us_per_transaction"] = round3(row.proxy_us(setup))
    item["rounds"] = [{JSON_KEY[s]: _run_json(r[s]) for s in row.setups} for r in row.rounds]
    return item


def json_document(
    transfers: Sequence[Row],
    tpcb: Sequence[Row],
    verdicts: Sequence[Verdict],
    *,
    env: Mapping[str, str],
    checks: Sequence[str],
    notes: Sequence[str],
) -> dict[str, Any]:
    two_updates = []
    for row in transfers:
        item = _row_json(row, "two-updates")
        item["same_shard_p50_ms_on_s1"] = round3(row.script_p50(SAME, 0))
        item["same_shard_p50_ms_on_s2"] = round3(row.script_p50(SAME, 1))
        item["cross_to_same_tps"] = round3(row.tps_ratio(CROSS, SAME))
        item["cross_to_same_p50"] = round3(row.p50_ratio(CROSS, SAME))
        verdict = transfer_verdict(row)
        item["target"] = verdict.target if verdict else None
        item["target_met"] = verdict.met if verdict else None
        two_updates.append(item)
    tpcb_rows = []
    for row in tpcb:
        item = _row_json(row, "tpcb")
        item["sharded_to_direct_tps"] = round3(row.tps_ratio(SHARDED, DIRECT))
        item["sharded_to_one_shard_tps"] = round3(row.tps_ratio(SHARDED, ONE_SHARD))
        tpcb_rows.append(item)
    return {
        "benchmark": BENCHMARK,
        **env,
        "shard_map": shard_map(),
        "two_updates": two_updates,
        "tpcb": tpcb_rows,
        "targets": [{"target": v.target, "measured": v.measured, "result": v.word}
                    for v in verdicts],  # fmt: skip
        "checks": list(checks),
        "notes": list(notes),
    }


def markdown_section(
    transfers: Sequence[Row],
    tpcb: Sequence[Row],
    verdicts: Sequence[Verdict],
    *,
    env: Mapping[str, str],
    checks: Sequence[str],
    notes: Sequence[str],
) -> str:
    plural = "" if env["rounds"] == "1" else "s"
    parts = [
        START_MARKER,
        "## Transactions across shards: two-phase commit and TPC-B",
        "",
        f"Written by `.venv/bin/python bench/transactions.py` on {env['date']}. Figures as "
        "JSON: `bench/results/transactions.json`. `BENCH_SECONDS` sets the length of one "
        "pgbench run (default 4), `BENCH_ROUNDS` the rounds (default 3), and `BENCH_KEEP=1` "
        "keeps the work directory (pgbench's output and scripts, the servers' and proxies' "
        "logs).",
        "",
        f"- Machine: {env['machine']}",
        f"- Software: {env['software']}",
        f"- Run: pgbench at scale {SCALE}, BENCH_SECONDS={env['seconds']} per run, "
        f"{env['rounds']} round{plural}; load average {env['loadavg']} before the run, "
        f"{env['loadavg_after']} after (other work on the machine skews the figures)",
        "",
        "What ran: three PostgreSQL servers on this machine (fsync off, "
        "max_prepared_transactions 64). *single* holds all of pgbench's tables; *s1* and *s2* "
        "were each filled with `pgbench -i` and then kept only the rows they own (map below). "
        f"Two proxies, transaction mode, pool.size {POOL_SIZE}, log level warning: *one-shard* "
        "(single as its only shard, no rules) and *sharded* (s1 and s2, no catalog: the "
        "two-phase commit decisions go to s1's database). pgbench runs with `-n "
        "--max-tries=1 --failures-detailed`, `-j` = min(clients, 2), for BENCH_SECONDS; in "
        "each round, for each protocol and client count, the runs of each table below ran "
        "back to back, the order rotating. Figures are medians over the rounds; ratios are "
        "computed within each round, then the median taken. *2PC* is the share of "
        "pgbench's transactions that committed by two-phase commit: the "
        "Transaction/COMMIT_PREPARED records that `pg_waldump --stats=record` finds in s2's "
        "WAL (s1 holds the decisions and commits its part with them, unprepared) between "
        "the positions before and after each run, over all rounds. *failed* "
        "counts, over all rounds, the transactions pgbench counted as failed (deadlock, "
        "serialization), clients it aborted after another error, and non-zero exits. *proxy "
        "cpu* is the proxy process's CPU time during its runs as a share of one core "
        "(Shardwire serves clients on one thread: near 100% is saturated), and *proxy µs/txn* "
        "that CPU time divided by pgbench's transactions; *others' cpu* is the "
        "largest share of the machine's CPU that processes outside the benchmark took during "
        "any run of the row.",
        "",
        "### Two UPDATEs in one transaction: on one shard or on two",
        "",
        "Through the sharded proxy, each transaction moves `delta` from one account to another "
        "(`BEGIN; UPDATE pgbench_accounts SET abalance = abalance - :delta WHERE aid = :a; "
        "UPDATE ... + :delta WHERE aid = :b; COMMIT;`, custom scripts with `-f`). "
        f"*cross-shard*: a in 1..{AID_SPLIT - 1:,} (s1), b in {AID_SPLIT:,}..{ACCOUNTS:,} "
        "(s2), committed by two-phase commit. *same-shard*: both on s1 or both on s2 (two "
        "scripts of equal weight; *same-shard p50 on s1/s2* splits the latencies by script), "
        "a plain COMMIT. The lower aid is always updated first, so concurrent transactions "
        "take their locks in one order and never deadlock (the proxy would break a deadlock "
        "across shards with 40P01 after about a second).",
        "",
        table_markdown(
            TRANSFER_HEADERS,
            [transfer_cells(r) for r in transfers],
            text=(0, len(TRANSFER_HEADERS) - 1),
        ),
        "",
        "### pgbench's TPC-B-like script on two shards",
        "",
        "The built-in script, unmodified (`pgbench -n`), against the single server directly "
        "(*d*), through the one-shard proxy (*1*) and through the sharded proxy (*2*). The "
        "sharded map: `pgbench_accounts` and `pgbench_history` range-sharded on `aid` "
        f"(aid < {AID_SPLIT:,} on s1), `pgbench_tellers` on `tid` (tid < {TID_SPLIT} on s1), "
        f"`pgbench_branches` on `bid` (bid < {BID_SPLIT} on s1). Each statement of the script "
        "names the key of the one table it touches (`UPDATE pgbench_accounts ... WHERE aid`, "
        "`SELECT ... WHERE aid`, `UPDATE pgbench_tellers ... WHERE tid`, `UPDATE "
        "pgbench_branches ... WHERE bid`, `INSERT INTO pgbench_history (tid, bid, aid, ...)`), "
        "so each goes to exactly one shard. The script draws aid, tid and bid independently: "
        "a transaction stays on one shard when all three keys fall on the same one (a quarter "
        "of them) and commits by two-phase commit otherwise (three quarters). No other map "
        "runs the script as it is: with the tellers and branches as reference tables, each "
        "UPDATE of them writes on both shards (every transaction a two-phase commit) and "
        "their balances, summed over the shards, count twice; sharding every table on `bid`, "
        "as TPC-B's branch hierarchy suggests, leaves the script's UPDATE and SELECT of "
        "pgbench_accounts (by aid alone) and its UPDATE of pgbench_tellers (by tid alone) "
        "without their key: the UPDATEs would run on every shard, and the SELECT, a read "
        "across shards inside a transaction block, is refused with 0A000. pgbench_history "
        "could follow any of the three keys for the same share of two-phase commits; on aid "
        "its rows stay with their account (left unsharded, on s1, it would add s1 to 7 "
        "transactions in 8).",
        "",
        table_markdown(TPCB_HEADERS, [tpcb_cells(r) for r in tpcb], text=(0,)),
        "",
        "Targets (issue 5, medians on this machine):",
        "",
        *(f"- {v.target}: {v.measured} — **{v.word}**" for v in verdicts),
        "",
        "Checks (before the runs a wrong answer stops the benchmark; after them a failure "
        "makes it exit 1):",
        "",
        *(f"- {line}" for line in checks),
    ]
    if notes:
        parts += ["", "Notes:", "", *(f"- {n}" for n in notes)]
    parts.append(END_MARKER)
    return "\n".join(parts) + "\n"


def _notes(transfers: Sequence[Row], tpcb: Sequence[Row], bench: Bench) -> list[str]:
    notes = []
    for row in transfers:
        on_s1, on_s2 = row.script_p50(SAME, 0), row.script_p50(SAME, 1)
        if row.workload.protocol == "prepared" and on_s1 and on_s2 and on_s2 > 1.2 * on_s1:
            # Said only when the figures show it: it describes the proxy's handling of a
            # prepared BEGIN at the time of writing.
            notes.append(
                f"{row.label()}: same-shard transactions on s2 took {ms(on_s2)} ms at p50, on "
                f"s1 {ms(on_s1)} ms. pgbench -M prepared sends BEGIN as a prepared statement "
                "(Bind/Execute), which Shardwire sends to the default shard, s1, at once (a "
                "simple-protocol BEGIN waits for the first statement and goes with it), so a "
                "transaction whose rows are all on s2 also has s1 as a participant that only "
                "began: its COMMIT first asks s1 whether it wrote, then commits on both (plain "
                "COMMITs, no two-phase commit). The same-shard figures of -M prepared include "
                "that cost."
            )
    for part, rows in (("two UPDATEs", transfers), ("TPC-B", tpcb)):
        for row in rows:
            for setup in row.setups:
                errors = row.errors(setup)
                if errors:
                    notes.append(
                        f"{part}, {row.label()}, {setup}: pgbench's errors over all rounds: "
                        + "; ".join(f"{n}× `{t}`" for t, n in errors)
                    )
                runs = [r[setup] for r in row.rounds]
                aborted = sum(run.two_phase_aborted or 0 for run in runs)
                if aborted:
                    notes.append(
                        f"{part}, {row.label()}, {setup}: {aborted} prepared transactions rolled "
                        "back (ROLLBACK PREPARED in the WAL) over all rounds"
                    )
                if setup == SHARDED or part == "two UPDATEs":
                    if any(run.wal is None for run in runs):
                        notes.append(
                            f"{part}, {row.label()}, {setup}: the WAL of some runs could not be "
                            "read, so their two-phase commits are not counted"
                        )
    for name, proxy in bench.proxies.items():
        note = report.proxy_log_note(f"the {name} Shardwire", proxy)
        if note:
            notes.append(note)
    return notes


def _describe(
    cluster: PostgresCluster, *, seconds: int, rounds: int, loadavg: str
) -> dict[str, str]:
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": report.machine_line(),
        "software": "PostgreSQL "
        + cluster.sql("SHOW server_version")
        + f", Python {platform.python_version()}, Shardwire {shardwire.__version__} "
        f"({report.shardwire_source()})",
        "seconds": str(seconds),
        "rounds": str(rounds),
        "loadavg": loadavg,
        "loadavg_after": "",
    }


def write_scripts(directory: Path) -> dict[str, list[Path]]:
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[Path]] = {}
    for variant, scripts in SCRIPTS.items():
        for where, text in scripts:
            path = directory / f"{variant}-{where.replace('+', '-')}.sql"
            path.write_text(text)
            out.setdefault(variant, []).append(path)
    return out


def main() -> int:
    seconds = _env_int("BENCH_SECONDS", 4)
    rounds = _env_int("BENCH_ROUNDS", 3)
    keep = os.environ.get("BENCH_KEEP", "") not in ("", "0")
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    loadavg = _loadavg()
    workdir = Path(tempfile.mkdtemp(prefix="shardwire-bench-transactions-"))
    os.chmod(workdir, 0o711)  # the postgres OS user runs the servers in here
    bench: Bench | None = None
    try:
        _progress(f"work directory {workdir}")
        bench = build(workdir)
        checks = check_before(bench)
        for line in checks:
            _progress(f"check: {line}")
        env = _describe(bench.single, seconds=seconds, rounds=rounds, loadavg=loadavg)
        proxy_pids = [pid for name in bench.proxies if (pid := bench.proxy_pid(name))]
        runner = Runner(
            bench,
            Machine(lambda: proxy_pids, bench.postmasters),
            seconds,
            workdir / "logs",
            write_scripts(workdir / "scripts"),
        )
        transfer_runs, tpcb_runs, scales = run_rounds(runner, rounds=rounds)
        env["loadavg_after"] = _loadavg()
        transfers = [Row(w, TRANSFERS, tuple(transfer_runs[w])) for w in WORKLOADS]
        tpcb = [Row(w, TPCB_SETUPS, tuple(tpcb_runs[w])) for w in WORKLOADS]
        good_scale = scales == {SCALE}
        checks.append(
            "the scaling factor pgbench found in each TPC-B run (count(*) of pgbench_branches): "
            + ", ".join(str(s) for s in sorted(scales))
            + ("" if good_scale else f" — WRONG, not {SCALE}")
        )
        after, ok = check_after(bench)
        ok &= good_scale
        checks += after
        for line in after:
            _progress(f"check: {line}")
        verdicts = [v for v in (transfer_verdict(r) for r in transfers) if v is not None]
        notes = _notes(transfers, tpcb, bench)

        print(table_text(TRANSFER_HEADERS, [transfer_cells(r) for r in transfers]))
        print()
        print(table_text(TPCB_HEADERS, [tpcb_cells(r) for r in tpcb]))
        print()
        for v in verdicts:
            print(f"{v.word}: {v.target}: {v.measured}")
        for line in checks:
            print(f"check: {line}")
        for note in notes:
            print(f"note: {note}")
        write_json(
            RESULTS / "transactions.json",
            json_document(transfers, tpcb, verdicts, env=env, checks=checks, notes=notes),
        )
        report.write_docs(
            DOCS,
            markdown_section(transfers, tpcb, verdicts, env=env, checks=checks, notes=notes),
        )
        _progress(f"wrote {RESULTS / 'transactions.json'} and {DOCS}")
        return 0 if ok else 1
    except KeyboardInterrupt:
        _progress("interrupted; stopping everything")
        return 130
    finally:
        if bench is not None:
            bench.stop()
        if keep:
            _progress(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
