"""What idle client connections cost a pooler in memory.

Each connection logs in (a StartupMessage with trust authentication, read up to the first
ReadyForQuery) and then sits there; the pooler's resident set size is read from /proc
before and after.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shardwire.proxy.protocol.messages import parse_error_fields, startup_message

_HEADER = struct.Struct("!cI")


@dataclass(frozen=True, slots=True)
class IdleCost:
    connections: int
    rss_before_kib: int
    rss_after_kib: int
    fds_before: int  # the pooler's open descriptors: shows the clients really reached it
    fds_after: int

    @property
    def added_mib(self) -> float:
        return (self.rss_after_kib - self.rss_before_kib) / 1024

    @property
    def per_connection_kib(self) -> float:
        return (self.rss_after_kib - self.rss_before_kib) / max(1, self.connections)


def raise_open_files_limit(wanted: int) -> int:
    """Raise this process's (and so its children's) open-file limit towards ``wanted``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def measure(pid: int, host: str, port: int, *, count: int, user: str, database: str) -> IdleCost:
    """Open ``count`` logged-in idle connections and read ``pid``'s RSS before and after."""
    time.sleep(1)  # let the pooler finish whatever the previous clients left behind
    before, fds_before = rss_kib(pid), open_fds(pid)
    with idle_connections(host, port, count=count, user=user, database=database):
        time.sleep(2)
        after, fds_after = rss_kib(pid), open_fds(pid)
    return IdleCost(count, before, after, fds_before, fds_after)


@contextlib.contextmanager
def idle_connections(
    host: str, port: int, *, count: int, user: str, database: str
) -> Iterator[list[socket.socket]]:
    sockets: list[socket.socket] = []
    try:
        for i in range(count):
            sockets.append(log_in(host, port, user=user, database=database, index=i))
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def log_in(host: str, port: int, *, user: str, database: str, index: int) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=10)
    try:
        params = {"user": user, "database": database, "application_name": "bench-idle"}
        sock.sendall(startup_message(params))
        buffer = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError(f"connection {index + 1} closed before ReadyForQuery")
            buffer += chunk
            while len(buffer) >= 5:
                kind, length = _HEADER.unpack_from(buffer)
                if len(buffer) < 1 + length:
                    break
                payload, buffer = buffer[5 : 1 + length], buffer[1 + length :]
                if kind == b"E":
                    fields = parse_error_fields(payload)
                    raise RuntimeError(
                        f"connection {index + 1} refused: {fields.get('C')} {fields.get('M')}"
                    )
                if kind == b"Z":
                    return sock
    except BaseException:
        sock.close()
        raise
