"""Read throughput with a streaming replica versus the primary alone: ``pgbench -S`` through
Shardwire, in interleaved rounds.

Setups (one shard, pgbench's tables at scale 10, all on the default shard):

- primary only: the shard has no replicas (Shardwire forwards without routing);
- routed: the same shard with a replica but ``replicas.target: primary``: every statement
  takes the routed path (needed to tell reads from writes) and runs on the primary, the cost
  of routing alone;
- replica: the same shard with one ``pg_basebackup -R`` replica; every pgbench read is a plain
  read outside a transaction, so all of them run on the replica (routed path);
- any: ``replicas.target: any``, reads alternate between the primary and the replica.

On a small machine the servers share the same cores, so the replica adds no capacity: the
figures show the cost of the read/write split (routing each statement, choosing a server),
not the gain of a real second machine.

Usage: ``.venv/bin/python bench/replicas.py``. Environment: BENCH_SECONDS (one run, default
5), BENCH_ROUNDS (default 2). Prints a table and writes bench/results/replicas.json.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

from pgbench_run import Target, initialise, run_select_only
from run import DATABASE, USER, proxy_settings

from shardwire.testing import PostgresCluster, stop_clusters
from shardwire.testing.proxy import ProxyProcess

SCALE = 10
CLIENTS = 8
POOL_SIZE = 20
RESULTS = Path(__file__).parent / "results"


def _config(primary: PostgresCluster, replica: PostgresCluster | None,
            target: str = "replica") -> dict[str, Any]:
    config = proxy_settings({"s1": primary.dsn(DATABASE, user=USER)},
                            pool={"size": POOL_SIZE}, replicas={"target": target})
    if replica is not None:
        config["shards"]["s1"]["replicas"] = [replica.dsn(DATABASE, user=USER)]
    return config


def main() -> int:
    seconds = int(os.environ.get("BENCH_SECONDS", "5"))
    rounds = int(os.environ.get("BENCH_ROUNDS", "2"))
    work = Path(tempfile.mkdtemp(prefix="shardwire-bench-replicas-"))
    os.chmod(work, 0o755)
    primary = PostgresCluster(work / "primary", name="primary")
    clusters = [primary]
    proxies: dict[str, ProxyProcess] = {}
    try:
        primary.init()
        primary.start()
        primary.sql(f"CREATE ROLE {USER} LOGIN")
        primary.sql(f"CREATE DATABASE {DATABASE} OWNER {USER}")
        initialise(Target("direct", primary.host, primary.port), user=USER,
                   database=DATABASE, scale=SCALE)
        replica = primary.create_replica(work / "replica", name="replica")
        clusters.append(replica)
        primary.wait_streaming(replica)
        setups = {
            "primary only": _config(primary, None),
            "routed": _config(primary, replica, "primary"),
            "replica": _config(primary, replica),
            "any": _config(primary, replica, "any"),
        }
        for name, cfg in setups.items():
            proxies[name] = ProxyProcess(cfg, work / name.replace(" ", "_"),
                                         log_level="warning").start()
        results: dict[str, dict[str, list[float]]] = {
            name: {"simple": [], "prepared": []} for name in setups}
        for r in range(rounds):
            for protocol in ("simple", "prepared"):
                for name, proxy in proxies.items():
                    run = run_select_only(
                        Target(name, proxy.host, proxy.port), protocol=protocol,
                        clients=CLIENTS, seconds=seconds, log_dir=work / "logs", user=USER,
                        database=DATABASE, tag=f"{name}-{protocol}-{r}")
                    if run.tps is None or run.failed or run.aborted_clients:
                        print(f"{name} {protocol}: pgbench failed: {run.errors}",
                              file=sys.stderr)
                        return 1
                    results[name][protocol].append(run.tps)
                    print(f"round {r + 1} {protocol:8} {name:12} {run.tps:9.0f} tps",
                          file=sys.stderr)
        print(f"pgbench -S, {CLIENTS} clients, {seconds}s x {rounds} rounds "
              "(best round), through Shardwire")
        print(f"{'setup':14} {'simple':>10} {'prepared':>10}")
        for name, by_protocol in results.items():
            print(f"{name:14} {max(by_protocol['simple']):10.0f} "
                  f"{max(by_protocol['prepared']):10.0f}")
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "replicas.json").write_text(json.dumps({
            "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "clients": CLIENTS, "seconds": seconds, "rounds": rounds, "scale": SCALE,
            "tps": results,
        }, indent=2) + "\n")
        return 0
    finally:
        for proxy in proxies.values():
            proxy.stop()
        stop_clusters(list(reversed(clusters)), mode="immediate")


if __name__ == "__main__":
    sys.exit(main())
