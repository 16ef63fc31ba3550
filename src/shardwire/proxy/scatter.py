"""Reads on several shards, merged (`ScatterRead`).

What the client sees is what one server would send for its statement: one RowDescription,
the merged DataRows, one CommandComplete with the total row count. The merge itself (what
each shard runs, how rows combine) is `shardwire.merge`; this module does the I/O: the
connections, the order of the shards' replies, back-pressure both ways, errors and cancels.
"""

from __future__ import annotations

import asyncio
import operator
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..merge import Merge, MergeError, MergePlan, MergeRefused
from .fanout import (
    ShardCall,
    ShardFailure,
    apply_settings,
    bind_parts,
    shard_error,
    take_connections,
)
from .protocol import messages as m
from .protocol.errors import PgError
from .protocol.framing import FrameError

if TYPE_CHECKING:
    from .pool import ServerConnection
    from .server import ClientConnection

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_LEN = struct.Struct("!I")
# A shard reading ahead of the others stops being read with this many rows held for it.
HIGH_WATER = 2000
_TYPE_OF = operator.itemgetter(0)  # a message's type byte


def integer_param(value: bytes | None, fmt: int) -> int | None:
    """A LIMIT/OFFSET parameter's value (text, or binary int2/int4/int8)."""
    if value is None:
        return None
    if fmt == 0:
        try:
            return int(value.decode("ascii").strip())
        except ValueError:
            raise PgError("22P02", f'invalid input syntax for type bigint: "{value!r}"') from None
    if len(value) in (2, 4, 8):
        return int.from_bytes(value, "big", signed=True)
    raise PgError("08P01", "incorrect binary data format in a LIMIT/OFFSET parameter")


class ScatterCall(ShardCall):
    """A shard's part of a scatter read. Its replies are split into whole messages
    (`MessageReader.frames`), so that DataRows reach the client as the shard sent them,
    without being framed again."""

    __slots__ = ("on_frames", "status")

    def __init__(self, index: int, conn: ServerConnection,
                 on_frames: Callable[[ScatterCall, list[bytes]], None]) -> None:
        super().__init__(index, conn, self._lost)
        self.on_frames = on_frames
        self.status = b"I"  # the shard's last ReadyForQuery status

    def data(self, conn: ServerConnection, data: bytes) -> None:
        try:
            frames = self.reader.frames(data)
        except FrameError as e:
            conn.abort(f"protocol error from server: {e.message}")
            self.connection_lost(conn)
            return
        if frames:
            self.on_frames(self, frames)

    def _lost(self, call: ShardCall, msgs: list[tuple[int, bytes]]) -> None:
        # ShardCall.connection_lost reports the loss as an empty list of messages.
        self.on_frames(self, [])


class ScatterRead:
    """One read on several shards, merged: from the shards' connections to the client's
    ReadyForQuery.

    `unit` is the client's messages for it: a simple Query, or Bind [Describe portal] Execute
    Sync (the statement parsed before, its text in `sql` and parameter types in
    `param_types`).

    `conns`: the connections of the client's transaction on these shards (in the order of
    `shards`, sorted), where the read runs inside that transaction: they stay the
    transaction's, and the client's transaction status follows theirs."""

    def __init__(self, client: ClientConnection, shards: Sequence[str], plan: MergePlan,
                 unit: Sequence[tuple[int, bytes]], *, param_types: Sequence[int] = (),
                 functions: frozenset[str] = frozenset(),
                 conns: Sequence[ServerConnection] | None = None) -> None:
        self.client = client
        self.given = list(conns) if conns is not None else None
        self.shards = sorted(shards)
        self.plan = plan
        self.unit = list(unit)
        self.param_types = tuple(param_types)
        self.functions = functions  # names the merge does not know: aggregates, maybe
        self.calls: list[ScatterCall] = []
        self.merge: Merge | None = None
        self.described = False  # the shards' RowDescription was handled
        self.want_description = False
        self.error: PgError | None = None
        self.done: asyncio.Future[None] | None = None
        self.paused: set[int] = set()
        self.client_paused = False
        self.simple = self.unit[0][0] == ord("Q")
        self.max_rows = 0  # the Execute's row limit (asyncpg's fetchrow sends 1); 0: all
        self.sent = 0  # rows written to the client
        # What the client is sent, held until there are rows for it or the statement ends:
        # a small result goes out in one write.
        self.held: list[bytes] = []

    # -- running ------------------------------------------------------------------------------

    async def run(self) -> None:
        client = self.client
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        try:
            request, merge_params, formats = self._request()
        except PgError as e:
            self._refused(e)
            return
        if self.given is not None:
            conns = self.given
        else:
            try:
                pools = [client.proxy.pool_for(shard) for shard in self.shards]
                conns = await take_connections(pools)
            except PgError as e:
                client.write(self._failure(e))
                return
        self.calls = [ScatterCall(i, conn, self._frames) for i, conn in enumerate(conns)]
        for call in self.calls:
            call.status = call.conn.link.status
        try:
            if self.given is None:
                for conn in conns:
                    await apply_settings(conn, client.settings)
            collation = await client.proxy.collation(conns[0])
            if self.functions and not self.plan.plan.groups_on_one_shard:
                aggregates = await client.proxy.aggregates_among(conns[0], self.functions)
                if aggregates:
                    raise MergeRefused(
                        f"{aggregates[0]}() is an aggregate the proxy cannot "
                        "combine across shards", hint="group by the sharding key, add a "
                        "condition on it that selects one shard, or name a shard with a "
                        "/* shard: name */ comment")
            self.merge = self.plan.start(merge_params, formats, collation, shards=len(conns),
                                         extra_float_digits=_extra_float_digits(client))
        except MergeError as e:
            self._give_back_all()
            self._refused(PgError(e.sqlstate, e.message, e.hint))
            return
        except (PgError, ShardFailure) as e:
            self._give_back_all()
            err = e.error if isinstance(e, ShardFailure) else e
            self._refused(err)
            return
        client.scatter = self
        if not self.simple:
            self.held.append(m.BIND_COMPLETE)
        for call in self.calls:
            call.conn.sink = call
            call.conn.write(request)
            stats = call.conn.pool.stats
            stats.queries += 1
            stats.bytes_in += len(request)
        try:
            await self.done
        finally:
            client.scatter = None
            self._give_back_all()

    def _request(self) -> tuple[bytes, dict[int, int | None], tuple[int, ...]]:
        """What every shard gets; the merge's LIMIT/OFFSET values; the client's formats."""
        sql = self.plan.shard_sql.encode("utf-8")
        if self.simple:
            return m.query(sql), {}, ()
        kinds = [k for k, _ in self.unit]
        bind = self.unit[0][1]
        params, formats, values = bind_parts(bind)
        shape_ok = (kinds[-1] == ord("S") and kinds[-2] == ord("E")
                    and all(k in (ord("D"), ord("H")) for k in kinds[1:-2]))
        if shape_ok:
            execute = self.unit[-2][1]
            shape_ok = execute[:1] == b"\x00" and len(execute) == 5
            self.max_rows = _I32.unpack_from(execute, 1)[0] if shape_ok else 0
        if not shape_ok:
            raise PgError(
                "0A000", "a query that reads several shards must come as Bind, Describe "
                "(optional), one Execute, then Sync",
                hint="fetch the rows of a query across shards with one Execute (no cursor "
                "that fetches in steps), or add a condition on the sharding key")
        self.want_description = any(k == ord("D") for k in kinds)
        param_formats = _param_formats(bind)
        merge_params = {}
        for number in self.plan.params_needed:
            index = number - 1
            fmt = param_formats[index] if len(param_formats) > 1 else (
                param_formats[0] if param_formats else 0)
            merge_params[number] = integer_param(
                values[index] if index < len(values) else None, fmt)
        types = b"".join(_LEN.pack(t) for t in self.param_types)
        parse = m.message(b"P", b"\x00" + sql + b"\x00" + _I16.pack(len(self.param_types))
                          + types)
        bind_msg = m.message(b"B", b"\x00\x00" + params + b"\x00\x00")  # results all in text
        request = (parse + bind_msg + m.message(b"D", b"P\x00")
                   + m.message(b"E", b"\x00\x00\x00\x00\x00") + m.SYNC)
        return request, merge_params, formats

    # -- the shards' replies ------------------------------------------------------------------

    def _frames(self, call: ScatterCall, frames: list[bytes]) -> None:
        merge = self.merge
        assert merge is not None
        out = self.held
        sent = self.sent
        notified = False
        try:
            notified = self._read(call, frames, merge, out)
        except MergeError as e:  # a value the merge cannot compute (overflow, division by 0)
            self._fail(PgError(e.sqlstate, e.message, e.hint))
            if any(frame[0] == 0x5A for frame in frames):  # the messages after it went unread
                call.ready = True
        if call.lost:
            self._fail(call.error or PgError("08006", f"lost shard {call.shard}"))
            call.ready = True  # nothing more will come from it
        if self.client.closed and self.error is None:
            self._fail(PgError("08006", "the client went away"))
        finished = all(c.ready for c in self.calls)
        if finished:
            self._finish(out)
        elif self.sent == sent and not notified:
            return  # nothing the client waits for yet: hold what there is
        self.held = []
        if out:
            self.client.write(b"".join(out))
        if finished and self.done is not None and not self.done.done():
            self.done.set_result(None)

    def _read(self, call: ScatterCall, frames: list[bytes], merge: Merge,
              out: list[bytes]) -> bool:
        """Handle a shard's messages; what goes to the client is added to `out`. True if a
        notice or notification was among them (it goes on at once)."""
        rows: list[bytes] = []
        notified = False
        if bytes(map(_TYPE_OF, frames)).count(0x44) == len(frames):
            # Only DataRows: the bulk of a large result, handed on without a look at each.
            rows = frames
            frames = []
        for frame in frames:
            kind = frame[0]
            if kind == 0x44:  # D: handed to the merge whole (see Merge.describe)
                rows.append(frame)
            elif kind == 0x54:  # T
                if not self.described:
                    self.described = True
                    description = merge.describe(frame[5:], frames=True)
                    if self.simple or self.want_description:
                        out.append(m.message(b"T", description))
            elif kind == 0x43:  # C
                if rows and self.error is None:
                    merge.feed(call.index, rows)
                rows = []
                if self.error is None:
                    merge.finish(call.index)
            elif kind == 0x5A:  # Z
                call.ready = True
                call.status = frame[5:6]
            elif kind == 0x45:  # E
                if merge.complete and self.error is None:
                    continue  # the client has all its rows already (LIMIT)
                if call.error is None:
                    call.error = shard_error(call.shard, frame[5:])
                self._fail(call.error)
            elif kind == 0x4E or kind == 0x41:  # a notice or a notification: pass it on
                out.append(frame)
                notified = True
            elif kind == 0x6E:  # NoData: not a query that returns rows
                if not self.described:
                    self.described = True
                    if self.want_description:
                        out.append(m.NO_DATA)
            # ParseComplete, BindComplete, ParameterStatus: the proxy's own business
        if rows and self.error is None:
            merge.feed(call.index, rows)
        if self.error is None:
            taken = merge.take()
            if taken and self.max_rows > 0:
                # An Execute with a row limit: the rows beyond it are read and dropped (the
                # portal ends at the Sync that follows).
                taken = taken[:max(0, self.max_rows - self.sent)]
            if taken:
                self.sent += len(taken)
                out.append(b"".join(taken))  # whole DataRow messages
            # A merge complete before every shard is (LIMIT) lets them end by themselves: each
            # has a LIMIT of its own, and a cancel would cost the connection (see give_back).
            self._flow(call, merge)
        return notified

    def _flow(self, call: ShardCall, merge: Merge) -> None:
        """Stop reading a shard that is far ahead of the others; read it again once the
        merge has used what it sent."""
        transport = call.conn.transport
        if transport is None:
            return
        if merge.buffered(call.index) > HIGH_WATER:
            if call.index not in self.paused:
                self.paused.add(call.index)
                transport.pause_reading()
        for index in list(self.paused):
            if merge.buffered(index) <= HIGH_WATER // 2 and not self.client_paused:
                self.paused.discard(index)
                other = self.calls[index].conn.transport
                if other is not None:
                    other.resume_reading()

    def pause(self) -> None:
        """The client reads slower than the shards send."""
        self.client_paused = True
        for call in self.calls:
            if call.conn.transport is not None and not call.ready:
                call.conn.transport.pause_reading()

    def resume(self) -> None:
        self.client_paused = False
        merge = self.merge
        for call in self.calls:
            if call.conn.transport is None or call.ready:
                continue
            if merge is None or merge.buffered(call.index) <= HIGH_WATER:
                self.paused.discard(call.index)
                call.conn.transport.resume_reading()

    def cancel(self) -> None:
        """The client's cancel request: every shard still working gets one."""
        for call in self.calls:
            call.cancel()

    def _fail(self, err: PgError) -> None:
        if self.error is None:
            self.error = err
            self._cancel_rest()
            # Whatever was paused must be read to its end now.
            for index in list(self.paused):
                transport = self.calls[index].conn.transport
                if transport is not None:
                    transport.resume_reading()
            self.paused.clear()

    def _cancel_rest(self) -> None:
        for call in self.calls:
            if not call.ready:
                call.cancel()

    def _finish(self, out: list[bytes]) -> None:
        """The statement's end, after what `out` holds for the client."""
        if self.error is not None:
            out.append(self._failure(self.error))
        elif self.max_rows > 0 and self.sent >= self.max_rows:
            # As PostgreSQL does when an Execute's limit is reached: the portal is suspended.
            out.append(m.message(b"s") + m.ready_for_query(self._status()))
        else:
            out.append(m.command_complete(f"SELECT {self.sent}")
                       + m.ready_for_query(self._status()))

    def _status(self) -> bytes:
        """The client's transaction status after the read."""
        if self.given is None:
            return b"I"
        failed = self.error is not None or any(c.status == b"E" for c in self.calls)
        return b"E" if failed else b"T"

    def _failure(self, err: PgError) -> bytes:
        return m.error_response(err) + m.ready_for_query(self._status())

    def _refused(self, err: PgError) -> None:
        """A failure before any shard ran the read. Inside a transaction it fails the
        transaction too, as an error does on one server: a shard's connection is made to fail
        in order (the proxy's refusal path), and the client sees `err` from it."""
        if self.given is None:
            self.client.write(self._failure(err))
            return
        self.client.refuse_in_transaction(err, self.given[0])

    def _give_back_all(self) -> None:
        if self.given is not None:
            for call in self.calls:  # still the transaction's
                if call.conn.sink is call:
                    call.conn.sink = None
                call.conn.link.status = call.status
        else:
            for call in self.calls:
                call.give_back()
        self.paused.clear()


def _extra_float_digits(client: ClientConnection) -> int:
    try:
        return int(client.settings.get("extra_float_digits", "1"))
    except ValueError:
        return 1


def _param_formats(bind: bytes) -> tuple[int, ...]:
    p = bind.index(0)
    s = bind.index(0, p + 1)
    (count,) = _I16.unpack_from(bind, s + 1)
    return struct.unpack_from(f"!{count}h", bind, s + 3) if count > 0 else ()

