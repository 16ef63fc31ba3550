"""The Docker image's commands, run here without Docker: docker/entrypoint.sh loads the demo's
sample shop with `demo-data`, validates the config and execs the proxy, and `health` tells a
serving proxy from a dead port. The servers are the session's real PostgreSQL clusters, in
place of compose's shard1..3 and catalog; the config is docker/shardwire.yaml with only their
addresses changed."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from shardwire.testing import PostgresCluster, PsqlError, free_port

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
DATABASE = "docker_demo"  # stands for each shard's `demo` database
CATALOG = "docker_catalog"  # stands for the catalog server's `shardwire_catalog`
DEMO_PASSWORD = "demo-secret"
READY_TIMEOUT = 60


@pytest.fixture(scope="module")
def servers(pg_clusters: list[PostgresCluster]) -> list[PostgresCluster]:
    for cluster in pg_clusters:
        cluster.create_database(DATABASE)
    pg_clusters[0].create_database(CATALOG)
    return pg_clusters


def local_config(servers: list[PostgresCluster], port: int) -> dict[str, Any]:
    """docker/shardwire.yaml, with the local servers for the compose services."""
    config = yaml.safe_load((ROOT / "docker" / "shardwire.yaml").read_text())
    config["listen"] = {"host": "127.0.0.1", "port": port}
    # The harness has no streaming replicas: each shard is its primary alone here.
    config["shards"] = {name: {"primary": c.dsn(DATABASE)}
                        for name, c in zip(config["shards"], servers, strict=True)}
    config["catalog"] = servers[0].dsn(CATALOG)
    return config


def environment(config_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PG", "SHARDWIRE_HEALTH"))}
    # The image's PATH: `shardwire` is the project's console script.
    bindir = str(Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), bindir, env["PATH"]])
    env.update(SHARDWIRE_CONFIG=str(config_path), DEMO_PASSWORD=DEMO_PASSWORD, **extra)
    return env


def entrypoint(env: dict[str, str], *args: str, timeout: float = 120
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(ENTRYPOINT), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


class Served:
    """The entrypoint started with no arguments, as `docker run` starts the image."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(["sh", str(ENTRYPOINT)], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        self.stderr.extend(self.proc.stderr)

    def wait_ready(self) -> str:
        deadline = time.monotonic() + READY_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                pytest.fail(f"exited with {self.proc.wait()}:\n{''.join(self.stderr)}")
            if "ready" in line:
                return line
        pytest.fail(f"not ready within {READY_TIMEOUT}s:\n{''.join(self.stderr)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def config_path(servers: list[PostgresCluster], tmp_path: Path) -> Path:
    path = tmp_path / "shardwire.yaml"
    path.write_text(yaml.safe_dump(local_config(servers, free_port()), sort_keys=False))
    return path


@pytest.fixture
def served(config_path: Path) -> Iterator[Served]:
    env = environment(config_path)
    loaded = entrypoint(env, "demo-data")
    assert loaded.returncode == 0, loaded.stderr
    proc = Served(env)
    yield proc
    proc.stop()


def on_shard(cluster: PostgresCluster, sql: str, database: str = DATABASE) -> list[tuple[Any, ...]]:
    with psycopg.connect(cluster.dsn(database), autocommit=True) as conn:
        return conn.execute(sql).fetchall()


def test_demo_data_puts_each_row_on_its_shard_and_runs_again_unchanged(
        servers: list[PostgresCluster], config_path: Path) -> None:
    env = environment(config_path)
    first = entrypoint(env, "demo-data")
    assert first.returncode == 0, first.stderr
    assert "sample data loaded on shard1, shard2, shard3" in first.stdout
    counts = [on_shard(c, "SELECT count(*) FROM tenants")[0][0] for c in servers]
    directory = on_shard(servers[0], "SELECT key, shard FROM shardwire_directory_by_user "
                                     "ORDER BY key", CATALOG)
    # As in docker/shardwire.yaml's map: tenants 1, 4 on shard1; 2, 5 on shard2; 3, 6, 7, 8
    # (the default) on shard3.
    assert counts == [2, 2, 4]
    assert on_shard(servers[2], "SELECT tenant_id FROM tenants ORDER BY 1") == [
        (3,), (6,), (7,), (8,)]
    assert {shard for _, shard in directory} == {"shard1", "shard2", "shard3"}
    # At every `docker compose up`: what is loaded stays as it is.
    again = entrypoint(env, "demo-data")
    assert again.returncode == 0, again.stderr
    assert "already loaded" in again.stderr
    assert on_shard(servers[0], "SELECT key, shard FROM shardwire_directory_by_user ORDER BY key",
                    CATALOG) == directory


def test_entrypoint_serves_the_demo_and_health_checks_it(
        servers: list[PostgresCluster], config_path: Path, served: Served) -> None:
    served.wait_ready()
    config = yaml.safe_load(config_path.read_text())
    port = config["listen"]["port"]
    # exec: the proxy is the process `docker stop` signals, not a shell in front of it.
    cmdline = Path(f"/proc/{served.proc.pid}/cmdline").read_bytes().split(b"\0")
    assert [Path(os.fsdecode(part)).name for part in cmdline[:3]][-2:] == ["shardwire", "serve"]
    assert Path(os.fsdecode(cmdline[0])).name not in ("sh", "dash", "bash")
    # The config was checked before it served.
    assert any(": ok (3 shards, 1 users)" in line for line in served.stderr)

    url = f"postgresql://demo:{DEMO_PASSWORD}@127.0.0.1:{port}/demo"
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        assert conn.execute("SELECT count(*) FROM tenants").fetchone() == (8,)
        assert conn.execute("SELECT name FROM tenants WHERE tenant_id = 3").fetchone() == (
            "Cedar Garden",)
        uid, shard = on_shard(servers[0], "SELECT key, shard FROM shardwire_directory_by_user "
                                          "WHERE shard = 'shard2' ORDER BY key LIMIT 1",
                              CATALOG)[0]
        # Through the directory in the catalog, to the user's shard.
        name = conn.execute("SELECT name FROM users WHERE user_id = %s", [uid]).fetchone()
        assert name == on_shard(servers[1], f"SELECT name FROM users WHERE user_id = {uid}")[0]

    env = environment(config_path)
    # As the image's HEALTHCHECK runs it: the entrypoint adds --config.
    anonymous = entrypoint(env, "health", "--timeout", "4", timeout=30)
    assert anonymous.returncode == 0, anonymous.stderr
    assert f"127.0.0.1:{port}: ok: answers a startup message" in anonymous.stdout
    logged_in = entrypoint({**env, "SHARDWIRE_HEALTH_USER": "demo",
                            "SHARDWIRE_HEALTH_PASSWORD": DEMO_PASSWORD}, "health", timeout=30)
    assert logged_in.returncode == 0, logged_in.stderr
    assert "ok: SHOW VERSION as demo in database shardwire (SHOW 1)" in logged_in.stdout
    through_proxy = entrypoint({**env, "SHARDWIRE_HEALTH_PASSWORD": DEMO_PASSWORD}, "health",
                               "--user", "demo", "--database", "demo", timeout=30)
    assert through_proxy.returncode == 0, through_proxy.stderr
    assert "ok: SELECT 1 as demo in database demo (SELECT 1)" in through_proxy.stdout
    wrong = entrypoint({**env, "SHARDWIRE_HEALTH_PASSWORD": "wrong"}, "health", "--user",
                       "demo", timeout=30)
    assert wrong.returncode == 1
    assert "unhealthy: SHOW VERSION as demo in database shardwire: 28P01" in wrong.stderr

    # docker stop: SIGTERM reaches the proxy, which exits.
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(20) == 0
    dead = entrypoint(env, "health", timeout=30)
    assert dead.returncode == 1
    assert dead.stderr.strip() == (f"127.0.0.1:{port}: unhealthy: connection refused: is the "
                                   "proxy running, and listening on this port?")
    assert dead.stdout == ""


def test_entrypoint_refuses_an_invalid_config_before_listening(
        servers: list[PostgresCluster], tmp_path: Path) -> None:
    port = free_port()
    config = local_config(servers, port)
    config["default_shard"] = "shard9"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = entrypoint(environment(path), timeout=60)
    assert result.returncode == 1
    assert "default_shard: 'shard9' is not one of the shards" in result.stderr
    assert "ready" not in result.stdout
    health = entrypoint(environment(path), "health", "--port", str(port), timeout=30)
    assert health.returncode == 1 and "connection refused" in health.stderr


def test_health_without_a_proxy_says_why_for_every_failure(tmp_path: Path) -> None:
    env = environment(tmp_path / "missing.yaml")
    port = free_port()
    refused = entrypoint(env, "health", "--port", str(port), timeout=30)
    assert refused.returncode == 1
    assert f"127.0.0.1:{port}: unhealthy: connection refused" in refused.stderr
    missing = entrypoint(env, "health", timeout=30)
    assert missing.returncode == 1
    assert "missing.yaml" in missing.stderr


# --- the replica's entrypoint ----------------------------------------------------------------


def test_replica_script_copies_the_primary_and_streams_from_it(
        servers: list[PostgresCluster], tmp_path: Path) -> None:
    """docker/postgres/replica.sh as compose runs it, with the postgres image's entrypoint
    replaced by a stub that starts the server the same way (`postgres` and the -c options)."""
    from shardwire.testing import pg_bindir
    from shardwire.testing.cluster import _server_user  # whom PostgreSQL runs as here

    primary = servers[1]
    slot = "docker_test_replica"
    role = "docker_replicator"
    # The primary's init script (docker/postgres/replication-user.sh), as the postgres image
    # runs it; here its pg_hba.conf line goes to a copy, the harness's servers trust 127.0.0.1.
    # What a failed earlier run on reused servers (SHARDWIRE_TEST_DIR) may have left.
    primary.sql(f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                f"WHERE slot_name = '{slot}'; DROP ROLE IF EXISTS {role}")
    hba = tmp_path / "primary"
    hba.mkdir()
    (hba / "pg_hba.conf").write_text("# the image's lines\n")
    init = subprocess.run(
        ["sh", str(ROOT / "docker" / "postgres" / "replication-user.sh")],
        env={"PATH": os.pathsep.join([str(pg_bindir()), os.environ["PATH"]]),
             "PGHOST": primary.host, "PGPORT": str(primary.port), "PGDATA": str(hba),
             "POSTGRES_USER": "postgres", "REPLICATION_USER": role,
             "REPLICATION_PASSWORD": "it's secret"},
        capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    assert (hba / "pg_hba.conf").read_text().endswith(
        f"host replication {role} all scram-sha-256\n")
    assert primary.sql(f"SELECT rolreplication, rolcanlogin, rolpassword LIKE 'SCRAM-SHA-256$%' "
                       f"FROM pg_authid WHERE rolname = '{role}'") == "t|t|t"
    replica = PostgresCluster(tmp_path / "replica", port=free_port(), name="replica")
    replica._prepare_dirs()  # an empty data directory the server user owns, as in the image
    stub = tmp_path / "stub"
    stub.mkdir(mode=0o755)
    (stub / "docker-entrypoint.sh").write_text(
        '#!/bin/sh\n[ "$1" = postgres ] && shift\nexec postgres -D "$PGDATA" "$@"\n')
    (stub / "docker-entrypoint.sh").chmod(0o755)
    user = _server_user()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(
        PATH=os.pathsep.join([str(stub), str(pg_bindir()), env["PATH"]]),
        PGDATA=str(replica.data_dir), PGPORT=str(primary.port),  # compose: 5432, the default
        PRIMARY_HOST=primary.host, REPLICATION_USER=role, REPLICATION_PASSWORD="it's secret",
        REPLICATION_SLOT=slot)
    if user is not None:
        env.update(HOME=user.home, USER=user.name)
    # The primary's settings come with the copy; the port and sockets are the replica's own.
    command = ["postgres", "-c", f"port={replica.port}", "-c", "unix_socket_directories=",
               "-c", "hot_standby=on"]

    def start() -> subprocess.Popen[str]:
        log = open(replica.log_path, "a")
        try:
            return subprocess.Popen(
                ["sh", str(ROOT / "docker" / "postgres" / "replica.sh"), *command], env=env,
                stdout=log, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                user=user.uid if user else None, group=user.gid if user else None)
        finally:
            log.close()

    def wait_accepting(proc: subprocess.Popen[str]) -> None:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the replica exited with {proc.returncode}:\n{replica.log_tail()}")
            try:
                replica.sql("SELECT 1", timeout=10)
                return
            except Exception:
                if time.monotonic() > deadline:
                    pytest.fail(f"the replica did not start:\n{replica.log_tail()}")
                time.sleep(0.5)

    def wait_for(sql: str, expected: str) -> None:
        """Until the replica has replayed what the primary committed (the table may not
        exist there yet)."""
        deadline = time.monotonic() + 30
        while True:
            try:
                got = replica.sql(sql, DATABASE)
            except PsqlError as e:
                got = str(e)
            if got == expected:
                return
            assert time.monotonic() < deadline, f"{sql}: {got!r}, expected {expected!r}"
            time.sleep(0.2)

    def copies() -> int:
        return replica.log_path.read_text().count("replica: copying")

    proc = start()
    try:
        wait_accepting(proc)
        assert copies() == 1
        assert replica.sql("SELECT pg_is_in_recovery()") == "t"
        primary.sql("DROP TABLE IF EXISTS docker_replica_probe; "
                    "CREATE TABLE docker_replica_probe (n int); "
                    "INSERT INTO docker_replica_probe VALUES (1), (2)", DATABASE)
        wait_for("SELECT count(*) FROM docker_replica_probe", "2")
        assert primary.sql(f"SELECT active FROM pg_replication_slots WHERE slot_name = '{slot}'"
                           ) == "t"
        # A restart finds the data directory and streams on, without copying again.
        replica.stop()
        proc.wait(30)
        primary.sql("INSERT INTO docker_replica_probe VALUES (3)", DATABASE)
        proc = start()
        wait_accepting(proc)
        wait_for("SELECT count(*) FROM docker_replica_probe", "3")
        assert copies() == 1
        # A replica whose volume was removed is copied again through the slot left behind.
        replica.stop()
        proc.wait(30)
        for entry in replica.data_dir.iterdir():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        proc = start()
        wait_accepting(proc)
        wait_for("SELECT count(*) FROM docker_replica_probe", "3")
        assert copies() == 2
    finally:
        if replica.is_running():
            replica.stop(mode="immediate")
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        primary.sql(f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                    f"WHERE slot_name = '{slot}'")
        primary.sql("DROP TABLE IF EXISTS docker_replica_probe", DATABASE)
        primary.sql(f"DROP ROLE IF EXISTS {role}")
