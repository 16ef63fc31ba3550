"""The Prometheus endpoint, end to end: a real proxy in front of the three real shards,
statements through it with psycopg, and the endpoint scraped over HTTP and parsed with
prometheus_client's own parser. Each check is what an operator would read off a dashboard:
the shard that got the statements counts them, a two-shard transaction is one two-phase
commit, a refused statement is counted by its SQLSTATE class, a queued client shows."""

from __future__ import annotations

import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from conftest import APP_PASSWORD, PROXY_ENV, assert_nothing_left_behind, base_config, on_shard
from prometheus_client.parser import text_string_to_metric_families

from shardwire.testing import PostgresCluster
from shardwire.testing.cluster import free_port
from shardwire.testing.proxy import ProxyProcess

SUFFIX = uuid.uuid4().hex[:8]
ITEMS = f"metrics_items_{SUFFIX}"
TENANT_SHARD = {1: 0, 2: 1, 3: 2}  # tenant -> index of its shard cluster

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    # Each shard here has one server (its primary): its `server` label is left out, so that
    # samples are looked up by shard and role (tests/unit/test_metrics_collector.py checks it).
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "server"))):
            s.value for family in text_string_to_metric_families(text) for s in family.samples}


def shard(name: str, shard_name: str, samples: Samples) -> float:
    return samples[(name, (("role", "primary"), ("shard", shard_name)))]


@pytest.fixture(scope="module")
def metrics_proxy(shards: list[PostgresCluster],
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProxyProcess, int]]:
    for cluster in shards:
        on_shard(cluster, f"create table {ITEMS} (id int primary key, tenant_id int, n int)")
    for tenant, index in TENANT_SHARD.items():
        on_shard(shards[index], f"insert into {ITEMS} values (%s, %s, 0), (%s, %s, 0)",
                 [tenant * 10, tenant, tenant * 10 + 1, tenant])
    port = free_port()
    cfg = base_config(shards)
    cfg["sharding"] = {"rules": {"metrics_by_tenant": {
        "kind": "tenant", "column": "tenant_id", "type": "integer", "tables": [ITEMS],
        "tenants": {1: "s1", 2: "s2", 3: "s3"}, "default": "s1"}}}
    # One server connection per shard, so that a second client of a busy shard must queue.
    cfg["pool"] = {"size": 1, "checkout_timeout": 10}
    cfg["transactions"] = {"recovery_interval": 1}
    cfg["metrics"] = {"host": "127.0.0.1", "port": port}
    proc = ProxyProcess(cfg, tmp_path_factory.mktemp("metrics-proxy"), env=PROXY_ENV).start()
    yield proc, port
    proc.stop()
    for cluster in shards:
        on_shard(cluster, f"drop table if exists {ITEMS}")


def test_statements_move_the_counters_of_the_shards_that_ran_them(
        metrics_proxy: tuple[ProxyProcess, int], shards: list[PostgresCluster]) -> None:
    proxy, port = metrics_proxy
    before = scrape(port)
    with psycopg.connect(proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
        for i in range(5):  # tenant 2 lives on s2
            assert conn.execute(f"select n from {ITEMS} where tenant_id = 2 and id = %s",
                                [20 + i % 2]).fetchone() == (0,)
        for _ in range(3):  # no key: every shard, merged
            assert conn.execute(f"select count(*) from {ITEMS}").fetchone() == (6,)
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute(f"select 1 / n from {ITEMS} where tenant_id = 2")
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute(f"select id, rank() over (order by n) from {ITEMS}")
    with psycopg.connect(proxy.dsn("app", APP_PASSWORD)) as conn:  # one transaction, 2 shards
        conn.execute(f"update {ITEMS} set n = n + 1 where tenant_id = 1 and id = 10")
        conn.execute(f"update {ITEMS} set n = n - 1 where tenant_id = 3 and id = 30")
        conn.commit()
    after = scrape(port)

    def grew(name: str, labels: tuple[tuple[str, str], ...] = ()) -> float:
        return after[(name, labels)] - before.get((name, labels), 0)

    def grew_on(name: str, shard_name: str) -> float:
        labels = (("role", "primary"), ("shard", shard_name))
        return after[(name, labels)] - before[(name, labels)]

    # s2: the five reads, the failed one, and its part of the three merged reads
    assert grew_on("shardwire_queries_total", "s2") >= 5 + 1 + 3
    assert grew_on("shardwire_transactions_total", "s2") >= 5
    assert grew_on("shardwire_sent_bytes_total", "s2") > 0
    assert grew_on("shardwire_received_bytes_total", "s2") > 0
    assert grew_on("shardwire_server_errors_total", "s2") == 1
    for other in ("s1", "s3"):  # the merged reads and the transaction reached them too
        assert grew_on("shardwire_queries_total", other) >= 3 + 1
        assert grew_on("shardwire_server_errors_total", other) == 0
    assert grew("shardwire_multi_shard_statements_total") == 3
    assert grew("shardwire_refused_statements_total", (("sqlstate_class", "0A"),)) == 1
    assert grew("shardwire_two_phase_commits_total") == 1
    assert grew("shardwire_two_phase_aborts_total") == 0
    # the same statement shape five times: analysed once at most, then from the cache
    assert grew("shardwire_route_cache_hits_total") >= 4
    assert on_shard(shards[0], f"select n from {ITEMS} where id = 10") == [(1,)]
    assert on_shard(shards[2], f"select n from {ITEMS} where id = 30") == [(-1,)]
    assert on_shard(shards[0], "select gid from pg_prepared_xacts") == []
    # the connections are back in their pools (one each: pool.size 1), and no client waits
    for name in ("s1", "s2", "s3"):
        idle = (("role", "primary"), ("shard", name), ("state", "idle"))
        assert after[("shardwire_server_connections", idle)] == 1
    assert after[("shardwire_clients", (("state", "active"),))] == 0
    assert after[("shardwire_clients", (("state", "waiting"),))] == 0
    assert_nothing_left_behind(proxy, shards)


def test_a_client_queued_for_a_busy_shard_shows_as_waiting_then_as_wait_time(
        metrics_proxy: tuple[ProxyProcess, int], shards: list[PostgresCluster]) -> None:
    proxy, port = metrics_proxy
    before = scrape(port)
    holder = psycopg.connect(proxy.dsn("app", APP_PASSWORD))
    try:
        # A transaction on s3 holds its only server connection.
        holder.execute(f"select n from {ITEMS} where tenant_id = 3 and id = 31")
        result: list[Any] = []

        def queued_read() -> None:
            with psycopg.connect(proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
                result.append(conn.execute(
                    f"select n from {ITEMS} where tenant_id = 3 and id = 31").fetchone())

        reader = threading.Thread(target=queued_read)
        reader.start()
        deadline = time.monotonic() + 10
        while True:
            during = scrape(port)
            if shard("shardwire_waiting_clients", "s3", during) == 1 or (
                    time.monotonic() > deadline):
                break
            time.sleep(0.05)
        assert shard("shardwire_waiting_clients", "s3", during) == 1
        assert during[("shardwire_clients", (("state", "waiting"),))] == 1
        assert during[("shardwire_clients", (("state", "active"),))] >= 1  # the holder
        active_s3 = (("role", "primary"), ("shard", "s3"), ("state", "active"))
        assert during[("shardwire_server_connections", active_s3)] == 1
        time.sleep(0.2)
        assert shard("shardwire_max_wait_seconds", "s3", scrape(port)) >= 0.2
    finally:
        holder.commit()
        holder.close()
    reader.join(timeout=10)
    assert result == [(0,)]
    after = scrape(port)
    assert shard("shardwire_waits_total", "s3", after) == shard(
        "shardwire_waits_total", "s3", before) + 1
    assert shard("shardwire_wait_seconds_total", "s3", after) - shard(
        "shardwire_wait_seconds_total", "s3", before) >= 0.2
    assert shard("shardwire_waiting_clients", "s3", after) == 0
    assert shard("shardwire_max_wait_seconds", "s3", after) == 0


def test_the_in_doubt_count_comes_from_the_last_recovery_pass(
        metrics_proxy: tuple[ProxyProcess, int]) -> None:
    _, port = metrics_proxy
    deadline = time.monotonic() + 10
    samples = scrape(port)
    while ("shardwire_in_doubt_transactions", ()) not in samples and (
            time.monotonic() < deadline):
        time.sleep(0.2)
        samples = scrape(port)
    assert samples[("shardwire_in_doubt_transactions", ())] == 0
    assert samples[("shardwire_recovery_unreachable_shards", ())] == 0
    assert abs(samples[("shardwire_recovery_last_run_timestamp_seconds", ())]
               - time.time()) < 30
    info = [v for (name, _), v in samples.items() if name == "shardwire_info"]
    assert info == [1]
