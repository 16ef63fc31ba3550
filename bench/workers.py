"""Issue 7's `--workers` row: pgbench -S through `shardwire serve --workers 2` next to
`--workers 1`, in interleaved rounds, against one PostgreSQL server (scale 10).

What it shows: how much more a second proxy process gets through when one process is the
bottleneck. The proxy, PostgreSQL and pgbench share the machine, so with few cores the second
worker competes with them for CPU; read the figure together with the machine's core count
(printed with the results).

Usage: ``.venv/bin/python bench/workers.py``. Environment: BENCH_SECONDS (length of one
pgbench run, default 10), BENCH_ROUNDS (default 3), BENCH_CLIENTS (pgbench clients, default
8), BENCH_KEEP=1 to keep the work directory (logs, configs).

Writes a table to stdout and the figures to bench/results/workers.json.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
from pathlib import Path
from types import FrameType

from pgbench_run import PgbenchResult, Target, initialise, run_select_only
from run import DATABASE, USER, proxy_settings

from shardwire.testing import PostgresCluster, start_clusters
from shardwire.testing.proxy import ProxyProcess

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"
SCALE = 10
POOL_SIZE = 20  # per worker
WORKER_COUNTS = (1, 2)
WARMUP_SECONDS = 2


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


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> int:
    seconds = _env_int("BENCH_SECONDS", 10)
    rounds = _env_int("BENCH_ROUNDS", 3)
    clients = _env_int("BENCH_CLIENTS", 8)
    keep = os.environ.get("BENCH_KEEP", "") not in ("", "0")
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="shardwire-bench-workers-"))
    os.chmod(workdir, 0o711)  # the postgres OS user runs the server in here
    clusters: list[PostgresCluster] = []
    proxies: dict[int, ProxyProcess] = {}
    results: dict[int, list[PgbenchResult]] = {n: [] for n in WORKER_COUNTS}
    try:
        _progress(f"work directory {workdir}")
        clusters = start_clusters(workdir / "pg", 1, prefix="pg")
        (server,) = clusters
        server.sql(f"CREATE ROLE {USER} LOGIN")
        server.sql(f"CREATE DATABASE {DATABASE} OWNER {USER}")
        _progress(f"pgbench -i -s {SCALE}")
        initialise(Target(server.name, server.host, server.port), user=USER,
                   database=DATABASE, scale=SCALE)
        for n in WORKER_COUNTS:
            config = proxy_settings({"s1": server.dsn(DATABASE, user=USER)},
                                    pool={"size": POOL_SIZE})
            proxies[n] = ProxyProcess(config, workdir / f"workers-{n}", log_level="warning",
                                      workers=n).start(timeout=60)
        for r in range(1, rounds + 1):
            order = WORKER_COUNTS if r % 2 else tuple(reversed(WORKER_COUNTS))
            for n in order:
                proxy = proxies[n]
                target = Target(f"workers-{n}", proxy.host, proxy.port)
                run_select_only(target, protocol="simple", clients=clients,
                                seconds=WARMUP_SECONDS, log_dir=workdir / "warmup", user=USER,
                                database=DATABASE)
                result = run_select_only(target, protocol="simple", clients=clients,
                                         seconds=seconds, log_dir=workdir / f"round{r}",
                                         user=USER, database=DATABASE, tag=f"workers-{n}")
                results[n].append(result)
                _progress(f"round {r}: --workers {n}: {result.tps or 0:.0f} TPS, p99 "
                          f"{result.p99_ms} ms, failed {result.failed + result.aborted_clients}")
    except KeyboardInterrupt:
        _progress("interrupted")
        return 130
    finally:
        for proxy in proxies.values():
            proxy.stop(timeout=30)
        for cluster in clusters:
            cluster.stop(mode="immediate")
        if keep:
            _progress(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return _report(results, seconds=seconds, rounds=rounds, clients=clients)


def _report(results: dict[int, list[PgbenchResult]], *, seconds: int, rounds: int,
            clients: int) -> int:
    def median_tps(n: int) -> float | None:
        values = [r.tps for r in results[n] if r.tps is not None]
        return statistics.median(values) if values else None

    one, two = median_tps(1), median_tps(2)
    ratio = two / one if one and two else None
    cores = os.cpu_count()
    print(f"pgbench -S, simple protocol, {clients} clients, {seconds} s x {rounds} rounds, "
          f"{cores} CPU cores")
    print(f"{'setup':<12} {'median TPS':>11} {'p99 ms (median)':>16}")
    for n in WORKER_COUNTS:
        p99s = [r.p99_ms for r in results[n] if r.p99_ms is not None]
        tps = median_tps(n)
        print(f"--workers {n:<2} {tps or 0:>11.0f} "
              f"{statistics.median(p99s) if p99s else float('nan'):>16.2f}")
    if ratio is not None:
        print(f"--workers 2 / --workers 1: {ratio:.2f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "workers.json").write_text(json.dumps({
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_cores": cores, "clients": clients, "seconds": seconds, "rounds": rounds,
        "median_tps": {str(n): median_tps(n) for n in WORKER_COUNTS}, "ratio": ratio,
        "runs": {str(n): [{"tps": r.tps, "p99_ms": r.p99_ms, "failed": r.failed,
                           "aborted_clients": r.aborted_clients} for r in results[n]]
                 for n in WORKER_COUNTS},
    }, indent=2) + "\n")
    failures = sum(r.failed + r.aborted_clients + (1 if r.returncode else 0)
                   for runs in results.values() for r in runs)
    return 1 if failures or ratio is None else 0


if __name__ == "__main__":
    sys.exit(main())
