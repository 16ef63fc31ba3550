"""`make bench`: pgbench -S against one PostgreSQL directly, through PgBouncer and through
Shardwire, in interleaved rounds; then what 1000 idle clients cost each pooler in memory.

Environment: BENCH_SECONDS (length of one pgbench run, default 10), BENCH_ROUNDS (default 3),
BENCH_KEEP=1 to keep the work directory (logs, configs) instead of deleting it.

Writes a table to stdout, the figures to bench/results/latest.json (one object per
workload) and bench/results/latest-run.json (machine, settings, memory), and rewrites the
pgbench -S section of docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import shutil
import signal
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import idle_clients
import pgbouncer
import report
from cpu_share import CpuShare, process_cpu
from idle_clients import IdleCost
from pgbench_run import PgbenchResult, Target, initialise, run_select_only, warm_up
from report import DIRECT, PGBOUNCER, SHARDWIRE, TARGETS, Row, Workload

import shardwire
from shardwire.testing import PostgresCluster, free_port
from shardwire.testing.proxy import ProxyProcess

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
DOCS = REPO / "docs" / "benchmarks.md"

USER = DATABASE = "bench"
SCALE = 10
POOL_SIZE = 20  # PgBouncer's default_pool_size and Shardwire's pool.size
IDLE_CLIENTS = 1000
WORKLOADS = tuple(Workload(p, c) for p in ("simple", "prepared") for c in (1, 8))
WARMUP_SECONDS = 2


def proxy_settings(shards: Mapping[str, str], **more: Any) -> dict[str, Any]:
    """A benchmark proxy's config: the bench user with trust, `shards` (name -> primary DSN),
    s1 the default shard, pool.size POOL_SIZE; `more` adds or replaces sections."""
    return {
        "auth": {"method": "trust"},
        "database": DATABASE,
        "users": {USER: {}},
        "shards": {name: {"primary": dsn} for name, dsn in shards.items()},
        "default_shard": "s1",
        "pool": {"size": POOL_SIZE},
        **more,
    }


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"{name} must be a whole number of at least 1, not {raw!r}") from None
    if value < 1:
        raise SystemExit(f"{name} must be at least 1, not {value}")
    return value


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM and SIGHUP take the same way out as Ctrl-C, through the cleanup below.
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> int:
    seconds = _env_int("BENCH_SECONDS", 10)
    rounds = _env_int("BENCH_ROUNDS", 3)
    keep = os.environ.get("BENCH_KEEP", "") not in ("", "0")
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    # Children inherit the limit: the poolers need a descriptor per idle client.
    idle_clients.raise_open_files_limit(2 * IDLE_CLIENTS + 1000)
    program = pgbouncer.ensure_installed()
    loadavg = _loadavg()

    workdir = Path(tempfile.mkdtemp(prefix="shardwire-bench-"))
    os.chmod(workdir, 0o711)  # the postgres OS user runs the server and PgBouncer in here
    cluster: PostgresCluster | None = None
    bouncer: pgbouncer.PgBouncer | None = None
    proxy: ProxyProcess | None = None
    try:
        _progress(f"work directory {workdir}")
        cluster = PostgresCluster(workdir / "pg", name="pg")
        cluster.init()
        cluster.start()
        cluster.sql(f"CREATE ROLE {USER} LOGIN")
        cluster.sql(f"CREATE DATABASE {DATABASE} OWNER {USER}")
        direct = Target(DIRECT, cluster.host, cluster.port)
        _progress(f"pgbench -i -s {SCALE}")
        initialise(direct, user=USER, database=DATABASE, scale=SCALE)

        bouncer = pgbouncer.PgBouncer(
            program,
            workdir / "pgbouncer",
            port=free_port(),
            server_host=cluster.host,
            server_port=cluster.port,
            database=DATABASE,
            user=USER,
            pool_size=POOL_SIZE,
            max_client_conn=IDLE_CLIENTS + 100,
            max_prepared_statements=200,
        )
        bouncer.start()
        proxy = ProxyProcess(
            proxy_settings(
                {"s1": cluster.dsn(DATABASE, user=USER)},
                listen={"max_client_connections": IDLE_CLIENTS + 100},
            ),
            workdir / "shardwire",
            log_level="warning",
        )
        proxy.start()
        targets = {
            DIRECT: direct,
            PGBOUNCER: Target(PGBOUNCER, bouncer.host, bouncer.port),
            SHARDWIRE: Target(SHARDWIRE, proxy.host, proxy.port),
        }
        env = _describe(cluster, bouncer, seconds=seconds, rounds=rounds, loadavg=loadavg)

        poolers = {PGBOUNCER: bouncer.pid, SHARDWIRE: _proxy_pid(proxy)}
        share = CpuShare(lambda: poolers.values(), lambda: report.postmaster_pid(cluster))
        results = _run_rounds(
            targets,
            seconds=seconds,
            rounds=rounds,
            logs=workdir / "logs",
            share=share,
            poolers=poolers,
        )
        rows = [Row(w, tuple(results[w])) for w in WORKLOADS]
        env["loadavg_after"] = _loadavg()

        _progress(f"memory: {IDLE_CLIENTS} idle clients")
        idle: dict[str, IdleCost | None] = {}
        for name, pid, target in (
            (SHARDWIRE, _proxy_pid(proxy), targets[SHARDWIRE]),
            (PGBOUNCER, bouncer.pid, targets[PGBOUNCER]),
        ):
            try:
                idle[name] = idle_clients.measure(
                    pid, target.host, target.port,
                    count=IDLE_CLIENTS, user=USER, database=DATABASE,
                )  # fmt: skip
            except (OSError, RuntimeError) as exc:
                _progress(f"  {name}: {exc}")
                idle[name] = None
            _progress(f"  {report.idle_line(name, idle[name])}")

        notes = _notes(rows, bouncer, proxy)
        print(report.text_table(rows))
        print()
        for name, cost in idle.items():
            print(report.idle_line(name, cost))
        for note in notes:
            print(f"note: {note}")

        report.write_json(RESULTS / "latest.json", report.json_rows(rows))
        report.write_json(
            RESULTS / "latest-run.json",
            {
                "benchmark": report.BENCHMARK,
                **env,
                "idle_clients": {name: _idle_json(cost) for name, cost in idle.items()},
                "notes": notes,
            },
        )
        report.write_docs(DOCS, report.markdown_section(rows, env=env, idle=idle, notes=notes))
        _progress(f"wrote {RESULTS / 'latest.json'} and {DOCS}")
        return 0
    except KeyboardInterrupt:
        _progress("interrupted; stopping everything")
        return 130
    finally:
        report.stop_all([
            proxy.stop if proxy else None,
            bouncer.stop if bouncer else None,
            (lambda: cluster.stop(mode="immediate")) if cluster else None,
        ])  # fmt: skip
        if keep:
            _progress(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _run_rounds(
    targets: Mapping[str, Target],
    *,
    seconds: int,
    rounds: int,
    logs: Path,
    share: CpuShare,
    poolers: Mapping[str, int],
) -> dict[Workload, list[dict[str, PgbenchResult]]]:
    """Every workload against every target, round after round.

    The order of the targets rotates from one workload to the next and from one round to
    the next, so none of them always runs first after a pause or last on a warm machine.
    """
    warm_up([targets[name] for name in TARGETS], seconds=min(seconds, WARMUP_SECONDS),
            log_dir=logs, user=USER, database=DATABASE)  # fmt: skip
    results: dict[Workload, list[dict[str, PgbenchResult]]] = {w: [] for w in WORKLOADS}
    progress = report.Progress(rounds * len(WORKLOADS) * len(TARGETS))
    for number in range(rounds):
        for index, workload in enumerate(WORKLOADS):
            this_round: dict[str, PgbenchResult] = {}
            for name in report.rotate(TARGETS, number + index):
                pooler = poolers.get(name)
                before = share.sample()
                pooler_before = None if pooler is None else process_cpu(pooler)
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
                after = share.sample()
                result = dataclasses.replace(
                    result,
                    other_cpu=share.other_fraction(before, after),
                    pooler_cpu=None
                    if pooler is None or pooler_before is None
                    else (process_cpu(pooler) - pooler_before) / (after.at - before.at),
                )
                this_round[name] = result
                progress(
                    f"round {number + 1} {workload.protocol} c{workload.clients} {name}: "
                    + _brief(name, result)
                )
            results[workload].append(this_round)
    return results


def _brief(name: str, result: PgbenchResult) -> str:
    tps = "no result" if result.tps is None else f"{result.tps:,.0f} tps"
    text = f"{tps}, p50 {result.p50_ms} ms, p99 {result.p99_ms} ms"
    if result.failed or result.aborted_clients or result.returncode:
        text += (
            f", {result.failed} failed, {result.aborted_clients} clients aborted, "
            f"exit {result.returncode}"
        )
    if result.pooler_cpu is not None:
        text += f", {name} used {result.pooler_cpu * 100:.0f}% of a core"
    if result.other_cpu is not None:
        text += f", others took {result.other_cpu * 100:.0f}% of the CPU"
    if result.errors:
        text += "; " + "; ".join(f"{n}× {t}" for t, n in result.errors)
    return text


def _proxy_pid(proxy: ProxyProcess) -> int:
    assert proxy.proc is not None
    return int(proxy.proc.pid)


def _idle_json(cost: IdleCost | None) -> dict[str, float] | None:
    if cost is None:
        return None
    return {
        "connections": cost.connections,
        "rss_before_kib": cost.rss_before_kib,
        "rss_after_kib": cost.rss_after_kib,
        "added_mib": round(cost.added_mib, 1),
    }


def _notes(rows: list[Row], bouncer: pgbouncer.PgBouncer, proxy: ProxyProcess) -> list[str]:
    notes = []
    version = ".".join(map(str, bouncer.version))
    prepared = [r for r in rows if r.workload.protocol == "prepared"]
    failed = sum(r.failed(PGBOUNCER) for r in prepared)
    aborted = sum(r.aborted(PGBOUNCER) for r in prepared)
    if not bouncer.supports_prepared:
        notes.append(
            f"PgBouncer {version} predates max_prepared_statements (1.21): in transaction "
            "mode it passes Parse and Bind to whichever server connection the client holds at "
            "that moment. pgbench prepares its statement once per connection, named P_0 on "
            "every connection. A Parse that lands where another client already prepared P_0 "
            "fails with `already exists` (pgbench logs it and goes on; the Bind then works, "
            "the text being the same); a Bind that lands where nobody prepared P_0 fails with "
            "`does not exist` and pgbench aborts that client. With one client PgBouncer keeps "
            "reusing the same server connection, so it works (an `already exists` there "
            "comes from P_0 left on a server connection by an earlier run: transaction mode "
            "resets nothing). In this run, -M "
            f"prepared through PgBouncer: {failed} failed transactions and {aborted} clients "
            "aborted over all rounds. An aborted client stops, so PgBouncer's TPS there is that "
            "of fewer clients and Shardwire's ratio to it means little."
        )
    for row in rows:
        for target in TARGETS:
            errors = row.errors(target)
            if errors:
                notes.append(
                    f"-M {row.workload.protocol} -c {row.workload.clients} through {target}, "
                    "pgbench's errors over all rounds: "
                    + "; ".join(f"{n}× `{t}`" for t, n in errors)
                )
    note = report.proxy_log_note("Shardwire", proxy)
    if note:
        notes.append(note)
    return notes


def _describe(
    cluster: PostgresCluster,
    bouncer: pgbouncer.PgBouncer,
    *,
    seconds: int,
    rounds: int,
    loadavg: str,
) -> dict[str, str]:
    cpu, memory, kernel = report.machine()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": str(len(os.sched_getaffinity(0))),
        "cpu": cpu,
        "memory": memory,
        "kernel": kernel,
        "postgres": "PostgreSQL " + cluster.sql("SHOW server_version"),
        "pgbouncer": "PgBouncer " + ".".join(map(str, bouncer.version)),
        "python": platform.python_version(),
        "shardwire": f"{shardwire.__version__} ({report.shardwire_source()})",
        "scale": str(SCALE),
        "db_size": cluster.sql(
            f"SELECT pg_size_pretty(pg_database_size('{DATABASE}'))", dbname=DATABASE
        ),
        "seconds": str(seconds),
        "rounds": str(rounds),
        "pool_size": str(POOL_SIZE),
        "loadavg": loadavg,
        "loadavg_after": "",
    }


if __name__ == "__main__":
    sys.exit(main())
