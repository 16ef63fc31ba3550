"""Throwaway real PostgreSQL clusters for the tests, the benchmarks and ``shardwire demo``.

A cluster is an ``initdb`` data directory tuned for speed, not durability: initdb runs with
``--no-sync`` and the server with ``fsync``, ``full_page_writes`` and ``synchronous_commit``
off. Killing the server processes (:meth:`PostgresCluster.kill`) keeps everything that reached
the kernel, so prepared transactions and ``COMMIT PREPARED`` (always flushed to the kernel)
survive, but an ordinary commit from the last few hundred milliseconds may be lost unless the
transaction ran with ``SET LOCAL synchronous_commit = on``.

PostgreSQL refuses to run as root, so when we are root the server programs run as the
``postgres`` OS user and the cluster directory belongs to it.

Layout for ``PostgresCluster(base / "shard1", name="shard1")``::

    base/shard1/                  data directory (owned by the server user)
    base/shard1/shardwire.conf    settings, rewritten by every start(), included by
                                  postgresql.conf
    base/shard1/shardwire-port    the port, so a reused directory restarts on it
    base/shard1/.s.PGSQL.<port>   the Unix socket (the data directory doubles as the
                                  private socket directory)
    base/shard1.log               server log, readable by everyone
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import pwd
import random
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from urllib.parse import quote

__all__ = [
    "BASE_SETTINGS",
    "HOST",
    "MD5_PASSWORD",
    "MD5_USER",
    "SCRAM_PASSWORD",
    "SCRAM_USER",
    "ClusterError",
    "PostgresCluster",
    "PsqlError",
    "free_port",
    "pg_bindir",
    "start_clusters",
    "stop_clusters",
]

HOST = "127.0.0.1"

# Roles that authenticate with a password over TCP, so tests can check the proxy's backend
# authentication; every other role is trusted.
MD5_USER = "sw_md5"
MD5_PASSWORD = "md5pass"
SCRAM_USER = "sw_scram"
SCRAM_PASSWORD = "scrampass"

# Applied to every cluster; a caller's ``settings`` win over these. ``port`` and
# ``unix_socket_directories`` are added per cluster.
BASE_SETTINGS: Mapping[str, str] = MappingProxyType(
    {
        "listen_addresses": HOST,
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_prepared_transactions": "64",
        "wal_level": "logical",
        "max_connections": "200",
        "max_wal_senders": "10",
        "max_replication_slots": "10",
        "shared_buffers": "64MB",
        # User and database in every log line: the log tail is what a failed test shows.
        "log_line_prefix": "%m [%p] %q%u@%d ",
    }
)

_CONF_FILE = "shardwire.conf"
_PORT_FILE = "shardwire-port"
_ROLES_MARKER = "shardwire-roles"
_SERVER_OS_USER = "postgres"
# The longest Unix socket path Linux accepts is 107 bytes; leave room for the file name.
_MAX_SOCKET_DIR = 107 - len("/.s.PGSQL.65535.lock")
_PORT_IN_USE_MARKERS = (
    "Address already in use",
    "could not bind IPv4 address",
    "could not create any TCP/IP sockets",
)


class ClusterError(RuntimeError):
    """A cluster could not be created, started or stopped; the message carries the log tail."""


class PsqlError(subprocess.CalledProcessError):
    """``psql`` exited non-zero; ``stderr`` holds PostgreSQL's error message."""

    def __init__(
        self,
        cluster: str,
        query: str,
        returncode: int,
        cmd: Sequence[str],
        stdout: str,
        stderr: str,
    ) -> None:
        super().__init__(returncode, list(cmd), output=stdout, stderr=stderr)
        self.cluster = cluster
        self.query = query

    def __str__(self) -> str:
        return (
            f"psql against {self.cluster} exited with {self.returncode}: "
            f"{(self.stderr or '').strip()}\nquery: {self.query.strip()[:500]}"
        )


# --- where the programs are and whom they run as --------------------------------------


@functools.cache
def pg_bindir() -> Path:
    """The directory holding initdb, pg_ctl and postgres.

    ``SHARDWIRE_PG_BINDIR`` wins; then the directory ``pg_ctl`` on PATH really lives in
    (Debian links /usr/local/bin/pg_ctl to /usr/lib/postgresql/<v>/bin); then the newest
    /usr/lib/postgresql/<v>/bin.
    """
    configured = os.environ.get("SHARDWIRE_PG_BINDIR")
    if configured:
        return Path(configured)
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).resolve().parent
    installed = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if installed:
        return installed[-1].parent
    raise ClusterError(
        "PostgreSQL server programs (initdb, pg_ctl) not found: install PostgreSQL or set "
        "SHARDWIRE_PG_BINDIR"
    )


def _program(name: str) -> str:
    candidate = pg_bindir() / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise ClusterError(f"PostgreSQL program {name!r} not found in {pg_bindir()} or on PATH")


@dataclass(frozen=True, slots=True)
class _ServerUser:
    name: str
    uid: int
    gid: int
    groups: frozenset[int]
    home: str


@functools.cache
def _server_user() -> _ServerUser | None:
    """The OS user the server programs run as, or None to run them as ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(_SERVER_OS_USER)
    except KeyError:
        raise ClusterError(
            f"running as root, but there is no {_SERVER_OS_USER!r} OS user to run "
            "PostgreSQL as (initdb and postgres refuse root)"
        ) from None
    groups = frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return _ServerUser(entry.pw_name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir)


def _clean_env() -> dict[str, str]:
    # PGDATA, PGPORT, PGOPTIONS and friends from the caller's shell must not leak into
    # throwaway clusters or into psql.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _run_server_program(
    args: Sequence[str], *, cwd: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    user = _server_user()
    env = _clean_env()
    if user is not None:
        env.update(HOME=user.home, USER=user.name, LOGNAME=user.name)
    return subprocess.run(
        list(args),
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=timeout,
        user=user.uid if user else None,
        group=user.gid if user else None,
        extra_groups=sorted(user.groups) if user else None,
    )


def _give_to_server_user(path: Path) -> None:
    user = _server_user()
    if user is not None:
        os.chown(path, user.uid, user.gid)


def _make_traversable(directory: Path) -> None:
    """Let the server user reach ``directory`` by adding search (x) bits where missing.

    Only the execute bit is added, never read or write: enough to reach a path, nothing to
    list or change. pytest's temp root (0700) is the usual case.
    """
    user = _server_user()
    if user is None:
        return
    for d in (directory, *directory.parents):
        st = d.stat()
        if st.st_uid == user.uid:
            needed = stat.S_IXUSR
        elif st.st_gid in user.groups:
            needed = stat.S_IXGRP
        else:
            needed = stat.S_IXOTH
        if not st.st_mode & needed:
            os.chmod(d, stat.S_IMODE(st.st_mode) | needed)


def _write_file(path: Path, text: str, mode: int = 0o600) -> bool:
    """Write ``text`` unless already there; returns whether the file changed."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except FileNotFoundError:
        pass
    path.write_text(text, encoding="utf-8")
    os.chmod(path, mode)
    _give_to_server_user(path)
    return True


# --- ports ------------------------------------------------------------------------------

_handed_out: set[tuple[str, int]] = set()
_port_lock = threading.Lock()
# Other sessions on the machine pick ports too: a seeded global random must not make them
# all pick the same ones.
_port_random = random.SystemRandom()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _can_bind(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # PostgreSQL binds with SO_REUSEADDR, so a port in TIME_WAIT is free for it too.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = HOST) -> int:
    """A TCP port on ``host`` that nothing is bound to now and this process has not handed out.

    Ports come from below the kernel's ephemeral range, so an outgoing connection's source
    port cannot take a killed cluster's port before it restarts. Another process can still
    take the port before the server binds it; :meth:`PostgresCluster.start` retries then.
    """
    low, _ = _ephemeral_range()
    with _port_lock:
        if low > 11000:
            for _ in range(200):
                port = _port_random.randrange(10000, low)
                if (host, port) not in _handed_out and _can_bind(host, port):
                    _handed_out.add((host, port))
                    return port
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
            if (host, port) not in _handed_out:
                _handed_out.add((host, port))
                return port
    raise ClusterError(f"no free TCP port found on {host}")


# --- processes --------------------------------------------------------------------------


def _proc_state(pid: int) -> str | None:
    """The /proc state letter of ``pid`` ("R", "S", "Z"...), or None if there is no such pid."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return "?"
    # "pid (comm) state ppid ...": comm may contain spaces and parentheses.
    return raw[raw.rindex(")") + 2]


def _is_dead(pid: int) -> bool:
    # A killed postmaster is reparented to PID 1, which in containers may never reap it: a
    # zombie is as dead as it gets.
    return _proc_state(pid) in (None, "Z", "X")


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_dead(pids: Iterable[int], timeout: float) -> bool:
    remaining = set(pids)
    deadline = time.monotonic() + timeout
    while True:
        remaining = {pid for pid in remaining if not _is_dead(pid)}
        if not remaining:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _conf_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# --- the cluster ------------------------------------------------------------------------


class PostgresCluster:
    """One throwaway PostgreSQL server on 127.0.0.1 with its own data directory.

    ``port=None`` reuses the port stored in an existing data directory, or picks a free one.
    ``settings`` override :data:`BASE_SETTINGS`; they are written to ``shardwire.conf`` in the
    data directory at every :meth:`start`, so a plain ``pg_ctl start`` uses them too.
    """

    host: str
    port: int
    data_dir: Path
    name: str

    def __init__(
        self,
        data_dir: str | Path,
        *,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        name: str = "pg",
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.name = name
        self.host = HOST
        self.settings: dict[str, str] = {k: str(v) for k, v in (settings or {}).items()}
        if "port" in self.settings:
            raise ValueError("pass the port as PostgresCluster(port=...), not in settings")
        stored = self._stored_port()
        # A port the caller chose or the directory remembers is kept; one we picked may be
        # replaced if someone else binds it first.
        self._port_is_ours = port is None and stored is None
        self.port = port if port is not None else stored if stored is not None else free_port()
        self.log_path = self.data_dir.parent / f"{name}.log"
        self.socket_dir = self._pick_socket_dir()

    def __repr__(self) -> str:
        return f"PostgresCluster({self.name!r}, port={self.port}, data_dir={str(self.data_dir)!r})"

    # -- state

    def exists(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    def is_running(self) -> bool:
        pid = self._postmaster_pid()
        return pid is not None and self._is_our_postmaster(pid)

    # -- lifecycle

    def init(self) -> None:
        """Create the data directory with initdb; does nothing if it already exists."""
        if self.exists():
            return
        self._prepare_dirs()
        args = [
            _program("initdb"), "-D", str(self.data_dir), "-A", "trust", "-U", "postgres",
            "--no-sync", "-E", "UTF8", "--locale=C", "--no-instructions",
        ]  # fmt: skip
        try:
            result = _run_server_program(args, cwd=self.data_dir.parent, timeout=120)
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"initdb for {self.name} in {self.data_dir} timed out") from exc
        if result.returncode != 0:
            raise ClusterError(
                f"initdb for {self.name} in {self.data_dir} failed with exit code "
                f"{result.returncode}:\n{result.stdout}{result.stderr}"
            )
        self._write_hba()
        with (self.data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write(
                f"\n# Added by shardwire.testing; {_CONF_FILE} is rewritten at every start.\n"
                f"include = '{_CONF_FILE}'\n"
            )
        self._write_settings()
        self._store_port()

    def start(self, timeout: float = 30) -> None:
        """Start the server and wait until it accepts connections.

        A server that is already running with the same settings is left alone; one running
        with other settings is restarted. On the first start the test roles are created.
        """
        if not self.exists():
            raise ClusterError(f"{self.name}: no cluster in {self.data_dir}; call init() first")
        changed = self._write_settings()
        if self.is_running():
            if not changed:
                return
            self.stop()
        stale = self._postmaster_pid()
        if stale is not None and _is_dead(stale):
            # Left by a crash; a zombie PID in it would make the new postmaster refuse.
            self._remove_stale_locks(stale)
        self._store_port()
        for attempt in range(1, 4):
            failure = self._start_once(timeout)
            if failure is None:
                break
            port_taken = any(marker in failure for marker in _PORT_IN_USE_MARKERS)
            if not (port_taken and self._port_is_ours and attempt < 3):
                raise ClusterError(f"{self.name} failed to start on port {self.port}:\n{failure}")
            # Another process bound our freshly picked port first: pick another.
            self.port = free_port()
            self._write_settings()
            self._store_port()
        if not (self.data_dir / _ROLES_MARKER).exists():
            self.ensure_test_roles()
            _write_file(self.data_dir / _ROLES_MARKER, "sw_md5 sw_scram\n")

    def stop(self, mode: str = "fast", timeout: float = 60) -> None:
        """Stop the server if it runs; falls back to :meth:`kill` if it will not stop."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"stop mode must be smart, fast or immediate, not {mode!r}")
        if not self.is_running():
            return
        # A later pytest session resets its temp root to 0700 while ours still runs.
        _make_traversable(self.data_dir.parent)
        args = [
            _program("pg_ctl"), "stop", "-D", str(self.data_dir), "-m", mode, "-w", "-s",
            "-t", str(math.ceil(timeout)),
        ]  # fmt: skip
        try:
            _run_server_program(args, cwd=self.data_dir.parent, timeout=timeout + 10)
        except subprocess.TimeoutExpired:
            pass
        if self.is_running():
            self.kill()

    def kill(self) -> None:
        """SIGKILL the postmaster and every server process it started: a crash, for fault tests.

        Connections break at once. The next :meth:`start` runs crash recovery.
        """
        pid = self._postmaster_pid()
        if pid is None or not self._is_our_postmaster(pid):
            return
        # Stopped, the postmaster cannot fork a child we would miss.
        _signal(pid, signal.SIGSTOP)
        children = _children(pid)
        _signal(pid, signal.SIGKILL)
        for child in children:
            _signal(child, signal.SIGKILL)
        if not _wait_dead([pid, *children], timeout=10):
            raise ClusterError(f"{self.name}: server processes survived SIGKILL")
        # The lock files name a PID that may linger as a zombie, which the next postmaster
        # would take for a live server. Every process is dead, so they are stale.
        self._remove_stale_locks(pid)

    def restart(self) -> None:
        self.stop()
        self.start()

    # -- streaming replicas

    def create_replica(
        self,
        data_dir: str | Path,
        *,
        name: str,
        settings: Mapping[str, str] | None = None,
        start: bool = True,
    ) -> PostgresCluster:
        """A real streaming replica of this (running) cluster, made with ``pg_basebackup -R``.

        The copy gets its own port and ``shardwire.conf``; ``-R`` writes ``standby.signal``
        and ``primary_conninfo``, so it starts as a hot standby that streams from this server
        (without a replication slot: a replica stopped for long may fall behind for good,
        which throwaway test clusters never are). The roles already exist, being replicated.
        """
        # cluster_name is what the walreceiver reports as application_name in the
        # primary's pg_stat_replication: wait_streaming finds the replica by it.
        own = {**(self.settings if settings is None else settings), "cluster_name": name}
        replica = PostgresCluster(data_dir, settings=own, name=name)
        if replica.exists():
            raise ClusterError(f"{name}: {replica.data_dir} already holds a cluster")
        replica._prepare_dirs()
        args = [
            _program("pg_basebackup"), "-h", self.host, "-p", str(self.port), "-U", "postgres",
            "-D", str(replica.data_dir), "-R", "-X", "stream", "--no-sync", "-c", "fast",
            "-w",
        ]  # fmt: skip
        for attempt in (1, 2):
            try:
                result = _run_server_program(args, cwd=replica.data_dir.parent, timeout=300)
            except subprocess.TimeoutExpired as exc:
                raise ClusterError(f"pg_basebackup of {self.name} for {name} timed out") from exc
            if result.returncode == 0 or "Permission denied" not in result.stderr or (
                    attempt == 2):
                break
            # A pytest session starting meanwhile resets its temp root to 0700: reach the
            # directory again and start over in it (pg_basebackup emptied it).
            _make_traversable(replica.data_dir.parent)
            replica._prepare_dirs()
        if result.returncode != 0:
            raise ClusterError(
                f"pg_basebackup of {self.name} for {name} failed with exit code "
                f"{result.returncode}:\n{result.stdout}{result.stderr}"
            )
        # The copy carries the primary's port file and postmaster settings: its own replace
        # them. The roles marker came along too, rightly: a standby cannot create roles.
        replica._write_settings()
        replica._store_port()
        if start:
            replica.start()
        return replica

    def is_in_recovery(self) -> bool:
        """Whether the server runs as a standby (``pg_is_in_recovery()``)."""
        return self.sql("SELECT pg_is_in_recovery()") == "t"

    def promote(self, timeout: float = 60) -> None:
        """Promote a standby to a primary (``pg_ctl promote``), waiting until it is one."""
        args = [
            _program("pg_ctl"), "promote", "-D", str(self.data_dir), "-w", "-s",
            "-t", str(math.ceil(timeout)),
        ]  # fmt: skip
        result = _run_server_program(args, cwd=self.data_dir.parent, timeout=timeout + 10)
        if result.returncode != 0:
            raise ClusterError(
                f"pg_ctl promote of {self.name} failed with exit code {result.returncode}:\n"
                f"{result.stdout}{result.stderr}\n{self.log_tail(20)}"
            )
        # The standby.signal written by -R is gone now; a later start() stays a primary.

    def wait_streaming(self, replica: PostgresCluster, timeout: float = 30) -> None:
        """Wait until ``replica`` streams from this server and has replayed all it has
        written so far (``pg_stat_replication`` on this server)."""
        # A commit flushed at once (synchronous_commit is off on test clusters) flushes all
        # the WAL before it: the flush position then covers everything written so far. The
        # transaction must write WAL of its own, or its commit is not flushed. (The insert
        # position would not do: right after a segment switch it points past a page header
        # where no record is yet, until the next WAL activity, up to 15 s later.)
        self.sql("BEGIN; SET LOCAL synchronous_commit = on; "
                 "SELECT pg_catalog.pg_logical_emit_message(true, 'shardwire.testing', ''); "
                 "COMMIT")
        target = self.sql("SELECT pg_current_wal_flush_lsn()")
        deadline = time.monotonic() + timeout
        streaming = (
            "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' "
            f"AND application_name = {_sql_literal(replica.name)}"
        )
        # Asked of the replica itself: the primary's replay_lsn is only as fresh as the
        # replica's last status message (wal_receiver_status_interval, 10 s by default).
        replayed = f"SELECT pg_last_wal_replay_lsn() >= {_sql_literal(target)}::pg_lsn"
        while True:
            if self.sql(streaming) != "0" and replica.sql(replayed) == "t":
                return
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"{replica.name} did not catch up with {self.name} within {timeout:g}s:\n"
                    f"{self.sql('SELECT * FROM pg_stat_replication')}\n{replica.log_tail(20)}"
                )
            time.sleep(0.05)

    # -- talking to it

    def dsn(
        self, dbname: str = "postgres", user: str = "postgres", password: str | None = None
    ) -> str:
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def sql(
        self,
        query: str,
        dbname: str = "postgres",
        user: str = "postgres",
        *,
        password: str | None = None,
        timeout: float | None = 120,
    ) -> str:
        """Run ``query`` (one or more statements) with psql over TCP; return its output.

        Rows come unaligned, one per line, columns separated by ``|``, without headers or
        command tags; the final newline is removed. Statements run one by one in autocommit
        and the first error stops the script and raises :class:`PsqlError`.
        """
        args = [
            _program("psql"), "-X", "-A", "-t", "-q", "-w", "-v", "ON_ERROR_STOP=1",
            "-h", self.host, "-p", str(self.port), "-U", user, "-d", dbname, "-f", "-",
        ]  # fmt: skip
        env = _clean_env()
        env["PGCONNECT_TIMEOUT"] = "10"
        # Lets tests that inspect pg_stat_activity tell harness sessions apart.
        env["PGAPPNAME"] = "shardwire.testing"
        if password is not None:
            env["PGPASSWORD"] = password
        result = subprocess.run(
            args,
            input=query,
            env=env,
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            timeout=timeout,
        )
        if result.returncode != 0:
            raise PsqlError(self.name, query, result.returncode, args, result.stdout, result.stderr)
        return result.stdout.removesuffix("\n")

    def create_database(self, name: str) -> None:
        """Create database ``name`` unless it exists."""
        found = self.sql(
            f"SELECT 1 FROM pg_catalog.pg_database WHERE datname = {_sql_literal(name)}"
        )
        if found == "1":
            return
        try:
            self.sql(f"CREATE DATABASE {_sql_ident(name)}")
        except PsqlError as exc:
            if "already exists" not in (exc.stderr or ""):
                raise

    def ensure_test_roles(self) -> None:
        """Create (or reset) ``sw_md5`` with an md5 password and ``sw_scram`` with a SCRAM one.

        pg_hba.conf makes both authenticate with their method over TCP; the password is
        stored in the format the method needs.
        """
        script = "\n".join(
            [
                "SET password_encryption = 'md5';",
                self._ensure_role_sql(MD5_USER, MD5_PASSWORD),
                "SET password_encryption = 'scram-sha-256';",
                self._ensure_role_sql(SCRAM_USER, SCRAM_PASSWORD),
            ]
        )
        self.sql(script)

    @staticmethod
    def _ensure_role_sql(role: str, password: str) -> str:
        return (
            "DO $$BEGIN\n"
            "  IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles\n"
            f"                 WHERE rolname = {_sql_literal(role)})\n"
            f"  THEN CREATE ROLE {_sql_ident(role)}; END IF;\n"
            "END$$;\n"
            f"ALTER ROLE {_sql_ident(role)} WITH LOGIN SUPERUSER "
            f"PASSWORD {_sql_literal(password)};"
        )

    # -- the log

    def log_position(self) -> int:
        """The log's current size: pass it to :meth:`log_tail` as ``since``."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_tail(self, lines: int = 50, *, since: int | None = None) -> str:
        """The last ``lines`` lines of the server log, or of what was logged after ``since``."""
        try:
            with self.log_path.open("rb") as log:
                if since is not None:
                    log.seek(since)
                else:
                    # The tail of a big log is in its last bytes; no need to read it all.
                    size = log.seek(0, os.SEEK_END)
                    log.seek(max(0, size - max(lines, 1) * 1024))
                data = log.read()
        except FileNotFoundError:
            return ""
        text = data.decode("utf-8", errors="replace")
        return "\n".join(deque(text.splitlines(), maxlen=lines))

    # -- internals

    def _stored_port(self) -> int | None:
        try:
            return int((self.data_dir / _PORT_FILE).read_text().strip())
        except (OSError, ValueError):
            return None

    def _store_port(self) -> None:
        _write_file(self.data_dir / _PORT_FILE, f"{self.port}\n", mode=0o644)

    def _pick_socket_dir(self) -> Path:
        # The data directory is private to the server user and goes away with the cluster;
        # use it unless the socket path would be too long or unsayable in the setting.
        own = str(self.data_dir)
        if len(os.fsencode(own)) <= _MAX_SOCKET_DIR and not any(c in own for c in ",'\"\\ "):
            return self.data_dir
        digest = hashlib.sha256(os.fsencode(own)).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"shardwire-{digest}"

    def _effective_settings(self) -> dict[str, str]:
        return {
            **BASE_SETTINGS,
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            **self.settings,
        }

    def _write_settings(self) -> bool:
        lines = [f"# Written by shardwire.testing for {self.name}; rewritten at every start."]
        lines += [f"{k} = {_conf_value(v)}" for k, v in self._effective_settings().items()]
        return _write_file(self.data_dir / _CONF_FILE, "\n".join(lines) + "\n")

    def _write_hba(self) -> None:
        rules = [
            "# Written by shardwire.testing.",
            "local all all trust",
            "local replication all trust",
        ]
        for address in ("127.0.0.1/32", "::1/128"):
            rules += [
                f"host all {MD5_USER} {address} md5",
                f"host all {SCRAM_USER} {address} scram-sha-256",
                f"host all all {address} trust",
                f"host replication all {address} trust",
            ]
        _write_file(self.data_dir / "pg_hba.conf", "\n".join(rules) + "\n")

    def _prepare_dirs(self) -> None:
        """Create what the server user needs and make sure it can reach it."""
        parent = self.data_dir.parent
        parent.mkdir(parents=True, exist_ok=True)
        _make_traversable(parent)
        if not self.data_dir.exists():
            self.data_dir.mkdir(mode=0o700)
            _give_to_server_user(self.data_dir)
        if not self.log_path.exists():
            self.log_path.touch(mode=0o644)
        _give_to_server_user(self.log_path)
        if self.socket_dir != self.data_dir:
            self.socket_dir.mkdir(mode=0o700, exist_ok=True)
            _give_to_server_user(self.socket_dir)

    def _start_once(self, timeout: float) -> str | None:
        """Start the server; None on success, else what went wrong with the log of this try."""
        self._prepare_dirs()
        offset = self.log_position()
        args = [
            _program("pg_ctl"), "start", "-D", str(self.data_dir), "-l", str(self.log_path),
            "-w", "-s", "-t", str(math.ceil(timeout)),
        ]  # fmt: skip
        try:
            result = _run_server_program(args, cwd=self.data_dir.parent, timeout=timeout + 10)
        except subprocess.TimeoutExpired:
            output = f"pg_ctl start did not return within {timeout + 10:.0f}s"
        else:
            if result.returncode == 0:
                return None
            output = f"pg_ctl start exited with {result.returncode}: {result.stdout}{result.stderr}"
        # A server still starting after pg_ctl gave up must not outlive the failure.
        self.kill()
        return f"{output.strip()}\n--- {self.log_path} ---\n{self.log_tail(50, since=offset)}"

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first)
        except (OSError, ValueError):
            return None

    def _is_our_postmaster(self, pid: int) -> bool:
        # postmaster.pid may name a dead or reused PID. The postmaster runs in its data
        # directory, which tells it apart from other clusters' processes.
        if _is_dead(pid):
            return False
        try:
            return os.path.realpath(f"/proc/{pid}/cwd") == str(self.data_dir)
        except OSError:
            return False

    def _remove_stale_locks(self, pid: int) -> None:
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
        for lock in self.socket_dir.glob(".s.PGSQL.*.lock"):
            try:
                owner = int(lock.read_text().split("\n", 1)[0])
            except (OSError, ValueError):
                continue
            if owner == pid:
                lock.unlink(missing_ok=True)
                lock.with_suffix("").unlink(missing_ok=True)


# --- several at once --------------------------------------------------------------------


def start_clusters(
    base_dir: str | Path,
    count: int,
    *,
    prefix: str = "shard",
    settings: Mapping[str, str] | None = None,
) -> list[PostgresCluster]:
    """Create and start ``count`` clusters ``<prefix>1``..``<prefix><count>`` under ``base_dir``.

    They come up in parallel, each on its own free port (or the port a reused directory
    remembers). If any fails, the others are stopped and the error names every failure.
    """
    base = Path(base_dir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    clusters = [
        PostgresCluster(base / f"{prefix}{i}", settings=settings, name=f"{prefix}{i}")
        for i in range(1, count + 1)
    ]

    def bring_up(cluster: PostgresCluster) -> None:
        cluster.init()
        cluster.start()

    with ThreadPoolExecutor(max_workers=max(1, count), thread_name_prefix="pg-start") as pool:
        futures = [pool.submit(bring_up, cluster) for cluster in clusters]
        errors = [future.exception() for future in futures]
    failures = [(c, e) for c, e in zip(clusters, errors, strict=True) if e is not None]
    if failures:
        stop_clusters(clusters, mode="immediate")
        if len(failures) == 1:
            raise failures[0][1]
        details = "\n\n".join(f"{c.name}: {e}" for c, e in failures)
        raise ClusterError(
            f"{len(failures)} of {count} clusters failed to start:\n{details}"
        ) from failures[0][1]
    return clusters


def stop_clusters(clusters: Iterable[PostgresCluster], *, mode: str = "fast") -> None:
    """Stop clusters in parallel; every one is attempted, the first error is raised after."""
    targets = list(clusters)
    if not targets:
        return
    with ThreadPoolExecutor(max_workers=len(targets), thread_name_prefix="pg-stop") as pool:
        futures = [pool.submit(cluster.stop, mode) for cluster in targets]
        errors = [future.exception() for future in futures]
    for error in errors:
        if error is not None:
            raise error
