"""Admission control, PAUSE / RESUME and the drain of a graceful shutdown: whether a client's
next transaction may start now, must wait, or is refused.

The proxy consults this module only while it is engaged (`Proxy.gate` is not None): when a
limit is configured, while the proxy is paused, and while it shuts down. Otherwise the cost
per statement is one attribute check in `ClientConnection._deliver`, and one more where a
transaction may have ended (`client.admitted is not None`).

A client is "in a transaction" from the first message of its work until the proxy has
answered all of it and no transaction is open; outside BEGIN each statement is one. Its
place is a `Ticket` listing the limits it counts against. Work that must wait is held whole
(its messages, in order) while the client's socket is not read, so a backlog costs one
`Waiter` per client, never a growing buffer; the queue of each limit is bounded, and beyond
it work is refused at once with 53300, the code PostgreSQL gives for too many connections.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from ..config.model import LimitSettings
from ..router.plan import Plan, Refusal
from ..router.shardmap import canonical_text
from .protocol import messages as m
from .protocol.errors import PgError

if TYPE_CHECKING:
    from asyncio import TimerHandle

    from .server import ClientConnection, Proxy

log = logging.getLogger("shardwire.admission")

_Q, _S = ord("Q"), ord("S")
# Held work beyond this many bytes stops the proxy reading from the client until it runs.
HELD_LIMIT = 1 << 20
# Token buckets kept for tenants' rates: beyond this many keys, the full (idle) ones go.
MAX_BUCKETS = 100_000


class Limit:
    """One limit on concurrent transactions (a user's, a database's) and its queue."""

    __slots__ = ("kind", "name", "setting", "maximum", "active", "queue")

    def __init__(self, kind: str, name: str, setting: str, maximum: int) -> None:
        self.kind = kind  # "user" | "database"
        self.name = name
        self.setting = setting
        self.maximum = maximum  # 0: no limit (any more)
        self.active = 0
        self.queue: deque[Waiter] = deque()

    @property
    def has_room(self) -> bool:
        return self.maximum == 0 or self.active < self.maximum


class Ticket:
    """A client's place among the transactions running: the limits it counts against (none
    when it is only tracked, so that PAUSE and shutdown know when it is done)."""

    __slots__ = ("limits",)

    def __init__(self) -> None:
        self.limits: list[Limit] = []


class Waiter:
    """Work held back: a client's messages, and where it stands in line."""

    __slots__ = ("client", "msgs", "raw", "size", "ticket", "needed", "limit", "timer",
                 "cancelled")

    def __init__(self, client: ClientConnection, msgs: list[tuple[int, bytes]],
                 raw: bytes | None) -> None:
        self.client = client
        self.msgs = msgs
        self.raw = raw
        self.size = _size(msgs)
        self.ticket = Ticket()
        self.needed: list[Limit] = []  # limits still to get, after `limit`
        self.limit: Limit | None = None  # the queue it is in (None: held by PAUSE)
        self.timer: TimerHandle | None = None
        self.cancelled = False


def between_transactions(c: ClientConnection) -> bool:
    """Whether the proxy has answered all of the client's work and no transaction is open."""
    server = c.server
    if server is not None and (server.link.busy or server.link.status != b"I"):
        return False
    return (c.tx is None and c.begin_sql is None and not c.pending and not c.acquiring
            and not c.waiting and not c.batch and not c.backlog and c.multi_unit is None)


def shutting_down() -> PgError:
    return PgError("57P01", "terminating connection: Shardwire is shutting down",
                   hint="reconnect: another proxy, or this one restarted, will serve you",
                   fatal=True)


class Admission:
    """The gate in front of every client's next transaction."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.settings = LimitSettings()
        self.users: dict[str, Limit] = {}
        self.databases: dict[str, Limit] = {}
        self.admitted: set[ClientConnection] = set()  # clients holding a ticket
        self.paused_all = False
        self.paused_databases: set[str] = set()
        self.held: deque[Waiter] = deque()  # work held by PAUSE
        self.draining = False
        self._cut = False  # SIGINT during the drain: stop waiting
        self._starting = 0  # waiters let in, to run on the loop's next turn (_go)
        self._quiet: list[asyncio.Future[None]] = []  # PAUSE and shutdown waiting
        self.buckets: dict[tuple[str, object], list[float]] = {}  # key -> [tokens, time]
        # Work refused: queue_full (53300), timeout (57014), rate (53400); for SHOW STATE and
        # the metrics endpoint.
        self.rejected: collections.Counter[str] = collections.Counter()

    # -- configuration -----------------------------------------------------------------------

    def configure(self, settings: LimitSettings) -> None:
        """Apply `limits` (at start and on RELOAD). Work waiting gets in if a limit rose."""
        self.settings = settings
        for limits, maximum in ((self.users, settings.max_transactions_per_user),
                                (self.databases, settings.max_transactions_per_database)):
            for limit in limits.values():
                limit.maximum = maximum
                self._wake(limit)
        if not settings.tenant_statements_per_second:
            self.buckets.clear()
        self._engage()

    def _engage(self) -> None:
        # Engaged, too, while let-in work has yet to run: what its client sends meanwhile
        # must queue behind it.
        engaged = (self.settings.any or self.paused_all or bool(self.paused_databases)
                   or self.draining or self._starting > 0)
        self.proxy.gate = self if engaged else None

    @property
    def paused(self) -> bool:
        return self.paused_all or bool(self.paused_databases)

    def _is_paused(self, database: str) -> bool:
        return self.paused_all or database in self.paused_databases

    def _limits_for(self, client: ClientConnection) -> list[Limit]:
        s = self.settings
        limits = []
        if s.max_transactions_per_user:
            limits.append(_limit(self.users, "user", client.user,
                                 "limits.max_transactions_per_user",
                                 s.max_transactions_per_user))
        if s.max_transactions_per_database:
            limits.append(_limit(self.databases, "database", client.database,
                                 "limits.max_transactions_per_database",
                                 s.max_transactions_per_database))
        return limits

    # -- the gate ---------------------------------------------------------------------------

    def hold(self, client: ClientConnection, msgs: list[tuple[int, bytes]],
             raw: bytes | None) -> bool:
        """Called for a client with no ticket that sent work. False: run it now (the client
        has a ticket); True: the gate keeps it (held, queued or refused)."""
        waiter = client.admission_wait
        if waiter is not None:  # already waiting: this comes after the held messages
            waiter.msgs.extend(msgs)
            waiter.raw = None
            waiter.size += _size(msgs)
            if waiter.size > HELD_LIMIT and client.transport is not None:
                client.transport.pause_reading()  # until it runs (_unpark)
            return True
        if self.draining:
            client.fatal(shutting_down())
            return True
        waiter = Waiter(client, msgs, raw)
        if self._is_paused(client.database):
            self.held.append(waiter)
            self._park(waiter)
            return True
        if self._queue(waiter, self._limits_for(client), bounded=True):
            return True
        self._admit(client, waiter.ticket)
        return False

    def _queue(self, w: Waiter, limits: list[Limit], *, bounded: bool) -> bool:
        """Take the limits in order while they have room. True if the waiter is now in a
        queue or was refused; False if it has them all."""
        for i, limit in enumerate(limits):
            if limit.has_room and not limit.queue:  # no jumping the queue
                limit.active += 1
                w.ticket.limits.append(limit)
                continue
            if bounded and len(limit.queue) >= self.settings.max_waiting_transactions:
                self._give_back(w.ticket)
                self._refuse(w, "queue_full", PgError(
                    "53300", f"too many transactions waiting for {limit.kind} {limit.name!r}: "
                    f"{limit.maximum} are running and {len(limit.queue)} are queued",
                    hint=f"retry later, or raise {limit.setting} or "
                    "limits.max_waiting_transactions"))
                return True
            w.limit, w.needed = limit, limits[i + 1:]
            limit.queue.append(w)
            if w.timer is None:
                w.timer = asyncio.get_running_loop().call_later(
                    self.settings.wait_timeout, self._timed_out, w)
                self._park(w)
            return True
        return False

    def _admit(self, client: ClientConnection, ticket: Ticket) -> None:
        client.admitted = ticket
        self.admitted.add(client)

    def _park(self, w: Waiter) -> None:
        # The client is still read: a client that goes away is noticed (and its place in
        # line given up) at once, and what it sends meanwhile is held after this, up to
        # HELD_LIMIT bytes.
        w.client.admission_wait = w

    def _unpark(self, w: Waiter) -> None:
        client = w.client
        client.admission_wait = None
        if w.timer is not None:
            w.timer.cancel()
            w.timer = None
        if client.transport is not None and not client.closed and not client.paused:
            client.transport.resume_reading()

    def _wake(self, limit: Limit) -> None:
        while limit.queue and limit.has_room:
            w = limit.queue.popleft()
            limit.active += 1
            w.ticket.limits.append(limit)
            w.limit = None
            if not self._queue(w, w.needed, bounded=False):
                self._go(w)

    def _go(self, w: Waiter) -> None:
        """The waiter may run: on the next turn of the loop, so that whoever released the
        slot finishes first."""
        if w.timer is not None:
            w.timer.cancel()
            w.timer = None
        self._starting += 1
        asyncio.get_running_loop().call_soon(self._run, w)

    def _run(self, w: Waiter) -> None:
        self._starting -= 1
        if self._starting == 0 and self.proxy.gate is not None:
            self._engage()
        if w.cancelled:
            return
        client = w.client
        self._unpark(w)
        if client.closed:
            self._give_back(w.ticket)
            return
        self._admit(client, w.ticket)
        client._deliver(w.msgs, w.raw)  # past the gate: it has a ticket now

    def _timed_out(self, w: Waiter) -> None:
        w.timer = None
        limit = w.limit
        if limit is None or w.cancelled:
            return
        limit.queue.remove(w)
        waited = self.settings.wait_timeout
        self._give_back(w.ticket)
        self._refuse(w, "timeout", PgError(
            "57014", f"canceling statement: waited {waited:g} s for one of the "
            f"{limit.maximum} transactions {limit.kind} {limit.name!r} may run at once",
            hint=f"retry later, or raise {limit.setting} or limits.wait_timeout"))

    def _refuse(self, w: Waiter, reason: str, err: PgError) -> None:
        """Answer the held work with `err` as a server would: one error per unit (a Query, or
        extended messages up to their Sync), the rest of an open unit skipped."""
        self.rejected[reason] += 1
        self.proxy.metrics.refused[err.sqlstate[:2]] += 1
        client = w.client
        w.cancelled = True
        self._unpark(w)
        out = []
        sent = False
        for kind, _ in w.msgs:
            if not sent:
                out.append(m.error_response(err))
                sent = True
            if kind == _Q or kind == _S:
                out.append(m.ready_for_query(b"I"))
                sent = False
        if sent:
            client.skip_to_sync = True
        client.write(b"".join(out))

    def _give_back(self, ticket: Ticket) -> None:
        limits, ticket.limits = ticket.limits, []
        for limit in limits:
            limit.active -= 1
        for limit in limits:
            self._wake(limit)

    # -- a client's transaction ends, or the client goes --------------------------------------

    def settle(self, client: ClientConnection) -> None:
        """The client holds a ticket and may have finished its transaction."""
        if between_transactions(client):
            self.release(client)
            if self.draining and not client.closed:
                client.fatal(shutting_down())

    def release(self, client: ClientConnection) -> None:
        """Give back what the client holds or waits for (it finished, or it is gone)."""
        w = client.admission_wait
        if w is not None:
            w.cancelled = True
            client.admission_wait = None
            if w.timer is not None:
                w.timer.cancel()
            if w.limit is not None:
                w.limit.queue.remove(w)
            elif w in self.held:
                self.held.remove(w)
            self._give_back(w.ticket)
        ticket = client.admitted
        if ticket is not None:
            client.admitted = None
            self.admitted.discard(client)
            self._give_back(ticket)
            if self._quiet:
                quiet, self._quiet = self._quiet, []
                for fut in quiet:
                    if not fut.done():
                        fut.set_result(None)

    def _track_in_flight(self) -> None:
        """Give the clients in the middle of work a ticket (with no limits), so that PAUSE
        and shutdown learn when they are done: the gate may have been off when they began."""
        for client in list(self.proxy.clients):
            if (client.admin is None and client.admitted is None
                    and client.admission_wait is None and not between_transactions(client)):
                self._admit(client, Ticket())

    async def _until_done(self, database: str | None, timeout: float | None = None) -> bool:
        """Wait until no client (of `database`) is in a transaction; False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while any(database is None or c.database == database for c in self.admitted):
            if self._cut:
                return False
            fut: asyncio.Future[None] = loop.create_future()
            self._quiet.append(fut)
            try:
                if deadline is None:
                    await fut
                else:
                    await asyncio.wait_for(fut, max(0.0, deadline - loop.time()))
            except TimeoutError:
                return False
        return True

    # -- PAUSE and RESUME ---------------------------------------------------------------------

    async def pause(self, database: str | None) -> None:
        """Hold new work (of `database`, or all) and return once what runs has finished."""
        if database is None:
            self.paused_all = True
        else:
            self.paused_databases.add(database)
        self._track_in_flight()
        self._engage()
        log.info("PAUSE %s: waiting for %d transactions", database or "(all databases)",
                 sum(1 for c in self.admitted if database is None or c.database == database))
        await self._until_done(database)
        log.info("paused %s", database or "(all databases)")

    def resume(self, database: str | None) -> None:
        """Let the held work run (through the limits, like new work)."""
        if database is None:
            self.paused_all = False
            self.paused_databases.clear()
        else:
            self.paused_databases.discard(database)
        for w in list(self.held):
            if self._is_paused(w.client.database):
                continue
            self.held.remove(w)
            if not self._queue(w, self._limits_for(w.client), bounded=True):
                self._go(w)
        self._engage()
        log.info("RESUME %s", database or "(all databases)")

    # -- shutdown ---------------------------------------------------------------------------

    async def drain(self, timeout: float) -> bool:
        """SIGTERM: the caller has stopped accepting connections. Clients with no transaction
        running are closed now, the others when theirs ends; returns once none is left, or
        False when `timeout` ran out first."""
        self.draining = True
        self._track_in_flight()
        self._engage()
        for client in list(self.proxy.clients):
            if client.admitted is None and not client.closed:
                client.fatal(shutting_down())  # idle, logging in, held or queued
        running = len(self.admitted)
        log.info("shutting down: %d transactions may run for up to %g s", running, timeout)
        done = await self._until_done(None, timeout)
        if not done:
            log.warning("shutting down: %d transactions still running after %g s are ended",
                        len(self.admitted), timeout)
        return done

    def cut_short(self) -> None:
        """SIGINT while draining: close what is left now."""
        log.info("shutting down at once (SIGINT)")
        self._cut = True
        quiet, self._quiet = self._quiet, []
        for fut in quiet:
            if not fut.done():
                fut.set_result(None)

    # -- tenants' rates ---------------------------------------------------------------------

    def throttle(self, plan: Plan, key: tuple[str, object]) -> Plan:
        """`plan`, or a refusal when the statement's key is over its rate (token bucket:
        `tenant_burst` statements at once, refilled at `tenant_statements_per_second`)."""
        rate = self.settings.tenant_statements_per_second
        if not rate:
            return plan
        burst = float(self.settings.tenant_burst or rate)
        now = time.monotonic()
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) >= MAX_BUCKETS:
                self._forget_full_buckets(now, rate, burst)
            bucket = self.buckets[key] = [burst, now]
        tokens = min(burst, bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            self.rejected["rate"] += 1
            rule, value = key
            return Refusal(
                "53400", f"too many statements for {rule} = {canonical_text(value)}: the "
                f"limit is {rate} per second (burst {burst:g}) for each key value",
                hint="slow down and retry, or raise limits.tenant_statements_per_second")
        bucket[0] = tokens - 1.0
        return plan

    def _forget_full_buckets(self, now: float, rate: int, burst: float) -> None:
        full = [k for k, (tokens, at) in self.buckets.items()
                if tokens + (now - at) * rate >= burst]
        for k in full or list(self.buckets)[:MAX_BUCKETS // 2]:
            del self.buckets[k]

    # -- SHOW STATE -------------------------------------------------------------------------

    def state_row(self) -> tuple[object, ...]:
        if self.draining:
            state = "shutting down"
        elif self.paused:
            # PAUSE is still waiting for transactions that were running when it came
            state = "pausing" if any(self._is_paused(c.database) for c in self.admitted) \
                else "paused"
        else:
            state = "running"
        paused = "(all)" if self.paused_all else ", ".join(sorted(self.paused_databases))
        queued = sum(len(limit.queue) for limits in (self.users, self.databases)
                     for limit in limits.values())
        running = sum(1 for c in list(self.proxy.clients)
                      if c.admin is None and c.state != "login" and not between_transactions(c))
        return (state, paused or None, running, queued, len(self.held),
                self.rejected["queue_full"], self.rejected["timeout"], self.rejected["rate"])


def _size(msgs: list[tuple[int, bytes]]) -> int:
    return sum(len(body) + 5 for _, body in msgs)


def _limit(limits: dict[str, Limit], kind: str, name: str, setting: str, maximum: int
           ) -> Limit:
    limit = limits.get(name)
    if limit is None:
        limit = limits[name] = Limit(kind, name, setting, maximum)
    return limit
