"""Instructions the proxy executes per statement: pgbench -S through Shardwire running under
valgrind's callgrind, which counts the instructions a process executes whatever else the
machine does. On this 2-core machine TPS swings by ±15% from one run to the next; the count
does not (the same setup twice agrees within 0.1%), so it tells what routing costs the proxy
apart from what a second server costs the machine (bench/sharded.py measures TPS).

Setups as in bench/sharded.py: *one-shard* (no sharding rules: the proxy forwards), *routed*
(pgbench_accounts range-sharded on aid over that one server: every statement is routed) and
*sharded* (two servers, split in the middle). Both servers hold every account, so every
query gets the same reply wherever it goes and only the proxy's work differs. For each
setup and protocol: pgbench -c 1 runs BENCH_STATEMENTS (default 3000) and then 500
statements, each after the counters were zeroed; the difference of the two counts, over the
difference of statements, is the count per statement with the connection's start and end
taken out. Writes the `bench:instructions` section of docs/benchmarks.md and
bench/results/instructions.json.

Usage: .venv/bin/python bench/instructions.py   (needs valgrind; about 6 minutes)"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import report
from pgbench_run import Target, initialise
from run import DATABASE, DOCS, RESULTS, USER, _env_int, _progress
from sharded import SETUPS, proxy_configs

import shardwire
from shardwire.testing import PostgresCluster, start_clusters, stop_clusters
from shardwire.testing.proxy import ProxyProcess

SCALE = 1  # the proxy's work per statement does not depend on the table's size
SPLIT = 50_001
PROTOCOLS = ("simple", "prepared")
WARM = 500
IDLE_SECONDS = 5
START_MARKER = "<!-- bench:instructions:start -->"
END_MARKER = "<!-- bench:instructions:end -->"


def main() -> int:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("bench/instructions.py skipped: valgrind is not installed "
              "(apt-get install -y valgrind)", file=sys.stderr)
        return 0
    statements = _env_int("BENCH_STATEMENTS", 3000)
    source = report.shardwire_source()  # before this run writes its results
    workdir = Path(tempfile.mkdtemp(prefix="shardwire-bench-instructions-"))
    os.chmod(workdir, 0o711)  # the postgres OS user runs the servers in here
    clusters: list[PostgresCluster] = []
    try:
        clusters = start_clusters(workdir / "pg", 2, prefix="pg")
        with ThreadPoolExecutor(max_workers=2) as pool:
            for future in [pool.submit(_fill, c) for c in clusters]:
                future.result()
        s1, s2 = (c.dsn(DATABASE, user=USER) for c in clusters)
        configs = proxy_configs(s1, s1, s2, SPLIT)  # both servers hold every account
        counts: dict[tuple[str, str], int] = {}
        jobs = [(setup, protocol) for setup in SETUPS for protocol in PROTOCOLS]
        # callgrind runs one thread at a time: two proxies at once use the two cores.
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = {
                (setup, protocol): pool.submit(
                    _count, configs[setup], protocol, statements, workdir / f"{setup}_{protocol}"
                )
                for setup, protocol in jobs
            }
            for job, counted in futures.items():
                counts[job] = counted.result()
                _progress(f"{job[0]} {job[1]}: {counts[job]:,} instructions a statement")
    finally:
        stop_clusters(clusters, mode="immediate")
        shutil.rmtree(workdir, ignore_errors=True)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    rows = []
    for protocol in PROTOCOLS:
        one, routed, sharded = (counts[(setup, protocol)] for setup in SETUPS)
        rows.append({
            "protocol": protocol, "one-shard": one, "routed": routed, "sharded": sharded,
            "routed_over_one_shard": round(routed / one, 3),
            "sharded_over_one_shard": round(sharded / one, 3),
        })  # fmt: skip
    report.write_json(
        RESULTS / "instructions.json", {"when": when, "statements": statements, "rows": rows}
    )
    section = _markdown(rows, when, statements, source)
    print(section)
    report.write_docs(DOCS, section)
    return 0


def _fill(cluster: PostgresCluster) -> None:
    cluster.sql(f"CREATE ROLE {USER} LOGIN")
    cluster.sql(f"CREATE DATABASE {DATABASE} OWNER {USER}")
    target = Target(cluster.name, cluster.host, cluster.port)
    initialise(target, user=USER, database=DATABASE, scale=SCALE)


def _count(config: dict[str, Any], protocol: str, statements: int, workdir: Path) -> int:
    """Instructions per statement of a proxy with `config` under pgbench -S -M `protocol`."""
    out = workdir / "callgrind.out"
    proxy = ProxyProcess(
        config,
        workdir,
        log_level="warning",
        wrapper=["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"],
    )
    proxy.start(timeout=300)
    assert proxy.proc is not None
    pid = str(proxy.proc.pid)
    target = Target("proxy", proxy.host, proxy.port)
    try:
        _pgbench(target, protocol, 200)  # the pool's connections, the caches: warm

        def measured(n: int) -> tuple[int, float]:
            """Instructions while pgbench runs `n` statements (none: 5 s idle), and seconds."""
            subprocess.run(["callgrind_control", "-z", pid], check=True, capture_output=True)
            start = time.monotonic()
            if n:
                _pgbench(target, protocol, n)
            else:
                time.sleep(IDLE_SECONDS)
            seconds = time.monotonic() - start
            before = set(workdir.glob("callgrind.out.*"))
            subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
            dumped = sorted(set(workdir.glob("callgrind.out.*")) - before)
            if len(dumped) != 1:
                raise RuntimeError(f"callgrind dumped {len(dumped)} files, not 1")
            found = re.search(r"^(?:summary|totals): (\d+)", dumped[0].read_text(), re.M)
            if found is None:
                raise RuntimeError(f"no total in {dumped[0]}")
            return int(found.group(1)), seconds

        (many, many_s), (few, few_s), (idle, idle_s) = (
            measured(statements), measured(WARM), measured(0))
    finally:
        proxy.stop(timeout=60)
    # The proxy's timers (heat's drain, health checks) run by the second, and a proxy under
    # callgrind answers a statement about 50 times slower than it would otherwise: their
    # instructions would weigh on each statement 50 times what they do, so they come off.
    per_second = idle / idle_s
    return round(((many - per_second * many_s) - (few - per_second * few_s))
                 / (statements - WARM))


def _pgbench(target: Target, protocol: str, transactions: int) -> None:
    args = [
        "pgbench", "-n", "-S", "-M", protocol, "-c", "1", "-t", str(transactions),
        "-h", target.host, "-p", str(target.port), "-U", USER, DATABASE,
    ]  # fmt: skip
    result = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    processed = re.search(r"actually processed: (\d+)", result.stdout)
    if result.returncode != 0 or processed is None or int(processed.group(1)) != transactions:
        raise RuntimeError(f"pgbench through the proxy failed:\n{result.stdout}\n{result.stderr}")


def _markdown(rows: list[dict[str, Any]], when: str, statements: int, source: str) -> str:
    lines = [
        START_MARKER,
        "## Instructions per statement in the proxy (callgrind)",
        "",
        f"Written by `.venv/bin/python bench/instructions.py` on {when} (Shardwire "
        f"{shardwire.__version__}, {source}). pgbench -S -c 1 through the "
        "proxy running under valgrind's callgrind: instructions the proxy executed per "
        f"statement ({statements:,} statements less {WARM}, each run after zeroing the "
        "counters). A count does not depend on the machine's load, so it shows what routing "
        "costs the proxy without the noise of the TPS rows; it counts the proxy's own "
        "instructions, not the kernel's for its sends and receives, nor cache misses or "
        "time. *routed*: the one-shard server behind a map that routes every "
        "statement; *sharded*: two servers, both holding every account, so that replies are "
        "the same as for one.",
        "",
        "| protocol | one-shard | routed | sharded | routed ÷ one-shard | sharded ÷ one-shard |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['protocol']} | {row['one-shard']:,} | {row['routed']:,} | {row['sharded']:,} "
            f"| {row['routed_over_one_shard']:.3f} | {row['sharded_over_one_shard']:.3f} |"
        )
    lines += ["", END_MARKER, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
