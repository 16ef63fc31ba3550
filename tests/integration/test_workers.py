"""`shardwire serve --workers N`: N proxy processes on one port. Clients land on every worker
and are served; SHOW STATS, SHOW POOLS and the Prometheus endpoint add up every worker's
figures; SIGHUP reloads every worker, SIGTERM stops them all; a worker that dies is started
again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import ADMIN_PASSWORD, APP_PASSWORD, PROXY_ENV, base_config
from prometheus_client.parser import text_string_to_metric_families

from shardwire.testing import PostgresCluster, free_port
from shardwire.testing.proxy import ProxyProcess

WORKERS = 2
SNAPSHOT_WAIT = 2.5  # seconds: a snapshot is written every second


@pytest.fixture
def workers_proxy(shards: list[PostgresCluster], tmp_path: Path) -> Iterator[ProxyProcess]:
    cfg = base_config(shards)
    cfg["metrics"] = {"host": "127.0.0.1", "port": free_port()}
    proxy = ProxyProcess(cfg, tmp_path / "proxy", env=PROXY_ENV, workers=WORKERS).start(30)
    assert f"({WORKERS} workers)".encode() in proxy.ready_line, proxy.ready_line
    yield proxy
    proxy.stop(timeout=30)


def admin(proxy: ProxyProcess, command: str) -> list[dict[str, Any]]:
    """`command` in the admin console (of whichever worker takes the connection)."""
    with psycopg.connect(proxy.dsn("admin", ADMIN_PASSWORD, database="shardwire"),
                         autocommit=True, cursor_factory=psycopg.ClientCursor,
                         connect_timeout=10) as conn:
        cur = conn.execute(command)
        assert cur.description is not None
        names = [d.name for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def s1_stats(proxy: ProxyProcess) -> dict[str, Any]:
    (row,) = [r for r in admin(proxy, "SHOW STATS") if (r["shard"], r["role"]) ==
              ("s1", "primary")]
    return row


def scrape(proxy: ProxyProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    port = proxy.config["metrics"]["port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def eventually(check: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"{check.__name__} still false after {seconds}s"
        time.sleep(0.2)


def test_clients_spread_over_workers_and_stats_add_up(workers_proxy: ProxyProcess) -> None:
    proxy = workers_proxy
    dsn = proxy.dsn("app", APP_PASSWORD)
    conns = [psycopg.connect(dsn, autocommit=True, connect_timeout=10) for _ in range(16)]
    try:
        time.sleep(SNAPSHOT_WAIT)
        workers = admin(proxy, "SHOW WORKERS")
        assert sorted(w["worker"] for w in workers) == list(range(WORKERS))
        assert len({w["pid"] for w in workers}) == WORKERS
        assert all(w["snapshot_age_s"] < 2.5 for w in workers), workers
        # The kernel spreads connections over the workers: each has some of the 16 (the
        # admin connection adds one to its worker).
        assert all(w["clients"] > 0 for w in workers), workers
        assert sum(w["clients"] for w in workers) == 16 + 1
        before = s1_stats(proxy)
        statements = 48
        for i in range(statements):
            row = conns[i % len(conns)].execute("SELECT %s::int * 2", (i,)).fetchone()
            assert row == (i * 2,)
        time.sleep(SNAPSHOT_WAIT)
        after = s1_stats(proxy)
        # Every statement counted once, whichever worker ran it.
        assert after["queries"] - before["queries"] == statements
        assert after["transactions"] - before["transactions"] == statements
        workers = admin(proxy, "SHOW WORKERS")
        assert sum(w["queries"] for w in workers) == after["queries"]
        assert all(w["queries"] > 0 for w in workers), workers
        pools = [r for r in admin(proxy, "SHOW POOLS") if r["shard"] == "s1"]
        assert pools[0]["pool_size"] == WORKERS * 10  # each worker has its own pool
        # The parent's Prometheus endpoint: the same sums.
        metrics = scrape(proxy)
        s1 = next(k[1] for k in metrics if k[0] == "shardwire_pool_size" and ("shard", "s1")
                  in k[1])
        labels = tuple(sorted({**dict(s1), "role": "primary"}.items()))
        assert metrics[("shardwire_queries_total", labels)] == after["queries"]
        assert metrics[("shardwire_transactions_total", labels)] == after["transactions"]
        assert metrics[("shardwire_workers", ())] == WORKERS
        assert metrics[("shardwire_clients", (("state", "idle"),))] == 16
        assert metrics[("shardwire_pool_size", labels)] == WORKERS * 10
        assert metrics[("shardwire_info", (("version", _version()),))] == 1
    finally:
        for conn in conns:
            conn.close()


def _version() -> str:
    from shardwire import __version__
    return __version__


def test_sighup_reloads_every_worker(workers_proxy: ProxyProcess) -> None:
    proxy = workers_proxy
    dsn = proxy.dsn("app", APP_PASSWORD)
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as kept:
        assert kept.execute("SELECT 1").fetchone() == (1,)
        cfg = dict(proxy.config)
        cfg["pool"] = {**cfg["pool"], "size": 7}
        proxy.write_config(cfg)
        proxy.signal(signal.SIGHUP)

        def every_worker_has_the_new_size() -> bool:
            pools = [r for r in admin(proxy, "SHOW POOLS") if r["shard"] == "s1"]
            return pools[0]["pool_size"] == WORKERS * 7  # 7 + 10 if one worker missed it

        eventually(every_worker_has_the_new_size)

        def every_worker_shows_one_stamp() -> bool:
            # The other workers' rows are their last snapshots (up to a second old): one may
            # predate its reload even once the pool sizes above agree.
            stamps = {w["config_loaded"] for w in admin(proxy, "SHOW WORKERS")}
            return len(stamps) == 1 and "" not in stamps

        eventually(every_worker_shows_one_stamp)
        # Nobody was dropped.
        assert kept.execute("SELECT 2").fetchone() == (2,)


def test_sigterm_stops_every_worker(workers_proxy: ProxyProcess) -> None:
    proxy = workers_proxy
    time.sleep(SNAPSHOT_WAIT)
    pids = {w["pid"] for w in admin(proxy, "SHOW WORKERS")}
    assert len(pids) == WORKERS
    assert proxy.proc is not None
    proxy.signal(signal.SIGTERM)
    assert proxy.proc.wait(30) == 0
    for pid in pids:
        assert not _alive(pid), f"worker {pid} outlived the parent's SIGTERM"
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn("app", APP_PASSWORD), connect_timeout=3)


def test_a_worker_that_dies_is_started_again(workers_proxy: ProxyProcess) -> None:
    proxy = workers_proxy
    time.sleep(SNAPSHOT_WAIT)
    victim = admin(proxy, "SHOW WORKERS")[0]
    os.kill(victim["pid"], signal.SIGKILL)

    def replaced() -> bool:
        try:
            rows = admin(proxy, "SHOW WORKERS")
        except psycopg.OperationalError:
            # A connection the kernel queued at the killed worker's socket is reset: the
            # clients of a worker that dies see that, as those of a single proxy would.
            return False
        return len(rows) == WORKERS and victim["pid"] not in {w["pid"] for w in rows}

    eventually(replaced, 20)
    for _ in range(8):  # whichever worker a connection lands on serves it
        with psycopg.connect(proxy.dsn("app", APP_PASSWORD), connect_timeout=10) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent's wait is missing.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def test_reload_in_the_admin_console_reloads_every_worker(workers_proxy: ProxyProcess) -> None:
    proxy = workers_proxy
    cfg = dict(proxy.config)
    cfg["pool"] = {**cfg["pool"], "size": 5}
    proxy.write_config(cfg)
    admin_dsn = proxy.dsn("admin", ADMIN_PASSWORD, database="shardwire")
    with psycopg.connect(admin_dsn, autocommit=True, cursor_factory=psycopg.ClientCursor,
                         connect_timeout=10) as conn:
        conn.execute("RELOAD")

    def every_worker_has_the_new_size() -> bool:
        pools = [r for r in admin(proxy, "SHOW POOLS") if r["shard"] == "s1"]
        return pools[0]["pool_size"] == WORKERS * 5

    eventually(every_worker_has_the_new_size)


def test_workers_stop_when_the_parent_is_killed(workers_proxy: ProxyProcess) -> None:
    proxy = workers_proxy
    time.sleep(SNAPSHOT_WAIT)
    pids = {w["pid"] for w in admin(proxy, "SHOW WORKERS")}
    assert proxy.proc is not None
    proxy.proc.kill()  # SIGKILL: the parent cannot pass anything on
    proxy.proc.wait()
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, "workers outlived their parent"
        time.sleep(0.2)



def test_workers_out_of_range_are_refused(shards: list[PostgresCluster], tmp_path: Path) -> None:
    proxy = ProxyProcess(base_config(shards), tmp_path / "proxy", env=PROXY_ENV)
    result = subprocess.run(
        [sys.executable, "-m", "shardwire.cli", "serve", "--config", str(proxy.config_path),
         "--workers", "0"], capture_output=True, text=True, timeout=60, env=proxy.env)
    assert result.returncode == 2
    assert "--workers must be between 1 and 64, not 0" in result.stderr
