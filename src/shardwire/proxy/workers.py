"""`shardwire serve --workers N`: N proxy processes on one port (docs/operations.md, Several
worker processes).

The parent process serves no client. It starts N workers, each an ordinary `shardwire serve`
of the same config file with a hidden `--worker-of DIR --worker-index I`, which listen on the
config's port with SO_REUSEPORT: the kernel spreads new connections over them. The workers
share nothing but the config file and the catalog database, as separate proxies on separate
machines would (each has its own pools, caches, heat statistics and two-phase commit
instance, and registers with the rebalancer on its own).

What the parent does:

- passes SIGTERM, SIGINT and SIGHUP on to every worker, and exits when they all have;
- starts a worker again when one dies while the others serve (after a second, so that a
  worker that cannot start does not spin);
- serves the Prometheus endpoint (the config's `metrics` section), adding up the workers'
  figures; the workers serve none.

Figures are shared through files. Every second each worker writes a snapshot of its pools'
figures and its metrics to `DIR/worker-I.json` (a temporary file renamed over the old one, so
a reader never sees half a file). The admin console's SHOW STATS and SHOW POOLS add the other
workers' snapshots to the figures of the worker that answers, read live; SHOW WORKERS lists
the workers. So another worker's figures are at most about a second old; a snapshot older than
`STALE_AFTER` seconds (a worker stopped or stuck) is left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ..config.model import Config
    from .server import Proxy

log = logging.getLogger("shardwire.workers")

SNAPSHOT_INTERVAL = 1.0  # seconds between a worker's snapshots
STALE_AFTER = 5.0  # a snapshot older than this is left out of the sums
READY_TIMEOUT = 60.0  # seconds the parent waits for every worker's first snapshot
RESTART_DELAY = 1.0  # seconds before a worker that died is started again
MAX_WORKERS = 64

# Metric families that do not add up over workers: the largest value counts (the worst lag,
# the longest wait), the smallest (a server any worker's checks keep out is shown out), or
# one copy.
_LARGEST = {"shardwire_max_wait_seconds", "shardwire_paused", "shardwire_replica_lag_seconds"}
_SMALLEST = {"shardwire_server_up"}
_ONCE = {"shardwire_info"}


# -- in a worker ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """What the parent told a worker: its number and where the snapshots go."""

    index: int
    run_dir: Path

    @property
    def snapshot_path(self) -> Path:
        return self.run_dir / f"worker-{self.index}.json"


def worker_config(config: Config) -> Config:
    """A worker's config: the file's, without the metrics endpoint (the parent serves it)."""
    from dataclasses import replace
    return replace(config, metrics=None)


def die_with_parent() -> None:
    """Ask Linux to send SIGTERM to this worker when its parent dies, so that a parent killed
    with SIGKILL leaves no worker serving on its own (a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


class WorkerFigures:
    """A worker's side: publishes its snapshot every second, and adds the other workers'
    snapshots to its own figures for the admin console."""

    def __init__(self, role: WorkerRole, proxy: Proxy) -> None:
        self.role = role
        self.proxy = proxy
        self.parent = os.getppid()
        self._task: asyncio.Task[None] | None = None

    def reload_all(self) -> None:
        """RELOAD in the admin console reached this worker: have the parent pass SIGHUP on
        to every worker (this one reloads once more, which changes nothing)."""
        if os.getppid() == self.parent:
            with contextlib.suppress(OSError):
                os.kill(self.parent, signal.SIGHUP)

    def start(self) -> None:
        self.publish()  # the parent waits for the first one: it means "ready"
        self._task = asyncio.get_running_loop().create_task(self._publish_forever())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        with contextlib.suppress(OSError):
            self.role.snapshot_path.unlink()
        if os.getppid() != self.parent:
            # The parent died without cleaning up: the last worker out removes the directory.
            with contextlib.suppress(OSError):
                self.role.run_dir.rmdir()

    async def _publish_forever(self) -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_INTERVAL)
            try:
                self.publish()
            except OSError as e:  # the figures are not worth stopping a worker for
                log.warning("cannot write %s: %s", self.role.snapshot_path, e.strerror or e)

    def publish(self) -> None:
        path = self.role.snapshot_path
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.snapshot()))
        os.replace(tmp, path)

    def snapshot(self) -> dict[str, Any]:
        from .metrics import ProxyCollector
        proxy = self.proxy
        now = time.monotonic()
        pools = {}
        for key, pool in proxy.pools.items():
            s = pool.stats
            pools[key] = {
                "shard": pool.shard, "role": pool.role, "pool_size": pool.settings.size,
                "active": len(pool.active), "idle": len(pool.idle),
                "connecting": pool.connecting, "waiting_clients": len(pool.waiters),
                "max_wait_ms": int(pool.oldest_wait(now) * 1000), "last_error": pool.last_error,
                "transactions": s.transactions, "queries": s.queries, "bytes_in": s.bytes_in,
                "bytes_out": s.bytes_out, "waits": s.waits, "wait_time": s.wait_time,
                "connects": s.connects,
            }
        families = [{"name": f.name, "documentation": f.documentation, "type": f.type,
                     "unit": f.unit, "samples": [[s.name, s.labels, s.value] for s in f.samples]}
                    for f in ProxyCollector(proxy.metrics).collect()]
        return {"index": self.role.index, "pid": os.getpid(), "time": time.time(),
                "clients": len(proxy.clients), "config_loaded": proxy.config_stamp,
                "pools": pools, "metrics": families}

    def all_snapshots(self) -> list[dict[str, Any]]:
        """This worker's figures, live, and the other workers' fresh snapshots."""
        mine = self.snapshot()
        others = [s for s in read_snapshots(self.role.run_dir) if s["index"] != self.role.index]
        return [mine, *others]

    def stats_rows(self) -> list[tuple[object, ...]]:
        """SHOW STATS over every worker."""
        rows: list[tuple[object, ...]] = []
        for _, first, found in _pools_over(self.all_snapshots()):
            waits = sum(p["waits"] for p in found)
            wait_time = sum(p["wait_time"] for p in found)
            rows.append((first["shard"], first["role"],
                         *(sum(p[c] for p in found) for c in ("transactions", "queries",
                                                             "bytes_in", "bytes_out")),
                         waits, int(wait_time / waits * 1e6) if waits else 0,
                         sum(p["connects"] for p in found)))
        return rows

    def pools_rows(self) -> list[tuple[object, ...]]:
        """SHOW POOLS over every worker: sizes and counts add up (each worker has its own
        pools), the longest wait is the largest."""
        rows: list[tuple[object, ...]] = []
        for _, first, found in _pools_over(self.all_snapshots()):
            rows.append((first["shard"], first["role"],
                         *(sum(p[c] for p in found) for c in ("pool_size", "active", "idle",
                                                             "connecting", "waiting_clients")),
                         max(p["max_wait_ms"] for p in found),
                         next((p["last_error"] for p in found if p["last_error"]), None)))
        return rows

    def workers_rows(self) -> list[tuple[object, ...]]:
        """SHOW WORKERS: one row per worker whose snapshot is fresh."""
        now = time.time()
        rows: list[tuple[object, ...]] = []
        for s in sorted(self.all_snapshots(), key=lambda s: s["index"]):
            rows.append((s["index"], s["pid"], s["clients"],
                         sum(p["queries"] for p in s["pools"].values()),
                         round(now - s["time"], 3), s["config_loaded"],
                         s["index"] == self.role.index))
        return rows


def config_stamp(config: Config) -> str:
    """The config file's modification time now, read when the config is loaded: every worker
    that loaded the same version of the file shows the same stamp (an operator can check after
    SIGHUP that every worker shows the new one)."""
    path = config.path
    try:
        mtime = os.stat(path).st_mtime if path else None
    except OSError:
        mtime = None
    return "" if mtime is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(mtime)) + (
        f".{int(mtime % 1 * 1000):03d}")


def _pools_over(snapshots: Sequence[dict[str, Any]]
                ) -> Iterator[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
    """Each pool key (in the first snapshot's order, then new ones), its first entry and its
    entries in every snapshot."""
    keys: dict[str, list[dict[str, Any]]] = {}
    for s in snapshots:
        for key, pool in s["pools"].items():
            keys.setdefault(key, []).append(pool)
    for key, found in keys.items():
        yield key, found[0], found


def read_snapshots(run_dir: Path) -> list[dict[str, Any]]:
    """The workers' snapshots in `run_dir` that are fresh (written in the last STALE_AFTER
    seconds)."""
    out = []
    now = time.time()
    for path in sorted(run_dir.glob("worker-*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # gone, or (a worker killed mid-write of its temporary file) unreadable
        if isinstance(data, dict) and now - float(data.get("time", 0)) <= STALE_AFTER:
            out.append(data)
    return out


# -- the parent ----------------------------------------------------------------------------


class WorkersCollector(Collector):
    """The Prometheus figures of every worker, added up (read from their snapshots)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def collect(self) -> Iterator[Metric]:
        snapshots = read_snapshots(self.run_dir)
        families: dict[str, Metric] = {}
        values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        for snap in snapshots:
            for f in snap["metrics"]:
                name = f["name"]
                if name not in families:
                    families[name] = Metric(name, f["documentation"], f["type"], f["unit"])
                    values[name] = {}
                seen = values[name]
                for sample_name, labels, value in f["samples"]:
                    key = (sample_name, tuple(sorted(labels.items())))
                    if key not in seen:
                        seen[key] = value
                    elif name in _LARGEST:
                        seen[key] = max(seen[key], value)
                    elif name in _SMALLEST:
                        seen[key] = min(seen[key], value)
                    elif name not in _ONCE:
                        seen[key] += value
        for name, family in families.items():
            for (sample_name, labels), value in values[name].items():
                family.add_sample(sample_name, dict(labels), value)
            yield family
        yield GaugeMetricFamily(
            "shardwire_workers", "Worker processes (serve --workers) whose figures are added "
            "up here: those that wrote a snapshot in the last "
            f"{STALE_AFTER:g} seconds.", value=len(snapshots))
        age = GaugeMetricFamily("shardwire_worker_snapshot_age_seconds", "How old each "
                                "worker's figures are (they are written every second).",
                                labels=["worker"])
        now = time.time()
        for snap in snapshots:
            age.add_metric([str(snap["index"])], max(0.0, now - snap["time"]))
        yield age


class WorkerSupervisor:
    """The parent of `serve --workers N`."""

    def __init__(self, config: Config, count: int, log_level: str) -> None:
        self.config = config
        self.count = count
        self.log_level = log_level
        self.run_dir = Path(tempfile.mkdtemp(prefix="shardwire-workers-"))
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.stopping: signal.Signals | None = None
        self._restart_at: dict[int, float] = {}

    def run(self) -> int:
        assert self.config.path is not None
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        http = None
        try:
            for i in range(self.count):
                self._spawn(i)
            if not self._wait_ready():
                self._forward(signal.SIGTERM)
                self._wait_all(10)
                return 1
            http = self._serve_metrics()
            listen = self.config.listen
            print(f"shardwire ready on {listen.host}:{listen.port} ({self.count} workers)",
                  flush=True)
            self._supervise()
            return 0
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for proc in self.procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            if http is not None:
                http.shutdown()
                http.server_close()
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _spawn(self, index: int) -> None:
        assert self.config.path is not None
        args = [sys.executable, "-m", "shardwire.cli", "serve", "--config",
                str(self.config.path), "--log-level", self.log_level,
                "--worker-of", str(self.run_dir), "--worker-index", str(index)]
        # stdout is not passed on: a worker's ready line is not the parent's.
        self.procs[index] = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        log.info("worker %d started (pid %d)", index, self.procs[index].pid)

    def _on_signal(self, signum: int, frame: object) -> None:
        sig = signal.Signals(signum)
        if sig is signal.SIGHUP:
            log.info("SIGHUP: every worker reloads the config file")
        elif self.stopping is None or sig is signal.SIGINT:
            self.stopping = sig
        self._forward(sig)

    def _forward(self, sig: signal.Signals) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    def _wait_ready(self) -> bool:
        """Until every worker has written its first snapshot (it is serving then)."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and self.stopping is None:
            ready = {s["index"] for s in read_snapshots(self.run_dir)}
            if len(ready) == self.count:
                return True
            dead = [i for i, p in self.procs.items() if p.poll() is not None]
            if dead:
                print(f"shardwire: worker {dead[0]} exited with status "
                      f"{self.procs[dead[0]].returncode} before it served (its log is above)",
                      file=sys.stderr)
                return False
            time.sleep(0.05)
        if self.stopping is None:
            print(f"shardwire: the workers were not ready within {READY_TIMEOUT:g}s",
                  file=sys.stderr)
        return False

    def _supervise(self) -> None:
        while True:
            if self.stopping is not None:
                self._wait_all(None)
                return
            for index, proc in list(self.procs.items()):
                if proc.poll() is None:
                    continue
                at = self._restart_at.get(index)
                if at is None:
                    log.error("worker %d (pid %d) exited with status %s; starting it again",
                              index, proc.pid, proc.returncode)
                    self._restart_at[index] = time.monotonic() + RESTART_DELAY
                elif time.monotonic() >= at and self.stopping is None:
                    del self._restart_at[index]
                    self._spawn(index)
            time.sleep(0.1)

    def _wait_all(self, timeout: float | None) -> None:
        """Until every worker has exited (they drain as `serve` does on SIGTERM)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for proc in self.procs.values():
            while proc.poll() is None:
                if deadline is not None and time.monotonic() > deadline:
                    return
                time.sleep(0.05)

    def _serve_metrics(self) -> Any:
        settings = self.config.metrics
        if settings is None:
            return None
        from prometheus_client import CollectorRegistry, start_http_server
        registry = CollectorRegistry()
        registry.register(WorkersCollector(self.run_dir))
        try:
            http, _ = start_http_server(settings.port, settings.host, registry=registry)
        except OSError as e:
            log.error("metrics endpoint cannot listen on %s:%s: %s; serving without it",
                      settings.host, settings.port, e.strerror or e)
            return None
        log.info("metrics endpoint on http://%s:%s/metrics (every worker's figures)",
                 settings.host, settings.port)
        return http


def workers_problem(config: Config, count: int) -> str | None:
    """Why `serve --workers count` cannot run with this config, or None."""
    if not 1 <= count <= MAX_WORKERS:
        return f"--workers must be between 1 and {MAX_WORKERS}, not {count}"
    if count > 1 and not hasattr(socket, "SO_REUSEPORT"):
        return "--workers needs SO_REUSEPORT, which this system does not have"
    return None
