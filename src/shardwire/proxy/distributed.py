"""Statements and transactions that change several shards: all or nothing.

`Participant` is one shard's connection in such work, used request by request (the proxy
reads the replies itself). `Coordinator.commit` ends a transaction open on several
participants: a plain COMMIT where at most one shard wrote, else two-phase commit — PREPARE
TRANSACTION on every shard that wrote, the decision recorded durably in the catalog database,
then COMMIT PREPARED everywhere (recovery finishes what a crash interrupts: twophase.py).
`DistributedStatement` runs one statement on several shards outside a transaction block
(DDL, maintenance, UPDATE/DELETE without a key, writes to reference tables, a multi-row
INSERT split by shard).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..router.split import ShardText
from .fanout import (
    ShardCall,
    apply_settings,
    bind_parts,
    pick_params,
    shard_error,
    take_connections,
)
from .pool import ServerConnection
from .protocol import messages as m
from .protocol.errors import PgError

if TYPE_CHECKING:
    from .server import ClientConnection, Proxy

log = logging.getLogger("shardwire.distributed")

_I16 = struct.Struct("!h")
_LEN = struct.Struct("!I")

# Tests stop the proxy at one of these points of a two-phase commit (SHARDWIRE_FAULT=point),
# the way a crash would: after_prepare, after_decision, mid_commit.
FAULT = os.environ.get("SHARDWIRE_FAULT", "")


def fault(point: str) -> None:
    if FAULT == point:
        log.warning("SHARDWIRE_FAULT=%s: exiting now", point)
        os._exit(99)


@dataclass(slots=True)
class Reply:
    """What a shard answered to one request, up to its ReadyForQuery."""

    tags: list[bytes] = field(default_factory=list)
    rows: list[bytes] = field(default_factory=list)  # DataRow bodies
    errors: list[PgError] = field(default_factory=list)
    notices: list[bytes] = field(default_factory=list)  # NoticeResponse bodies
    description: bytes | None = None  # the first RowDescription or NoData message, framed

    @property
    def tag(self) -> bytes:
        return self.tags[-1] if self.tags else b""


class Participant:
    """A shard's connection taking part in a distributed statement or transaction."""

    __slots__ = ("conn", "call", "reply", "expect", "done", "status", "wrote")

    def __init__(self, conn: ServerConnection, *, status: bytes = b"I") -> None:
        self.conn = conn
        self.call = ShardCall(0, conn, self._messages)
        self.reply = Reply()
        self.expect = 0
        self.done: asyncio.Future[None] | None = None
        self.status = status  # the last ReadyForQuery status: I, T or E
        self.wrote = False  # a statement that is not a plain read ran here

    @property
    def shard(self) -> str:
        return self.conn.pool.shard

    async def run(self, data: bytes, replies: int = 1) -> Reply:
        """Send `data` and read until `replies` ReadyForQuery messages came back."""
        await self.send(data, replies)
        return self.reply

    def send(self, data: bytes, replies: int = 1) -> asyncio.Future[None]:
        """Send `data`; the future is done once `replies` ReadyForQuery messages came back
        (`reply` holds them). No task of its own: `run_all` sends to every participant, then
        waits for each."""
        self.reply = Reply()
        self.expect = replies
        done = self.done = asyncio.get_running_loop().create_future()
        if self.call.lost or self.conn.closed:
            self.reply.errors.append(self.call.error or PgError(
                "08006", f"lost the connection to shard {self.shard}"))
            done.set_result(None)
            return done
        self.call.ready = False
        self.conn.sink = self.call
        self.conn.write(data)
        return done

    def _messages(self, call: ShardCall, msgs: list[tuple[int, bytes]]) -> None:
        reply = self.reply
        for kind, body in msgs:
            if kind == 0x44:  # D
                reply.rows.append(body)
            elif kind == 0x43:  # C
                reply.tags.append(body[:-1])
            elif kind == 0x5A:  # Z
                self.status = body[:1]
                self.expect -= 1
            elif kind == 0x45:  # E
                reply.errors.append(shard_error(self.shard, body))
            elif kind == 0x4E:  # N
                reply.notices.append(body)
            elif kind == 0x54 or kind == 0x6E:  # T, n
                if reply.description is None:
                    reply.description = m.message(bytes([kind]), body)
        if call.lost:
            reply.errors.append(call.error or PgError("08006", f"lost shard {self.shard}"))
            self.expect = 0
        if self.expect <= 0 and self.done is not None and not self.done.done():
            call.ready = True
            self.done.set_result(None)

    def detach(self) -> None:
        """Back to the ordinary relay (the client's statements stream through it again)."""
        if self.conn.sink is self.call:
            self.conn.sink = None
        self.conn.link.status = self.status

    def give_back(self) -> None:
        """To the pool, if it is idle outside a transaction; closed otherwise."""
        self.detach()
        conn = self.conn
        if conn.closed or self.call.lost:
            return
        conn.client = None
        if self.status != b"I":
            conn.abort("left inside a transaction by a distributed statement")
            return
        conn.pool.release(conn)


async def run_all(parts: Sequence[Participant], data: bytes | Mapping[str, bytes],
                  replies: int = 1, *, before: bytes = b"") -> list[Reply]:
    """Send every participant `data` (or its own entry of it, by shard), after `before`;
    their replies once all have answered."""
    if isinstance(data, bytes):
        sent = [p.send(before + data, replies) for p in parts]
    else:
        sent = [p.send(before + data[p.shard], replies) for p in parts]
    for done in sent:
        await done
    return [p.reply for p in parts]


def _first_error(replies: Sequence[Reply]) -> PgError | None:
    for reply in replies:
        if reply.errors:
            return reply.errors[0]
    return None


class Coordinator:
    """Ends transactions open on several shards (see the module docstring)."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        from .twophase import new_instance_id
        self.instance = new_instance_id()
        self.numbers = itertools.count(1)
        self.commits = 0  # two-phase commits completed
        self.aborts = 0

    async def rollback(self, parts: Sequence[Participant]) -> None:
        await run_all([p for p in parts if p.status != b"I"], m.query("ROLLBACK"))

    async def commit(self, parts: Sequence[Participant]) -> tuple[bytes, PgError | None]:
        """COMMIT on every participant, all or nothing: (the tag, the error, if any)."""
        if any(p.status == b"E" for p in parts):
            await self.rollback(parts)
            return b"ROLLBACK", None  # as PostgreSQL answers COMMIT in a failed transaction
        parts = [p for p in parts if p.status == b"T"]
        unsure = [p for p in parts if not p.wrote]
        if unsure and len(parts) > 1:
            # A read may still have written (a function with side effects): the server knows.
            checks = await run_all(unsure, m.query(
                "SELECT pg_catalog.pg_current_xact_id_if_assigned() IS NOT NULL"))
            error = _first_error(checks)
            if error is not None:
                await self.rollback(parts)
                return b"ROLLBACK", error
            for part, check in zip(unsure, checks, strict=True):
                part.wrote = bool(check.rows) and check.rows[0].endswith(b"t")
        written = [p for p in parts if p.wrote]
        readers = [p for p in parts if not p.wrote]
        if len(written) <= 1:
            replies = await run_all(readers + written, m.query("COMMIT"))
            error = _first_error(replies)
            tag = replies[-1].tag if replies else b"COMMIT"
            return (tag or b"COMMIT"), error
        return await self._two_phase(readers, written)

    async def _two_phase(self, readers: Sequence[Participant], written: Sequence[Participant]
                         ) -> tuple[bytes, PgError | None]:
        from .twophase import CommitOutcomeUnknown, make_gid
        decisions = self.proxy.decision_log  # the catalog's, or the default shard's
        gid = make_gid(self.instance, next(self.numbers))
        quoted = gid.replace("'", "''")
        decider = next((p for p in (*written, *readers)
                        if p.conn.pool.address == decisions.address), None)
        if decider is not None:
            return await self._decided_by(decider, readers, written, gid)
        error = await self._prepare(readers, written, gid)
        if error is not None:
            return b"ROLLBACK", error
        fault("after_prepare")
        try:
            await decisions.record_commit(gid, [p.shard for p in written])
        except CommitOutcomeUnknown as e:
            # Whether the decision was stored is unknown: the prepared transactions stay as
            # they are, and recovery finishes them by what it finds once the catalog answers.
            self.aborts += 1
            return b"ROLLBACK", PgError(
                "08007", "the outcome of the transaction is unknown: the catalog database "
                f"went away while the commit decision was written ({e.message}); recovery "
                "commits or rolls it back on every shard once the catalog answers",
                hint="check the catalog database; SHOW IN_DOUBT in the admin console lists "
                "the transaction until it is resolved")
        except PgError as e:
            await run_all(written, m.query(f"ROLLBACK PREPARED '{quoted}'"))
            self.aborts += 1
            return b"ROLLBACK", PgError(
                "40000", "the transaction was rolled back on every shard: the commit "
                f"decision could not be recorded in the catalog database ({e.message})",
                hint="check the catalog database, then retry the transaction")
        fault("after_decision")
        await self._commit_prepared(written, gid)
        return b"COMMIT", None

    async def _prepare(self, readers: Sequence[Participant], written: Sequence[Participant],
                       gid: str) -> PgError | None:
        """PREPARE TRANSACTION on `written` (COMMIT on `readers` meanwhile); when one cannot
        prepare, the others are rolled back and the client's error is returned."""
        quoted = gid.replace("'", "''")
        readers_done = asyncio.ensure_future(run_all(readers, m.query("COMMIT")))
        prepared = await run_all(written, m.query(f"PREPARE TRANSACTION '{quoted}'"))
        await readers_done
        ok = [p for p, r in zip(written, prepared, strict=True)
              if not r.errors and r.tag == b"PREPARE TRANSACTION"]
        if len(ok) == len(written):
            return None
        failed = next(p for p in written if p not in ok)
        reply = prepared[written.index(failed)]
        why = reply.errors[0].message if reply.errors else "its transaction had failed"
        await run_all(ok, m.query(f"ROLLBACK PREPARED '{quoted}'"))
        self.aborts += 1
        return PgError("40000", f"the transaction was rolled back on every shard: shard "
                       f"{failed.shard} could not prepare it ({why})",
                       hint="retry the transaction")

    async def _commit_prepared(self, written: Sequence[Participant], gid: str) -> None:
        """COMMIT PREPARED everywhere, once the decision is recorded; what fails is left to
        recovery, which commits it by the decision."""
        commit = m.query("COMMIT PREPARED '" + gid.replace("'", "''") + "'")
        if FAULT == "mid_commit":
            if len(written) > 1:
                await written[0].run(commit)
            fault("mid_commit")
        done = await run_all(written, commit)
        # "does not exist" (42704) or "busy" (55000): recovery is finishing it already.
        failures = [(p.shard, r.errors[0]) for p, r in zip(written, done, strict=True)
                    if r.errors and r.errors[0].sqlstate not in ("42704", "55000")]
        self.commits += 1
        if failures:
            for shard, error in failures:
                log.warning("COMMIT PREPARED %s on %s failed: %s; recovery will finish it",
                            gid, shard, error.message)
        else:
            self.proxy.decision_log.forget_soon(gid)

    async def _decided_by(self, decider: Participant, readers: Sequence[Participant],
                          written: Sequence[Participant], gid: str
                          ) -> tuple[bytes, PgError | None]:
        """Two-phase commit where a participant's shard database holds the decision log (no
        catalog of its own): that participant is not prepared. Once the others are, it
        records the decision inside its own transaction and commits: that COMMIT is the
        decision, durable with its writes. Then COMMIT PREPARED on the others. Recovery is
        unchanged: a prepared transaction commits if its decision row exists. Saves the
        decider's PREPARE and COMMIT PREPARED and a connection to the log."""
        decisions = self.proxy.decision_log
        quoted = gid.replace("'", "''")
        others = [p for p in written if p is not decider]
        readers = [p for p in readers if p is not decider]
        try:
            table = await decisions.table()
        except PgError as e:
            await self.rollback([*written, *readers, decider])
            self.aborts += 1
            return b"ROLLBACK", PgError(
                "40000", "the transaction was rolled back on every shard: the commit decision "
                f"could not be recorded ({e.message})", hint="retry the transaction")
        error = await self._prepare(readers, others, gid)
        if error is not None:
            await self.rollback([decider])
            return b"ROLLBACK", error
        fault("after_prepare")
        sql = decisions.commit_statement(table, gid, [p.shard for p in others])
        reply = await decider.run(m.query(sql))
        if decider.call.lost:
            # The COMMIT went out and its fate is unknown: recovery finds the decision row,
            # or not, once the shard answers.
            self.aborts += 1
            return b"ROLLBACK", PgError(
                "08007", "the outcome of the transaction is unknown: shard "
                f"{decider.shard} went away while it committed (its commit is the decision); "
                "recovery commits or rolls back the other shards by what it finds there",
                hint="SHOW IN_DOUBT in the admin console lists the transaction until it is "
                "resolved")
        if reply.errors or reply.tag != b"COMMIT":
            await run_all(others, m.query(f"ROLLBACK PREPARED '{quoted}'"))
            self.aborts += 1
            why = reply.errors[0].message if reply.errors else "it did not commit"
            return b"ROLLBACK", PgError(
                "40000", f"the transaction was rolled back on every shard: shard "
                f"{decider.shard} could not commit it with the decision ({why})",
                hint="retry the transaction")
        fault("after_decision")
        await self._commit_prepared(others, gid)
        return b"COMMIT", None


# Statements PostgreSQL refuses inside a transaction block: sent to each shard on their own.
_NO_TRANSACTION = re.compile(
    rb"(?is)^\s*(vacuum|create\s+database|drop\s+database|alter\s+system|reindex\s+.*"
    rb"\bconcurrently\b|(create|drop)\s+(unique\s+)?index\s+concurrently|cluster\s*;?\s*$)")
_TAG_COUNT = re.compile(rb"^(INSERT 0|UPDATE|DELETE|SELECT|MERGE|COPY) (\d+)$")


def shard_requests(shards: Sequence[str], sql: bytes, unit: Sequence[tuple[int, bytes]],
                   param_types: Sequence[int], split: Mapping[str, ShardText] | None = None
                   ) -> dict[str, bytes]:
    """What each shard gets: the client's statement, or its own part of a split INSERT."""
    if split is None:
        return dict.fromkeys(shards, statement_request(sql, unit, param_types))
    return {shard: statement_request(split[shard].sql, unit, param_types,
                                     split[shard].params) for shard in shards}


def statement_request(sql: bytes, unit: Sequence[tuple[int, bytes]],
                      param_types: Sequence[int], numbers: Sequence[int] | None = None
                      ) -> bytes:
    """What a shard gets for the client's statement: a Query, or Parse/Bind/Describe/
    Execute/Sync of the statement with its parameters (only the client's parameters
    `numbers`, in that order, when the text was renumbered)."""
    if unit[0][0] == ord("Q"):
        return m.query(sql)
    kinds = [k for k, _ in unit]
    if kinds[-1] != ord("S") or kinds[-2] != ord("E") or not all(
            k in (ord("D"), ord("H")) for k in kinds[1:-2]):
        raise PgError("0A000", "a statement for several shards must come as Bind, Describe "
                      "(optional), Execute, then Sync", hint="send it with the simple query "
                      "protocol")
    params, results, _ = bind_parts(unit[0][1])
    if numbers is not None:
        params = pick_params(params, numbers)
        param_types = [param_types[n - 1] if n <= len(param_types) else 0 for n in numbers]
    types = b"".join(_LEN.pack(t) for t in param_types)
    return (m.message(b"P", b"\x00" + sql + b"\x00" + _I16.pack(len(param_types)) + types)
            + m.message(b"B", b"\x00\x00" + params + _I16.pack(len(results))
                        + b"".join(_I16.pack(r) for r in results))
            + m.message(b"D", b"P\x00") + m.message(b"E", b"\x00\x00\x00\x00\x00") + m.SYNC)


def combined_tag(replies: Sequence[Reply], *, same_rows: bool) -> bytes:
    """One command tag for the shards' tags: row counts added, unless every shard holds the
    same rows (a reference table), where one shard's count is the answer."""
    tags = [r.tags[-1] for r in replies if r.tags and r.tags[-1] not in (b"BEGIN",)]
    if not tags:
        return b"COMMIT"
    counted = [_TAG_COUNT.match(t) for t in tags]
    if same_rows or not all(counted):
        return tags[0]
    total = sum(int(c.group(2)) for c in counted if c is not None)
    first = counted[0]
    assert first is not None
    return first.group(1) + b" " + str(total).encode()


class DistributedStatement:
    """One statement on several shards outside a transaction block, all or nothing: each shard
    runs it in a transaction, and the coordinator commits them together (two-phase commit
    when two or more wrote). Statements PostgreSQL will not run in a transaction block
    (VACUUM, CREATE INDEX CONCURRENTLY...) run on each shard on their own, as on one server,
    where they are not atomic either."""

    def __init__(self, client: ClientConnection, shards: Sequence[str], sql: bytes,
                 unit: Sequence[tuple[int, bytes]], *, param_types: Sequence[int] = (),
                 same_rows: bool = False, wrote: bool = True,
                 split: Mapping[str, ShardText] | None = None,
                 rows: Sequence[str] | None = None) -> None:
        self.client = client
        self.shards = sorted(shards)
        self.sql = sql
        self.unit = list(unit)
        self.param_types = tuple(param_types)
        self.same_rows = same_rows  # every shard holds the same rows (a reference table)
        self.split = split  # a multi-row INSERT: each shard's own statement
        self.rows = rows  # ... and the shard of each of its rows, in order
        self.wrote = wrote
        self.simple = self.unit[0][0] == ord("Q")
        self.started = time.monotonic()
        self.parts: list[Participant] = []
        self.deadlocked = False  # cancelled by the deadlock check

    def lock_owner(self) -> LockOwner:
        return LockOwner(self.started, {(p.shard, p.conn.pid): p.conn for p in self.parts},
                         self._victim)

    def _victim(self, shard: str, conn: ServerConnection) -> None:
        self.deadlocked = True
        for part in self.parts:
            part.call.cancel()

    async def run(self) -> None:
        client = self.client
        try:
            requests = shard_requests(self.shards, self.sql, self.unit, self.param_types,
                                      self.split)
            conns = await take_connections([client.proxy.pool_for(s) for s in self.shards])
        except PgError as e:
            client.write(self._reply([], e))
            return
        parts = self.parts = [Participant(conn) for conn in conns]
        running = client.proxy.distributed_running
        running.add(self)
        try:
            for conn in conns:
                await apply_settings(conn, client.settings)
            if _NO_TRANSACTION.match(self.sql):
                replies = await run_all(parts, requests)
                client.write(self._reply(replies, _first_error(replies)))
                return
            replies = await run_all(parts, requests, 2, before=m.query("BEGIN"))
            running.discard(self)
            error = _first_error(replies)
            if error is not None and self.deadlocked:
                error = deadlock_error(self.shards)
            if error is not None:
                await client.proxy.coordinator.rollback(parts)
                client.write(self._reply(replies, error))
                return
            for part in parts:
                part.wrote = self.wrote
            _, error = await client.proxy.coordinator.commit(parts)
            client.write(self._reply(replies, error))
        except Exception:
            for part in parts:
                part.status = b"E"  # not to be reused: its state is unknown
            raise
        finally:
            running.discard(self)
            for part in parts:
                part.give_back()

    def _reply(self, replies: Sequence[Reply], error: PgError | None) -> bytes:
        out = [] if self.simple else [m.BIND_COMPLETE]
        if error is not None:
            for reply in replies:
                out.extend(m.message(b"N", n) for n in reply.notices)
            return b"".join(out) + m.error_response(error) + m.ready_for_query(b"I")
        out.append(statement_reply(self.unit, replies, same_rows=self.same_rows,
                                   rows=self.rows, shards=self.shards))
        out.append(m.ready_for_query(b"I"))
        return b"".join(out)


@dataclass(frozen=True, slots=True)
class Step:
    """One statement of a query string run across shards: its text and where it runs."""

    sql: bytes
    shards: tuple[str, ...]  # empty: any participant
    write: bool = False
    same_rows: bool = False  # a reference table: every shard returns the same rows
    split: Mapping[str, ShardText] | None = None  # a multi-row INSERT split by shard
    rows: tuple[str, ...] | None = None


class QueryString(DistributedStatement):
    """A query string whose statements need different shards, outside a transaction block:
    one transaction across them, as one server runs a query string in one implicit
    transaction. Each statement runs in order on its shards (a participant begins at its
    first); the first error rolls every participant back after the results so far, as on
    one server; at the end the coordinator commits them together. `tags`: the BEGIN and
    COMMIT the string was written with, answered around its statements."""

    def __init__(self, client: ClientConnection, shards: Sequence[str], steps: Sequence[Step],
                 *, begin: bytes = b"BEGIN", tags: bool = False) -> None:
        super().__init__(client, shards, b"", [(ord("Q"), b"")])
        self.steps = list(steps)
        self.begin = begin
        self.tags = tags

    async def run(self) -> None:
        client = self.client
        try:
            conns = await take_connections([client.proxy.pool_for(s) for s in self.shards])
        except PgError as e:
            client.write(m.error_response(e) + m.ready_for_query(b"I"))
            return
        parts = self.parts = [Participant(conn) for conn in conns]
        by_shard = {p.shard: p for p in parts}
        begun: set[str] = set()
        out = [m.command_complete("BEGIN")] if self.tags else []
        running = client.proxy.distributed_running
        running.add(self)
        try:
            for conn in conns:
                await apply_settings(conn, client.settings)
            for step in self.steps:
                targets = [by_shard[s] for s in step.shards] or [parts[0]]
                requests = shard_requests([p.shard for p in targets], step.sql, self.unit, (),
                                          step.split)
                begin = m.query(self.begin)
                replies = list(await asyncio.gather(*(
                    p.run(requests[p.shard], 1) if p.shard in begun
                    else p.run(begin + requests[p.shard], 2) for p in targets)))
                begun.update(p.shard for p in targets)
                for part in targets:
                    part.wrote = part.wrote or step.write
                error = _first_error(replies)
                if error is not None:
                    if self.deadlocked:
                        error = deadlock_error(self.shards)
                    await client.proxy.coordinator.rollback(parts)
                    out.extend(m.message(b"N", n) for r in replies for n in r.notices)
                    client.write(b"".join(out) + m.error_response(error)
                                 + m.ready_for_query(b"I"))
                    return
                out.append(statement_reply(self.unit, replies, same_rows=step.same_rows,
                                           rows=step.rows, shards=[p.shard for p in targets]))
            running.discard(self)
            _, error = await client.proxy.coordinator.commit(
                [p for p in parts if p.shard in begun])
            if error is not None:
                out.append(m.error_response(error))
            elif self.tags:
                out.append(m.command_complete("COMMIT"))
            client.write(b"".join(out) + m.ready_for_query(b"I"))
        except Exception:
            for part in parts:
                part.status = b"E"  # not to be reused: its state is unknown
            raise
        finally:
            running.discard(self)
            for part in parts:
                part.give_back()


def statement_reply(unit: Sequence[tuple[int, bytes]], replies: Sequence[Reply], *,
                    same_rows: bool, rows: Sequence[str] | None = None,
                    shards: Sequence[str] = ()) -> bytes:
    """What the client gets for its statement run on several shards (after any
    BindComplete, before ReadyForQuery): notices, the description, the rows (RETURNING) and
    one command tag. For a split INSERT (`rows`: the shard of each VALUES row; `shards`: whose
    the replies are), RETURNING rows come back in the order of the VALUES rows, as from one
    server, whenever every shard returned one row per row it inserted."""
    out: list[bytes] = []
    for reply in replies:
        out.extend(m.message(b"N", n) for n in reply.notices)
    described = next((r.description for r in replies if r.description), None)
    if unit[0][0] == ord("Q"):
        if described is not None and described[:1] == b"T":
            out.append(described)
    elif any(k == ord("D") for k, _ in unit):
        out.append(described or m.NO_DATA)
    returned = _in_row_order(replies, rows, shards) if rows is not None else None
    if returned is None:
        returned = [r for reply in (replies[:1] if same_rows else replies) for r in reply.rows]
    out.extend(b"D" + _LEN.pack(len(r) + 4) + r for r in returned)
    out.append(m.message(b"C", combined_tag(replies, same_rows=same_rows) + b"\x00"))
    return b"".join(out)


def _in_row_order(replies: Sequence[Reply], rows: Sequence[str], shards: Sequence[str]
                  ) -> list[bytes] | None:
    """The shards' RETURNING rows in the order of the inserted rows; None when a shard
    returned a different number of rows (ON CONFLICT DO NOTHING skipped some)."""
    by_shard = {shard: iter(reply.rows) for shard, reply in zip(shards, replies, strict=True)}
    counts = {shard: len(reply.rows) for shard, reply in zip(shards, replies, strict=True)}
    if any(counts.get(shard, 0) != rows.count(shard) for shard in by_shard):
        return None
    return [next(by_shard[shard]) for shard in rows]


_SAVEPOINT_NAME = re.compile(rb'("(?:[^"]|"")+"|[A-Za-z_][\w$]*)\s*;?\s*$')


def follow_savepoints(savepoints: list[str], words: Sequence[str], sql: bytes) -> None:
    """Keep `savepoints` (the open ones, in order) in step with SAVEPOINT, RELEASE and
    ROLLBACK TO, so that a shard joining later gets the same ones."""
    found = _SAVEPOINT_NAME.search(sql)
    if found is None or not words:
        return
    name = found.group(1).decode("utf-8", "replace")
    if not name.startswith('"'):
        name = name.lower()
    if words[0] == "savepoint":
        savepoints.append(name)
    elif name in savepoints:
        index = len(savepoints) - 1 - savepoints[::-1].index(name)
        # RELEASE drops it and the later ones; ROLLBACK TO keeps it, drops the later ones.
        del savepoints[index + (0 if words[0] == "release" else 1):]


class ShardTransaction:
    """A client's transaction on several shards: the connection of each shard that has
    joined, the BEGIN they started with, and (kept by the client) the open savepoints."""

    __slots__ = ("begin", "conns", "implicit", "savepoints", "started", "written")

    def __init__(self, begin: bytes, first: ServerConnection | None,
                 savepoints: list[str]) -> None:
        self.begin = begin
        self.started = time.monotonic()
        self.written: set[str] = set()  # shards sent more than plain reads
        self.conns: dict[str, ServerConnection] = {}
        if first is not None:
            self.conns[first.pool.shard] = first
        self.savepoints = savepoints
        # The implicit transaction of a pipeline (extended-protocol statements up to a Sync)
        # that went on to another shard: it ends at the Sync (ClientConnection._hop).
        self.implicit = False

    def joining_queries(self) -> tuple[bytes, int]:
        """What a joining shard runs first (in sink mode), and how many replies that is."""
        out = m.query(self.begin)
        for name in self.savepoints:
            out += m.query(f"SAVEPOINT {name}")
        return out, 1 + len(self.savepoints)


# -- deadlocks across shards -----------------------------------------------------------------
#
# Each shard detects the deadlocks among its own backends; a cycle through two shards (T1
# holds a row on s1 and waits on s2, T2 holds the row on s2 and waits on s1) no single server
# sees. Every second while two or more transactions span shards, the proxy asks each shard
# which of its backends wait for which (pg_blocking_pids), joins the answers through the
# backends of its own transactions, and cancels the youngest transaction of any cycle with
# SQLSTATE 40P01, as PostgreSQL does for a deadlock on one server.

DEADLOCK_CHECK_INTERVAL = 1.0
_WAITERS = ("SELECT pid, pg_catalog.pg_blocking_pids(pid) FROM pg_catalog.pg_stat_activity "
            "WHERE datname = pg_catalog.current_database() AND wait_event_type = 'Lock'")


@dataclass(eq=False)
class LockOwner:
    """A transaction of the proxy's on several shards, as the deadlock check sees it."""

    started: float
    backends: dict[tuple[str, int], ServerConnection]  # (shard, backend pid) -> connection
    victim: Callable[[str, ServerConnection], None]  # cancel its statement waiting there


def find_cycle(edges: dict[LockOwner, set[LockOwner]]) -> list[LockOwner] | None:
    """One cycle of the wait-for graph, if there is any."""
    state: dict[LockOwner, int] = {}  # 1: on the current path, 2: done
    path: list[LockOwner] = []

    def visit(node: LockOwner) -> list[LockOwner] | None:
        state[node] = 1
        path.append(node)
        for nxt in edges.get(node, ()):
            if state.get(nxt) == 1:
                return path[path.index(nxt):]
            if nxt not in state:
                found = visit(nxt)
                if found is not None:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in list(edges):
        if node not in state:
            found = visit(node)
            if found is not None:
                return found
    return None


async def check_deadlocks(proxy: Proxy, owners: Sequence[LockOwner]) -> LockOwner | None:
    """One pass: the victim cancelled, if a cycle was found."""
    from .fanout import query_rows
    by_backend = {key: owner for owner in owners for key in owner.backends}
    shards = sorted({shard for shard, _ in by_backend})
    edges: dict[LockOwner, set[LockOwner]] = {}
    waiting: dict[LockOwner, tuple[str, ServerConnection]] = {}
    for shard in shards:
        pool = proxy.pool_for(shard)
        try:
            conn = pool.try_acquire() or await pool.acquire()
        except PgError:
            continue  # no connection to spare: the next pass looks again
        try:
            rows = await query_rows(conn, _WAITERS)
        except Exception as e:  # noqa: BLE001 - a failed look is retried next pass
            log.info("deadlock check on %s failed: %s", shard, e)
            conn.abort("deadlock check failed")
            continue
        pool.release(conn)
        for pid_text, blockers in rows:
            if pid_text is None or not blockers:
                continue
            waiter = by_backend.get((shard, int(pid_text)))
            if waiter is None:
                continue
            for blocker in blockers.strip("{}").split(","):
                if not blocker:
                    continue
                holder = by_backend.get((shard, int(blocker)))
                if holder is not None and holder is not waiter:
                    edges.setdefault(waiter, set()).add(holder)
                    waiting[waiter] = (shard, waiter.backends[(shard, int(pid_text))])
    cycle = find_cycle(edges)
    log.debug("deadlock check: %d transactions, %d waiting on another", len(owners),
              len(edges))
    if cycle is None:
        return None
    victim = max(cycle, key=lambda o: o.started)
    if victim in waiting:
        shard, conn = waiting[victim]
        victim.victim(shard, conn)
    return victim


def deadlock_error(shards: Sequence[str]) -> PgError:
    return PgError("40P01", "deadlock detected across shards "
                   f"({', '.join(sorted(set(shards)))}): this transaction was chosen to "
                   "end it", hint="retry the transaction; taking rows in the same order in "
                   "every transaction avoids deadlocks")
