"""`shardwire demo` as a newcomer runs it: start, connect with the printed URL, Ctrl-C, again."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from shardwire.testing import PostgresCluster, free_port

READY_TIMEOUT = 60
STOP_TIMEOUT = 60
SHARDS = 2


class Demo:
    """One `shardwire demo` child process; stderr goes to a file shown when a test fails."""

    def __init__(self, data_dir: Path, port: int, log: Path) -> None:
        self.log = log
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "shardwire.cli", "demo", "--port", str(port),
                 "--data-dir", str(data_dir), "--shards", str(SHARDS)],
                stdout=subprocess.PIPE, stderr=err, text=True,
                env={k: v for k, v in os.environ.items() if not k.startswith("PG")})
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_ready(self) -> str:
        """The ready line."""
        deadline = time.monotonic() + READY_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                pytest.fail(f"the demo exited with {self.proc.wait()} before it was ready:\n"
                            f"{self.stderr()}")
            if "ready" in line:
                return line
        pytest.fail(f"no ready line within {READY_TIMEOUT}s:\n{self.stderr()}")

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the demo did not exit within {STOP_TIMEOUT}s of SIGINT:\n"
                        f"{self.stderr()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def demo_dir(tmp_path: Path) -> Iterator[Path]:
    data_dir = tmp_path / "demo"
    yield data_dir
    # Whatever happened in the test, no server of the demo outlives it.
    for i in range(1, SHARDS + 1):
        if (data_dir / f"shard{i}").is_dir():
            PostgresCluster(data_dir / f"shard{i}", name=f"shard{i}").stop(mode="immediate")


def urls(ready_line: str) -> tuple[str, str]:
    found = re.findall(r"postgresql://\S+", ready_line)
    assert len(found) == 2, ready_line
    app, admin = (u.rstrip(")") for u in found)
    return app, admin


def assert_shop_readable(url: str) -> dict[str, int]:
    with psycopg.connect(url, connect_timeout=10) as conn:
        counts = {table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                  for table in ("tenants", "customers", "products", "orders", "order_items",
                                "events", "countries")}
        # Tenant-owned rows carry their tenant: a join on it finds every order's customer.
        orphans = conn.execute(
            "SELECT count(*) FROM orders o LEFT JOIN customers c"
            " ON c.tenant_id = o.tenant_id AND c.customer_id = o.customer_id"
            " WHERE c.customer_id IS NULL").fetchone()[0]
    assert all(n > 0 for n in counts.values()), counts
    assert 200 <= sum(counts.values()) <= 2000, counts
    assert orphans == 0
    return counts


def show_shards(admin_url: str) -> list[tuple[object, ...]]:
    # The admin console speaks the simple query protocol, as psql does.
    with psycopg.connect(admin_url, autocommit=True, cursor_factory=psycopg.ClientCursor,
                         connect_timeout=10) as conn:
        return conn.execute("SHOW SHARDS").fetchall()


def assert_servers_gone(data_dir: Path) -> None:
    for i in range(1, SHARDS + 1):
        cluster = PostgresCluster(data_dir / f"shard{i}", name=f"shard{i}")
        assert cluster.exists()
        assert not cluster.is_running(), f"{cluster} still runs after the demo exited"
        assert not (cluster.data_dir / "postmaster.pid").exists()


def test_demo_starts_serves_stops_and_restarts(demo_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "demo.log"

    first = Demo(demo_dir, port, log)
    try:
        app_url, admin_url = urls(first.wait_ready())
        assert app_url == f"postgresql://demo:demo@127.0.0.1:{port}/demo"
        assert admin_url == f"postgresql://demo:demo@127.0.0.1:{port}/shardwire"
        counts = assert_shop_readable(app_url)
        shards = show_shards(admin_url)
        assert [row[0] for row in shards] == ["shard1", "shard2"]
        assert (demo_dir / "shardwire.yaml").is_file()
        assert first.interrupt() == 0
    finally:
        first.kill()
    assert_servers_gone(demo_dir)

    version_file = demo_dir / "shard1" / "PG_VERSION"
    created = version_file.stat()
    config = (demo_dir / "shardwire.yaml").read_text()

    second = Demo(demo_dir, port, log)
    try:
        app_url, admin_url = urls(second.wait_ready())
        # The same servers on the same ports, and the sample data was not loaded twice.
        assert version_file.stat().st_ino == created.st_ino
        assert version_file.stat().st_mtime_ns == created.st_mtime_ns
        assert (demo_dir / "shardwire.yaml").read_text() == config
        assert assert_shop_readable(app_url) == counts
        assert len(show_shards(admin_url)) == SHARDS
        assert second.interrupt() == 0
    finally:
        second.kill()
    assert_servers_gone(demo_dir)


def test_demo_refuses_a_taken_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "shardwire.cli", "demo", "--port", str(port),
             "--data-dir", str(tmp_path / "demo")],
            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"port {port} is taken; use --port" in result.stderr
    assert "ready" not in result.stdout
    # It gave up before creating any server.
    assert not (tmp_path / "demo" / "shard1").exists()
