"""Issue 3's speed row: pgbench -S through a one-shard Shardwire and through a Shardwire that
range-shards pgbench_accounts over two PostgreSQL servers, in interleaved rounds.

Setups:

- one-shard: one server holding all of pgbench's tables (scale 10), no sharding rules;
- routed: the same server behind a map that range-shards pgbench_accounts over that one shard:
  every statement is routed (to it), so the difference from one-shard is routing alone;
- sharded: two servers; pgbench_accounts range-sharded on aid (aid < 500001 on s1, the rest on
  s2), pgbench_branches and pgbench_tellers reference tables (a full copy on both),
  pgbench_history unsharded (on the default shard, s1). Each shard is filled directly with
  ``pgbench -i`` (faster than loading through the proxy) and then loses the accounts it does
  not own, then ``VACUUM FULL ANALYZE``.

Next to them, with no proxy (``direct.point_queries``, one Python client, psycopg, the same
length as a pgbench run): pgbench -S's point query against the single server, against s1 alone
(keys of s1 only) and against s1 and s2, each query sent to the shard of a random aid, the way
the sharded proxy routes. pgbench talks to one server only, so it cannot alternate. This
answers whether alternating between two servers costs this machine per-query latency by
itself, before any proxy.

Each pgbench run also records, from /proc, the CPU time it took per transaction: the proxy's,
its servers' (postmasters and backends) and the whole machine's. Where the machine is the
limit, TPS goes as the inverse of the last, and the servers' figures show what a second
server costs the machine with no proxy code involved.

Usage: ``.venv/bin/python bench/sharded.py``. Environment: BENCH_SECONDS (length of one
pgbench run, default 10), BENCH_ROUNDS (default 3), BENCH_KEEP=1 to keep the work directory.

Writes a table to stdout, the figures to bench/results/sharded.json and the section between
``<!-- bench:sharded:start -->`` and ``<!-- bench:sharded:end -->`` of docs/benchmarks.md.
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import report
from cpu_share import machine_busy, process_cpu, server_cpu
from direct import KeyRange, PointResult, Server, point_queries
from pgbench_run import PgbenchResult, Target, initialise, run_select_only, warm_up
from report import Workload, ms, num, percent, round3, table_markdown, table_text, write_json
from run import (
    DATABASE,
    DOCS,
    POOL_SIZE,
    RESULTS,
    SCALE,
    USER,
    WARMUP_SECONDS,
    WORKLOADS,
    _brief,
    _env_int,
    _interrupt,
    _loadavg,
    _progress,
    proxy_settings,
)

import shardwire
from shardwire.testing import PostgresCluster, start_clusters, stop_clusters
from shardwire.testing.proxy import ProxyProcess

ONE_SHARD, ROUTED, SHARDED = "one-shard", "routed", "sharded"
SETUPS = (ONE_SHARD, ROUTED, SHARDED)
BENCHMARK = "pgbench-S-sharded"
RATIO_TARGET = 0.9
ACCOUNTS = 100_000 * SCALE
SPLIT = ACCOUNTS // 2 + 1  # first aid on s2: 500001 at scale 10
START_MARKER = "<!-- bench:sharded:start -->"
END_MARKER = "<!-- bench:sharded:end -->"
ROUTE_SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = 600000"
ROUTE_CHECK = f"SHOW ROUTE FOR {ROUTE_SQL}"
# The direct runs, no proxy: which servers one Python client queries.
DIRECT_SINGLE, DIRECT_S1, DIRECT_BOTH = "single", "s1", "s1+s2"
DIRECT_SETUPS = (DIRECT_SINGLE, DIRECT_S1, DIRECT_BOTH)
PROTOCOLS = ("simple", "prepared")


@dataclass(frozen=True, slots=True)
class Cpu:
    """CPU time per transaction of one pgbench run, in µs: the proxy's, its servers' (their
    postmasters and backends), and the whole machine's (every process, all cores)."""

    proxy: float | None
    servers: float | None
    machine: float | None


@dataclass(frozen=True, slots=True)
class Setup:
    """Where a setup's CPU time is counted: its proxy and its servers' postmasters."""

    proxy: int
    servers: tuple[PostgresCluster, ...]

    def cpu(self) -> tuple[float, float, float]:
        """CPU seconds so far: the proxy's, the servers', the machine's."""
        postmasters = (report.postmaster_pid(c) for c in self.servers)
        return (process_cpu(self.proxy), sum(server_cpu(p) for p in postmasters if p),
                machine_busy())


@dataclass(frozen=True, slots=True)
class Row(report.Row):
    """One workload's results; the targets here are the two setups."""

    cpu: tuple[Mapping[str, Cpu], ...] = ()  # one {setup: CPU per transaction} per round

    def cpu_us(self, setup: str, part: str) -> float | None:
        """Median over the rounds of `part` (proxy, servers, machine) of `setup`'s CPU."""
        return report.median_of(getattr(r[setup], part) for r in self.cpu)

    def tps_ratio(self, setup: str) -> float | None:
        """``setup`` ÷ one-shard TPS, within each round, then the median."""

        def ratio(r: Mapping[str, PgbenchResult]) -> float | None:
            ours, base = r[setup].tps, r[ONE_SHARD].tps
            return None if ours is None or not base else ours / base

        return self.median(ratio)

    @property
    def ratio(self) -> float | None:
        """Sharded ÷ one-shard TPS: the target."""
        return self.tps_ratio(SHARDED)

    @property
    def routed_ratio(self) -> float | None:
        """Routed ÷ one-shard TPS (one server either way: what routing costs)."""
        return self.tps_ratio(ROUTED)

    def failures(self, setup: str) -> int:
        return sum(
            r[setup].failed + r[setup].aborted_clients + (1 if r[setup].returncode else 0)
            for r in self.rounds
        )

    @property
    def name(self) -> str:
        return f"{BENCHMARK}/{self.workload.protocol}/c{self.workload.clients}"


@dataclass(frozen=True, slots=True)
class DirectRow:
    """One protocol's direct runs (no proxy), one {setup: result} per round."""

    protocol: str
    rounds: tuple[Mapping[str, PointResult], ...]

    def median(self, pick: Callable[[Mapping[str, PointResult]], float | None]) -> float | None:
        return report.median_of(pick(r) for r in self.rounds)

    def qps(self, setup: str) -> float | None:
        return self.median(lambda r: r[setup].qps)

    def p50(self, setup: str) -> float | None:
        return self.median(lambda r: r[setup].p50_ms)

    def p99(self, setup: str) -> float | None:
        return self.median(lambda r: r[setup].p99_ms)

    def p50_ratio(self, setup: str, base: str) -> float | None:
        """``setup`` ÷ ``base`` p50, within each round, then the median."""

        def ratio(r: Mapping[str, PointResult]) -> float | None:
            ours, theirs = r[setup].p50_ms, r[base].p50_ms
            return None if ours is None or not theirs else ours / theirs

        return self.median(ratio)

    def added_us(self, setup: str, base: str) -> float | None:
        """How much later than ``base``'s the median query finished, in µs, per round."""

        def added(r: Mapping[str, PointResult]) -> float | None:
            ours, theirs = r[setup].p50_ms, r[base].p50_ms
            return None if ours is None or theirs is None else (ours - theirs) * 1000

        return self.median(added)

    def s1_share(self) -> float | None:
        """The share of the alternating queries that went to s1 (about half, if random)."""

        def share(r: Mapping[str, PointResult]) -> float | None:
            counts = r[DIRECT_BOTH].per_server
            return counts[0] / sum(counts) if sum(counts) else None

        return self.median(share)

    @property
    def name(self) -> str:
        return f"{BENCHMARK}/direct/{self.protocol}"


def main() -> int:
    seconds = _env_int("BENCH_SECONDS", 10)
    rounds = _env_int("BENCH_ROUNDS", 3)
    keep = os.environ.get("BENCH_KEEP", "") not in ("", "0")
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    loadavg = _loadavg()
    source = report.shardwire_source()  # before this run writes its results
    workdir = Path(tempfile.mkdtemp(prefix="shardwire-bench-sharded-"))
    os.chmod(workdir, 0o711)  # the postgres OS user runs the servers in here
    clusters: list[PostgresCluster] = []
    proxies: list[ProxyProcess] = []
    try:
        _progress(f"work directory {workdir}")
        clusters = start_clusters(workdir / "pg", 3, prefix="pg")
        single, s1, s2 = clusters
        _progress(f"pgbench -i -s {SCALE} on {len(clusters)} servers")
        with ThreadPoolExecutor(max_workers=len(clusters)) as pool:
            for future in [pool.submit(_fill, c) for c in clusters]:
                future.result()
        _progress("keeping on each shard only the accounts it owns")
        with ThreadPoolExecutor(max_workers=2) as pool:
            for future in [
                pool.submit(_keep_accounts, s1, f"aid >= {SPLIT}"),
                pool.submit(_keep_accounts, s2, f"aid < {SPLIT}"),
            ]:
                future.result()
        counts = {
            name: int(c.sql("SELECT count(*) FROM pgbench_accounts", dbname=DATABASE))
            for name, c in (("s1", s1), ("s2", s2))
        }
        if sum(counts.values()) != ACCOUNTS:
            raise RuntimeError(f"the shards hold {counts} accounts, not {ACCOUNTS} in all")

        configs = proxy_configs(
            single.dsn(DATABASE, user=USER), s1.dsn(DATABASE, user=USER),
            s2.dsn(DATABASE, user=USER), SPLIT)  # fmt: skip
        one, routed, sharded = (
            ProxyProcess(configs[setup], workdir / setup, log_level="warning")
            for setup in SETUPS
        )
        for proxy in (one, routed, sharded):
            proxies.append(proxy)
            proxy.start()
        targets = {
            ONE_SHARD: Target(ONE_SHARD, one.host, one.port),
            ROUTED: Target(ROUTED, routed.host, routed.port),
            SHARDED: Target(SHARDED, sharded.host, sharded.port),
        }

        route_before = _show_route(targets[SHARDED])
        _progress(f"before the runs: {_route_text(route_before)}")
        if not _route_ok(route_before):
            raise RuntimeError(f"routing is not what the map says: {_route_text(route_before)}")

        servers = {c: Server(c.host, c.port) for c in clusters}
        ranges = {
            DIRECT_SINGLE: [KeyRange(servers[single], 1, ACCOUNTS + 1)],
            DIRECT_S1: [KeyRange(servers[s1], 1, SPLIT)],
            DIRECT_BOTH: [
                KeyRange(servers[s1], 1, SPLIT),
                KeyRange(servers[s2], SPLIT, ACCOUNTS + 1),
            ],
        }
        setups = {
            ONE_SHARD: Setup(one.proc.pid, (single,)),
            ROUTED: Setup(routed.proc.pid, (single,)),
            SHARDED: Setup(sharded.proc.pid, (s1, s2)),
        }
        results, cpu, direct = _run_rounds(
            targets, setups, ranges, seconds=seconds, rounds=rounds, logs=workdir / "logs"
        )
        rows = [Row(w, tuple(results[w]), tuple(cpu[w])) for w in WORKLOADS]
        direct_rows = [DirectRow(p, tuple(direct[p])) for p in PROTOCOLS]
        route_after = _show_route(targets[SHARDED])
        route_line = (
            f"`{ROUTE_CHECK}` through the sharded proxy, before the runs (a wrong answer stops "
            "the benchmark) and again after them: "
            f"{_route_text(route_after)} "
            + ("(single on s2, as the map says)" if _route_ok(route_after) else "(WRONG)")
        )
        env = _describe(single, seconds=seconds, rounds=rounds, loadavg=loadavg, counts=counts,
                        source=source)
        notes = _notes(rows, proxies)

        print(table_text(HEADERS, [cells(r) for r in rows], right=range(1, 7)))
        print()
        print(table_text(CPU_HEADERS, [cpu_cells(r) for r in rows], right=range(2, 5)))
        print()
        print(
            table_text(DIRECT_HEADERS, [direct_cells(r) for r in direct_rows], right=range(1, 10))
        )
        print()
        print(route_line)
        for note in notes:
            print(f"note: {note}")
        write_json(RESULTS / "sharded.json", json_rows(rows) + direct_json(direct_rows))
        report.write_docs(
            DOCS,
            markdown_section(rows, direct_rows, env=env, route_line=route_line, notes=notes),
        )
        _progress(f"wrote {RESULTS / 'sharded.json'} and {DOCS}")
        return 0 if _route_ok(route_after) else 1
    except KeyboardInterrupt:
        _progress("interrupted; stopping everything")
        return 130
    finally:
        report.stop_all([
            *(p.stop for p in proxies),
            (lambda: stop_clusters(clusters, mode="immediate")) if clusters else None,
        ])  # fmt: skip
        if keep:
            _progress(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def proxy_configs(single: str, s1: str, s2: str, split: int) -> dict[str, dict[str, Any]]:
    """The proxies' configs by setup (ONE_SHARD, ROUTED, SHARDED), from the servers' DSNs:
    *routed* puts the single server behind a map that routes every statement (to it), what
    routing costs without a second server on the machine; *sharded* splits the accounts at
    `split` between s1 and s2."""

    def by_aid(ranges: list[dict[str, Any]]) -> dict[str, Any]:
        rule = {
            "kind": "range",
            "column": "aid",
            "type": "integer",
            "tables": ["pgbench_accounts"],
            "ranges": ranges,
        }
        return {"rules": {"by_aid": rule}, "reference": ["pgbench_branches", "pgbench_tellers"]}

    return {
        ONE_SHARD: proxy_settings({"s1": single}),
        ROUTED: proxy_settings({"s1": single}, sharding=by_aid([{"shard": "s1"}])),
        SHARDED: proxy_settings(
            {"s1": s1, "s2": s2},
            sharding=by_aid([{"to": split, "shard": "s1"}, {"from": split, "shard": "s2"}]),
        ),
    }


def _fill(cluster: PostgresCluster) -> None:
    cluster.sql(f"CREATE ROLE {USER} LOGIN")
    cluster.sql(f"CREATE DATABASE {DATABASE} OWNER {USER}")
    target = Target(cluster.name, cluster.host, cluster.port)
    initialise(target, user=USER, database=DATABASE, scale=SCALE)


def _keep_accounts(cluster: PostgresCluster, not_owned: str) -> None:
    cluster.sql(f"DELETE FROM pgbench_accounts WHERE {not_owned}", dbname=DATABASE, user=USER)
    cluster.sql("VACUUM FULL ANALYZE pgbench_accounts", dbname=DATABASE, user=USER, timeout=600)


def _show_route(target: Target) -> dict[str, str]:
    return report.show_route(target.host, target.port, ROUTE_SQL, user=USER, database=DATABASE)


def _route_ok(route: Mapping[str, str]) -> bool:
    return route.get("route") == "single" and report.route_shards(route) == ["s2"]


def _route_text(route: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in route.items() if v) or "no row"


def _run_rounds(
    targets: Mapping[str, Target],
    setups: Mapping[str, Setup],
    ranges: Mapping[str, Sequence[KeyRange]],
    *,
    seconds: int,
    rounds: int,
    logs: Path,
) -> tuple[
    dict[Workload, list[dict[str, PgbenchResult]]],
    dict[Workload, list[dict[str, Cpu]]],
    dict[str, list[dict[str, PointResult]]],
]:
    """Every workload against every setup (with the CPU time each run took), then the
    direct runs of each protocol against each set of servers, round after round, the
    order rotating."""
    warm_up([targets[name] for name in SETUPS], seconds=min(seconds, WARMUP_SECONDS),
            log_dir=logs, user=USER, database=DATABASE)  # fmt: skip
    for name in DIRECT_SETUPS:
        _progress(f"warm-up direct {name}")
        point_queries(ranges[name], protocol="prepared", seconds=min(seconds, WARMUP_SECONDS),
                      user=USER, database=DATABASE)  # fmt: skip
    results: dict[Workload, list[dict[str, PgbenchResult]]] = {w: [] for w in WORKLOADS}
    cpu: dict[Workload, list[dict[str, Cpu]]] = {w: [] for w in WORKLOADS}
    direct: dict[str, list[dict[str, PointResult]]] = {p: [] for p in PROTOCOLS}
    progress = report.Progress(
        rounds * (len(WORKLOADS) * len(SETUPS) + len(PROTOCOLS) * len(DIRECT_SETUPS))
    )
    for number in range(rounds):
        for index, workload in enumerate(WORKLOADS):
            this_round: dict[str, PgbenchResult] = {}
            this_cpu: dict[str, Cpu] = {}
            for name in report.rotate(SETUPS, number + index):
                before = setups[name].cpu()
                result = run_select_only(
                    targets[name],
                    protocol=workload.protocol,
                    clients=workload.clients,
                    seconds=seconds,
                    log_dir=logs,
                    user=USER,
                    database=DATABASE,
                    tag=f"r{number + 1}-{workload.protocol}-c{workload.clients}-{name}",
                )
                this_round[name] = result
                this_cpu[name] = _per_transaction(before, setups[name].cpu(), result)
                progress(
                    f"round {number + 1} {workload.protocol} c{workload.clients} {name}: "
                    + _brief(name, result)
                )
            results[workload].append(this_round)
            cpu[workload].append(this_cpu)
        for index, protocol in enumerate(PROTOCOLS):
            points: dict[str, PointResult] = {}
            for name in report.rotate(DIRECT_SETUPS, number + index):
                points[name] = point_queries(
                    ranges[name], protocol=protocol, seconds=seconds, user=USER, database=DATABASE
                )
                progress(
                    f"round {number + 1} direct {protocol} c1 {name}: " + _point_brief(points[name])
                )
            direct[protocol].append(points)
    return results, cpu, direct


def _per_transaction(before: tuple[float, float, float], after: tuple[float, float, float],
                     result: PgbenchResult) -> Cpu:
    if not result.transactions:
        return Cpu(None, None, None)
    proxy, servers, machine = ((b - a) * 1e6 / result.transactions
                               for a, b in zip(before, after, strict=True))
    return Cpu(proxy, servers, machine)


def _point_brief(result: PointResult) -> str:
    qps = "no queries" if result.qps is None else f"{result.qps:,.0f} queries/s"
    servers = " / ".join(f"{n:,}" for n in result.per_server)
    return f"{qps}, p50 {ms(result.p50_ms)} ms, p99 {ms(result.p99_ms)} ms, per server {servers}"


def _notes(rows: Sequence[Row], proxies: Sequence[ProxyProcess]) -> list[str]:
    notes = []
    for row in rows:
        for setup in SETUPS:
            if row.failures(setup) or row.errors(setup):
                failed = sum(r[setup].failed for r in row.rounds)
                aborted = sum(r[setup].aborted_clients for r in row.rounds)
                notes.append(
                    f"-M {row.workload.protocol} -c {row.workload.clients} through the {setup} "
                    f"Shardwire: {failed} failed transactions, {aborted} clients aborted; "
                    "pgbench's errors over all rounds: "
                    + ("; ".join(f"{n}× `{t}`" for t, n in row.errors(setup)) or "none printed")
                )
    for name, proxy in zip(SETUPS, proxies, strict=True):
        note = report.proxy_log_note(f"the {name} Shardwire", proxy)
        if note:
            notes.append(note)
    return notes


def _describe(
    cluster: PostgresCluster,
    *,
    seconds: int,
    rounds: int,
    loadavg: str,
    counts: Mapping[str, int],
    source: str,
) -> dict[str, str]:
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": report.machine_line(),
        "software": "PostgreSQL "
        + cluster.sql("SHOW server_version")
        + f", Python {platform.python_version()}, Shardwire {shardwire.__version__} "
        f"({source})",
        "seconds": str(seconds),
        "rounds": str(rounds),
        "loadavg": loadavg,
        "loadavg_after": _loadavg(),
        "accounts": ", ".join(f"{n:,} on {name}" for name, n in counts.items()),
    }


# --- output -------------------------------------------------------------------------------


def _verdict(row: Row) -> str:
    ratio = row.ratio
    if ratio is None:
        return "n/a"
    return "met" if ratio >= RATIO_TARGET else "MISSED"


HEADERS = (
    "protocol", "clients", "one-shard tps", "routed tps", "sharded tps", "routed/one-shard",
    "sharded/one-shard", "p50 ms one/sharded", "p99 ms one/sharded", "failed one/sharded",
    f"≥ {RATIO_TARGET}",
)  # fmt: skip


def cells(row: Row) -> list[str]:
    return [
        row.workload.protocol,
        str(row.workload.clients),
        num(row.tps(ONE_SHARD)),
        num(row.tps(ROUTED)),
        num(row.tps(SHARDED)),
        num(row.routed_ratio, 2),
        num(row.ratio, 2),
        f"{ms(row.p50(ONE_SHARD))} / {ms(row.p50(SHARDED))}",
        f"{ms(row.p99(ONE_SHARD))} / {ms(row.p99(SHARDED))}",
        f"{row.failures(ONE_SHARD)} / {row.failures(SHARDED)}",
        _verdict(row),
    ]


CPU_HEADERS = (
    "protocol", "clients", "proxy µs one/routed/sharded", "servers µs one/routed/sharded",
    "machine µs one/routed/sharded",
)  # fmt: skip


def cpu_cells(row: Row) -> list[str]:
    return [
        row.workload.protocol,
        str(row.workload.clients),
        *(" / ".join(num(row.cpu_us(s, part), 1) for s in SETUPS)
          for part in ("proxy", "servers", "machine")),
    ]


DIRECT_HEADERS = (
    "protocol", "queries/s single", "queries/s s1", "queries/s s1+s2",
    "p50 ms single / s1 / s1+s2", "p99 ms single / s1 / s1+s2", "s1+s2 ÷ single p50",
    "+p50 µs s1+s2 vs single", "+p50 µs s1+s2 vs s1", "on s1",
)  # fmt: skip


def direct_cells(row: DirectRow) -> list[str]:
    return [
        row.protocol,
        *(num(row.qps(s)) for s in DIRECT_SETUPS),
        " / ".join(ms(row.p50(s)) for s in DIRECT_SETUPS),
        " / ".join(ms(row.p99(s)) for s in DIRECT_SETUPS),
        num(row.p50_ratio(DIRECT_BOTH, DIRECT_SINGLE), 2),
        num(row.added_us(DIRECT_BOTH, DIRECT_SINGLE), 1),
        num(row.added_us(DIRECT_BOTH, DIRECT_S1), 1),
        percent(row.s1_share()),
    ]


def direct_json(rows: Sequence[DirectRow]) -> list[dict[str, Any]]:
    keys = {DIRECT_SINGLE: "single", DIRECT_S1: "s1", DIRECT_BOTH: "s1_s2"}
    out = []
    for row in rows:
        item: dict[str, Any] = {"name": row.name, "protocol": row.protocol, "clients": 1}
        for setup in DIRECT_SETUPS:
            item[f"{keys[setup]}_qps"] = round3(row.qps(setup))
            item[f"{keys[setup]}_p50_ms"] = round3(row.p50(setup))
            item[f"{keys[setup]}_p99_ms"] = round3(row.p99(setup))
        item["s1_s2_to_single_p50"] = round3(row.p50_ratio(DIRECT_BOTH, DIRECT_SINGLE))
        item["s1_s2_added_p50_us_vs_single"] = round3(row.added_us(DIRECT_BOTH, DIRECT_SINGLE))
        item["s1_s2_added_p50_us_vs_s1"] = round3(row.added_us(DIRECT_BOTH, DIRECT_S1))
        item["rounds"] = [
            {keys[s]: {"queries": r[s].queries, "seconds": round3(r[s].seconds),
                       "p50_ms": round3(r[s].p50_ms), "p99_ms": round3(r[s].p99_ms),
                       "per_server": list(r[s].per_server)}
             for s in DIRECT_SETUPS}
            for r in row.rounds
        ]  # fmt: skip
        out.append(item)
    return out


def json_rows(rows: Sequence[Row]) -> list[dict[str, Any]]:
    return [
        {
            "name": row.name,
            "protocol": row.workload.protocol,
            "clients": row.workload.clients,
            "one_shard_tps": round3(row.tps(ONE_SHARD)),
            "routed_tps": round3(row.tps(ROUTED)),
            "sharded_tps": round3(row.tps(SHARDED)),
            "routed_ratio": round3(row.routed_ratio),
            "ratio": round3(row.ratio),
            "cpu_us_per_transaction": {
                setup: {part: round3(row.cpu_us(setup, part))
                        for part in ("proxy", "servers", "machine")}
                for setup in SETUPS
            },
        }
        for row in rows
    ]


def markdown_section(
    rows: Sequence[Row],
    direct: Sequence[DirectRow],
    *,
    env: Mapping[str, str],
    route_line: str,
    notes: Sequence[str],
) -> str:
    plural = "" if env["rounds"] == "1" else "s"
    parts = [
        START_MARKER,
        "## pgbench -S: one-shard and two-shard Shardwire",
        "",
        f"Written by `.venv/bin/python bench/sharded.py` on {env['date']}. Figures as JSON: "
        "`bench/results/sharded.json`. Target (issue 3): sharded TPS ≥ "
        f"{RATIO_TARGET}× one-shard TPS, for both protocols.",
        "",
        f"- Machine: {env['machine']}",
        f"- Software: {env['software']}",
        f"- Run: pgbench -S at scale {SCALE}, BENCH_SECONDS={env['seconds']} per run, "
        f"{env['rounds']} round{plural}; load average {env['loadavg']} before the run, "
        f"{env['loadavg_after']} after",
        "",
        "What ran: three PostgreSQL servers (fsync off) on this machine. *one-shard*: "
        "Shardwire with one shard holding all of pgbench's tables and no sharding rules. "
        "*routed*: the same server behind a Shardwire whose map range-shards "
        "`pgbench_accounts` on `aid` over that one shard (every statement is routed, to it): "
        "the cost of routing alone, without a second server competing for this machine's "
        "cores. *sharded*: Shardwire with two shards; `pgbench_accounts` range-sharded on `aid` "
        f"(aid < {SPLIT} on s1, the rest on s2: {env['accounts']}), `pgbench_branches` and "
        "`pgbench_tellers` reference tables, `pgbench_history` on the default shard s1. All "
        f"proxies run in transaction mode with pool.size {POOL_SIZE} and log level warning. "
        "In each round, for each protocol and client count (`-j` = min(clients, 2)), pgbench "
        "ran through each, the order rotating. Figures are medians over the rounds; the ratio "
        "is computed within each round, then the median taken. *failed* counts failed "
        "transactions, aborted clients and non-zero exits over all rounds.",
        "",
        table_markdown(HEADERS, [cells(r) for r in rows], text=(0, len(HEADERS) - 1)),
        "",
        "CPU time per transaction in the same runs, in µs (from /proc, medians over the "
        "rounds): the proxy's; its servers' (postmasters and backends; sharded: s1 and s2 "
        "together); the whole machine's, every process on all cores, pgbench included. "
        "Where the machine is the limit, TPS goes as the inverse of the last column.",
        "",
        table_markdown(CPU_HEADERS, [cpu_cells(r) for r in rows], text=(0,)),
        "",
        "Direct, no proxy: one Python client (psycopg "
        f"{psycopg.__version__}, one query after the other, BENCH_SECONDS per run, in the same "
        "rounds, the order rotating) sends pgbench -S's point query with a uniformly random "
        "aid (`-M simple`: the text with the aid in it, simple query protocol; `-M prepared`: "
        "a statement prepared once per connection, the aid as its parameter) to *single* (all "
        "accounts), to *s1* alone (aids of s1 only), or to *s1+s2*: to whichever shard holds "
        "the aid, so the server changes at random from one query to the next, as through the "
        "sharded proxy (pgbench talks to one server only). *+p50* is how much later than the "
        "other's the median query finished, within each round, then the median; *on s1* the "
        "share of the s1+s2 queries that went to s1. These rows show whether alternating "
        "between two PostgreSQL servers costs this machine per-query latency by itself, "
        "with no proxy in between; *s1* tells that apart from a difference between the "
        "servers (s1 holds half the accounts).",
        "",
        table_markdown(DIRECT_HEADERS, [direct_cells(r) for r in direct], text=(0,)),
        "",
        f"Routing check: {route_line}.",
    ]
    if notes:
        parts += ["", "Notes:", "", *(f"- {n}" for n in notes)]
    parts.append(END_MARKER)
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    sys.exit(main())
