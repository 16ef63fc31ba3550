"""Server connections and the pool of them kept for each shard server."""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..config.model import PoolSettings, ServerAddress
from ..rebalancer.heat import Heat
from .protocol import messages as m
from .protocol.backend import BackendHandshake
from .protocol.errors import PgError
from .protocol.relay import BackendProtocolError, ServerLink

if TYPE_CHECKING:
    from .scatter import ShardCall
    from .server import ClientConnection

log = logging.getLogger("shardwire.pool")

_clock = time.perf_counter


class ServerConnection(asyncio.Protocol):
    """One connection to a PostgreSQL server. While a client holds it, replies stream to that
    client through the connection's `ServerLink`; while it is idle in the pool, any byte from
    the server (a shutdown notice, say) means it is no longer usable."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.link = ServerLink(pool.settings.max_prepared_statements)
        self.transport: asyncio.Transport | None = None
        self.client: ClientConnection | None = None
        self.handshake: BackendHandshake | None = None
        self.login: asyncio.Future[None] | None = None
        self.closed = False
        self.pid = 0
        self.secret = 0
        self.created = time.monotonic()
        self.last_used = self.created
        # Called when the server becomes idle while no client holds it (resets, login setup).
        self.on_idle: Callable[[], None] | None = None
        # Reads the server's replies instead of the relay, for multi-shard work (scatter.py).
        self.sink: ShardCall | None = None
        self.tls_wanted = False
        self._tls_answer: asyncio.Future[bytes] | None = None
        # When the oldest request still unanswered was written (0: none), for heat statistics.
        self.busy_since = 0.0

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is not None:
            sink.data(self, data)
            if sink.ready and self.busy_since:
                self._finished(None)
            return
        if self.client is not None:
            try:
                out = self.link.feed(data)
            except BackendProtocolError as e:
                self.abort(f"protocol error from server: {e}")
                return
            client = self.client
            if out:
                client.write(out)
                self.pool.stats.bytes_out += len(out)
            if self.link.param_updates:
                client.note_parameters(self.link.param_updates)
                self.link.param_updates.clear()
            if not self.link.busy:
                if self.busy_since:
                    self._finished(client.heat_key)
                client.server_ready(self)
            return
        if self.handshake is not None:
            self._login_data(data)
            return
        if self._tls_answer is not None and not self._tls_answer.done():
            self._tls_answer.set_result(data)
            return
        if self.on_idle is not None:
            try:
                self.link.feed(data)
            except BackendProtocolError as e:
                self.abort(f"protocol error from server: {e}")
                return
            self.link.param_updates.clear()
            if not self.link.busy:
                self.busy_since = 0.0  # the proxy's own statements are not the shard's load
                callback, self.on_idle = self.on_idle, None
                callback()
            return
        # Unsolicited data on an idle connection: usually the server shutting down.
        self.abort("server sent data while idle")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.login is not None and not self.login.done():
            self.login.set_exception(PgError(
                "08006", f"connection to shard {self.pool.shard} "
                f"({self.pool.address.host}:{self.pool.address.port}) closed during login"))
        if self._tls_answer is not None and not self._tls_answer.done():
            self._tls_answer.set_result(b"")
        self.pool.forget(self)
        if self.sink is not None:
            self.sink.connection_lost(self)
        if self.client is not None:
            client, self.client = self.client, None
            client.server_lost(self)
        if self.on_idle is not None:
            callback, self.on_idle = self.on_idle, None
            callback()

    def pause_writing(self) -> None:
        # The server reads slower than the client sends (a big COPY): stop reading the client.
        if self.client is not None and self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client is not None and self.client.transport is not None:
            self.client.transport.resume_reading()

    # -- life cycle -------------------------------------------------------------------------

    async def connect(self) -> None:
        addr = self.pool.address
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: self, addr.host, addr.port)
        assert self.transport is not None
        if addr.sslmode in ("prefer", "require"):
            self._tls_answer = loop.create_future()
            self.transport.write(m.ssl_request())
            answer = await self._tls_answer
            self._tls_answer = None
            if answer == b"S":
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                new = await loop.start_tls(self.transport, self, ctx)
                self.transport = new  # type: ignore[assignment]
            elif addr.sslmode == "require":
                raise PgError("08006", f"shard {self.pool.shard} refused TLS (sslmode=require)")
        self.handshake = BackendHandshake(user=addr.user, database=addr.database,
                                          password=addr.password)
        self.login = loop.create_future()
        self.write(self.handshake.start())
        await self.login

    def _login_data(self, data: bytes) -> None:
        hs = self.handshake
        assert hs is not None and self.login is not None and self.transport is not None
        try:
            reply, rest = hs.feed(data)
        except PgError as e:
            self.handshake = None
            if not self.login.done():
                self.login.set_exception(e)
            self.transport.close()
            return
        if reply:
            self.transport.write(reply)
        if hs.ready:
            self.handshake = None
            self.pid, self.secret = hs.pid, hs.secret
            self.busy_since = 0.0
            self.link.reported = dict(hs.parameters)
            if not self.login.done():
                self.login.set_result(None)
            if rest:
                self.abort("server sent data after login")

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        if not self.busy_since:
            self.busy_since = _clock()
        self.transport.write(data)

    def _finished(self, key: tuple[str, object] | None) -> None:
        """Everything sent was answered: add the work to the shard's heat (and to the key's,
        for a single-shard statement whose key the router knew)."""
        busy = _clock() - self.busy_since
        self.busy_since = 0.0
        pool = self.pool
        counters = pool.counters
        counters.statements += 1
        counters.busy += busy
        link = self.link
        if link.rows:
            counters.rows += link.rows
            link.rows = 0
        if link.errors:
            counters.errors += link.errors
            pool.stats.errors += link.errors  # the metrics' total (heat's is per window)
            link.errors = 0
        if key is not None:
            pool.heat.pending.append((key, pool.shard, busy))  # recorded by Heat.drain

    def abort(self, reason: str) -> None:
        if not self.closed:
            log.info("closing server connection to %s: %s", self.pool.shard, reason)
            self.closed = True
            if self.transport is not None:
                self.transport.abort()
            self.pool.forget(self)

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.write(m.TERMINATE)
            self.transport.close()
        self.pool.forget(self)

    def run_and_release(self, sql: str) -> None:
        """Run a reset query with replies dropped, then go back to the pool."""
        self.on_idle = lambda: self.pool.release(self)
        self.write(self.link.internal_query(sql))


class PoolStats:
    __slots__ = ("transactions", "queries", "bytes_in", "bytes_out", "wait_time", "waits",
                 "errors", "connects")

    def __init__(self) -> None:
        self.transactions = 0  # server check-outs returned to the pool
        self.queries = 0  # Query messages and Syncs sent
        self.bytes_in = 0  # bytes from clients to this shard
        self.bytes_out = 0
        self.wait_time = 0.0  # seconds clients waited for a server connection
        self.waits = 0
        self.errors = 0
        self.connects = 0


class Pool:
    """Connections to one shard server, handed out one client at a time."""

    def __init__(self, shard: str, role: str, address: ServerAddress,
                 settings: PoolSettings, heat: Heat | None = None) -> None:
        self.shard = shard
        # The proxy's heat statistics; this shard's counters are added to directly.
        self.heat = heat if heat is not None else Heat(time.time())
        self.counters = self.heat.shard(shard)
        self.role = role
        self.is_replica = role != "primary"
        self.address = address
        self.settings = settings
        self.idle: collections.deque[ServerConnection] = collections.deque()
        self.active: set[ServerConnection] = set()  # held by a client or being reset
        self.connecting = 0
        self.waiters: collections.deque[asyncio.Future[ServerConnection]] = collections.deque()
        self.wait_started: dict[asyncio.Future[ServerConnection], float] = {}
        self.stats = PoolStats()
        self.login_parameters: dict[frozenset[tuple[str, str]], dict[str, str]] = {}
        self.last_error: str | None = None
        self.closed = False
        # Health (health.py). `up` until a check or a connect attempt fails; a replica gets
        # reads only once a check has succeeded (`checked`), which also measured its lag.
        self.up = True
        self.checked = False
        self.in_recovery: bool | None = None  # what the last check found
        self.lag: float | None = None  # a standby's replay lag in seconds; None: unknown
        self.failures = 0  # checks failed in a row
        self.down_since = 0.0  # time.time() of the failure that took it out of rotation
        self.health_error: str | None = None
        self.next_check = 0.0  # time.time() of the next health check
        self.health_task: asyncio.Task[None] | None = None

    def serves_reads(self, max_lag: float) -> bool:
        """Whether this replica may take reads now: up, checked, still a standby, and not
        lagging more than `max_lag` seconds."""
        lag = self.lag
        return (self.up and self.checked and self.in_recovery is True and lag is not None
                and lag <= max_lag)

    def check_passed(self, in_recovery: bool, lag: float | None) -> None:
        if not self.up:
            log.warning("shard %s %s %s:%s is back after %d failed health checks", self.shard,
                        self.role, self.address.host, self.address.port, self.failures)
        self.up = self.checked = True
        self.in_recovery = in_recovery
        self.lag = lag
        self.failures = 0
        self.health_error = None

    def mark_down(self, reason: str) -> None:
        """The server failed a health check or a connect: out of rotation until a check
        passes. Idle connections are closed (they would fail the next client)."""
        self.failures += 1
        self.health_error = reason
        if self.up:
            self.up = False
            self.down_since = time.time()
            log.warning("shard %s %s %s:%s is down: %s", self.shard, self.role,
                        self.address.host, self.address.port, reason)
            for conn in list(self.idle):
                self.idle.remove(conn)
                conn.abort("server marked down")

    def down_error(self) -> PgError:
        """What a statement that needs this (down) server gets at once."""
        since = time.strftime("%H:%M:%S", time.gmtime(self.down_since))
        wait = max(0.0, self.next_check - time.time())
        role = "primary" if self.role == "primary" else "replica"
        hint = ("reads outside transactions still go to the shard's replicas; if the primary "
                f"is gone for good, promote a replica, set shards.{self.shard}.primary to it "
                "and RELOAD (docs/operations.md)") if role == "primary" else (
                "retry; the replica is checked again shortly")
        return PgError(
            "57P03", f"shard {self.shard}: {role} {self.address.host}:{self.address.port} is "
            f"out of rotation since {since} UTC ({self.health_error or 'unreachable'}); next "
            f"check in {wait:.1f}s", hint=hint)

    @property
    def size(self) -> int:
        return len(self.idle) + len(self.active) + self.connecting

    def oldest_wait(self, now: float) -> float:
        """Seconds the longest-waiting client has waited."""
        return max((now - t for t in self.wait_started.values()), default=0.0)

    def try_acquire(self) -> ServerConnection | None:
        """An idle connection at once, or None (then `acquire`)."""
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                self.active.add(conn)
                return conn
        return None

    async def acquire(self) -> ServerConnection:
        conn = self.try_acquire()
        if conn is not None:
            return conn
        if self.closed:
            raise PgError("57P01", f"shard {self.shard} pool is shutting down")
        if not self.up and self.connecting:
            # Known down, and a connect is already trying it: fail now rather than queue
            # behind connect timeouts. One client at a time still tries, so a server that
            # comes back is found before the next health check.
            raise self.down_error()
        if self.size < self.settings.size:
            return await self._open()
        if len(self.waiters) >= self.settings.max_waiting_clients:
            raise PgError(
                "53300", f"too many clients waiting for a server connection of shard "
                f"{self.shard} ({len(self.waiters)} waiting)",
                hint="raise pool.max_waiting_clients or pool.size, or lower the load")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[ServerConnection] = loop.create_future()
        self.waiters.append(fut)
        started = self.wait_started[fut] = time.monotonic()
        try:
            return await asyncio.wait_for(fut, self.settings.checkout_timeout)
        except TimeoutError:
            raise PgError(
                "57014", f"timed out after {self.settings.checkout_timeout:g}s waiting for a "
                f"server connection of shard {self.shard} (all {self.settings.size} in use)",
                hint="raise pool.size or pool.checkout_timeout, or look for long transactions "
                "in SHOW SERVERS") from None
        finally:
            self.stats.waits += 1
            self.stats.wait_time += time.monotonic() - started
            del self.wait_started[fut]
            if fut in self.waiters:
                self.waiters.remove(fut)

    async def _open(self) -> ServerConnection:
        self.connecting += 1
        conn = ServerConnection(self)
        try:
            await asyncio.wait_for(conn.connect(), self.settings.connect_timeout)
        except TimeoutError:
            conn.abort("connect timeout")
            self.last_error = "connect timeout"
            self.mark_down("connect timeout")
            raise PgError(
                "08006", f"could not connect to shard {self.shard} at "
                f"{self.address.host}:{self.address.port}: timed out after "
                f"{self.settings.connect_timeout:g}s") from None
        except PgError as e:
            conn.abort("login failed")
            self.last_error = e.message
            if e.sqlstate.startswith("08") or e.sqlstate.startswith("57"):
                self.mark_down(e.message)  # starting up, shutting down, gone: not a password
                raise PgError(e.sqlstate, f"shard {self.shard}: {e.message}", e.hint) from None
            raise PgError("08006", f"could not log in to shard {self.shard}: {e.message}",
                          hint=e.hint) from None
        except OSError as e:
            conn.abort("connect failed")
            self.last_error = str(e)
            self.mark_down(e.strerror or str(e))
            raise PgError(
                "08006", f"could not connect to shard {self.shard} at "
                f"{self.address.host}:{self.address.port}: {e.strerror or e}",
                hint="is the server running and accepting TCP connections?") from None
        finally:
            self.connecting -= 1
        self.last_error = None
        if not self.up:  # reachable again before its next health check
            self.up = True
            self.failures = 0
        self.stats.connects += 1
        self.active.add(conn)
        return conn

    def release(self, conn: ServerConnection) -> None:
        """Take back a connection whose client is done with it."""
        if conn.busy_since:
            conn._finished(None)  # multi-shard work, given back as soon as it is answered
        conn.client = None
        conn.on_idle = None
        conn.last_used = time.monotonic()
        self.stats.transactions += 1
        if conn.closed:
            self.forget(conn)
            return
        if not conn.link.idle or self.closed:
            # Mid-transaction or mid-reply: nobody else may inherit that state.
            conn.abort("released while not idle")
            return
        self._hand_over(conn)

    def forget(self, conn: ServerConnection) -> None:
        self.active.discard(conn)
        try:
            self.idle.remove(conn)
        except ValueError:
            pass
        if self.waiters and self.size < self.settings.size and not self.closed:
            # A slot opened: give the first waiter a new connection.
            asyncio.get_event_loop().create_task(self._open_for_waiter())

    async def _open_for_waiter(self) -> None:
        if not self.waiters or self.size >= self.settings.size:
            return
        try:
            conn = await self._open()
        except PgError as e:
            while self.waiters:
                fut = self.waiters.popleft()
                if not fut.done():
                    fut.set_exception(e)
                    return
            return
        self._hand_over(conn)

    def _hand_over(self, conn: ServerConnection) -> None:
        """Give an idle connection to the first client waiting, else keep it idle."""
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return
        self.active.discard(conn)
        self.idle.append(conn)

    def close_idle(self, older_than: float) -> None:
        now = time.monotonic()
        for conn in list(self.idle):
            if now - conn.last_used > older_than:
                self.idle.remove(conn)
                conn.close()

    def close(self) -> None:
        self.closed = True
        if self.health_task is not None:
            self.health_task.cancel()
        for conn in list(self.idle) + list(self.active):
            conn.close()
        for fut in self.waiters:
            if not fut.done():
                fut.set_exception(PgError("57P01", "Shardwire is shutting down"))
        self.waiters.clear()
