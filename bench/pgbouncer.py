"""PgBouncer in transaction mode, the yardstick Shardwire is measured against.

PgBouncer refuses to run as root, so when we are root it runs as the ``postgres`` OS user
(the one the harness runs PostgreSQL as) and its work directory belongs to that user.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

_CANDIDATES = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")
_OS_USER = "postgres"
# max_prepared_statements (prepared statements in transaction mode) arrived in 1.21.
PREPARED_STATEMENTS_SINCE = (1, 21)


def _find() -> str | None:
    found = shutil.which("pgbouncer")
    if found:
        return found
    return next((c for c in _CANDIDATES if Path(c).exists()), None)


def ensure_installed() -> str:
    """The pgbouncer program; installs the Debian package ``pgbouncer`` if it is missing."""
    found = _find()
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError("pgbouncer is not installed: run `apt-get install pgbouncer` as root")
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "pgbouncer"]
    if subprocess.run(install, env=env).returncode != 0:
        # A fresh container has no package lists yet.
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(install, env=env, check=True)
    found = _find()
    if found is None:
        raise RuntimeError("apt-get installed pgbouncer, but the program is not found")
    return found


def version(program: str) -> tuple[int, ...]:
    """``(1, 18, 0)`` from ``pgbouncer --version`` ("PgBouncer 1.18.0" on its first line)."""
    out = subprocess.run([program, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"PgBouncer (\d+(?:\.\d+)*)", out)
    if match is None:
        raise RuntimeError(f"cannot tell the version of {program}: {out!r}")
    return tuple(int(part) for part in match.group(1).split("."))


class PgBouncer:
    """One pgbouncer process in the foreground, pooling ``database`` on one server."""

    def __init__(
        self,
        program: str,
        workdir: Path,
        *,
        port: int,
        server_host: str,
        server_port: int,
        database: str,
        user: str,
        pool_size: int,
        max_client_conn: int,
        max_prepared_statements: int,
    ) -> None:
        self.program = program
        self.workdir = workdir
        self.host = "127.0.0.1"
        self.port = port
        self.version = version(program)
        self.supports_prepared = self.version >= PREPARED_STATEMENTS_SINCE
        self.log_path = workdir / "pgbouncer.log"
        self.config_path = workdir / "pgbouncer.ini"
        self.proc: subprocess.Popen[bytes] | None = None
        lines = [
            "[databases]",
            f"{database} = host={server_host} port={server_port} dbname={database} user={user}",
            "",
            "[pgbouncer]",
            f"listen_addr = {self.host}",
            f"listen_port = {port}",
            "unix_socket_dir =",
            "auth_type = trust",
            f"auth_file = {workdir / 'userlist.txt'}",
            "pool_mode = transaction",
            f"default_pool_size = {pool_size}",
            f"max_client_conn = {max_client_conn}",
            f"logfile = {self.log_path}",
            f"pidfile = {workdir / 'pgbouncer.pid'}",
            # Shardwire runs at log level warning in the benchmark; so does PgBouncer.
            "log_connections = 0",
            "log_disconnections = 0",
            "ignore_startup_parameters = extra_float_digits",
        ]
        if self.supports_prepared:
            lines.append(f"max_prepared_statements = {max_prepared_statements}")
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text("\n".join(lines) + "\n")
        (workdir / "userlist.txt").write_text(f'"{user}" ""\n')
        self._account = _run_as()
        if self._account is not None:
            for path in (workdir, self.config_path, workdir / "userlist.txt"):
                os.chown(path, self._account.pw_uid, self._account.pw_gid)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 20) -> None:
        account = self._account
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
        if account is not None:
            env |= {"HOME": account.pw_dir, "USER": account.pw_name}
        with open(self.workdir / "pgbouncer.stderr", "ab") as stderr:
            self.proc = subprocess.Popen(
                [self.program, str(self.config_path)],
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                user=account.pw_uid if account else None,
                group=account.pw_gid if account else None,
                extra_groups=[] if account else None,
                # Ctrl-C reaches our cleanup, which stops it; not PgBouncer's own slow
                # "safe shutdown" that waits for clients.
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited at start:\n{self.log_tail()}")
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"pgbouncer did not listen:\n{self.log_tail()}") from None
                time.sleep(0.05)

    def stop(self, timeout: float = 10) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # immediate shutdown
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log_tail(self, lines: int = 30) -> str:
        text = ""
        for path in (self.workdir / "pgbouncer.stderr", self.log_path):
            try:
                text += path.read_text(errors="replace")
            except OSError:
                pass
        return "\n".join(text.splitlines()[-lines:])


def _run_as() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(_OS_USER)
    except KeyError:
        raise RuntimeError(
            f"running as root, but there is no {_OS_USER!r} OS user to run pgbouncer as"
        ) from None
