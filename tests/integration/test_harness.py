"""The cluster harness itself: the shards answer, with the settings and roles the suite needs."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from shardwire.testing import (
    MD5_PASSWORD,
    MD5_USER,
    SCRAM_PASSWORD,
    SCRAM_USER,
    ClusterError,
    PostgresCluster,
    PsqlError,
    free_port,
)

# libpq 16+ can insist on one authentication method, proving which one the server asked for.
REQUIRE_AUTH = psycopg.pq.version() >= 160000


def test_three_shards_answer(pg_clusters: list[PostgresCluster]) -> None:
    assert [c.name for c in pg_clusters] == ["shard1", "shard2", "shard3"]
    assert len({c.port for c in pg_clusters}) == 3
    for cluster in pg_clusters:
        assert cluster.is_running()
        assert cluster.sql("SELECT 1") == "1"
        with psycopg.connect(cluster.dsn()) as conn:
            row = conn.execute("SELECT current_setting('port')::int, current_user").fetchone()
        assert row == (cluster.port, "postgres")


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("max_prepared_transactions", "64"),
        ("wal_level", "logical"),
        ("fsync", "off"),
        ("synchronous_commit", "off"),
        ("full_page_writes", "off"),
        ("max_connections", "200"),
        ("max_wal_senders", "10"),
        ("max_replication_slots", "10"),
        ("shared_buffers", "64MB"),
        ("listen_addresses", "127.0.0.1"),
    ],
)
def test_settings_took_effect(
    pg_clusters: list[PostgresCluster], setting: str, expected: str
) -> None:
    assert [c.sql(f"SHOW {setting}") for c in pg_clusters] == [expected] * 3


def test_socket_is_in_the_private_directory(pg_clusters: list[PostgresCluster]) -> None:
    for cluster in pg_clusters:
        assert cluster.sql("SHOW unix_socket_directories") == str(cluster.socket_dir)
        assert (cluster.socket_dir / f".s.PGSQL.{cluster.port}").is_socket()


@pytest.mark.parametrize(
    ("user", "password", "method", "stored_prefix"),
    [
        (MD5_USER, MD5_PASSWORD, "md5", "md5"),
        (SCRAM_USER, SCRAM_PASSWORD, "scram-sha-256", "SCRAM-SHA-256$"),
    ],
)
def test_password_roles_log_in_over_tcp(
    pg_clusters: list[PostgresCluster], user: str, password: str, method: str, stored_prefix: str
) -> None:
    for cluster in pg_clusters:
        stored = cluster.sql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{user}'")
        assert stored.startswith(stored_prefix)
        dsn = cluster.dsn(user=user, password=password)
        if REQUIRE_AUTH:
            dsn += f"?require_auth={method}"
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user"
            ).fetchone()
        assert row == (user, True)


@pytest.mark.parametrize("user", [MD5_USER, SCRAM_USER])
def test_password_roles_refuse_a_wrong_password(
    pg_clusters: list[PostgresCluster], user: str
) -> None:
    cluster = pg_clusters[0]
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(cluster.dsn(user=user, password="wrong"), connect_timeout=5)
    # Neither role is trusted: no password is no login either.
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(cluster.dsn(user=user), passfile="/dev/null", connect_timeout=5)


def test_sql_error_carries_stderr(pg_clusters: list[PostgresCluster]) -> None:
    with pytest.raises(PsqlError) as caught:
        pg_clusters[0].sql("SELECT 1;\nSELEC 2;\nSELECT 3;")
    assert isinstance(caught.value, subprocess.CalledProcessError)
    assert "syntax error" in (caught.value.stderr or "")
    assert "syntax error" in str(caught.value)
    assert caught.value.output == "1\n"  # ON_ERROR_STOP: the third statement never ran


def test_sql_returns_rows_one_per_line(pg_clusters: list[PostgresCluster]) -> None:
    out = pg_clusters[1].sql("SELECT g, g * 2 FROM generate_series(1, 3) g")
    assert out == "1|2\n2|4\n3|6"


def test_create_database_is_idempotent(pg_clusters: list[PostgresCluster]) -> None:
    cluster = pg_clusters[2]
    cluster.create_database("sw harness")
    cluster.create_database("sw harness")
    assert cluster.sql("SELECT count(*) FROM pg_database WHERE datname = 'sw harness'") == "1"
    assert cluster.sql("SELECT current_database()", dbname="sw harness") == "sw harness"
    with psycopg.connect(cluster.dsn(dbname="sw harness")) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("sw harness",)


def test_dsn_quotes_user_password_and_database(tmp_path: Path) -> None:
    cluster = PostgresCluster(tmp_path / "never-started", port=5999)
    assert cluster.dsn() == "postgresql://postgres@127.0.0.1:5999/postgres"
    assert (
        cluster.dsn("my db", user="a@b", password="p:w/@")
        == "postgresql://a%40b:p%3Aw%2F%40@127.0.0.1:5999/my%20db"
    )


def test_free_port_is_bindable_and_not_repeated() -> None:
    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == 20
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))


def test_failing_tests_show_the_server_logs(tmp_path: Path) -> None:
    """The conftest hook appends each shard's log to the report of a failing test."""
    shutil.copy(Path(__file__).parents[1] / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_fails.py").write_text(
        "def test_passes(pg_clusters):\n"
        "    pg_clusters[0].sql('SELECT 1')\n"
        "\n"
        "def test_fails(pg_clusters):\n"
        "    pg_clusters[0].sql(\"SELECT 'marker-in-the-log'::int\")\n"
    )
    # Its own clusters in its own temp dir, never the ones of this session.
    env = {k: v for k, v in os.environ.items() if k != "SHARDWIRE_TEST_DIR"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--basetemp",
         str(tmp_path / "basetemp"), str(tmp_path / "test_fails.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert "1 failed, 1 passed" in out
    shard1_log = out[out.index("shard1 server log, since the test started") :]
    shard1_log = shard1_log[: shard1_log.index("shard2 server log")]
    assert "invalid input syntax for type integer" in shard1_log
    assert "ready to accept connections" not in shard1_log  # logged before this test
    assert "shard3 server log, since the test started" in out


# --- a cluster of its own, so crashing it disturbs no other test ---------------------------


@pytest.fixture(scope="module")
def spare(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresCluster]:
    cluster = PostgresCluster(tmp_path_factory.mktemp("spare") / "spare", name="spare")
    cluster.init()
    cluster.start()
    yield cluster
    cluster.stop()


def test_kill_then_start(spare: PostgresCluster) -> None:
    spare.sql(
        "CREATE TABLE IF NOT EXISTS kept (v int);"
        # synchronous_commit is off: make this commit durable before the crash.
        "BEGIN; SET LOCAL synchronous_commit = on; INSERT INTO kept VALUES (42); COMMIT;"
    )
    with psycopg.connect(spare.dsn(), autocommit=True) as conn:
        spare.kill()
        assert not spare.is_running()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    spare.kill()  # killing a dead server is a no-op
    spare.start()
    assert spare.is_running()
    assert spare.sql("SELECT v FROM kept") == "42"
    assert "automatic recovery in progress" in spare.log_tail(30)


def test_stop_and_restart(spare: PostgresCluster) -> None:
    port = spare.port
    spare.restart()
    assert spare.is_running() and spare.port == port
    spare.stop()
    assert not spare.is_running()
    spare.stop()  # stopping a stopped server is a no-op
    spare.start()
    spare.start()  # so is starting a running one
    assert spare.sql("SELECT 1") == "1"


def test_reused_data_dir_restarts_on_its_port(spare: PostgresCluster) -> None:
    spare.stop()
    again = PostgresCluster(spare.data_dir, name=spare.name)
    assert again.exists()
    assert again.port == spare.port
    again.init()  # existing cluster: nothing to do
    again.start()
    assert again.sql("SELECT current_setting('port')::int") == str(spare.port)
    with psycopg.connect(again.dsn(user=SCRAM_USER, password=SCRAM_PASSWORD)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_bad_setting_fails_start_with_the_log(spare: PostgresCluster) -> None:
    spare.stop()
    broken = PostgresCluster(spare.data_dir, name=spare.name, settings={"max_connections": "many"})
    with pytest.raises(ClusterError, match=r"(?s)failed to start.*max_connections"):
        broken.start(timeout=10)
    assert not broken.is_running()
    spare.start()  # the good settings are written back
    assert spare.sql("SHOW max_connections") == "200"


def test_settings_override_the_defaults(spare: PostgresCluster) -> None:
    tuned = PostgresCluster(spare.data_dir, name=spare.name, settings={"max_connections": "50"})
    tuned.start()  # running with other settings: restarted
    assert tuned.sql("SHOW max_connections") == "50"
    spare.start()
    assert spare.sql("SHOW max_connections") == "200"


def test_port_in_settings_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="port"):
        PostgresCluster(tmp_path / "x", settings={"port": "5432"})
