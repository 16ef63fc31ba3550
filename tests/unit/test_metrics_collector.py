"""The metrics endpoint without servers: its config section, and what a scrape of an idle
proxy shows (the live figures are checked in tests/integration/test_metrics.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shardwire.config import ConfigError, parse_config
from shardwire.config.model import MetricsSettings
from shardwire.config.settings import config_rows
from shardwire.proxy.server import Proxy

ROOT = Path(__file__).resolve().parents[2]

BASE: dict[str, Any] = {
    "database": "app",
    "auth": {"method": "trust"},
    "users": {"app": {}},
    "shards": {"s1": {"primary": "postgresql://u@127.0.0.1:1/app"},
               "s2": {"primary": "postgresql://u@127.0.0.1:2/app"}},
    "default_shard": "s1",
}


def config_text(**changes: Any) -> str:
    return yaml.safe_dump({**BASE, **changes})


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, env={})
    return info.value.problems


def test_without_a_metrics_section_there_is_no_endpoint() -> None:
    assert parse_config(config_text(), env={}).metrics is None
    assert parse_config(config_text(metrics=None), env={}).metrics is None


def test_the_metrics_section_gives_a_port_and_a_host() -> None:
    config = parse_config(config_text(metrics={"port": 9187}), env={})
    assert config.metrics == MetricsSettings(port=9187, host="127.0.0.1")
    config = parse_config(config_text(metrics={"port": 9187, "host": "0.0.0.0"}), env={})
    assert config.metrics == MetricsSettings(port=9187, host="0.0.0.0")
    rows = {row[0]: row[1:] for row in config_rows(config)}
    assert rows["metrics.port"] == ("9187", "", "no")
    assert rows["metrics.host"] == ("0.0.0.0", "", "no")


def test_the_port_can_come_from_the_environment() -> None:
    text = config_text(metrics={"port": "${METRICS_PORT}"})
    assert parse_config(text, env={"METRICS_PORT": "9300"}).metrics == MetricsSettings(9300)


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        ({"port": 0}, "metrics.port: must be from 1 to 65535, got 0"),
        ({"port": 65536}, "metrics.port: must be from 1 to 65535, got 65536"),
        ({"port": -1}, "metrics.port: must be from 1 to 65535, got -1"),
        ({"port": "nine"}, "metrics.port: expected an integer, got a string ('nine')"),
        ({"port": 9187.5}, "metrics.port: expected an integer, got a number (9187.5)"),
        ({"port": True}, "metrics.port: expected an integer, got a boolean (true)"),
        ({}, "metrics.port: required when metrics is set (the TCP port of the Prometheus "
             "endpoint, e.g. 9187)"),
        ({"host": "0.0.0.0"}, "metrics.port: required when metrics is set"),
        ({"port": 6432}, "metrics.port: must differ from listen.port (6432)"),
        ({"port": 9187, "host": ""}, "metrics.host: must not be empty"),
        ({"port": 9187, "path": "/m"},
         "metrics.path: unknown key (allowed: host, port)"),
        ("9187", "metrics: expected a mapping, got a string ('9187')"),
    ],
)
def test_a_bad_metrics_section_is_refused_with_its_key(metrics: Any, expected: str) -> None:
    found = problems(config_text(metrics=metrics))
    assert any(p.startswith(expected) for p in found), found


def test_port_at_the_top_level_still_points_to_listen() -> None:
    found = problems(config_text(port=7000))
    assert any(p.endswith("did you mean listen: {port: ...}?") for p in found), found


def scrape(proxy: Proxy) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(proxy.metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_an_idle_proxy_exports_every_family_at_zero() -> None:
    async def build() -> Proxy:
        return Proxy(parse_config(config_text(metrics={"port": 9187}), env={}))

    proxy = asyncio.run(build())
    samples = scrape(proxy)
    for state in ("login", "starting", "idle", "active", "waiting", "admin"):
        assert samples[("shardwire_clients", (("state", state),))] == 0
    for shard, port in (("s1", 1), ("s2", 2)):
        labels = (("role", "primary"), ("server", f"127.0.0.1:{port}"), ("shard", shard))
        for name in ("shardwire_queries_total", "shardwire_transactions_total",
                     "shardwire_sent_bytes_total", "shardwire_received_bytes_total",
                     "shardwire_waits_total", "shardwire_wait_seconds_total",
                     "shardwire_server_connects_total", "shardwire_server_errors_total",
                     "shardwire_waiting_clients", "shardwire_max_wait_seconds"):
            assert samples[(name, labels)] == 0, name
        assert samples[("shardwire_pool_size", labels)] == 20
        assert samples[("shardwire_server_up", labels)] == 1
        for state in ("active", "idle", "connecting"):
            assert samples[("shardwire_server_connections", (*labels, ("state", state)))] == 0
    for name in ("shardwire_route_cache_hits_total", "shardwire_route_cache_misses_total",
                 "shardwire_multi_shard_statements_total", "shardwire_two_phase_commits_total",
                 "shardwire_two_phase_aborts_total"):
        assert samples[(name, ())] == 0, name
    assert samples[("shardwire_clients_limit", ())] == 1000
    # No recovery pass has finished: the in-doubt count is unknown, so it is not exported.
    assert not any(name == "shardwire_in_doubt_transactions" for name, _ in samples)
    assert ("process_cpu_seconds_total", ()) in samples


def test_a_scrape_from_another_thread_survives_the_loop_changing_what_it_reads() -> None:
    """The scrape thread copies containers before iterating them: clients coming and going
    and clients starting to wait must never make a scrape fail."""

    async def build() -> Proxy:
        return Proxy(parse_config(config_text(), env={}))

    proxy = asyncio.run(build())
    pool = proxy.pool_for("s1")
    stop = threading.Event()
    failures: list[BaseException] = []

    def scrape_loop() -> None:
        while not stop.is_set():
            try:
                generate_latest(proxy.metrics.registry)
            except BaseException as e:  # noqa: BLE001 - reported below
                failures.append(e)
                return

    class FakeClient:
        acquiring = False
        state = "idle"

    thread = threading.Thread(target=scrape_loop)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, mid-iteration too
    thread.start()
    deadline = time.monotonic() + 0.5
    try:
        while time.monotonic() < deadline and not failures:
            for _ in range(200):
                client: Any = FakeClient()
                proxy.clients.add(client)
                pool.wait_started[client] = time.monotonic()
            proxy.clients.clear()
            pool.wait_started.clear()
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert failures == []


def test_the_docs_and_the_dashboard_name_exactly_the_metrics_exported() -> None:
    from shardwire.proxy.twophase import RecoveryReport

    async def build() -> Proxy:
        shards = {**BASE["shards"], "s2": {"primary": "postgresql://u@127.0.0.1:2/app",
                                           "replicas": ["postgresql://u@127.0.0.1:3/app"]}}
        return Proxy(parse_config(config_text(shards=shards), env={}))

    proxy = asyncio.run(build())
    replica = next(p for p in proxy.pools.values() if p.is_replica)
    replica.lag = 0.25  # as a health check measured it
    proxy.metrics.recovered(RecoveryReport())
    proxy.metrics.refused["0A"] += 1
    exported = {name for name, _ in scrape(proxy) if name.startswith("shardwire_")}
    docs = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `(shardwire_\w+)`", docs, re.MULTILINE))
    assert documented == exported
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {name for e in exprs for name in re.findall(r"\bshardwire_\w+", e)}
    assert used <= exported, used - exported
    # every figure has a panel; shardwire_info feeds the dashboard's variables instead
    assert exported - used == {"shardwire_clients_limit", "shardwire_info"}
    variables = [v["definition"] for v in dashboard["templating"]["list"]]
    assert all("shardwire_info" in v for v in variables)


def test_each_server_of_a_shard_has_its_own_series_and_a_replica_its_lag() -> None:
    async def build() -> Proxy:
        shards = {**BASE["shards"], "s2": {"primary": "postgresql://u@127.0.0.1:2/app",
                                           "replicas": ["postgresql://u@127.0.0.1:3/app",
                                                        "postgresql://u@127.0.0.1:4/app"]}}
        return Proxy(parse_config(config_text(shards=shards), env={}))

    proxy = asyncio.run(build())
    replicas = sorted((p for p in proxy.pools.values() if p.is_replica),
                      key=lambda p: p.address.port)
    replicas[0].lag, replicas[1].up = 1.5, False
    samples = scrape(proxy)
    sizes = {labels: v for (name, labels), v in samples.items()
             if name == "shardwire_pool_size" and ("shard", "s2") in labels}
    assert set(sizes) == {tuple(sorted({"shard": "s2", "role": role, "server": server}.items()))
                          for role, server in (("primary", "127.0.0.1:2"),
                                               ("replica", "127.0.0.1:3"),
                                               ("replica", "127.0.0.1:4"))}
    lags = {dict(labels)["server"]: v for (name, labels), v in samples.items()
            if name == "shardwire_replica_lag_seconds"}
    assert lags == {"127.0.0.1:3": 1.5}  # the other was not measured yet
    ups = {dict(labels)["server"]: v for (name, labels), v in samples.items()
           if name == "shardwire_server_up" and ("shard", "s2") in labels}
    assert ups == {"127.0.0.1:2": 1, "127.0.0.1:3": 1, "127.0.0.1:4": 0}


def test_a_port_already_taken_is_logged_and_the_proxy_goes_on_without_the_endpoint(
        caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def run() -> int | None:
            proxy = Proxy(parse_config(config_text(metrics={"port": port}), env={}))
            proxy.metrics.start()
            try:
                return proxy.metrics.port
            finally:
                await proxy.metrics.close()

        with caplog.at_level(logging.ERROR, logger="shardwire.metrics"):
            assert asyncio.run(run()) is None
    assert f"metrics endpoint cannot listen on 127.0.0.1:{port}" in caplog.text


def test_the_endpoint_serves_over_http_and_closes() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def run() -> str:
        proxy = Proxy(parse_config(config_text(metrics={"port": port}), env={}))
        proxy.metrics.start()
        assert proxy.metrics.port == port
        try:
            def get() -> str:
                url = f"http://127.0.0.1:{port}/metrics"
                with urllib.request.urlopen(url, timeout=5) as reply:
                    return str(reply.read().decode())
            return await asyncio.to_thread(get)
        finally:
            await proxy.metrics.close()

    text = asyncio.run(run())
    assert 'shardwire_clients{state="idle"} 0.0' in text
    with pytest.raises(OSError):  # closed: nothing listens there any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
