"""The Prometheus endpoint (docs/metrics.md): the proxy's own figures, read when scraped.

Nothing here runs per statement. The figures are the counters the proxy keeps anyway (the
pools' `PoolStats`, the router's cache hits, the coordinator's two-phase commits, the
clients' states: the same sources as the admin console's SHOW STATS, POOLS and CLIENTS),
plus the few this module owns, which the proxy adds to on cold paths (a statement run on
several shards, a statement refused, a recovery pass). `ProxyCollector.collect` reads them
at scrape time, and prometheus_client's HTTP server, in a daemon thread, serves the result.

Reading from another thread: the proxy is a single asyncio thread, and the scrape thread
only reads. Under the GIL, reading one attribute (an int, a float, a reference) is atomic,
and so are `len()` of a set, dict or deque and the C-level copies `list(a_set)` and
`list(a_dict.values())`, which run without returning to the interpreter loop, so no other
thread runs in the middle of them. Python-level iteration over a live container is not
(the event loop may add or remove an entry between two steps: "changed size during
iteration"), so every container is copied with one such call first and the copy is
iterated. Two figures read a moment apart may disagree by the statements run in between;
each one is a value the proxy really had, and counters never go backwards (except when
RELOAD replaces a pool or the router, which Prometheus treats as a counter reset).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from .. import __version__

if TYPE_CHECKING:
    from .server import Proxy
    from .twophase import RecoveryReport

log = logging.getLogger("shardwire.metrics")

# Client states as SHOW CLIENTS names them, plus `waiting` (for a server connection): always
# exported, at 0 when no client is in them, so dashboards show a line rather than a gap.
CLIENT_STATES = ("login", "starting", "idle", "active", "waiting", "admin")
SERVER_STATES = ("active", "idle", "connecting")


class ProxyMetrics:
    """The figures the proxy counts for metrics only, and the endpoint that serves them all.

    The proxy adds to `multi_shard` and `refused` on paths that are not the single-shard hot
    path, and hands over each recovery pass's report with `recovered`.
    """

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.multi_shard = 0  # statements run on several shards (scatter, distributed writes)
        # Statements the proxy answered with an error of its own (what a sharded setup cannot
        # do, an unreachable shard or directory...), by SQLSTATE class (its first two chars).
        self.refused: collections.Counter[str] = collections.Counter()
        self.last_recovery: RecoveryReport | None = None
        self.last_recovery_at = 0.0  # time.time() of the last recovery pass that finished
        self.registry = CollectorRegistry()
        self.registry.register(ProxyCollector(self))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def recovered(self, report: RecoveryReport) -> None:
        self.last_recovery, self.last_recovery_at = report, time.time()

    @property
    def port(self) -> int | None:
        """The port the endpoint listens on, or None when it does not."""
        return None if self._http is None else int(self._http.server_port)

    def start(self) -> None:
        """Serve /metrics if the config has a `metrics` section. A port that cannot be had
        is logged, and the proxy serves its clients anyway: Prometheus reports the target
        down, and the data path never depends on the observability path."""
        settings = self.proxy.config.metrics
        if settings is None or self._http is not None:
            return
        try:
            self._http, self._thread = start_http_server(
                settings.port, settings.host, registry=self.registry)
        except OSError as e:
            log.error("metrics endpoint cannot listen on %s:%s: %s; serving without it",
                      settings.host, settings.port, e.strerror or e)
            return
        log.info("metrics endpoint on http://%s:%s/metrics", settings.host, self.port)

    async def close(self) -> None:
        http, self._http = self._http, None
        if http is None:
            return
        # shutdown() waits for serve_forever to notice (up to half a second): not on the loop.
        await asyncio.to_thread(http.shutdown)
        http.server_close()
        if self._thread is not None:
            self._thread.join(timeout=1)
            self._thread = None


class ProxyCollector(Collector):
    """Reads the proxy's figures at each scrape; see the module docstring for why reading
    them from the HTTP server's thread is safe."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        proxy = self.metrics.proxy
        yield from self._clients(proxy)
        yield from self._pools(proxy)
        yield from self._routing(proxy)
        yield from self._two_phase(proxy)
        yield from self._admission(proxy)
        info = GaugeMetricFamily("shardwire_info", "Shardwire's version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info

    def _clients(self, proxy: Proxy) -> Iterator[Metric]:
        counts = dict.fromkeys(CLIENT_STATES, 0)
        for client in list(proxy.clients):  # one C-level copy (module docstring)
            state = "waiting" if client.acquiring else client.state
            counts[state] = counts.get(state, 0) + 1
        clients = GaugeMetricFamily(
            "shardwire_clients", "Client connections by state: login (authenticating), "
            "starting, idle, active (holding a server connection or running a statement on "
            "several shards), waiting (for a server connection), admin (admin console).",
            labels=["state"])
        for state, n in counts.items():
            clients.add_metric([state], n)
        yield clients
        yield GaugeMetricFamily(
            "shardwire_clients_limit", "listen.max_client_connections: client connections "
            "beyond it are refused with SQLSTATE 53300.",
            value=proxy.config.listen.max_client_connections)

    def _pools(self, proxy: Proxy) -> Iterator[Metric]:
        labels = ["shard", "role", "server"]
        servers = GaugeMetricFamily(
            "shardwire_server_connections", "Server connections by state: active (held by a "
            "client or being reset), idle (in the pool), connecting.",
            labels=[*labels, "state"])
        size = GaugeMetricFamily("shardwire_pool_size", "pool.size: the most server "
                                 "connections to the shard server.", labels=labels)
        waiting = GaugeMetricFamily("shardwire_waiting_clients", "Clients queued for a "
                                    "server connection of the shard server.", labels=labels)
        max_wait = GaugeMetricFamily("shardwire_max_wait_seconds", "How long the client "
                                     "queued longest for a server connection has waited.",
                                     labels=labels)
        counters = {
            "queries": CounterMetricFamily(
                "shardwire_queries", "Query messages and extended-protocol Syncs sent to "
                "the shard server (a statement on several shards counts on each).",
                labels=labels),
            "transactions": CounterMetricFamily(
                "shardwire_transactions", "Server connections given back to the pool: in "
                "transaction pooling one per transaction (a statement outside BEGIN is one), "
                "in session pooling one per session.", labels=labels),
            "bytes_in": CounterMetricFamily(
                "shardwire_sent_bytes", "Bytes sent to the shard server.",
                labels=labels, unit="bytes"),
            "bytes_out": CounterMetricFamily(
                "shardwire_received_bytes", "Bytes of the shard server's replies relayed to "
                "clients as they are (replies merged from several shards are not counted).",
                labels=labels, unit="bytes"),
            "waits": CounterMetricFamily(
                "shardwire_waits", "Clients that queued for a server connection.",
                labels=labels),
            "wait_time": CounterMetricFamily(
                "shardwire_wait_seconds", "Time clients spent queued for a server "
                "connection; divided by shardwire_waits_total, the average wait.",
                labels=labels, unit="seconds"),
            "connects": CounterMetricFamily(
                "shardwire_server_connects", "Server connections opened.", labels=labels),
            "errors": CounterMetricFamily(
                "shardwire_server_errors", "ErrorResponses from the shard server to "
                "statements relayed to one shard.", labels=labels),
        }
        up = GaugeMetricFamily(
            "shardwire_server_up", "1 while the server is in rotation, 0 while health checks "
            "(or a failed connect) keep it out (docs/operations.md).", labels=labels)
        lag = GaugeMetricFamily(
            "shardwire_replica_lag_seconds", "A replica's replay lag as its last health check "
            "measured it (an upper bound: docs/operations.md); absent until measured.",
            labels=labels, unit="seconds")
        now = time.monotonic()
        for pool in list(proxy.pools.values()):
            address = pool.address
            values = [pool.shard, pool.role, f"{address.host}:{address.port}"]
            up.add_metric(values, 1 if pool.up else 0)
            if pool.is_replica and pool.lag is not None:
                lag.add_metric(values, pool.lag)
            servers.add_metric([*values, "active"], len(pool.active))
            servers.add_metric([*values, "idle"], len(pool.idle))
            servers.add_metric([*values, "connecting"], pool.connecting)
            size.add_metric(values, pool.settings.size)
            waiting.add_metric(values, len(pool.waiters))
            started = list(pool.wait_started.values())
            max_wait.add_metric(values, max((now - t for t in started), default=0.0))
            stats = pool.stats
            for name, family in counters.items():
                family.add_metric(values, getattr(stats, name))
        yield from (servers, size, waiting, max_wait, up, lag, *counters.values())

    def _routing(self, proxy: Proxy) -> Iterator[Metric]:
        router = proxy.router  # RELOAD replaces it (and its counts) with a new one
        yield CounterMetricFamily(
            "shardwire_route_cache_hits", "Statements whose routing analysis came from the "
            "router's cache (by text, literals aside).", value=router.hits)
        yield CounterMetricFamily(
            "shardwire_route_cache_misses", "Statements the router had to analyse.",
            value=router.misses)
        yield CounterMetricFamily(
            "shardwire_multi_shard_statements", "Statements run on several shards: merged "
            "reads, writes on several shards (all or nothing), DDL on every shard.",
            value=self.metrics.multi_shard)
        refused = CounterMetricFamily(
            "shardwire_refused_statements", "Statements the proxy answered with an error of "
            "its own, by SQLSTATE class: 0A (what a sharded setup cannot do), 08 (a shard "
            "or the directory unreachable), ...", labels=["sqlstate_class"])
        for sqlstate_class, n in dict(self.metrics.refused).items():
            refused.add_metric([sqlstate_class], n)
        yield refused

    def _admission(self, proxy: Proxy) -> Iterator[Metric]:
        admission = proxy.admission  # admission.py
        rejected = CounterMetricFamily(
            "shardwire_admission_rejected", "Work refused by admission control: queue_full "
            "(53300, a limit's queue was full), timeout (57014, waited limits.wait_timeout), "
            "rate (53400, a tenant over limits.tenant_statements_per_second).",
            labels=["reason"])
        counts = dict(admission.rejected)
        for reason in ("queue_full", "timeout", "rate"):
            rejected.add_metric([reason], counts.get(reason, 0))
        yield rejected
        yield GaugeMetricFamily(
            "shardwire_paused", "1 while PAUSE holds new work (of some database), else 0.",
            value=1 if admission.paused else 0)

    def _two_phase(self, proxy: Proxy) -> Iterator[Metric]:
        coordinator = proxy.coordinator
        yield CounterMetricFamily(
            "shardwire_two_phase_commits", "Transactions committed on several shards with "
            "two-phase commit.", value=coordinator.commits)
        yield CounterMetricFamily(
            "shardwire_two_phase_aborts", "Two-phase commits that ended rolled back on every "
            "shard (a shard could not prepare, or the decision could not be recorded).",
            value=coordinator.aborts)
        report, at = self.metrics.last_recovery, self.metrics.last_recovery_at
        if report is None:
            return  # no recovery pass has finished yet: nothing known, nothing exported
        yield GaugeMetricFamily(
            "shardwire_in_doubt_transactions", "Prepared transactions the last recovery pass "
            "left unresolved (undecided and younger than transactions.recovery_min_age, or "
            "failed to finish).", value=len(report.left_young) + len(report.failed))
        yield GaugeMetricFamily(
            "shardwire_recovery_unreachable_shards", "Shards the last recovery pass could "
            "not look at.", value=len(report.unreachable))
        yield GaugeMetricFamily(
            "shardwire_recovery_last_run_timestamp_seconds", "When the last recovery pass "
            "finished (Unix time).", value=at)
