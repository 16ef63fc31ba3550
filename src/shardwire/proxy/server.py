"""The listening proxy: client connections, their hand-over to server connections, and the
life cycle of the whole process. The only module here that touches client sockets."""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import re
import secrets
import signal
import ssl
import struct
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

from .. import __version__
from ..config.load import load_config
from ..config.model import Config, PoolMode, ReadTarget
from ..merge import MergeError, MergePlan
from ..rebalancer.heat import Heat
from ..rebalancer.store import drain_forever as drain_heat
from ..rebalancer.store import flush_forever as flush_heat
from ..router.analyze import Kind
from ..router.classify import (
    SessionReset,
    replayable_setting,
    session_reset,
    session_state_reason,
    split_statements,
)
from ..router.plan import (
    AnyShard,
    EachStatement,
    MultiShard,
    NeedLookup,
    Plan,
    Refusal,
    SingleShard,
    describe,
)
from ..router.route import RouteContext
from ..router.shardmap import ShardMap
from ..router.split import ShardText, SplitError, split_insert
from .admission import Admission, Ticket, Waiter
from .directory import Directory
from .distributed import (
    DEADLOCK_CHECK_INTERVAL,
    Coordinator,
    DistributedStatement,
    LockOwner,
    Participant,
    QueryString,
    ShardTransaction,
    Step,
    check_deadlocks,
    deadlock_error,
    follow_savepoints,
    run_all,
    shard_requests,
    statement_reply,
)
from .fanout import apply_settings, query_rows, quote_literal, show
from .fence import Fences
from .metrics import ProxyMetrics
from .pool import Pool, ServerConnection
from .protocol import frontend
from .protocol import messages as m
from .protocol.errors import PgError
from .protocol.framing import (
    FRONTEND_TYPES,
    FrameError,
    MessageReader,
    check_frontend_message,
)
from .protocol.relay import ClientStatements
from .replicas import ReplicaSet, parse_target_setting, plain_read, read_only_begin
from .routing import BoundLane, Prepared, StatementRouter, parse_param_types, read_bind
from .scatter import ScatterRead
from .workers import WorkerFigures, WorkerRole, config_stamp

log = logging.getLogger("shardwire")

# Client messages are limited like PostgreSQL's (1 GB) would be impractical for a proxy that
# buffers one whole message: Query, Parse and Bind above this are refused with 08P01.
MAX_CLIENT_MESSAGE = 256 * 1024 * 1024
# Connections still logging in may exceed listen.max_client_connections by this much; the
# limit itself is applied after the startup packet, where PostgreSQL applies it, so that
# clients see the 53300 error rather than a broken SSL negotiation.
LOGIN_HEADROOM = 100
# Stop reading from a client that has this much queued while it waits for a server.
PENDING_LIMIT = 4 * 1024 * 1024

_Q, _P, _S, _X, _B = ord("Q"), ord("P"), ord("S"), ord("X"), ord("B")
_CHECKED = frozenset(b"QPBDC")  # messages the proxy looks into
_BOUND = frozenset(b"EDS")  # what may follow a Bind in a unit _route_unit takes


def _bound_unit(msgs: list[tuple[int, bytes]]) -> bool:
    """Whether a unit that begins with a Bind is that Bind, then Describe and Execute
    messages, then its Sync (and nothing else), as pgbench and most drivers send it."""
    if len(msgs) == 4:  # Bind, Describe, Execute, Sync (libpq), without a loop
        return msgs[3][0] == _S and msgs[1][0] in _BOUND and msgs[2][0] in _BOUND
    return msgs[-1][0] == _S and all(k in _BOUND for k, _ in msgs[1:-1])


# First words of the queries the proxy may answer itself (see _local_query).
_LOCAL_WORDS = (b"set", b"reset", b"show", b"begin", b"start", b"commit", b"end", b"rollback",
                b"abort")
# Statements that write nothing by themselves (a function called by a SELECT may: COMMIT asks).
_NOT_WRITES = (b"select", b"begin", b"start", b"set", b"show", b"savepoint", b"release",
               b"reset")
_NOT_WRITE_KINDS = frozenset({Kind.READ, Kind.TRANSACTION, Kind.SESSION})
# First words of transaction control the proxy follows inside transactions.
_TX_WORDS = (b"commit", b"end", b"rollback", b"abort", b"savepoint", b"release", b"prepare")
_SHOW_ROUTE = re.compile(rb"(?is)^\s*show\s+route\s+for\s+(.+?)\s*;?\s*$")
# A BEGIN the proxy may answer itself and send later, with the first statement's shard.
_PLAIN_BEGIN = re.compile(
    rb"(?is)^\s*(begin|start\s+transaction)(\s+(work|transaction))?"
    rb"(\s*,?\s*(isolation\s+level\s+(serializable|repeatable\s+read|read\s+committed|"
    rb"read\s+uncommitted)|read\s+(only|write)|(not\s+)?deferrable))*\s*;?\s*$")


class ClientConnection(asyncio.Protocol):
    """One client, from its first byte to its last."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.handshake: frontend.Handshake | None = None
        self.reader = MessageReader(MAX_CLIENT_MESSAGE, FRONTEND_TYPES)
        self.statements = ClientStatements()
        self.user = ""
        self.database = ""
        self.settings: dict[str, str] = {}
        self.startup_settings: dict[str, str] = {}
        self.server: ServerConnection | None = None
        self.pool: Pool | None = None
        self.pinned: str | None = None  # why this client keeps its server connection
        self.reset: SessionReset | None = None  # DISCARD/DEALLOCATE/RESET ALL being sent
        # A SET (name, value) or RESET (name, None) on its way to the server.
        self.setting_change: tuple[str, str | None] | None = None
        self.session_mode = False
        self.pending: list[tuple[int, bytes]] = []
        self.pending_bytes = 0
        self.paused = False  # reading from the client paused while its messages wait
        self.acquiring = False
        self.skip_to_sync = False
        self.closed = False
        self.admin: object | None = None
        self.pid = 0
        self.secret = 0
        self.addr = ""
        self.connected_at = time.time()
        self.state = "login"
        self.queries = 0
        # Routing by shard map (used when the map shards anything; see _dispatch).
        self.batch: list[tuple[int, bytes]] = []  # messages not yet sent: no shard chosen
        self.backlog: list[tuple[int, bytes]] = []  # messages waiting for the client's turn
        self.waiting = False
        self.retry = False  # the message being handled waits too (see _dispatch)
        self.portal_open = False  # a Bind or Execute went out since the last Sync
        # A transaction statement (BEGIN, SAVEPOINT...) was bound since the last Sync: the
        # pipeline stays on its shard (see _hop).
        self.pipeline_control = False
        # A pipeline on its way to another shard (_hop): whether its implicit transaction is
        # being made a block; None when no hop is under way.
        self.hop: bool | None = None
        # The client's unnamed statement (its Parse body) and the connection that has it.
        self.unnamed: tuple[bytes, ServerConnection | None] | None = None
        self.begin_sql: bytes | None = None  # a BEGIN answered by the proxy, not yet sent
        self.tx_begin: bytes | None = None  # the client's BEGIN, for shards joining later
        # The router (shard map) the client's open transaction began with: a RELOAD meanwhile
        # does not move its statements (_same_map).
        self.tx_router: StatementRouter | None = None
        self.tx: ShardTransaction | None = None  # a transaction on several shards
        self.savepoints: list[str] = []  # the open savepoints of the client's transaction
        self.wrote = False  # the transaction, still on one shard, was sent more than reads
        self.shard_session: str | None = None  # SET shardwire.shard
        self.shard_local: str | None = None  # SET LOCAL shardwire.shard
        self.key_session: str | None = None
        self.key_local: str | None = None
        self.analyses: dict[bytes, Prepared] = {}  # prepared statements by name
        # The lane of the prepared statement this client bound last (_route_unit).
        self.bound: BoundLane | None = None
        self.scatter: ScatterRead | None = None  # a read running on several shards
        # A statement for several shards, waiting for the rest of its unit (up to Sync).
        self.multi_unit: list[tuple[int, bytes]] | None = None
        self.multi_start: Callable[[list[tuple[int, bytes]]], Awaitable[None]] | None = None
        # (rule, key) of the last statement routed by its key: its server connection adds the
        # statement's time to the key's heat when it is answered (pool.py).
        self.heat_key: tuple[str, object] | None = None
        # The read/write split (replicas.py): SET shardwire.target (None: the config's), and
        # when this session last sent a shard with replicas more than a plain read.
        self.read_target: ReadTarget | None = None
        self.wrote_at = 0.0
        self.primary_write = False  # wrote_at is set again when that unit is answered
        # Admission control (admission.py): the client's place among the transactions
        # running, and its work held back while it waits for one.
        self.admitted: Ticket | None = None
        self.admission_wait: Waiter | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.addr = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        proxy = self.proxy
        if len(proxy.clients) >= proxy.config.listen.max_client_connections + LOGIN_HEADROOM:
            # Far beyond the limit (a flood of connections that never log in): drop at once.
            self.closed = True
            transport.abort()  # type: ignore[attr-defined]
            return
        proxy.clients.add(self)
        cfg = proxy.config
        self.handshake = frontend.Handshake(
            users=cfg.users, auth_method=cfg.auth_method, database=cfg.database,
            admin_database=cfg.admin_database, tls_available=proxy.tls_context is not None,
            fake_salt_key=proxy.fake_salt_key)

    def data_received(self, data: bytes) -> None:
        if self.handshake is not None:
            self._handshake_data(data)
            return
        if self.admin is not None:
            self.admin.feed(data)  # type: ignore[attr-defined]
            return
        try:
            msgs, whole = self.reader.split_whole(data)
            if msgs:
                self._client_messages(msgs, data if whole else None)
        except FrameError as e:
            self.fatal(e)
        except (ValueError, IndexError, struct.error):
            # A message whose inside does not match its type (a Parse without its NULs...).
            self.fatal(PgError("08P01", "invalid message format", fatal=True))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.scatter is not None:
            self.scatter.cancel()
        self.proxy.clients.discard(self)
        self.proxy.clients_by_pid.pop(self.pid, None)
        self._let_go_of_server()

    def pause_writing(self) -> None:
        # The client reads slower than its server answers: stop reading from the server.
        if self.server is not None and self.server.transport is not None:
            self.server.transport.pause_reading()
        if self.scatter is not None:
            self.scatter.pause()

    def resume_writing(self) -> None:
        if self.server is not None and self.server.transport is not None:
            self.server.transport.resume_reading()
        if self.scatter is not None:
            self.scatter.resume()

    # -- login ------------------------------------------------------------------------------

    def _handshake_data(self, data: bytes) -> None:
        assert self.handshake is not None
        for action in self.handshake.feed(data):
            match action:
                case frontend.Send(data=out):
                    self.write(out)
                case frontend.StartTls():
                    asyncio.get_running_loop().create_task(self._start_tls())
                    return
                case frontend.CancelQuery(pid=pid, secret=secret):
                    self.proxy.cancel(pid, secret)
                    self.close()
                    return
                case frontend.Reject(error=err):
                    self.fatal(err)
                    return
                case frontend.Authenticated():
                    self.handshake = None
                    self._authenticated(action)
                    return

    async def _start_tls(self) -> None:
        assert self.transport is not None and self.proxy.tls_context is not None
        loop = asyncio.get_running_loop()
        try:
            self.transport = await loop.start_tls(  # type: ignore[assignment]
                self.transport, self, self.proxy.tls_context, server_side=True)
        except (OSError, ssl.SSLError) as e:
            log.info("TLS handshake with %s failed: %s", self.addr, e)
            if self.transport is not None:
                self.transport.abort()

    def _authenticated(self, auth: frontend.Authenticated) -> None:
        proxy = self.proxy
        if len(proxy.clients_by_pid) >= proxy.config.listen.max_client_connections:
            self.fatal(PgError("53300", "sorry, too many clients already",
                               hint="raise listen.max_client_connections", fatal=True))
            return
        self.user, self.database = auth.user, auth.database
        self.startup_settings = dict(auth.settings)
        self.settings = dict(auth.settings)
        self.pid, self.secret = self.proxy.new_backend_key(self)
        if auth.database == self.proxy.config.admin_database:
            from .admin import AdminSession
            self.admin = AdminSession(self.proxy, self)
            self.state = "admin"
            self.admin.greet()  # type: ignore[attr-defined]
            return
        user_cfg = self.proxy.config.users.get(auth.user)
        mode = (user_cfg.pool_mode if user_cfg and user_cfg.pool_mode
                else self.proxy.config.pool.mode)
        self.session_mode = mode is PoolMode.SESSION
        if self.session_mode:
            self.pinned = "session pool mode"
        self.pool = self.proxy.default_pool
        self.state = "starting"
        if self.transport is not None:
            self.transport.pause_reading()
        asyncio.get_running_loop().create_task(self._greet())

    async def _greet(self) -> None:
        """Send the server's parameters as they are with this client's settings applied."""
        assert self.pool is not None
        pool = self.pool
        if not pool.up and self.proxy.replicated:
            pool = self.proxy.login_pool(pool)  # the default primary is down: ask a replica
        try:
            params = await self.proxy.login_parameters(pool, self.settings)
        except PgError as e:
            self.fatal(PgError(e.sqlstate, e.message, e.hint, e.detail, fatal=True))
            return
        if self.closed:
            return
        out = [m.parameter_status(k, v) for k, v in params.items()]
        out.append(m.backend_key_data(self.pid, self.secret))
        out.append(m.ready_for_query(b"I"))
        self.write(b"".join(out))
        self.state = "idle"
        if self.transport is not None:
            self.transport.resume_reading()
        if self.pending:
            self._get_server()

    # -- statements -------------------------------------------------------------------------

    def _client_messages(self, msgs: list[tuple[int, bytes]], raw: bytes | None) -> None:
        if self.skip_to_sync:
            msgs, raw = self._skip_until_sync(msgs), None
            if not msgs:
                return
        for i, (kind, body) in enumerate(msgs):
            if kind in _CHECKED:
                check_frontend_message(kind, body)
                if kind == _Q or kind == _P:
                    self._inspect_sql(kind, body)
            elif kind == _X:
                if i:
                    self._deliver(msgs[:i], None)
                self.close()
                return
        self._deliver(msgs, raw)

    def _deliver(self, msgs: list[tuple[int, bytes]], raw: bytes | None) -> None:
        gate = self.proxy.gate  # None unless limits, PAUSE or shutdown apply (admission.py)
        if gate is not None and self.admitted is None and gate.hold(self, msgs, raw):
            return
        if not self.proxy.routing:
            self._send(msgs, raw)
        elif (self.server is None and not self.waiting and not self.batch
              and self.begin_sql is None and self.state == "idle" and not self.skip_to_sync
              and not (self.shard_session or self.shard_local or self.key_session
                       or self.key_local)):
            self._route_unit(msgs, raw)
        else:
            self._dispatch(msgs)

    def _route_unit(self, msgs: list[tuple[int, bytes]], raw: bytes | None) -> None:
        """The common case of a sharded setup, between transactions: a whole Query, or a Bind of
        a named statement up to its Sync, that one shard runs. It goes out in one write, as on
        the unsharded path; everything else takes the general path (`_dispatch`). This runs
        for most statements, so it reads each attribute once."""
        kind, body = msgs[0]
        proxy = self.proxy
        router = proxy.router
        if kind == _Q:
            if len(msgs) != 1:
                self._dispatch(msgs)
                return
            sql = body[:-1]
            # A query with a lane is a statement on a sharded table, never one the proxy may
            # answer itself (_local_query): only the others need that look at their first word.
            laned = router.query_lane(body)
            if laned is not None:
                plan: Plan = laned
            elif sql.lstrip()[:8].lower().startswith(_LOCAL_WORDS):
                self._dispatch(msgs)
                return
            else:
                plan = router.plan_query(sql, proxy.no_context, self._timezone(), lane_tried=True)
        elif kind == _B and _bound_unit(msgs):
            bound = self.bound  # the lane of the statement this client bound last, if any
            laned = None
            if bound is not None and body.startswith(bound.head):
                laned = router.bound_plan(bound, body)
            if laned is not None:
                plan = laned
            else:
                planned = self._plan_bound(router, body)
                if planned is None:
                    self._dispatch(msgs)
                    return
                plan = planned
        else:
            self._dispatch(msgs)
            return
        self.heat_key = key = router.last_key
        gate = proxy.gate
        if gate is not None and key is not None:
            plan = gate.throttle(plan, key)  # tenants' rates
        if type(plan) is SingleShard and not proxy.fences.active:  # fence.py: held?
            pool = (proxy.primaries[plan.shard] if not proxy.replicated else
                    self._pool_for(plan.shard, self._statement_of(msgs[0]), False))
            conn = pool.try_acquire()
            if conn is not None:
                self.queries += 1
                self.pool = pool
                prefix = self._attach(conn)  # before the rewrite: its replies come first
                data = self.statements.rewrite(msgs, conn.link, raw)
                if prefix:
                    data = prefix + data
                if self.reset is not None or self.setting_change is not None:
                    data += self._after_send(conn)
                conn.write(data)
                stats = pool.stats
                stats.bytes_in += len(data)
                stats.queries += 1
                return
        self._dispatch(msgs, plan)

    def _plan_bound(self, router: StatementRouter, body: bytes) -> Plan | None:
        """The plan of a Bind of a named prepared statement outside transactions, as
        `_route_unit` takes it, when the client's last statement's lane did not answer;
        None when the statement is not known here (the server says so)."""
        name_at = 1 if body[0] == 0 else body.index(0) + 1  # mostly the unnamed portal
        name_end = body.index(0, name_at)
        known = self.analyses.get(body[name_at:name_end]) if name_end > name_at else None
        if known is None:
            return None
        bound = known.bound
        if bound is not None and body.startswith(bound.head):
            laned = router.bound_plan(bound, body)
        else:
            laned = router.lane_plan(known.analyses, known.param_types, body, name_end + 1)
            if laned is not None and not known.bound_tried:
                known.bound_tried = True  # asked once: most clients keep one layout
                bound = known.bound = router.bound_lane(known, body, name_end + 1)
        if laned is not None:
            self.bound = bound  # the next Bind of the same statement is found at once
            return laned
        return router.plan_bind(known.analyses, known.param_types, read_bind(body)[2],
                                self.proxy.no_context, self._timezone())

    def _send(self, msgs: list[tuple[int, bytes]], raw: bytes | None) -> None:
        self.queries += 1
        server = self.server
        prefix = b""
        if server is None and not self.pending and not self.acquiring and (
                self.state != "starting"):
            # The common case: an idle server connection is there to take.
            assert self.pool is not None
            server = self.pool.try_acquire()
            if server is not None:
                prefix = self._attach(server)
        if server is not None:
            data = self.statements.rewrite(msgs, server.link, raw)
            if prefix:
                data = prefix + data
            if self.reset is not None or self.setting_change is not None:
                data += self._after_send(server)
            server.write(data)
            stats = server.pool.stats
            stats.bytes_in += len(data)
            stats.queries += 1
            return
        self.pending.extend(msgs)
        self.pending_bytes += len(raw) if raw is not None else sum(len(b) + 5 for _, b in msgs)
        if self.pending_bytes > PENDING_LIMIT and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        if self.state == "starting":
            return  # sent once the login is complete
        self._get_server()

    def _get_server(self) -> None:
        if not self.acquiring:
            pool = self.pool
            assert pool is not None
            conn = pool.try_acquire()
            if conn is not None:
                self._write_attached(conn)
            else:
                self.acquiring = True
                asyncio.get_running_loop().create_task(self._acquire(pool))

    def _inspect_sql(self, kind: int, body: bytes) -> None:
        if kind == _P:
            start = body.index(0) + 1
            sql = body[start:body.index(0, start)]
        else:
            sql = body[:-1]
        if self.pinned is None:
            reason = session_state_reason(sql, simple=kind == _Q)
            if reason is not None and not (kind == _Q and self._track_setting(sql)):
                self.pinned = reason
                log.debug("client %s pinned to its server connection: %s", self.addr, reason)
        if kind == _Q and b"all" in sql.lower():
            reset = session_reset(sql)
            if reset is not None:
                self.reset = reset if self.reset is None else SessionReset(
                    reset.prepared or self.reset.prepared, reset.settings or self.reset.settings)

    def _track_setting(self, sql: bytes) -> bool:
        """A session-level SET or RESET outside a transaction: remember it, so that it is
        replayed on whichever server connection serves the client next (a SET inside a
        transaction may be rolled back: that pins instead)."""
        change = replayable_setting(sql)
        if change is None or self._status() != b"I":
            return False
        name, value = change
        self.setting_change = (name, value)
        if value is None:
            value = self.startup_settings.get(name)  # RESET: back to the startup value
        if value is None:
            self.settings.pop(name, None)
        else:
            self.settings[name] = value
        return True

    def _after_send(self, conn: ServerConnection) -> bytes:
        """Bookkeeping once the client's messages went to `conn`; returns what the proxy must
        send after them."""
        change, self.setting_change = self.setting_change, None
        if change is not None:
            name, value = change
            if value is None:
                # After RESET the server has its default (not the client's startup value, if
                # it had one: the next check-out sets that again).
                conn.link.settings.pop(name, None)
            else:
                conn.link.settings[name] = value
        return self._after_reset(conn) if self.reset is not None else b""

    def _after_reset(self, conn: ServerConnection) -> bytes:
        """The client's batch resets session state on `conn`: forget what it forgot, and
        bring back the settings of the client's startup packet, as PostgreSQL's RESET ALL
        would. Returns the proxy's own follow-up query, if any."""
        reset, self.reset = self.reset, None
        assert reset is not None
        if reset.prepared:
            conn.link.prepared.clear()
            self.statements.statements.clear()
        if not reset.settings:
            return b""
        self.settings = dict(self.startup_settings)
        conn.link.settings = {}
        return conn.link.settings_query(self.settings, tell_client=True) or b""

    async def _acquire(self, pool: Pool) -> None:
        try:
            conn = await pool.acquire()
        except PgError as e:
            self.acquiring = False
            self._fail_pending(e)
            return
        self.acquiring = False
        if self.closed:
            pool.release(conn)
            return
        self._write_attached(conn)

    def _attach(self, conn: ServerConnection) -> bytes:
        """Take `conn`; returns what must go to it first: the SETs that give it this client's
        settings, and the messages that waited for it."""
        self.server = conn
        conn.client = self
        self.state = "active"
        out = conn.link.settings_query(self.settings) or b""
        if self.pending:
            pending, self.pending = self.pending, []
            self.pending_bytes = 0
            out += self.statements.rewrite(pending, conn.link, None)
            if self.reset is not None or self.setting_change is not None:
                out += self._after_send(conn)
            if self.paused and self.transport is not None and not self.closed:
                self.paused = False
                self.transport.resume_reading()
        return out

    def _write_attached(self, conn: ServerConnection) -> None:
        out = self._attach(conn)
        if out:
            conn.write(out)
            conn.pool.stats.bytes_in += len(out)

    def _fail_pending(self, err: PgError) -> None:
        """No server for the pending messages: answer each unit with the error, as a server
        would that skips to the next Sync after an error."""
        pending, self.pending = self.pending, []
        self.pending_bytes = 0
        out = []
        sent_error = False
        for kind, _ in pending:
            if not sent_error:
                out.append(m.error_response(err))
                sent_error = True
            if kind in (_Q, _S):
                out.append(m.ready_for_query(b"I"))
                sent_error = False
        if sent_error:
            self.skip_to_sync = True  # an extended batch whose Sync is still to come
        self.write(b"".join(out))
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()
        if self.admitted is not None:
            self.proxy.admission.settle(self)

    def _skip_until_sync(self, msgs: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        for i, (kind, _) in enumerate(msgs):
            if kind == _S:
                self.skip_to_sync = self.pipeline_control = False
                self.write(m.ready_for_query(
                    self.server.link.status if self.server is not None else b"I"))
                return msgs[i + 1:]
            if kind == _X:
                return msgs[i:]
        return []

    # -- routing by shard map ----------------------------------------------------------------
    #
    # Messages are taken in order. A message that decides the shard (a Query, a Bind whose
    # statement touches a sharded table, a Sync or Flush) gets a server connection of that
    # shard, and the messages held back before it (a Parse waiting for its Bind) go there
    # first. While the client waits for a connection, or for its server to finish before the
    # proxy answers something itself, later messages wait in `backlog`.

    def _dispatch(self, msgs: list[tuple[int, bytes]], plan: Plan | None = None) -> None:
        """`plan`: the first message's, when the caller has made it already."""
        if self.waiting:
            self.backlog.extend(msgs)
            return
        for i, (kind, body) in enumerate(msgs):
            if self.skip_to_sync:
                if kind == _S:
                    self.skip_to_sync = self.pipeline_control = False
                    self.write(m.ready_for_query(self._status()))
                continue
            if not self._dispatch_one(kind, body, plan if i == 0 else None) or self.retry:
                # Not taken yet: it goes again once the wait is over.
                self.retry = False
                self.backlog[:0] = msgs[i:]
                return
            if self.waiting:
                self.backlog[:0] = msgs[i + 1:]
                return
        if self.admitted is not None:
            self.proxy.admission.settle(self)  # answered here (a SET, a refusal)?

    def _resume(self) -> None:
        self.waiting = False
        backlog, self.backlog = self.backlog, []
        if backlog:
            self._dispatch(backlog)
        if self.admitted is not None:
            self.proxy.admission.settle(self)

    def _status(self) -> bytes:
        if self.server is not None:
            return self.server.link.status
        return b"T" if self.begin_sql is not None else b"I"

    def _context(self) -> RouteContext:
        return RouteContext(shard=self.shard_local or self.shard_session,
                            key=self.key_local or self.key_session,
                            lookups=self.proxy.directory.caches)

    def _dispatch_one(self, kind: int, body: bytes, plan: Plan | None = None) -> bool:
        """Handle one message; False if it must wait for the server to finish first."""
        router = self.proxy.router
        server = self.server
        if self.multi_unit is not None:  # the rest of a multi-shard statement's unit
            self.multi_unit.append((kind, body))
            if kind == _S:
                unit, self.multi_unit = self.multi_unit, None
                self._run_multi(unit)
            return True
        if plan is not None and type(plan) is not AnyShard:  # planned by _route_unit
            self._execute(plan, (kind, body), ends_unit=kind == _Q)
            return True
        if kind == _Q and (server is not None or self.begin_sql is not None) and (
                body.lstrip()[:9].lower().startswith(_TX_WORDS)):
            analyses = router.prepared(body[:-1])
            if len(analyses) == 1 and analyses[0].kind is Kind.TRANSACTION:
                words = analyses[0].words
                if self.tx is not None and (words[:1] == ("prepare",) or words[1:2] == (
                        "prepared",)):
                    self._refuse(PgError(
                        "0A000", f"{' '.join(words[:2]).upper()} in a transaction on several "
                        "shards: Shardwire runs two-phase commit itself for such "
                        "transactions", hint="end the transaction with COMMIT"),
                        (kind, body), ends_unit=True)
                    return True
                if self.tx is not None:
                    return self._tx_control(words, body[:-1], [(kind, body)])
                if words and words[0] in ("savepoint", "release", "rollback"):
                    follow_savepoints(self.savepoints, words, body[:-1])
        if kind == _Q:
            sql = body[:-1]
            local = self._local_query(sql)
            if local is not None:
                if server is not None and server.link.busy:
                    self.waiting = True
                    return False
                if self.batch:
                    self._send_batch(self.proxy.config.default_shard, [])
                    self.waiting = True
                    return False
                self.write(local + m.ready_for_query(self._status()))
                return True
            plan = router.plan_query(sql, self._context(), self._timezone())
            self.heat_key = router.last_key
            if self.tx_router is not None and self.tx_router is not router:
                plan = self._same_map(plan, self.tx_router.plan_query(
                    sql, self._context(), self._timezone()))
            if self.proxy.gate is not None and self.heat_key is not None:
                plan = self.proxy.gate.throttle(plan, self.heat_key)
            self._execute(plan, (kind, body), ends_unit=True)
            return True
        if kind == _P:
            name_end = body.index(0)
            sql_end = body.index(0, name_end + 1)
            sql = body[name_end + 1:sql_end]
            self.analyses[body[:name_end]] = Prepared(router.prepared(sql),
                                                      parse_param_types(body), sql)
            self.bound = None
            self._forward((kind, body))
            return True
        if kind == ord("B"):
            _, statement, params = read_bind(body)
            known = self.analyses.get(statement)
            if known is None:
                self._forward((kind, body))  # the server says it does not exist
                return True
            analyses = known.analyses
            if self.tx is not None and len(analyses) == 1 and (
                    analyses[0].kind is Kind.TRANSACTION):
                return self._tx_control_bound(analyses[0].words, known.sql, (kind, body))
            if (server is None and self.begin_sql is None
                    and len(analyses) == 1 and analyses[0].kind is Kind.TRANSACTION
                    and analyses[0].words[:1] in (("begin",), ("start",))
                    and _PLAIN_BEGIN.match(known.sql)):
                if self.batch:
                    # Its Parse, held back: the default shard answers that first (quietly
                    # closed), then this Bind comes again.
                    self._send_batch(self.proxy.config.default_shard, [], quiet=True)
                    self.waiting = self.retry = True
                    return True
                self._bound_begin(known.sql, (kind, body))
                return True
            if self.portal_open and analyses and analyses[0].kind is Kind.TRANSACTION:
                self.pipeline_control = True
            plan = router.plan_bind(analyses, known.param_types, params, self._context(),
                                    self._timezone())
            self.heat_key = router.last_key
            if self.tx_router is not None and self.tx_router is not router:
                old = self.tx_router
                plan = self._same_map(plan, old.plan_bind(
                    old.prepared(known.sql), known.param_types, params, self._context(),
                    self._timezone()))
            if self.proxy.gate is not None and self.heat_key is not None:
                plan = self.proxy.gate.throttle(plan, self.heat_key)
            self._execute(plan, (kind, body), ends_unit=False)
            return True
        if kind in (_S, ord("H"), ord("F")):
            if kind == _S and self.tx is not None and self.tx.implicit:
                return self._end_pipeline()
            if server is not None:
                self._forward((kind, body))
            elif self.batch or kind != ord("H"):
                if not self.batch and kind == _S and self.begin_sql is None:
                    self.write(m.ready_for_query(b"I"))  # nothing to answer but the Sync
                    return True
                # Only Parse/Describe/Close before a Flush (asyncpg prepares so): any shard
                # answers them; close that batch at once so the connection is free for the
                # shard the statement's Bind will need.
                quiet = kind == ord("H") and not any(k in (_B, ord("E")) for k, _ in self.batch)
                self._send_batch(self.proxy.config.default_shard, [(kind, body)], quiet=quiet)
            return True
        if kind in (ord("d"), ord("c"), ord("f")) and server is None:
            return True  # outside COPY PostgreSQL ignores them too
        self._forward((kind, body))
        return True

    def _same_map(self, plan: Plan, before: Plan) -> Plan:
        """The plan of a statement in a transaction that began before a RELOAD changed the
        shard map: the statement runs only if the map it began with routes it the same way;
        otherwise the transaction would see two maps, and it fails as a serialization
        failure does on one server (rebalancing.md: a flip during a transaction)."""
        if plan == before:
            return plan
        return Refusal("40001", "the shard map changed (RELOAD) during this transaction, and "
                       "this statement would now reach other shards than under the map the "
                       "transaction began with", hint="roll back and retry the transaction")

    def _timezone(self) -> str:
        return self.settings.get("timezone", "UTC")

    def _forward(self, msg: tuple[int, bytes]) -> None:
        if self.server is not None:
            self._write_server([msg])
        else:
            self.batch.append(msg)

    def _write_server(self, msgs: list[tuple[int, bytes]], extra: bytes = b"",
                      quiet: bool = False) -> None:
        server = self.server
        assert server is not None
        link = server.link
        if self.tx is not None:
            self._note_writes(server.pool.shard, msgs, self.tx.written)
        elif not self.wrote and self._writes(msgs):
            self.wrote = True  # the shard of a transaction that may later span shards
        chunks = []
        start = 0
        for i, (kind, body) in enumerate(msgs):
            if kind == _P and body[:1] == b"\x00":
                self.unnamed = (body[1:], server)
            elif kind == _B:
                self.portal_open = True
                unnamed = self.unnamed
                if unnamed is not None and unnamed[1] is not server and (
                        body[body.index(0) + 1] == 0):
                    # Bind of the unnamed statement, parsed on another shard's connection.
                    chunks.append(self.statements.rewrite(msgs[start:i], link, None))
                    chunks.append(link.inject_unnamed_parse(unnamed[0]))
                    self.unnamed = (unnamed[0], server)
                    start = i
            elif kind == ord("E"):
                self.portal_open = True
            elif kind == _S or kind == _Q:
                self.portal_open = self.pipeline_control = False
        chunks.append(self.statements.rewrite(msgs[start:], link, None))
        if quiet:
            chunks.append(link.end_batch_quietly())
        data = b"".join(chunks) + extra
        if self.reset is not None or self.setting_change is not None:
            data += self._after_send(server)
        server.write(data)
        stats = server.pool.stats
        stats.bytes_in += len(data)
        stats.queries += 1

    def _execute(self, plan: Plan, msg: tuple[int, bytes], *, ends_unit: bool) -> None:
        self.queries += 1
        # Rebalance fence (fence.py): a write to keys being moved waits for the flip.
        if self.proxy.fences.active and self.proxy.fences.hold(self, plan, msg, ends_unit):
            return
        target: str | None
        match plan:
            case SingleShard(shard=shard):
                target = shard
            case AnyShard():
                target = self.server.pool.shard if self.server is not None else None
            case Refusal(sqlstate=code, message=text, hint=hint):
                self._refuse(PgError(code, text, hint), msg, ends_unit=ends_unit)
                return
            case MultiShard() | EachStatement():
                if self.proxy.replicated and not self._plain_read_message(msg):
                    self.wrote_at = time.monotonic()  # read-your-writes (replicas.py)
                self._multi(plan, msg, ends_unit=ends_unit)
                return
            case NeedLookup(rule=rule, keys=keys, assign=assign):
                # Read (or write) the directory, then route the message again.
                self.waiting = self.retry = True
                self.queries -= 1
                asyncio.get_running_loop().create_task(
                    self._lookup(rule, keys, assign, ends_unit))
                return
        if target is None:
            if not ends_unit:
                self.batch.append(msg)  # no decision yet: the next Bind or Sync decides
                return
            target = self.proxy.config.default_shard
        server = self.server
        if server is None:
            self._send_batch(target, [msg])
        elif server.pool.shard == target and not (
                server.pool.is_replica and self._needs_primary(server, msg)):
            self._write_server([msg])
        elif self.pinned is None and server.link.status == b"I" and not self.portal_open:
            # No transaction there, and no portal: once the connection has answered what it
            # was sent (closing an open Parse/Describe batch quietly first, as asyncpg
            # prepares with a Flush), it goes back to the pool and this message goes to its
            # own shard.
            if server.link.open_batch_only:
                server.write(server.link.end_batch_quietly())
            self.waiting = self.retry = True
            self.queries -= 1
        elif self.pinned is not None and server.link.status == b"I":
            self._refuse(PgError(
                "0A000", f"this session is tied to a server connection of shard "
                f"{server.pool.shard} ({self.pinned}), and the statement needs shard "
                f"{target}", hint="keep session state (temporary tables, LISTEN, advisory "
                "locks, SQL PREPARE, SET ROLE) out of sessions that use several shards, or "
                "use transaction pooling; see docs/pooling.md"), msg, ends_unit=ends_unit)
        elif server.link.status == b"E":
            self._write_server([msg])  # the transaction has failed: the server says so
        elif server.pool.shard == target and self.portal_open:
            self._refuse(PgError(  # (replicas.py) reads of this pipeline ran on a replica
                "0A000", f"the statement must run on the primary of shard {target}, and the "
                "statements before it in the same pipeline (no Sync since them) ran on one of "
                "its replicas as plain reads", hint="send a Sync after the reads, or SET "
                "shardwire.target = 'primary' for sessions that pipeline reads and writes"),
                msg, ends_unit=ends_unit)
        elif self.portal_open and self.tx is None and self.tx_begin is None and (
                server.link.client_units_due):
            # Replies to the client's earlier Syncs or Queries are still due, so whether the
            # pipeline's statements are an implicit transaction is not known yet.
            self._refuse(self._pipeline_error(
                server, target, "replies to the client's earlier Syncs are still due, so "
                "whether they are a transaction block is not known yet"), msg,
                ends_unit=ends_unit)
        elif self.portal_open:
            self._hop(server, target, msg, ends_unit=ends_unit)
        elif server.link.busy:
            # The statement before it is still running (or a Parse waits for its Sync):
            # this one goes to its shard once that is answered.
            if server.link.open_batch_only:  # a Parse (psycopg's unnamed one) without Sync
                server.write(server.link.end_batch_quietly())
            self.waiting = self.retry = True
            self.queries -= 1
        else:
            self._switch_shard(target, msg)

    def _hop(self, server: ServerConnection, target: str, msg: tuple[int, bytes], *,
             ends_unit: bool) -> None:
        """A pipeline (statements bound since the last Sync) goes on to another shard.

        Its statements so far ran on `server`; their replies are still in the server's output
        buffer. A Sync of the proxy's own brings them, and the message waits for it. Outside
        a transaction block, the statements are an implicit transaction that this Sync would
        commit: a BEGIN sent first makes them a block instead (PostgreSQL takes the earlier
        statements into it), and the pipeline becomes a transaction on several shards that
        ends, all or nothing, at the client's Sync (_end_pipeline). If a statement failed, the
        server skipped the rest: so does the client's pipeline, up to its Sync (server_ready).
        """
        if self.pipeline_control:
            # BEGIN, COMMIT or a savepoint inside the pipeline: where its transaction starts
            # and ends is the client's, and it cannot be spread over shards.
            self._refuse(self._pipeline_error(
                server, target, "the pipeline holds its own BEGIN, COMMIT or savepoint "
                "command, whose transaction cannot span shards"), msg, ends_unit=ends_unit)
            return
        link = server.link
        implicit = self.tx is None and self.tx_begin is None and link.status == b"I"
        if implicit:
            server.write(link.begin_in_batch())
            if self.unnamed is not None and self.unnamed[1] is server:
                self.unnamed = (self.unnamed[0], None)  # replaced by the BEGIN
        else:
            server.write(link.end_batch_quietly())
        log.debug("client %s: pipeline goes on from shard %s to %s", self.addr,
                  server.pool.shard, target)
        self.portal_open = False
        self.hop = implicit
        self.waiting = self.retry = True
        self.queries -= 1

    def _hopped(self, conn: ServerConnection) -> bool:
        """The Sync of a hop (_hop) is answered. False while the pipeline is rolled back."""
        implicit, self.hop = self.hop, None
        status = conn.link.status
        if status == b"T":
            if implicit:
                self.tx = ShardTransaction(b"BEGIN", conn, self.savepoints)
                self.tx.implicit = True
                if self.wrote:
                    self.tx.written.add(conn.pool.shard)
            return True
        # A statement of the pipeline failed (the client has its error): the rest of the
        # pipeline is skipped, as the server skipped it.
        tx = self.tx
        if tx is None or not tx.implicit:
            self.skip_to_sync = True
            return True
        # The pipeline's transaction on several shards: rolled back now, and the client's Sync
        # answered with I as the server would.

        async def roll_back() -> None:
            try:
                parts = self._participants(tx)
                await self.proxy.coordinator.rollback(parts)
                for part in parts:
                    part.give_back()
                self._end_tx(released=True)
            except Exception:
                log.exception("rolling back a pipeline on several shards failed")
                self._end_tx()
            self.skip_to_sync = True
            if not self.closed:
                self._resume()

        asyncio.get_running_loop().create_task(roll_back())
        return False

    def _end_pipeline(self) -> bool:
        """The client's Sync of a pipeline that went on to several shards (_hop): commit on
        every shard (two-phase when two or more wrote), or roll back if a statement failed;
        then ReadyForQuery I. False while the last statements' replies are still due."""
        server = self.server
        assert server is not None
        if server.link.busy:
            if server.link.batch_open:
                server.write(server.link.end_batch_quietly())
                self.portal_open = False
            self.waiting = True
            return False
        tx = self.tx
        assert tx is not None
        self.waiting = True
        self.pipeline_control = False
        self._finish_on_shards(self._commit_pipeline(tx), "ending a pipeline")
        return True

    async def _commit_pipeline(self, tx: ShardTransaction) -> bytes:
        parts = self._participants(tx)
        _, error = await self.proxy.coordinator.commit(parts)
        for part in parts:
            part.give_back()
        self._end_tx(released=True)
        return (m.error_response(error) if error is not None else b"") + m.ready_for_query(b"I")

    def _pipeline_stays(self, server: ServerConnection) -> bool:
        """Whether statements of the client's open pipeline (Bind/Execute sent, no Sync yet)
        ran on `server` in a way another shard cannot join: outside a transaction block they
        are one implicit transaction, committed or rolled back together at the Sync; inside
        one, their replies are still due and the Sync that brings them has not come."""
        return self.portal_open and (
            (server.link.status == b"I" and self.begin_sql is None)
            or not server.link.open_batch_only)

    def _pipeline_error(self, server: ServerConnection, target: str, why: str) -> PgError:
        return PgError(
            "0A000", f"the statement needs shard {target}, and the statements before it in "
            f"the same pipeline (no Sync since them) ran on shard {server.pool.shard}: {why}",
            hint="send a Sync before this statement; see \"Pipelines\" in docs/routing.md")

    # -- transactions on several shards ---------------------------------------------------
    #
    # A transaction starts on the shard of its first statement, as on one server. A statement
    # for another shard makes it a ShardTransaction: that shard's connection joins (BEGIN as
    # the client wrote it, and the savepoints still open), and each statement goes to the
    # connection of its shard. COMMIT, ROLLBACK and savepoints go to every participant;
    # COMMIT through the coordinator (two-phase commit when two or more shards wrote).

    def _switch_shard(self, target: str, msg: tuple[int, bytes]) -> None:
        server = self.server
        assert server is not None
        tx = self.tx
        if tx is None:
            tx = self.tx = ShardTransaction(self.tx_begin or b"BEGIN", server, self.savepoints)
            if self.wrote:
                tx.written.add(server.pool.shard)
        conn = tx.conns.get(target)
        if conn is None:
            pool = (self.proxy.pool_for(target) if not self.proxy.replicated else
                    self._pool_for(target, None, True))
            conn = pool.try_acquire()
            if conn is None:
                self.waiting = self.retry = True
                self.queries -= 1
                asyncio.get_running_loop().create_task(self._join(pool))
                return
            self._join_with(conn)
        self.server = tx.conns[target]
        self.pool = self.server.pool
        self._write_server([msg])

    async def _join(self, pool: Pool) -> None:
        try:
            conn = await pool.acquire()
        except PgError as e:
            self.waiting = self.retry = False
            msg = self.backlog.pop(0)
            self._refuse(e, msg, ends_unit=msg[0] == _Q)
            self._resume()
            return
        if self.closed or self.tx is None:
            pool.release(conn)
            return
        self._join_with(conn)
        self._resume()

    def _join_with(self, conn: ServerConnection) -> None:
        """`conn` joins the transaction: the client's settings, its BEGIN, its savepoints."""
        tx = self.tx
        assert tx is not None
        tx.conns[conn.pool.shard] = conn
        conn.client = self
        link = conn.link
        out = link.settings_query(self.settings) or b""
        out += link.internal_query(tx.begin.decode("utf-8", "replace"))
        for name in tx.savepoints:
            out += link.internal_query(f"SAVEPOINT {name}")
        conn.write(out)

    def _tx_control(self, words: tuple[str, ...], sql: bytes,
                    unit: list[tuple[int, bytes]]) -> bool:
        """COMMIT, ROLLBACK or a savepoint command in a transaction on several shards: every
        participant gets it. False while the current statement is still running."""
        server = self.server
        if server is not None and server.link.busy:
            log.debug("client %s: %s waits for shard %s", self.addr, words[0],
                      server.pool.shard)
            self.waiting = True
            return False
        log.debug("client %s: %s on %s", self.addr, " ".join(words), ", ".join(
            f"{shard} ({c.pid}, {c.link.status!r})" for shard, c in (self.tx.conns.items()
                                                                  if self.tx else ())))
        self.waiting = True
        self.state = "active"
        self._finish_on_shards(self._run_tx_control(words, sql, unit), "ending a transaction")
        return True

    def _finish_on_shards(self, reply: Awaitable[bytes], what: str) -> None:
        """Run `reply`, the end of a transaction on several shards, as a task: the client
        gets what it returns (XX000 if it fails), then its next messages."""

        async def run() -> None:
            try:
                self.write(await reply)
            except Exception:
                log.exception("%s on several shards failed", what)
                self.write(m.error_response(PgError(
                    "XX000", f"internal error {what} on several shards"))
                    + m.ready_for_query(b"I"))
                self._end_tx()
            finally:
                if not self.closed:
                    self._resume()

        asyncio.get_running_loop().create_task(run())

    @staticmethod
    def _participants(tx: ShardTransaction) -> list[Participant]:
        """The transaction's connections as participants of its end, each knowing whether
        it was sent more than plain reads."""
        parts = [Participant(conn, status=conn.link.status) for conn in tx.conns.values()]
        for part in parts:
            part.wrote = part.shard in tx.written
        return parts

    def _note_writes(self, shard: str, msgs: list[tuple[int, bytes]], written: set[str]
                     ) -> None:
        """Remember the shards of a transaction that were sent more than plain reads: COMMIT
        prepares those without asking (the others are asked whether they wrote)."""
        if shard not in written and self._writes(msgs):
            written.add(shard)

    def _writes(self, msgs: list[tuple[int, bytes]]) -> bool:
        """Whether these messages hold a statement that is not a plain read."""
        for kind, body in msgs:
            if kind == _Q:
                if not body.lstrip()[:9].lower().startswith(_NOT_WRITES):
                    return True
            elif kind == _B:
                known = self.analyses.get(read_bind(body)[1])
                if known is None or any(a.kind not in _NOT_WRITE_KINDS for a in known.analyses):
                    return True
        return False

    def _bound_begin(self, sql: bytes, msg: tuple[int, bytes]) -> None:
        """A prepared BEGIN (pgbench -M prepared, JDBC) with no transaction open: answered
        here, like a simple-protocol BEGIN, and sent with the first statement to its shard."""

        async def start(unit: list[tuple[int, bytes]]) -> None:
            self.begin_sql = self.tx_begin = sql
            self.tx_router = self.proxy.router
            out = [m.BIND_COMPLETE]
            rest = 1
            for kind, _ in unit[1:]:
                rest += 1
                if kind == ord("D"):
                    out.append(m.NO_DATA)
                elif kind == ord("E"):
                    out.append(m.command_complete("BEGIN"))
                    break
            if unit[rest:] == [unit[-1]] and unit[-1][0] == _S:
                out.append(m.ready_for_query(b"T"))
            else:
                # JDBC sends its first statement in the same batch: it follows the BEGIN
                # through the ordinary path, which sends the BEGIN along with it.
                self.backlog[:0] = unit[rest:]
            self.write(b"".join(out))

        self.multi_start = start
        self.multi_unit = [msg]

    def _tx_control_bound(self, words: tuple[str, ...], sql: bytes,
                          msg: tuple[int, bytes]) -> bool:
        """The Bind of COMMIT, ROLLBACK or a savepoint command (JDBC sends them so) in a
        transaction on several shards: run on every participant once its Sync has come."""
        server = self.server
        if server is not None and server.link.busy:
            if server.link.open_batch_only:  # the statement's Parse went there, unsynced
                server.write(server.link.end_batch_quietly())
                self.portal_open = False
            self.waiting = True
            return False

        async def start(unit: list[tuple[int, bytes]]) -> None:
            self.write(await self._run_tx_control(words, sql, unit))

        self.multi_start = start
        self.multi_unit = [msg]
        return True

    async def _run_tx_control(self, words: tuple[str, ...], sql: bytes,
                              unit: list[tuple[int, bytes]]) -> bytes:
        tx = self.tx
        assert tx is not None
        parts = self._participants(tx)
        head = b"" if unit[0][0] == _Q else m.BIND_COMPLETE + (
            m.NO_DATA if any(k == ord("D") for k, _ in unit) else b"")
        coordinator = self.proxy.coordinator
        word = words[0]
        is_savepoint = word in ("savepoint", "release") or (
            word == "rollback" and len(words) > 1 and words[1] == "to") or (
            word == "rollback" and len(words) > 2 and words[2] == "to")
        if not is_savepoint:
            if word in ("commit", "end"):
                tag, error = await coordinator.commit(parts)
            else:
                await coordinator.rollback(parts)
                tag, error = b"ROLLBACK", None
            for part in parts:
                part.give_back()
            self._end_tx(released=True)
            if error is not None:
                return head + m.error_response(error) + m.ready_for_query(b"I")
            return head + m.message(b"C", tag + b"\x00") + m.ready_for_query(b"I")
        replies = await run_all(parts, m.query(sql))
        for part in parts:
            part.detach()
        errors = [e for r in replies for e in r.errors]
        if not errors:
            follow_savepoints(tx.savepoints, words, sql)
        status = b"E" if any(p.status == b"E" for p in parts) else b"T"
        if errors:
            return head + m.error_response(errors[0]) + m.ready_for_query(status)
        return head + m.message(b"C", replies[0].tag + b"\x00") + m.ready_for_query(status)

    def lock_owner(self) -> LockOwner | None:
        """This client's transaction as the deadlock check sees it, if one is open. One on
        a single shard counts as the oldest: never the victim (its shard sees its own
        deadlocks)."""
        tx = self.tx
        if tx is not None:
            return LockOwner(tx.started, {(shard, c.pid): c for shard, c in tx.conns.items()},
                             self._deadlock_victim)
        server = self.server
        if server is not None and server.link.status != b"I":
            return LockOwner(0.0, {(server.pool.shard, server.pid): server},
                             self._deadlock_victim)
        return None

    def _deadlock_victim(self, shard: str, conn: ServerConnection) -> None:
        """Chosen to end a deadlock across shards: the statement waiting on `conn` is
        cancelled and fails with 40P01."""
        if conn.closed:
            return
        error = m.error_response(deadlock_error(list(self.tx.conns) if self.tx else [shard]))
        if conn.link.replace_running_error(error):
            address = conn.pool.address
            asyncio.get_running_loop().create_task(
                send_cancel(address.host, address.port, conn.pid, conn.secret))

    def _end_tx(self, *, released: bool = False) -> None:
        tx, self.tx = self.tx, None
        self.tx_begin = None
        self.tx_router = None
        self.wrote = False
        self.savepoints = []
        self.shard_local = self.key_local = None
        self.server = None
        self.state = "idle"
        if tx is not None and not released:
            for conn in tx.conns.values():
                conn.client = None
                conn.pool.release(conn)  # closed: it is inside a transaction

    def _multi(self, plan: MultiShard | EachStatement, msg: tuple[int, bytes], *,
               ends_unit: bool) -> None:
        """A statement for several shards: checked here, then run (a DistributedStatement, a
        statement of a transaction on several shards, a ScatterRead, or a QueryString) once
        its unit, the Query or the Bind up to its Sync, is complete."""
        server = self.server
        if server is None and self.batch:
            # Parse/Describe held back before this Bind: the default shard answers them first.
            self._send_batch(self.proxy.config.default_shard, [], quiet=True)
            server = self.server
            if server is None:
                self.retry = True  # waiting for a connection: the Bind comes again
                self.queries -= 1
                return
        if server is not None and self._pipeline_stays(server):
            self._refuse(self._pipeline_error(
                server, ", ".join(plan.shards), "a statement for several shards runs on its "
                "own, not inside a pipeline of others"), msg, ends_unit=ends_unit)
            return
        if server is not None and (server.link.busy or self.portal_open or (
                self.pinned is None and server.link.status == b"I")):
            # Wait for that connection to answer (and, outside a transaction, to go back to
            # its pool; an open Parse/Describe batch is closed quietly first).
            if server.link.open_batch_only:
                server.write(server.link.end_batch_quietly())
                self.portal_open = False
            self.waiting = self.retry = True
            self.queries -= 1
            return
        if isinstance(plan, EachStatement):
            self._each(plan, msg)
            return
        shards = ", ".join(plan.shards)
        kind, body = msg
        param_types: tuple[int, ...] = ()
        if kind == _Q:
            sql = body[:-1]
        else:
            _, statement, _ = read_bind(body)
            known = self.analyses[statement]
            param_types, sql = known.param_types, known.sql
        analyses = self.proxy.router.prepared(sql)
        a = analyses[0]
        in_transaction = (server is not None and server.link.status != b"I") or (
            self.begin_sql is not None)
        if len(analyses) != 1:
            self._refuse(PgError(
                "0A000", f"a query string with several statements needs several shards "
                f"({shards}); Shardwire runs statements across shards one at a time",
                hint="send the statements one by one"), msg, ends_unit=ends_unit)
            return
        if server is not None and server.link.status == b"E":
            self._write_server([msg])  # the transaction has failed: the server says so
            return
        if a.rule is not None and plan.rows is None and self.proxy.fences.moving:
            move = self.proxy.fences.moving_rule(a.rule.name)
            if move is not None:
                self._refuse(_moving_error(a.rule.name, move), msg, ends_unit=ends_unit)
                return
        split: dict[str, ShardText] | None = None
        if plan.rows is not None:
            try:
                split = split_insert(sql, plan.rows)
            except SplitError as e:
                self._refuse(PgError(
                    "0A000", f"the INSERT has rows for several shards ({shards}) and "
                    f"Shardwire cannot split its text by row: {e}",
                    hint="insert the rows of each shard in a statement of their own (in one "
                    "transaction, they commit together)"), msg, ends_unit=ends_unit)
                return
        same_rows = plan.write and a.rule is None  # writes to reference tables
        if plan.write or a.kind in (Kind.DDL, Kind.MAINTENANCE):
            if in_transaction:
                def start(unit: list[tuple[int, bytes]]) -> Awaitable[None]:
                    return self._run_in_transaction(plan.shards, sql, unit, param_types,
                                                    same_rows=same_rows, split=split,
                                                    rows=plan.rows)
            else:
                def start(unit: list[tuple[int, bytes]]) -> Awaitable[None]:
                    return DistributedStatement(self, plan.shards, sql, unit,
                                                param_types=param_types, same_rows=same_rows,
                                                wrote=plan.write or a.kind is Kind.DDL,
                                                split=split, rows=plan.rows).run()
        else:
            try:
                merge, functions = self.proxy.router.merge_plan(sql)
            except MergeError as e:
                self._refuse(PgError(e.sqlstate, e.message, e.hint), msg, ends_unit=ends_unit)
                return
            if in_transaction:
                def start(unit: list[tuple[int, bytes]]) -> Awaitable[None]:
                    return self._scatter_in_transaction(plan.shards, merge, unit, param_types,
                                                        functions)
            else:
                def start(unit: list[tuple[int, bytes]]) -> Awaitable[None]:
                    return ScatterRead(self, plan.shards, merge, unit,
                                       param_types=param_types, functions=functions).run()
        self.proxy.metrics.multi_shard += 1
        self.multi_start = start
        if ends_unit:
            self._run_multi([msg])
        else:
            self.multi_unit = [msg]

    def _each(self, plan: EachStatement, msg: tuple[int, bytes]) -> None:
        """A query string whose statements need different shards: outside a transaction
        block, one QueryString (a transaction across them); inside one, refused."""
        sql = msg[1][:-1]
        if (self.server is not None and self.server.link.status != b"I") or (
                self.begin_sql is not None):
            self._refuse(PgError(
                "0A000", f"the statements of this query string need different shards "
                f"({', '.join(plan.shards)}); inside a transaction block Shardwire runs such "
                "statements only one per query", hint="send the statements one by one"),
                msg, ends_unit=True)
            return
        texts = split_statements(sql)
        analyses = self.proxy.router.prepared(sql)
        if plan.begin:
            begin, texts, analyses = texts[0], texts[1:-1], analyses[1:-1]
        else:
            begin = b"BEGIN"
        if len(texts) != len(plan.plans) or len(analyses) != len(plan.plans):
            self._refuse(PgError("0A000", "cannot tell the statements of this query string "
                                 "apart", hint="send the statements one by one"),
                         msg, ends_unit=True)
            return
        for a, step in zip(analyses, plan.plans, strict=True):
            if (isinstance(step, MultiShard) and step.rows is None and a.rule is not None
                    and self.proxy.fences.moving):
                move = self.proxy.fences.moving_rule(a.rule.name)
                if move is not None:
                    self._refuse(_moving_error(a.rule.name, move), msg, ends_unit=True)
                    return
        steps = []
        for text, a, step in zip(texts, analyses, plan.plans, strict=True):
            write = a.kind is not Kind.READ
            if isinstance(step, SingleShard):
                steps.append(Step(text, (step.shard,), write))
            elif isinstance(step, AnyShard):
                steps.append(Step(text, (), write))
            else:
                split = None
                if step.rows is not None:
                    try:
                        split = split_insert(text, step.rows)
                    except SplitError as e:
                        self._refuse(PgError(
                            "0A000", "an INSERT of this query string has rows for several "
                            f"shards and Shardwire cannot split its text by row: {e}",
                            hint="insert each shard's rows in a statement of their own"),
                            msg, ends_unit=True)
                        return
                steps.append(Step(text, step.shards, write, same_rows=step.write
                                  and a.rule is None, split=split, rows=step.rows))

        def start(unit: list[tuple[int, bytes]]) -> Awaitable[None]:
            return QueryString(self, plan.shards, steps, begin=begin, tags=plan.begin).run()

        self.proxy.metrics.multi_shard += 1
        self.multi_start = start
        self._run_multi([msg])

    async def _tx_join(self, shards: Sequence[str]) -> tuple[ShardTransaction, set[str]] | None:
        """The client's transaction on several shards (made one if it is on one shard yet),
        with a connection of each of `shards`: those that join now (returned) have the
        client's settings and still need its BEGIN and savepoints (`joining_queries`). None:
        the client went away meanwhile."""
        tx = self.tx
        if tx is None:
            begin = self.tx_begin or self.begin_sql or b"BEGIN"
            tx = self.tx = ShardTransaction(begin, self.server, self.savepoints)
            if self.wrote and self.server is not None:
                tx.written.add(self.server.pool.shard)
            self.begin_sql = None
        joining: set[str] = set()
        for shard in sorted(shards):
            if shard not in tx.conns:
                conn = await self.proxy.pool_for(shard).acquire()
                if self.closed:
                    conn.pool.release(conn)
                    return None
                await apply_settings(conn, self.settings)
                tx.conns[shard] = conn
                conn.client = self
                joining.add(shard)
        return tx, joining

    async def _scatter_in_transaction(self, shards: Sequence[str], merge: MergePlan,
                                      unit: list[tuple[int, bytes]],
                                      param_types: Sequence[int],
                                      functions: frozenset[str]) -> None:
        """A read of several shards inside the client's transaction: it runs, merged, on the
        transaction's connections of those shards (joining them first where needed), and
        sees what the transaction wrote there."""
        joined = await self._tx_join(shards)
        if joined is None:
            return
        tx, joining = joined
        first, count = tx.joining_queries()
        parts = [Participant(tx.conns[shard]) for shard in sorted(joining)]
        replies = await asyncio.gather(*(p.run(first, count) for p in parts))
        for part in parts:
            part.detach()
        errors = [e for r in replies for e in r.errors]
        conns = [tx.conns[shard] for shard in sorted(shards)]
        if errors:
            self.refuse_in_transaction(errors[0], conns[0])
            return
        await ScatterRead(self, shards, merge, unit, param_types=param_types,
                          functions=functions, conns=conns).run()
        self._follow_failure(tx)

    def _follow_failure(self, tx: ShardTransaction) -> None:
        """After a statement on several of the transaction's shards: when one of them failed
        (the transaction is aborted), the client's statements go to it, which answers each
        with 25P02 until ROLLBACK, as PostgreSQL does."""
        if self.unnamed is not None:
            # The statement ran as the unnamed statement of the shards' connections: the
            # client's own is prepared again where it is bound next.
            self.unnamed = (self.unnamed[0], None)
        failed = next((c for c in tx.conns.values() if c.link.status == b"E"), None)
        if failed is not None:
            self.server = failed
            self.pool = failed.pool
        elif self.server is None:
            self.server = next(iter(tx.conns.values()))
            self.pool = self.server.pool

    def refuse_in_transaction(self, err: PgError, conn: ServerConnection) -> None:
        """Fail the client's statement with `err` inside its transaction: through `conn`, a
        connection of the transaction, which fails in order (and so fails the transaction,
        as any error does on one server)."""
        self.server = conn
        self.pool = conn.pool
        self._write_server([], conn.link.refusal(m.error_response(err), own_unit=True))

    async def _run_in_transaction(self, shards: Sequence[str], sql: bytes,
                                  unit: list[tuple[int, bytes]], param_types: Sequence[int],
                                  *, same_rows: bool, split: Mapping[str, ShardText] | None,
                                  rows: Sequence[str] | None) -> None:
        """A statement for several shards inside the client's transaction: each shard's
        connection joins the transaction if it has not yet, and runs it."""
        try:
            requests = shard_requests(shards, sql, unit, param_types, split)
        except PgError as e:
            self.write(m.error_response(e) + m.ready_for_query(self._status()))
            return
        joined = await self._tx_join(shards)
        if joined is None:
            return
        tx, joining = joined
        parts = [Participant(tx.conns[shard], status=tx.conns[shard].link.status)
                 for shard in sorted(shards)]
        first, count = tx.joining_queries()
        replies = await asyncio.gather(*(
            p.run(first + requests[p.shard], count + 1) if p.shard in joining
            else p.run(requests[p.shard]) for p in parts))
        for part in parts:
            part.detach()
            part.wrote = True
            tx.written.add(part.shard)
        self._follow_failure(tx)
        status = b"E" if any(c.link.status == b"E" for c in tx.conns.values()) else b"T"
        out = [] if unit[0][0] == _Q else [m.BIND_COMPLETE]
        errors = [e for r in replies for e in r.errors]
        if errors:
            self.write(b"".join(out) + m.error_response(errors[0]) + m.ready_for_query(b"E"))
            return
        self.write(b"".join(out) + statement_reply(unit, replies, same_rows=same_rows,
                                                   rows=rows, shards=sorted(shards))
                   + m.ready_for_query(status))

    def _run_multi(self, unit: list[tuple[int, bytes]]) -> None:
        start, self.multi_start = self.multi_start, None
        assert start is not None
        self.waiting = True
        self.state = "active"

        async def run() -> None:
            try:
                await start(unit)
            except Exception:
                log.exception("statement on several shards failed")
                self.write(m.error_response(PgError(
                    "XX000", "internal error in a statement on several shards"))
                    + m.ready_for_query(b"I"))
            finally:
                self.state = "idle"
                if not self.closed:
                    self._resume()

        asyncio.get_running_loop().create_task(run())

    async def _lookup(self, rule: str, keys: tuple[object, ...], assign: bool,
                      ends_unit: bool) -> None:
        try:
            await self.proxy.directory.resolve(rule, keys, assign=assign)
        except PgError as e:
            msg = self.backlog.pop(0)
            self.waiting = False
            self._refuse(e, msg, ends_unit=ends_unit)
            if self.retry:  # the refusal waits for a server connection
                self.retry = False
                self.backlog.insert(0, msg)
            if not self.waiting:
                self._resume()
            return
        if not self.closed:
            self._resume()

    def _send_batch(self, shard: str, msgs: list[tuple[int, bytes]],
                    extra: bytes = b"", *, quiet: bool = False) -> None:
        """Send the held-back batch and `msgs` to a server of `shard`, once there is one."""
        self.batch.extend(msgs)
        if not self.proxy.replicated:
            pool = self.proxy.pool_for(shard)
        else:
            pool = self._pool_for(shard, self._statement_of(msgs[-1]) if msgs else None,
                                  self.begin_sql is not None)
        self.pool = pool
        conn = pool.try_acquire()
        if conn is not None:
            self._attach_for_batch(conn, extra, quiet)
            return
        self.waiting = self.acquiring = True
        asyncio.get_running_loop().create_task(self._acquire_for_batch(pool, extra, quiet))

    async def _acquire_for_batch(self, pool: Pool, extra: bytes, quiet: bool) -> None:
        try:
            conn = await pool.acquire()
        except PgError as e:
            self.acquiring = False
            self.pending, self.batch = self.batch, []
            self._fail_pending(e)
            self._resume()
            return
        self.acquiring = False
        if self.closed:
            pool.release(conn)
            return
        self._attach_for_batch(conn, extra, quiet)
        self._resume()  # the messages that came meanwhile (the rest of the batch, say)

    def _attach_for_batch(self, conn: ServerConnection, extra: bytes, quiet: bool) -> None:
        prefix = self._attach(conn)
        if not quiet and self.begin_sql is not None:
            prefix += conn.link.internal_query(self.begin_sql.decode("utf-8", "replace"))
            self.begin_sql = None
        batch, self.batch = self.batch, []
        if prefix:
            conn.write(prefix)
        self._write_server(batch, extra, quiet)

    def _refuse(self, err: PgError, msg: tuple[int, bytes], *, ends_unit: bool) -> None:
        """Answer `msg` with `err`, in order and with the transaction state PostgreSQL would
        leave: through the server when the client holds one (or has a batch or transaction
        waiting for one), else at once."""
        error = m.error_response(err)
        if self.server is None and not self.batch and self.begin_sql is None:
            self.proxy.metrics.refused[err.sqlstate[:2]] += 1
            if ends_unit:
                self.write(error + m.ready_for_query(b"I"))
            else:
                self.write(error)
                self.skip_to_sync = True
            return
        if self.server is None:
            self._send_batch(self.proxy.config.default_shard, [], b"")
            if self.server is None:
                # Waiting for a connection: the message is refused again once there is one.
                self.retry = True
                return
        server = self.server
        assert server is not None
        self.proxy.metrics.refused[err.sqlstate[:2]] += 1  # here: a retry did not get this far
        self._write_server([], server.link.refusal(error, own_unit=ends_unit))

    def _local_query(self, sql: bytes) -> bytes | None:
        """Replies for a Query the proxy answers itself (SET shardwire.*, SHOW ROUTE FOR, a
        BEGIN or COMMIT with no shard yet), or None."""
        if not sql.lstrip()[:8].lower().startswith(_LOCAL_WORDS):
            return None  # the common case, decided without an analysis
        shown = _SHOW_ROUTE.match(sql)
        if shown:
            plan = describe(self.proxy.router.plan_query(shown.group(1), self._context(),
                                                         self._timezone()))
            columns = [("route", m.TEXT_OID), ("shards", m.TEXT_OID), ("reason", m.TEXT_OID),
                       ("sqlstate", m.TEXT_OID), ("message", m.TEXT_OID)]
            shards = plan.get("shards")
            row = [plan.get("route"),
                   ", ".join(str(x) for x in shards) if isinstance(shards, list) and shards
                   else None,
                   plan.get("reason") or plan.get("hint"), plan.get("sqlstate"),
                   plan.get("message")]
            return (m.row_description(columns) + m.data_row(row)
                    + m.command_complete("SHOW"))
        if b"arget" in sql or b"ARGET" in sql:  # SET/RESET/SHOW shardwire.target
            target = parse_target_setting(sql)
            if target is not None:
                return self._target_setting(target.verb, target.value, target.local)
        analyses = self.proxy.router.prepared(sql)
        if len(analyses) != 1:
            return None
        a = analyses[0]
        if a.set_shardwire is not None:
            return self._shardwire_setting(*a.set_shardwire)
        if a.kind is not Kind.TRANSACTION or self.server is not None:
            return None
        word = a.words[0] if a.words else ""
        if word in ("begin", "start") and self.begin_sql is None and _PLAIN_BEGIN.match(sql):
            self.begin_sql = self.tx_begin = sql
            self.tx_router = self.proxy.router
            return m.command_complete("BEGIN")
        if self.begin_sql is not None and word in ("commit", "end", "rollback", "abort") and (
                len(a.words) == 1 or a.words[1] in ("work", "transaction")):
            self.begin_sql = self.tx_begin = None
            self.tx_router = None
            self.shard_local = self.key_local = None
            return m.command_complete("COMMIT" if word in ("commit", "end") else "ROLLBACK")
        return None

    def _shardwire_setting(self, name: str, value: str, local: bool) -> bytes:
        if name.startswith("show:"):
            name = name[5:]
            current = (self.shard_local or self.shard_session) if name == "shard" else (
                self.key_local or self.key_session)
            return (m.row_description([(f"shardwire.{name}", m.TEXT_OID)])
                    + m.data_row([current or ""]) + m.command_complete("SHOW"))
        if name == "shard" and value and value not in self.proxy.config.shards:
            return m.error_response(PgError(
                "22023", f'invalid value for parameter "shardwire.shard": "{value}"',
                hint="known shards: " + ", ".join(self.proxy.config.shards)))
        in_transaction = self._status() != b"I"
        if local and not in_transaction:
            return m.notice_response("SET LOCAL can only be used in transaction blocks",
                                     sqlstate="25P01", severity="WARNING") + (
                m.command_complete("SET"))
        if name == "shard":
            if local:
                self.shard_local = value or None
            else:
                self.shard_session = value or None
        else:
            if local:
                self.key_local = value or None
            else:
                self.key_session = value or None
        return m.command_complete("SET")

    # -- the read/write split (replicas.py) ---------------------------------------------------

    def _pool_for(self, shard: str, statement: bytes | None, in_tx: bool) -> Pool:
        """The pool of `shard` for a unit whose statement is `statement` (None: no statement
        decides, as for a held-back Parse), or for a transaction (`in_tx`): a replica for a
        plain read or a READ ONLY transaction, else the primary."""
        proxy = self.proxy
        replica_set = proxy.replicated.get(shard)
        if replica_set is None:
            return proxy.pool_for(shard)
        settings = proxy.config.replicas
        if in_tx:
            read = read_only_begin(self.tx_begin)
        else:
            read = statement is not None and plain_read(statement)
        if not read:
            if in_tx or statement is not None:
                self.primary_write = True
                self.wrote_at = time.monotonic()
            return replica_set.primary
        target = self.read_target or settings.target
        if target is ReadTarget.PRIMARY or self.pinned is not None:
            return replica_set.primary
        wait = settings.read_your_writes
        if self.heat_key is not None:  # routed by one key: its rule's own time, if it has one
            rule = proxy.router.smap.rules.get(self.heat_key[0])
            if rule is not None and rule.read_your_writes is not None:
                wait = rule.read_your_writes
        if wait and time.monotonic() - self.wrote_at < wait:
            return replica_set.primary
        return replica_set.for_read(target, settings.max_lag)

    def _statement_of(self, msg: tuple[int, bytes]) -> bytes | None:
        """The SQL a Query or a Bind (of a known prepared statement) runs, else None."""
        kind, body = msg
        if kind == _Q:
            return body[:-1]
        if kind == _B:
            known = self.analyses.get(read_bind(body)[1])
            return known.sql if known is not None else None
        return None

    def _plain_read_message(self, msg: tuple[int, bytes]) -> bool:
        statement = self._statement_of(msg)
        return statement is not None and plain_read(statement)

    def _needs_primary(self, server: ServerConnection, msg: tuple[int, bytes]) -> bool:
        """Whether `msg`, for the shard of `server` (a replica's connection), must wait and
        go to the primary: outside a transaction, anything but a plain read (in a READ ONLY
        transaction the replica refuses writes, as the primary would)."""
        if server.link.status != b"I" or msg[0] not in (_Q, _B):
            return False
        return not self._plain_read_message(msg)

    def _target_setting(self, verb: str, value: str, local: bool) -> bytes:
        """SET / RESET / SHOW shardwire.target, answered by the proxy."""
        if verb == "show":
            current = self.read_target or self.proxy.config.replicas.target
            return (m.row_description([("shardwire.target", m.TEXT_OID)])
                    + m.data_row([current.value]) + m.command_complete("SHOW"))
        if local:
            return m.error_response(PgError(
                "0A000", "SET LOCAL shardwire.target is not supported: the target is chosen "
                "when a transaction starts", hint="use SET shardwire.target (for the session) "
                "or BEGIN READ ONLY for a transaction on replicas"))
        if not value:
            self.read_target = None
            return m.command_complete("RESET" if verb == "reset" else "SET")
        try:
            self.read_target = ReadTarget(value)
        except ValueError:
            return m.error_response(PgError(
                "22023", f'invalid value for parameter "shardwire.target": "{value}"',
                hint="shardwire.target is primary, replica or any"))
        return m.command_complete("SET")

    # -- callbacks from the server connection -----------------------------------------------

    def server_ready(self, conn: ServerConnection) -> None:
        """The server answered everything sent so far."""
        if self.hop is not None and not self._hopped(conn):
            return
        status = conn.link.status
        if status == b"I" and self.tx is None:
            if self.primary_write:  # read-your-writes counts from the end of the write
                self.primary_write = False
                self.wrote_at = time.monotonic()
            self.shard_local = self.key_local = None  # SET LOCAL ends with the transaction
            self.tx_begin = None
            self.tx_router = None
            self.wrote = False
            if self.savepoints:
                self.savepoints = []
            if self.pinned is None:
                self.server = None
                self.state = "idle"
                conn.pool.release(conn)
        elif status == b"T" and self.tx_router is None:
            self.tx_router = self.proxy.router  # a BEGIN the server ran (in a query string)
        if self.waiting and not self.acquiring:
            self._resume()
        elif self.admitted is not None:
            self.proxy.admission.settle(self)

    def note_parameters(self, updates: list[tuple[str, str]]) -> None:
        for key, value in updates:
            self.settings[key] = value

    def server_lost(self, conn: ServerConnection) -> None:
        if self.server is conn:
            self.server = None
            self.fatal(PgError("08006", f"lost the connection to shard {conn.pool.shard}",
                               hint="the server closed the connection or crashed; reconnect "
                               "and retry", fatal=True))

    # -- output and ending ------------------------------------------------------------------

    def write(self, data: bytes | bytearray) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def fatal(self, err: PgError) -> None:
        if err.fatal is False:
            err = PgError(err.sqlstate, err.message, err.hint, err.detail, fatal=True)
        self.write(m.error_response(err))
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True
        self.proxy.clients.discard(self)
        self._let_go_of_server()

    def _let_go_of_server(self) -> None:
        if self.admitted is not None or self.admission_wait is not None:
            self.proxy.admission.release(self)
        if self.tx is not None:
            self._end_tx()  # each participant is closed: its transaction dies with it
            return
        conn, self.server = self.server, None
        if conn is None:
            return
        conn.client = None
        if self.pinned is not None and not conn.closed and conn.link.idle:
            # Session state must not reach the next client: reset it first.
            conn.link.forget_session_state()
            conn.run_and_release(conn.pool.settings.server_reset_query)
        else:
            conn.pool.release(conn)  # closes it unless idle outside a transaction


class Proxy:
    """The whole proxy: config, pools, clients, the listening socket."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.clients: set[ClientConnection] = set()
        self.clients_by_pid: dict[int, ClientConnection] = {}
        self.pools: dict[str, Pool] = {}
        self.primaries: dict[str, Pool] = {}  # shard name -> its primary's pool
        # Shards with replicas (replicas.py); empty when none has: one check on the hot path.
        self.replicated: dict[str, ReplicaSet] = {}
        self.tls_context: ssl.SSLContext | None = None
        self.fake_salt_key = secrets.token_bytes(32)
        self.started = time.time()
        self._server: asyncio.AbstractServer | None = None
        self._next_pid = 1
        self._maintenance: asyncio.Task[None] | None = None
        self._recovering: asyncio.Task[None] | None = None
        self._deadlocks: asyncio.Task[None] = None  # type: ignore[assignment]
        self.distributed_running: set[DistributedStatement] = set()
        self._collation: str | None = None
        self.coordinator = Coordinator(self)
        self._aggregates: dict[str, bool] = {}  # function name -> an aggregate on the shards?
        self.heat = Heat(time.time(), config.rebalance.heat_top_keys)  # SHOW HOT, rebalancer
        self._heat_flush: asyncio.Task[None] | None = None
        self._heat_drain: asyncio.Task[None] | None = None
        self.fences = Fences(self)  # rebalance fences and map flips (fence.py)
        self.metrics = ProxyMetrics(self)  # the Prometheus endpoint (metrics.py)
        # serve --workers (workers.py): listen with SO_REUSEPORT, figures of every worker.
        self.reuse_port = False
        self.worker_figures: WorkerFigures | None = None
        self.gate: Admission | None = None  # set while admission control applies
        self.admission = Admission(self)  # limits, PAUSE, shutdown (admission.py)
        self._apply_config(config)

    def _apply_config(self, config: Config) -> None:
        self.config = config
        # The file's modification time as it was loaded (SHOW WORKERS): the same on every
        # worker that loaded the same version of the file.
        self.config_stamp = config_stamp(config)
        self.admission.configure(config.limits)
        smap = getattr(config, "sharding", None) or ShardMap(tuple(config.shards),
                                                             config.default_shard)
        self.router = StatementRouter(smap)
        # False: everything goes to the default shard, unrouted. Replicas need the routed
        # path, which tells reads from writes.
        self.routing = smap.sharded or any(s.replicas for s in config.shards.values())
        old_directory = getattr(self, "directory", None)
        self.directory = Directory(config.catalog, smap)
        self._decisions_for(config)
        # The context of a session that named no shard or key (see RouteContext).
        self.no_context = RouteContext(shard=None, key=None, lookups=self.directory.caches)
        if old_directory is not None:
            asyncio.get_running_loop().create_task(old_directory.close())
        for shard in config.shards.values():
            key = f"{shard.name}/primary"
            old = self.pools.get(key)
            if old is None or old.address != shard.primary:
                if old is not None:
                    old.close()
                self.pools[key] = Pool(shard.name, "primary", shard.primary, config.pool,
                                       self.heat)
            else:
                old.settings = config.pool
        # Each shard's primary pool by the shard's name: `pool_for` is on every statement's
        # path, and a lookup by name costs less than building the pool's key.
        self.primaries = {name: self.pools[f"{name}/primary"] for name in config.shards}
        self._replica_pools(config)
        for key in list(self.pools):
            if key.split("/")[0] not in config.shards:
                self.pools.pop(key).close()
        self._watch_health()
        if config.tls is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(config.tls.cert_file, config.tls.key_file)
            self.tls_context = ctx
        else:
            self.tls_context = None

    def _decisions_for(self, config: Config) -> None:
        """The two-phase-commit decision log: in the catalog database, or without one, in
        the default shard's database (docs/transactions.md)."""
        from .twophase import DecisionLog, Recovery, decision_address
        where = decision_address(config)
        old = getattr(self, "decision_log", None)
        timeout = config.transactions.decision_timeout
        if old is not None and old.address == where:
            old.timeout = timeout
            self.recovery.config = config  # type: ignore[has-type]
            return
        self.decision_log = DecisionLog(where, timeout=timeout)
        self.recovery = Recovery(config, self.decision_log, self.coordinator.instance)
        if old is not None:
            asyncio.get_running_loop().create_task(old.close())

    def pool_for(self, shard: str) -> Pool:
        return self.primaries[shard]

    def _replica_pools(self, config: Config) -> None:
        """Pools for the replicas (`<shard>/replica/<host>:<port>`), kept across a reload
        when the server stays; and the shards' replica sets."""
        wanted: dict[str, tuple[str, object]] = {}
        for shard in config.shards.values():
            for address in shard.replicas:
                wanted[f"{shard.name}/replica/{address.host}:{address.port}"] = (
                    shard.name, address)
        for key in [k for k in self.pools if "/replica/" in k]:
            old = self.pools[key]
            if key not in wanted or wanted[key][1] != old.address:
                self.pools.pop(key).close()
        replicated: dict[str, ReplicaSet] = {}
        for shard in config.shards.values():
            pools = []
            for address in shard.replicas:
                key = f"{shard.name}/replica/{address.host}:{address.port}"
                pool = self.pools.get(key)
                if pool is None:
                    pool = self.pools[key] = Pool(shard.name, "replica", address, config.pool,
                                                  self.heat)
                else:
                    pool.settings = config.pool
                pools.append(pool)
            if pools:
                replicated[shard.name] = ReplicaSet(shard.name, self.pool_for(shard.name),
                                                    pools)
        self.replicated = replicated

    def _watch_health(self) -> None:
        """A health check task for every pool that has none (health.py); only once the
        event loop runs (start() calls this again)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        from .health import watch
        for pool in self.pools.values():
            if pool.health_task is None and not pool.closed:
                pool.health_task = loop.create_task(watch(pool, lambda: self.config.health))

    def login_pool(self, primary: Pool) -> Pool:
        """Where a client logging in learns the server's parameters while `primary` is down:
        one of its shard's replicas, if one is up."""
        replica_set = self.replicated.get(primary.shard)
        if replica_set is None:
            return primary
        return next((p for p in replica_set.replicas if p.up and p.checked), primary)

    @property
    def default_pool(self) -> Pool:
        return self.pools[f"{self.config.default_shard}/primary"]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await self.fences.start()  # before clients: a move already running is known (fence.py)
        listen = self.config.listen
        self._server = await loop.create_server(
            lambda: ClientConnection(self), listen.host, listen.port, reuse_address=True,
            reuse_port=self.reuse_port,
            backlog=1024)
        self._maintenance = loop.create_task(self._maintain())
        self._watch_health()  # health.py
        self._recovering = loop.create_task(self._recover())
        self._deadlocks = loop.create_task(self._watch_deadlocks())
        self._heat_flush = loop.create_task(flush_heat(self))
        self._heat_drain = loop.create_task(drain_heat(self.heat))
        self.metrics.start()  # serves /metrics when the config has a metrics section
        log.info("Shardwire %s listening on %s:%s", __version__, listen.host, self.port)

    async def _watch_deadlocks(self) -> None:
        """Deadlocks through several shards, which no shard sees (distributed.py)."""
        while True:
            await asyncio.sleep(DEADLOCK_CHECK_INTERVAL)
            if not self.distributed_running and not any(
                    c.tx is not None for c in self.clients):
                continue
            # Transactions on one shard take part too: a cycle may pass through them.
            owners = [owner for c in self.clients if (owner := c.lock_owner()) is not None]
            owners += [s.lock_owner() for s in self.distributed_running]
            try:
                victim = await check_deadlocks(self, owners)
            except Exception:
                log.exception("deadlock check failed")
                continue
            if victim is not None:
                log.info("deadlock across shards: cancelled the youngest transaction")

    async def _recover(self) -> None:
        """Finish the prepared transactions a crash left on the shards: at start-up, then
        every transactions.recovery_interval seconds (twophase.py)."""
        from .twophase import check_shards
        try:
            for problem in await check_shards(self.config):
                log.warning("%s", problem)
        except Exception:
            log.exception("checking the shards' max_prepared_transactions failed")
        while True:
            settings = self.config.transactions
            try:
                report = await self.recovery.run_once(min_age=settings.recovery_min_age)
                self.metrics.recovered(report)  # the in-doubt gauge (metrics.py)
                if report.committed or report.rolled_back:
                    log.info("recovery: committed %d, rolled back %d prepared transactions",
                             len(report.committed), len(report.rolled_back))
            except Exception:
                log.exception("recovery pass failed")
            await asyncio.sleep(settings.recovery_interval)

    @property
    def port(self) -> int:
        sockets = getattr(self._server, "sockets", None)  # uvloop's Server is not asyncio's
        assert sockets
        return int(sockets[0].getsockname()[1])

    def stop_listening(self) -> None:
        """Refuse new connections from now on (the first step of a graceful shutdown)."""
        if self._server is not None:
            self._server.close()

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    async def close(self) -> None:
        if self._maintenance is not None:
            self._maintenance.cancel()
        if self._heat_flush is not None:
            self._heat_flush.cancel()
        if self._heat_drain is not None:
            self._heat_drain.cancel()
        if self._recovering is not None:
            self._recovering.cancel()
            self._deadlocks.cancel()
        if self._server is not None:
            self._server.close()
        for client in list(self.clients):
            client.fatal(PgError("57P01", "terminating connection: Shardwire is shutting down",
                                 fatal=True))
        for pool in self.pools.values():
            pool.close()
        await self.directory.close()
        await self.decision_log.close()
        await self.fences.close()  # fence.py
        await self.metrics.close()

    def reload(self) -> list[str]:
        """Load the config file again. Returns the problems; the old config stays on error."""
        from ..config.load import ConfigError
        if self.config.path is None:
            return ["this proxy was not started from a config file"]
        try:
            config = load_config(self.config.path)
        except ConfigError as e:
            return list(e.problems)
        except OSError as e:
            return [f"{self.config.path}: {e.strerror}"]
        self._apply_config(config)
        # Prepared statements were analysed with the old map's rules: analyse them again, so
        # that a map flip (fence.py) reaches them too.
        for client in self.clients:
            client.analyses = {name: Prepared(self.router.prepared(p.sql), p.param_types, p.sql)
                               for name, p in client.analyses.items()}
            client.bound = None
        log.info("configuration reloaded from %s", config.path)
        return []

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(5)
            for pool in self.pools.values():
                pool.close_idle(self.config.pool.idle_timeout)

    # -- keys and cancellation --------------------------------------------------------------

    def new_backend_key(self, client: ClientConnection) -> tuple[int, int]:
        pid = self._next_pid
        self._next_pid = (self._next_pid + 1) & 0x7FFFFFFF or 1
        secret = secrets.randbits(31)
        self.clients_by_pid[pid] = client
        return pid, secret

    def cancel(self, pid: int, secret: int) -> None:
        client = self.clients_by_pid.get(pid)
        if client is None or not hmac.compare_digest(
                client.secret.to_bytes(4, "big"), secret.to_bytes(4, "big", signed=True)):
            log.info("cancel request for unknown key %s ignored", pid)
            return
        if client.scatter is not None:
            client.scatter.cancel()
            return
        server = client.server
        if server is None:
            return  # nothing running
        asyncio.get_running_loop().create_task(
            send_cancel(server.pool.address.host, server.pool.address.port,
                        server.pid, server.secret))

    async def collation(self, conn: ServerConnection) -> str:
        """The database's collation (lc_collate), which orders text in merged results; read
        once from a shard."""
        if self._collation is None:
            self._collation = await show(conn, "lc_collate")
        return self._collation

    async def aggregates_among(self, conn: ServerConnection, names: frozenset[str]
                               ) -> list[str]:
        """Which of these function names are aggregates (or window functions) in the
        shards' catalog; asked once per name."""
        unknown = sorted(n for n in names if n not in self._aggregates)
        if unknown:
            found = await query_rows(conn, (
                "SELECT DISTINCT proname FROM pg_catalog.pg_proc WHERE prokind IN ('a', 'w') "
                "AND proname IN (" + ", ".join(quote_literal(n) for n in unknown) + ")"))
            aggregates = {row[0] for row in found}
            if len(self._aggregates) > 10000:
                self._aggregates.clear()
            for name in unknown:
                self._aggregates[name] = name in aggregates
        return sorted(n for n in names if self._aggregates.get(n))

    async def login_parameters(self, pool: Pool, settings: dict[str, str]) -> dict[str, str]:
        """The ParameterStatus values a client with these settings should see at login.

        Learned once per distinct set of settings from a real server connection."""
        key = frozenset(settings.items())
        cached = pool.login_parameters.get(key)
        if cached is not None:
            return cached
        conn = await pool.acquire()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        query = conn.link.settings_query(settings)
        if query is None:
            params = dict(conn.link.reported)
            pool.release(conn)
        else:
            conn.on_idle = lambda: _settle(done)
            conn.write(query)
            try:
                await asyncio.wait_for(done, pool.settings.checkout_timeout)
            except TimeoutError:
                conn.abort("login settings timed out")
                raise PgError("57014", "timed out applying session settings") from None
            if conn.closed:
                raise PgError("08006", f"lost the connection to shard {pool.shard} at login")
            if conn.link.dropped_errors:
                fields = m.parse_error_fields(conn.link.dropped_errors[0])
                conn.abort("login settings failed")
                raise PgError(fields.get("C", "22023"), fields.get("M", "invalid setting"),
                              hint="check the parameters and options the client sends")
            params = dict(conn.link.reported)
            pool.release(conn)
        if len(pool.login_parameters) > 1000:
            pool.login_parameters.clear()
        pool.login_parameters[key] = params
        return params


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def send_cancel(host: str, port: int, pid: int, secret: int) -> None:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    except (OSError, TimeoutError) as e:
        log.info("could not send cancel request to %s:%s: %s", host, port, e)
        return
    writer.write(m.cancel_request(pid, secret))
    await writer.drain()
    writer.close()


def _moving_error(rule: str, move: int) -> PgError:
    return PgError(
        "55000", f"keys of rule {rule} are being moved between shards (move {move}): until "
        "the move is done their rows are on both shards, and a statement across shards of "
        "its tables would count them twice", hint="add a condition on the sharding key "
        "(statements by key are served), or retry when the move is done (shardwire "
        "rebalance status)")


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def run(config: Config, *, ready: Callable[[Proxy], None] | None = None,
              worker: WorkerRole | None = None) -> None:
    """Serve until SIGINT or SIGTERM; SIGHUP reloads the config file. `worker`: one of the
    processes of `serve --workers` (workers.py).

    SIGTERM shuts down gracefully: no new connections, running transactions get
    `shutdown_timeout` seconds to finish (admission.py). SIGINT closes everything at once."""
    proxy = Proxy(config)
    proxy.reuse_port = worker is not None
    await proxy.start()
    if worker is not None:
        proxy.worker_figures = WorkerFigures(worker, proxy)
        proxy.worker_figures.start()
    # Everything loaded so far (sqlglot's tables above all) lives as long as the process:
    # keep it out of the garbage collector's full passes, which would otherwise walk it all.
    gc.collect()
    gc.freeze()
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[signal.Signals] = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _stop_on, stop, sig)

    def on_hup() -> None:
        problems = proxy.reload()
        for p in problems:
            log.error("reload rejected: %s", p)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    if ready is not None:
        ready(proxy)
    try:
        if await stop is signal.SIGTERM:
            proxy.stop_listening()
            loop.add_signal_handler(signal.SIGINT, proxy.admission.cut_short)
            await proxy.admission.drain(proxy.config.shutdown_timeout)
    finally:
        if proxy.worker_figures is not None:
            proxy.worker_figures.close()
        await proxy.close()


def _stop_on(fut: asyncio.Future[signal.Signals], sig: signal.Signals) -> None:
    if not fut.done():
        fut.set_result(sig)

