"""``shardwire health``: is a proxy up and answering? For container health checks and scripts.

With a user (``--user``, or ``SHARDWIRE_HEALTH_USER``) it logs in like any client and runs one
statement: ``SHOW VERSION`` in the admin console, which checks the proxy alone, or ``SELECT 1``
in any other database, which checks the proxy and the shard that answers it. The password
comes from the environment only (``SHARDWIRE_HEALTH_PASSWORD``, else ``PGPASSWORD``), never
from the command line, where ``ps`` would show it.

Without a user it only checks that the proxy answers a startup message, which needs no
credentials: enough to tell a live listener from a dead or wedged one.

Exit status 0 when healthy, 1 otherwise; either way one line says what was checked.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
from dataclasses import dataclass

__all__ = ["HealthTarget", "add_parser", "check", "health_command"]

USER_ENV = "SHARDWIRE_HEALTH_USER"
PASSWORD_ENVS = ("SHARDWIRE_HEALTH_PASSWORD", "PGPASSWORD")
# A user name the proxy does not know: without credentials the check stops at the first
# answer to the startup message, an authentication request or an error, either of which
# shows that the proxy is serving.
PROBE_USER = "shardwire_health"
# Addresses a proxy listens on that a client cannot connect to: the loopback of that family.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


@dataclass(frozen=True, slots=True)
class HealthTarget:
    host: str
    port: int
    database: str
    admin_database: str = "shardwire"
    user: str | None = None
    password: str | None = None
    timeout: float = 5.0

    @property
    def where(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class Unhealthy(Exception):
    """What failed, worded for the operator reading a health check's output."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    health = sub.add_parser(
        "health", help="check that a proxy is up and answering (for health checks)",
        description="Connect to a proxy and check that it answers. With a user (--user or "
        f"{USER_ENV}; password from {' or '.join(PASSWORD_ENVS)}) it logs in and runs SHOW "
        "VERSION in the admin console, or SELECT 1 in another --database; without one it "
        "checks that the proxy answers a startup message. Exits 0 when healthy, 1 otherwise.")
    health.add_argument("--config", metavar="FILE",
                        help="take the host, port and admin database from this config")
    health.add_argument("--host", help="default: the config's listen.host (a wildcard address "
                        "means the loopback), else 127.0.0.1")
    health.add_argument("--port", type=int, help="default: the config's listen.port, else 6432")
    health.add_argument("--user", default=None, help=f"default: ${USER_ENV}; none: no login")
    health.add_argument("--database", help="default: the admin console's database")
    health.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                        help="give up after this long (default 5)")


def health_command(args: argparse.Namespace) -> int:
    host, port, admin_database = args.host, args.port, "shardwire"
    if args.config:
        from .cli import load_or_report
        config = load_or_report(args.config)
        if config is None:
            return 1
        host = host or _WILDCARDS.get(config.listen.host, config.listen.host)
        port = port or config.listen.port
        admin_database = config.admin_database
    if args.timeout <= 0:
        print("--timeout must be positive", file=sys.stderr)
        return 2
    user = args.user if args.user is not None else os.environ.get(USER_ENV) or None
    password = next((os.environ[e] for e in PASSWORD_ENVS if os.environ.get(e)), None)
    target = HealthTarget(
        host=_WILDCARDS.get(host, host) if host else "127.0.0.1", port=port or 6432,
        database=args.database or admin_database, admin_database=admin_database,
        user=user, password=password, timeout=args.timeout)
    try:
        print(f"{target.where}: ok: {check(target)}", flush=True)
    except Unhealthy as e:
        print(f"{target.where}: unhealthy: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


def check(target: HealthTarget) -> str:
    """What was checked, when the proxy is healthy; raises :class:`Unhealthy` otherwise."""
    started = time.monotonic()
    if target.user is None:
        _probe(target)
        what = "answers a startup message (no login: give --user to run a statement)"
    else:
        what = asyncio.run(_login(target))
    return f"{what} in {(time.monotonic() - started) * 1000:.0f} ms"


def _probe(target: HealthTarget) -> None:
    from .proxy.protocol.messages import startup_message
    try:
        with socket.create_connection((target.host, target.port), timeout=target.timeout) as s:
            s.sendall(startup_message({"user": PROBE_USER, "database": target.database,
                                       "application_name": "shardwire health"}))
            first = s.recv(1)
    except TimeoutError:
        raise Unhealthy(f"no answer within {target.timeout:g}s") from None
    except OSError as e:
        raise Unhealthy(_connect_error(e)) from None
    if first not in (b"R", b"E"):
        raise Unhealthy("the server did not answer the startup message like PostgreSQL: "
                        + ("it closed the connection" if not first else f"got {first!r}"))


async def _login(target: HealthTarget) -> str:
    import asyncpg
    admin = target.database == target.admin_database
    statement = "SHOW VERSION" if admin else "SELECT 1"
    conn = None
    try:
        async with asyncio.timeout(target.timeout):
            # ssl off: the check is about the proxy answering, on the loopback as a rule.
            conn = await asyncpg.connect(
                host=target.host, port=target.port, user=target.user,
                password=target.password, database=target.database, ssl=False,
                server_settings={"application_name": "shardwire health"})
            # The simple query protocol: the admin console accepts only that.
            status = await conn.execute(statement)
    except TimeoutError:
        raise Unhealthy(f"no answer within {target.timeout:g}s") from None
    except asyncpg.PostgresError as e:
        raise Unhealthy(f"{statement} as {target.user} in database {target.database}: "
                        f"{e.sqlstate} {e}") from None
    except OSError as e:
        raise Unhealthy(_connect_error(e)) from None
    except asyncpg.InterfaceError as e:
        raise Unhealthy(f"{statement} as {target.user} in database {target.database}: "
                        f"{e}") from None
    finally:
        if conn is not None:
            conn.terminate()
    return f"{statement} as {target.user} in database {target.database} ({status})"


def _connect_error(e: OSError) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "connection refused: is the proxy running, and listening on this port?"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve the host: {e.strerror}"
    return f"cannot connect: {e.strerror or e}"
