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
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import report
from pgbench_run import PgbenchResult, Target, initialise, run_select_only
from report import Workload, write_json
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
ROUTE_CHECK = "SHOW ROUTE FOR SELECT abalance FROM pgbench_accounts WHERE aid = 600000"


@dataclass(frozen=True, slots=True)
class Row(report.Row):
    """One workload's results; the targets here are the two setups."""

    @property
    def ratio(self) -> float | None:
        """Sharded ÷ one-shard TPS, within each round, then the median."""

        def ratio(r: Mapping[str, PgbenchResult]) -> float | None:
            ours, base = r[SHARDED].tps, r[ONE_SHARD].tps
            return None if ours is None or not base else ours / base

        return self.median(ratio)

    @property
    def routed_ratio(self) -> float | None:
        """Routed ÷ one-shard TPS (one server either way: what routing costs), per round."""

        def ratio(r: Mapping[str, PgbenchResult]) -> float | None:
            ours, base = r[ROUTED].tps, r[ONE_SHARD].tps
            return None if ours is None or not base else ours / base

        return self.median(ratio)

    def failures(self, setup: str) -> int:
        return sum(
            r[setup].failed + r[setup].aborted_clients + (1 if r[setup].returncode else 0)
            for r in self.rounds
        )

    @property
    def name(self) -> str:
        return f"{BENCHMARK}/{self.workload.protocol}/c{self.workload.clients}"


def main() -> int:
    seconds = _env_int("BENCH_SECONDS", 10)
    rounds = _env_int("BENCH_ROUNDS", 3)
    keep = os.environ.get("BENCH_KEEP", "") not in ("", "0")
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    loadavg = _loadavg()
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

        base: dict[str, Any] = {
            "auth": {"method": "trust"},
            "database": DATABASE,
            "users": {USER: {}},
            "default_shard": "s1",
            "pool": {"size": POOL_SIZE},
        }
        one = ProxyProcess(
            {**base, "shards": {"s1": {"primary": single.dsn(DATABASE, user=USER)}}},
            workdir / "one-shard",
            log_level="warning",
        )
        proxies.append(one)
        one.start()
        # The same server behind a map that routes every statement (to it): what routing
        # costs, without a second server on the machine.
        routed = ProxyProcess(
            {
                **base,
                "shards": {"s1": {"primary": single.dsn(DATABASE, user=USER)}},
                "sharding": {
                    "rules": {
                        "by_aid": {
                            "kind": "range",
                            "column": "aid",
                            "type": "integer",
                            "tables": ["pgbench_accounts"],
                            "ranges": [{"shard": "s1"}],
                        }
                    },
                    "reference": ["pgbench_branches", "pgbench_tellers"],
                },
            },
            workdir / "routed",
            log_level="warning",
        )
        proxies.append(routed)
        routed.start()
        sharded = ProxyProcess(
            {
                **base,
                "shards": {
                    "s1": {"primary": s1.dsn(DATABASE, user=USER)},
                    "s2": {"primary": s2.dsn(DATABASE, user=USER)},
                },
                "sharding": {
                    "rules": {
                        "by_aid": {
                            "kind": "range",
                            "column": "aid",
                            "type": "integer",
                            "tables": ["pgbench_accounts"],
                            "ranges": [
                                {"to": SPLIT, "shard": "s1"},
                                {"from": SPLIT, "shard": "s2"},
                            ],
                        }
                    },
                    "reference": ["pgbench_branches", "pgbench_tellers"],
                },
            },
            workdir / "sharded",
            log_level="warning",
        )
        proxies.append(sharded)
        sharded.start()
        targets = {
            ONE_SHARD: Target(ONE_SHARD, one.host, one.port),
            ROUTED: Target(ROUTED, routed.host, routed.port),
            SHARDED: Target(SHARDED, sharded.host, sharded.port),
        }

        route_before = _show_route(targets[SHARDED])
        _progress(f"before the runs: {_route_text(route_before)}")
        if not _route_ok(route_before):
            raise RuntimeError(f"routing is not what the map says: {_route_text(route_before)}")

        results = _run_rounds(targets, seconds=seconds, rounds=rounds, logs=workdir / "logs")
        rows = [Row(w, tuple(results[w])) for w in WORKLOADS]
        route_after = _show_route(targets[SHARDED])
        route_line = (
            f"`{ROUTE_CHECK}` through the sharded proxy, before the runs (a wrong answer stops "
            "the benchmark) and again after them: "
            f"{_route_text(route_after)} "
            + ("(single on s2, as the map says)" if _route_ok(route_after) else "(WRONG)")
        )
        env = _describe(single, seconds=seconds, rounds=rounds, loadavg=loadavg, counts=counts)
        notes = _notes(rows, proxies)

        print(text_table(rows))
        print()
        print(route_line)
        for note in notes:
            print(f"note: {note}")
        write_json(RESULTS / "sharded.json", json_rows(rows))
        report.write_docs(DOCS, markdown_section(rows, env=env, route_line=route_line, notes=notes))
        _progress(f"wrote {RESULTS / 'sharded.json'} and {DOCS}")
        return 0 if _route_ok(route_after) else 1
    except KeyboardInterrupt:
        _progress("interrupted; stopping everything")
        return 130
    finally:
        _stop(proxies, clusters)
        if keep:
            _progress(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _fill(cluster: PostgresCluster) -> None:
    cluster.sql(f"CREATE ROLE {USER} LOGIN")
    cluster.sql(f"CREATE DATABASE {DATABASE} OWNER {USER}")
    target = Target(cluster.name, cluster.host, cluster.port)
    initialise(target, user=USER, database=DATABASE, scale=SCALE)


def _keep_accounts(cluster: PostgresCluster, not_owned: str) -> None:
    cluster.sql(f"DELETE FROM pgbench_accounts WHERE {not_owned}", dbname=DATABASE, user=USER)
    cluster.sql("VACUUM FULL ANALYZE pgbench_accounts", dbname=DATABASE, user=USER, timeout=600)


def _show_route(target: Target) -> dict[str, str]:
    with psycopg.connect(
        host=target.host, port=target.port, user=USER, dbname=DATABASE, autocommit=True,
        connect_timeout=10,
    ) as conn:  # fmt: skip
        cursor = conn.execute(ROUTE_CHECK)
        row = cursor.fetchone()
        names = [d.name for d in cursor.description or ()]
    if row is None:
        return {}
    return {
        name: "" if value is None else str(value) for name, value in zip(names, row, strict=True)
    }


def _route_ok(route: Mapping[str, str]) -> bool:
    shards = route.get("shards", "").replace("{", " ").replace("}", " ").replace(",", " ")
    return route.get("route") == "single" and shards.split() == ["s2"]


def _route_text(route: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in route.items() if v) or "no row"


def _run_rounds(
    targets: Mapping[str, Target], *, seconds: int, rounds: int, logs: Path
) -> dict[Workload, list[dict[str, PgbenchResult]]]:
    """Every workload against every setup, round after round, the order rotating."""
    for name in SETUPS:
        _progress(f"warm-up {name}")
        run_select_only(
            targets[name], protocol="simple", clients=8, seconds=min(seconds, WARMUP_SECONDS),
            log_dir=logs, user=USER, database=DATABASE, tag=f"warmup-{name}",
        )  # fmt: skip
    results: dict[Workload, list[dict[str, PgbenchResult]]] = {w: [] for w in WORKLOADS}
    total = rounds * len(WORKLOADS) * len(SETUPS)
    done = 0
    started = time.monotonic()
    for number in range(rounds):
        for index, workload in enumerate(WORKLOADS):
            shift = (number + index) % len(SETUPS)
            order = SETUPS[shift:] + SETUPS[:shift]
            this_round: dict[str, PgbenchResult] = {}
            for name in order:
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
                done += 1
                _progress(
                    f"[{done}/{total} {time.monotonic() - started:.0f}s] round {number + 1} "
                    f"{workload.protocol} c{workload.clients} {name}: {_brief(name, result)}"
                )
            results[workload].append(this_round)
    return results


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
        warnings = [
            line for line in proxy.log_tail(100_000).splitlines()
            if " WARNING " in line or " ERROR " in line or " CRITICAL " in line
        ]  # fmt: skip
        if warnings:
            notes.append(
                f"the {name} Shardwire logged {len(warnings)} warnings or errors; "
                f"the first: {warnings[0]}"
            )
    return notes


def _describe(
    cluster: PostgresCluster,
    *,
    seconds: int,
    rounds: int,
    loadavg: str,
    counts: Mapping[str, int],
) -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
         if line.startswith("model name")),
        platform.processor() or "unknown CPU",
    )  # fmt: skip
    meminfo = Path("/proc/meminfo").read_text().split()
    memory_gib = int(meminfo[meminfo.index("MemTotal:") + 1]) / 1024 / 1024
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{len(os.sched_getaffinity(0))} cores, {cpu}, {memory_gib:.1f} GiB RAM, "
        f"Linux {platform.release()}",
        "software": "PostgreSQL "
        + cluster.sql("SHOW server_version")
        + f", Python {platform.python_version()}, Shardwire {shardwire.__version__}",
        "seconds": str(seconds),
        "rounds": str(rounds),
        "loadavg": loadavg,
        "loadavg_after": _loadavg(),
        "accounts": ", ".join(f"{n:,} on {name}" for name, n in counts.items()),
    }


# --- output -------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


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
NUMERIC = range(1, 7)  # right-aligned columns


def cells(row: Row) -> list[str]:
    return [
        row.workload.protocol,
        str(row.workload.clients),
        _num(row.tps(ONE_SHARD)),
        _num(row.tps(ROUTED)),
        _num(row.tps(SHARDED)),
        _num(row.routed_ratio, 2),
        _num(row.ratio, 2),
        f"{_ms(row.p50(ONE_SHARD))} / {_ms(row.p50(SHARDED))}",
        f"{_ms(row.p99(ONE_SHARD))} / {_ms(row.p99(SHARDED))}",
        f"{row.failures(ONE_SHARD)} / {row.failures(SHARDED)}",
        _verdict(row),
    ]


def text_table(rows: Sequence[Row]) -> str:
    table = [list(HEADERS), *(cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADERS))]
    out = []
    for n, line in enumerate(table):
        out.append(
            "  ".join(
                c.rjust(w) if i in NUMERIC and n else c.ljust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            ).rstrip()
        )
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def markdown_table(rows: Sequence[Row]) -> str:
    out = [
        "| " + " | ".join(HEADERS) + " |",
        "| --- | " + " | ".join(["---:"] * (len(HEADERS) - 2)) + " | --- |",
    ]
    out += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(out)


def _round3(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def json_rows(rows: Sequence[Row]) -> list[dict[str, Any]]:
    return [
        {
            "name": row.name,
            "protocol": row.workload.protocol,
            "clients": row.workload.clients,
            "one_shard_tps": _round3(row.tps(ONE_SHARD)),
            "routed_tps": _round3(row.tps(ROUTED)),
            "sharded_tps": _round3(row.tps(SHARDED)),
            "routed_ratio": _round3(row.routed_ratio),
            "ratio": _round3(row.ratio),
        }
        for row in rows
    ]


def markdown_section(
    rows: Sequence[Row], *, env: Mapping[str, str], route_line: str, notes: Sequence[str]
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
        markdown_table(rows),
        "",
        f"Routing check: {route_line}.",
    ]
    if notes:
        parts += ["", "Notes:", "", *(f"- {n}" for n in notes)]
    parts.append(END_MARKER)
    return "\n".join(parts) + "\n"


def _stop(proxies: Sequence[ProxyProcess], clusters: Sequence[PostgresCluster]) -> None:
    # Each in turn, whatever the one before did: nothing may outlive the benchmark.
    stops: list[Callable[[], None]] = [p.stop for p in proxies]
    if clusters:
        stops.append(lambda: stop_clusters(clusters, mode="immediate"))
    for stop in stops:
        try:
            stop()
        except KeyboardInterrupt:
            stop()
        except Exception as exc:  # report it and go on stopping the rest
            _progress(f"while stopping: {exc}")


if __name__ == "__main__":
    sys.exit(main())
