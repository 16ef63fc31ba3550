"""Running statements on several shards at once: the plumbing. `ShardCall` is a connection
whose replies the proxy reads itself; scatter.py (reads) and distributed.py (writes,
transactions) build on it.

A connection taken for this work leaves the ordinary relay: the proxy reads the server's
messages (the connection's `sink`) instead of streaming them to a client, and gives the
connection back to its pool once the server is ready again.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .pool import Pool, ServerConnection
from .protocol import messages as m
from .protocol.errors import PgError
from .protocol.framing import FrameError, MessageReader

if TYPE_CHECKING:
    pass

log = logging.getLogger("shardwire.fanout")

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_LEN = struct.Struct("!I")
MAX_SERVER_MESSAGE = 1024 * 1024 * 1024
BACKEND_TYPES = frozenset(b"123nstDCEINSZAGHWdcTKRV")


class ShardFailure(Exception):
    """A shard could not run its part: the error the client gets."""

    def __init__(self, error: PgError) -> None:
        super().__init__(error.message)
        self.error = error


async def take_connections(pools: Sequence[Pool]) -> list[ServerConnection]:
    """One connection from each pool, taken in the order given (callers sort by shard name, so
    that two multi-shard statements never each hold what the other waits for)."""
    conns: list[ServerConnection] = []
    try:
        for pool in pools:
            conn = pool.try_acquire()
            if conn is None:
                conn = await pool.acquire()
            conns.append(conn)
    except BaseException:
        for conn in conns:
            conn.pool.release(conn)
        raise
    return conns


async def apply_settings(conn: ServerConnection, settings: dict[str, str]) -> None:
    """Give `conn` the client's settings (TimeZone, DateStyle...) before it runs its part."""
    query = conn.link.settings_query(settings)
    if not query:
        return
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def ready() -> None:
        if not done.done():
            done.set_result(None)

    conn.on_idle = ready
    conn.write(query)
    await done
    if conn.closed:
        raise ShardFailure(PgError("08006", f"lost the connection to shard {conn.pool.shard}"))


def shard_error(shard: str, payload: bytes) -> PgError:
    """A shard's ErrorResponse as the client's error: the shard named in the message."""
    fields = m.parse_error_fields(payload)
    return PgError(fields.get("C", "XX000"), f"{shard}: {fields.get('M', 'error')}",
                   fields.get("H"), fields.get("D"))


class ShardCall:
    """One connection's part: the messages sent, the replies read back (as a sink)."""

    __slots__ = ("index", "conn", "reader", "on_messages", "ready", "lost", "error", "cancelled")

    def __init__(self, index: int, conn: ServerConnection,
                 on_messages: Callable[[ShardCall, list[tuple[int, bytes]]], None]) -> None:
        self.index = index
        self.conn = conn
        self.reader = MessageReader(MAX_SERVER_MESSAGE, BACKEND_TYPES)
        self.on_messages = on_messages
        self.ready = False  # ReadyForQuery seen: the connection may go back
        self.lost = False
        self.error: PgError | None = None
        self.cancelled = False  # a cancel request went to its server

    @property
    def shard(self) -> str:
        return self.conn.pool.shard

    # -- the connection's sink ---------------------------------------------------------------

    def data(self, conn: ServerConnection, data: bytes) -> None:
        try:
            msgs = self.reader.feed(data)
        except FrameError as e:
            conn.abort(f"protocol error from server: {e.message}")
            self.connection_lost(conn)
            return
        if msgs:
            self.on_messages(self, msgs)

    def connection_lost(self, conn: ServerConnection) -> None:
        if self.lost:
            return
        self.lost = True
        self.error = self.error or PgError(
            "08006", f"lost the connection to shard {self.shard}",
            hint="the server closed the connection or crashed; retry")
        self.on_messages(self, [])

    def cancel(self) -> None:
        if self.ready or self.lost or self.cancelled:
            return
        self.cancelled = True
        from .server import send_cancel  # the client's cancel path, reused
        address = self.conn.pool.address
        asyncio.get_running_loop().create_task(
            send_cancel(address.host, address.port, self.conn.pid, self.conn.secret))

    def give_back(self) -> None:
        conn = self.conn
        if conn.sink is self:
            conn.sink = None
        if self.lost or conn.closed:
            return
        if not self.ready:
            conn.abort("abandoned in the middle of a multi-shard statement")
        elif self.cancelled:
            # The cancel request may reach the server after this statement ended, and would
            # then cancel whatever the connection runs next: it is not used again.
            conn.close()
        else:
            conn.pool.release(conn)


def bind_parts(body: bytes) -> tuple[bytes, tuple[int, ...], tuple[bytes | None, ...]]:
    """The parameter part of a Bind body (formats, values: to copy as is), its result format
    codes, and the parameter values."""
    p = body.index(0)
    s = body.index(0, p + 1)
    start = pos = s + 1
    (nformats,) = _I16.unpack_from(body, pos)
    pos += 2 + 2 * max(nformats, 0)
    (nvalues,) = _I16.unpack_from(body, pos)
    pos += 2
    values: list[bytes | None] = []
    for _ in range(max(nvalues, 0)):
        (length,) = _I32.unpack_from(body, pos)
        pos += 4
        if length < 0:
            values.append(None)
        else:
            values.append(body[pos:pos + length])
            pos += length
    params = body[start:pos]
    (nresults,) = _I16.unpack_from(body, pos)
    results = struct.unpack_from(f"!{nresults}h", body, pos + 2) if nresults > 0 else ()
    return params, tuple(results), tuple(values)


def pick_params(section: bytes, numbers: Sequence[int]) -> bytes:
    """A Bind's parameter part (formats, values) with only the parameters `numbers` (the
    client's $n, 1-based), in that order: for a statement whose text was renumbered."""
    (nformats,) = _I16.unpack_from(section, 0)
    pos = 2 + 2 * max(nformats, 0)
    formats = struct.unpack_from(f"!{nformats}h", section, 2) if nformats > 0 else ()
    (nvalues,) = _I16.unpack_from(section, pos)
    pos += 2
    values: list[bytes] = []
    for _ in range(max(nvalues, 0)):
        (length,) = _I32.unpack_from(section, pos)
        end = pos + 4 + max(length, 0)
        values.append(section[pos:end])  # the length and the value, as sent
        pos = end
    if numbers and max(numbers) > len(values):
        raise PgError("08P01", f"bind message supplies {len(values)} parameters, but the "
                      f"statement uses ${max(numbers)}")
    if len(formats) > 1:
        formats = tuple(formats[n - 1] if n <= len(formats) else 0 for n in numbers)
    out = [_I16.pack(len(formats)), *(_I16.pack(f) for f in formats),
           _I16.pack(len(numbers)), *(values[n - 1] for n in numbers)]
    return b"".join(out)


async def query_rows(conn: ServerConnection, sql: str) -> list[list[str | None]]:
    """The rows (as text) of a query of the proxy's own, run on an idle connection."""
    rows: list[list[str | None]] = []
    failure: list[PgError] = []
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def messages(call: ShardCall, msgs: list[tuple[int, bytes]]) -> None:
        for kind, body in msgs:
            if kind == 0x44:
                rows.append(_text_values(body))
            elif kind == 0x45:
                failure.append(shard_error(call.shard, body))
            elif kind == 0x5A:
                call.ready = True
        if call.lost:
            failure.append(call.error or PgError("08006", f"lost shard {call.shard}"))
        if (call.ready or call.lost) and not done.done():
            done.set_result(None)

    call = ShardCall(0, conn, messages)
    conn.sink = call
    conn.write(m.query(sql))
    try:
        await done
    finally:
        conn.sink = None
    if failure:
        raise ShardFailure(failure[0])
    return rows


def _text_values(body: bytes) -> list[str | None]:
    (count,) = _I16.unpack_from(body, 0)
    pos = 2
    values: list[str | None] = []
    for _ in range(count):
        (length,) = _I32.unpack_from(body, pos)
        pos += 4
        if length < 0:
            values.append(None)
        else:
            values.append(body[pos:pos + length].decode("utf-8"))
            pos += length
    return values


async def show(conn: ServerConnection, name: str) -> str:
    """A server setting's value (SHOW name)."""
    rows = await query_rows(conn, f"SHOW {name}")
    if not rows or rows[0][0] is None:
        raise ShardFailure(PgError("XX000", f"SHOW {name} returned no value"))
    return rows[0][0]


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
