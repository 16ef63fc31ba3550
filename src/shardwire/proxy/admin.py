"""The admin console: the virtual database `shardwire` answering SHOW commands and RELOAD
with ordinary result sets, so psql and any driver can read them.

Most commands answer at once from the proxy's memory. Those that must ask servers (SHOW
IN_DOUBT, RESOLVE IN_DOUBT) answer later; messages that arrive meanwhile wait their turn, so
replies always go out in the order of the requests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from .. import __version__
from ..config.settings import config_rows
from ..rebalancer.heat import merge_windows
from ..router.classify import leading_words, split_statements
from ..router.shardmap import canonical_text
from .protocol import messages as m
from .protocol.errors import PgError
from .protocol.framing import FRONTEND_TYPES, FrameError, MessageReader

if TYPE_CHECKING:
    from .server import ClientConnection, Proxy
    from .twophase import Recovery

log = logging.getLogger("shardwire.admin")

T, I8, F8 = m.TEXT_OID, m.INT8_OID, m.FLOAT8_OID
HOT_KEYS_SHOWN = 10  # per rule, by statements and by busy time

Result = tuple[Sequence[tuple[str, int]], Sequence[Sequence[object]], str]

# RESOLVE IN_DOUBT '<gid>' COMMIT | ROLLBACK
_RESOLVE = re.compile(rb"(?is)^\s*resolve\s+in_doubt\s+'((?:[^']|'')*)'\s+(commit|rollback)\s*$")


class AdminSession:
    def __init__(self, proxy: Proxy, client: ClientConnection) -> None:
        self.proxy = proxy
        self.client = client
        self.reader = MessageReader(1 << 20, FRONTEND_TYPES)
        self.skip_to_sync = False
        self.commands: dict[str, Callable[[], Result]] = {
            "shards": self.show_shards, "pools": self.show_pools, "clients": self.show_clients,
            "servers": self.show_servers, "stats": self.show_stats, "config": self.show_config,
            "version": self.show_version, "help": self.show_help, "hot": self.show_hot,
            "state": self.show_state, "workers": self.show_workers,
        }
        # Commands answered later (they ask servers): SHOW <name>.
        self.later: dict[str, Callable[[], Awaitable[bytes]]] = {
            "in_doubt": self.show_in_doubt,
        }
        self.queue: deque[tuple[int, bytes]] = deque()  # messages waiting for their turn
        self.running: asyncio.Task[None] | None = None  # the command being answered later

    def greet(self) -> None:
        params = {"server_version": f"15.0 (Shardwire {__version__} admin console)",
                  "server_encoding": "UTF8", "client_encoding": "UTF8", "DateStyle": "ISO",
                  "integer_datetimes": "on", "standard_conforming_strings": "on",
                  "TimeZone": "UTC", "application_name": ""}
        out = [m.parameter_status(k, v) for k, v in params.items()]
        out.append(m.backend_key_data(self.client.pid, self.client.secret))
        out.append(m.ready_for_query(b"I"))
        self.client.write(b"".join(out))

    def feed(self, data: bytes) -> None:
        try:
            msgs = self.reader.feed(data)
        except FrameError as e:
            self.client.fatal(e)
            return
        self.queue.extend(msgs)
        self._next()

    def _next(self) -> None:
        """Answer the waiting messages in order, until one must be answered later."""
        while self.queue and self.running is None and not self.client.closed:
            kind, body = self.queue.popleft()
            if kind == ord("X"):
                self.client.close()
                return
            if kind == ord("Q"):
                sql = body[:-1]
                statements = split_statements(sql)
                if any(self._is_later(stmt) for stmt in statements):
                    self.running = asyncio.get_running_loop().create_task(
                        self._answer_later(statements))
                    return
                self.client.write(self.run(sql) + m.ready_for_query(b"I"))
            elif kind == ord("S"):
                if self.skip_to_sync:
                    self.skip_to_sync = False
                self.client.write(m.ready_for_query(b"I"))
            elif not self.skip_to_sync:
                self.skip_to_sync = True
                self.client.write(m.error_response(PgError(
                    "0A000", "the admin console supports only the simple query protocol",
                    hint="use psql, or your driver's simple-query mode")))

    def _is_later(self, stmt: bytes) -> bool:
        words = leading_words(stmt, 3)
        return (len(words) == 2 and words[0] == "show" and words[1] in self.later) or (
            bool(words) and words[0] in ("resolve", "pause"))

    async def _answer_later(self, statements: list[bytes]) -> None:
        out = []
        try:
            for stmt in statements:
                try:
                    if self._is_later(stmt):
                        out.append(await self.run_later(stmt))
                    else:
                        out.append(self.run_one(stmt))
                except PgError as e:
                    out.append(m.error_response(e))
                    break
                except Exception as e:  # the console must keep answering
                    log.exception("admin command failed")
                    out.append(m.error_response(PgError("XX000", f"internal error: {e}")))
                    break
            self.client.write(b"".join(out) + m.ready_for_query(b"I"))
        finally:
            self.running = None
            self._next()

    def run(self, sql: bytes) -> bytes:
        statements = split_statements(sql)
        if not statements:
            return m.EMPTY_QUERY
        out = []
        for stmt in statements:
            try:
                out.append(self.run_one(stmt))
            except PgError as e:
                out.append(m.error_response(e))
                break
        return b"".join(out)

    def run_one(self, stmt: bytes) -> bytes:
        words = leading_words(stmt, 3)
        if words and words[0] == "show" and len(words) == 2 and words[1] in self.commands:
            columns, rows, tag = self.commands[words[1]]()
            return _result(columns, rows, tag)
        if words == ["reload"]:
            problems = self.proxy.reload()
            if problems:
                raise PgError("F0000", "the new configuration was rejected; the old one stays "
                              "in force", detail="\n".join(problems),
                              hint="fix the file and RELOAD again")
            if self.proxy.worker_figures is not None:  # serve --workers: all reload
                self.proxy.worker_figures.reload_all()
            return m.command_complete("RELOAD")
        if words and words[0] == "resume" and len(words) <= 2:
            self.proxy.admission.resume(self._database(words))  # admission.py
            return m.command_complete("RESUME")
        if words in (["begin"], ["commit"], ["rollback"], ["set"]) or (
                words and words[0] == "set"):
            # psql and drivers send these; the console has no state to change.
            return m.command_complete(words[0].upper())
        raise PgError("42601", f"unknown admin command: {stmt.decode('utf-8', 'replace')[:80]}",
                      hint="SHOW HELP lists the commands")

    async def run_later(self, stmt: bytes) -> bytes:
        words = leading_words(stmt, 3)
        if words[0] == "show":
            return await self.later[words[1]]()
        if words[0] == "pause" and len(words) <= 2:
            # Answered once every transaction in flight has finished (admission.py).
            await self.proxy.admission.pause(self._database(words))
            return m.command_complete("PAUSE")
        found = _RESOLVE.match(stmt)
        if found is None:
            raise PgError("42601", "RESOLVE IN_DOUBT takes a transaction id and COMMIT or "
                          "ROLLBACK", hint="RESOLVE IN_DOUBT 'shardwire:...' COMMIT")
        gid = found.group(1).decode("utf-8", "replace").replace("''", "'")
        return await self.resolve_in_doubt(gid, commit=found.group(2).lower() == b"commit")

    def _database(self, words: Sequence[str]) -> str | None:
        """The database of `PAUSE <db>` / `RESUME <db>`; None for all."""
        if len(words) < 2:
            return None
        served = self.proxy.config.database
        if words[1] != served:
            raise PgError("3D000", f"database {words[1]!r} is not served by this proxy",
                          hint=f"name {served!r}, or give no name for all databases")
        return served

    # -- the commands -----------------------------------------------------------------------

    def show_help(self) -> Result:
        rows = [(f"SHOW {name.upper()}",) for name in (*self.commands, *self.later)] + [
            ("RELOAD",), ("PAUSE [<db>]",), ("RESUME [<db>]",),
            ("RESOLVE IN_DOUBT '<gid>' COMMIT",),
            ("RESOLVE IN_DOUBT '<gid>' ROLLBACK",)]
        return [("command", T)], rows, ""

    def show_version(self) -> Result:
        return [("version", T)], [(f"Shardwire {__version__}",)], ""

    def show_shards(self) -> Result:
        cols = [("shard", T), ("role", T), ("host", T), ("port", I8), ("database", T),
                ("user", T), ("default", m.BOOL_OID), ("health", T), ("in_recovery", T),
                ("lag_s", T), ("failures", I8), ("health_error", T)]
        rows = []
        cfg = self.proxy.config
        pools = self.proxy.pools
        for shard in cfg.shards.values():
            servers = [("primary", shard.primary)] + [("replica", r) for r in shard.replicas]
            for role, addr in servers:
                # health.py: up, down, or unchecked (no check has passed yet)
                pool = pools.get(f"{shard.name}/primary" if role == "primary" else
                                 f"{shard.name}/replica/{addr.host}:{addr.port}")
                health = None if pool is None else (
                    "down" if not pool.up else "up" if pool.checked else "unchecked")
                rows.append((shard.name, role, addr.host, addr.port, addr.database, addr.user,
                             shard.name == cfg.default_shard, health,
                             None if pool is None or pool.in_recovery is None
                             else str(pool.in_recovery).lower(),
                             None if pool is None or pool.lag is None else f"{pool.lag:.3f}",
                             None if pool is None else pool.failures,
                             None if pool is None else pool.health_error))
        return cols, rows, ""

    def show_pools(self) -> Result:
        cols = [("shard", T), ("role", T), ("pool_size", I8), ("active", I8), ("idle", I8),
                ("connecting", I8), ("waiting_clients", I8), ("max_wait_ms", I8),
                ("last_error", T)]
        if self.proxy.worker_figures is not None:  # serve --workers: all of them (workers.py)
            return cols, self.proxy.worker_figures.pools_rows(), ""
        rows = []
        now = time.monotonic()
        for pool in self.proxy.pools.values():
            rows.append((pool.shard, pool.role, pool.settings.size, len(pool.active),
                         len(pool.idle), pool.connecting, len(pool.waiters),
                         int(pool.oldest_wait(now) * 1000), pool.last_error))
        return cols, rows, ""

    def show_clients(self) -> Result:
        cols = [("pid", I8), ("user", T), ("database", T), ("address", T), ("state", T),
                ("shard", T), ("pinned", T), ("connected_at", T), ("queries", I8)]
        rows = []
        for c in sorted(self.proxy.clients, key=lambda c: c.pid):
            shard = c.server.pool.shard if c.server is not None else None
            rows.append((c.pid, c.user, c.database, c.addr, c.state, shard, c.pinned,
                         time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(c.connected_at)),
                         c.queries))
        return cols, rows, ""

    def show_servers(self) -> Result:
        cols = [("shard", T), ("role", T), ("backend_pid", I8), ("state", T),
                ("client_pid", I8), ("prepared_statements", I8), ("age_s", I8),
                ("idle_s", I8)]
        rows = []
        now = time.monotonic()
        for pool in self.proxy.pools.values():
            for state, conns in (("active", pool.active), ("idle", pool.idle)):
                for conn in conns:
                    rows.append((pool.shard, pool.role, conn.pid, state,
                                 conn.client.pid if conn.client is not None else None,
                                 len(conn.link.prepared), int(now - conn.created),
                                 int(now - conn.last_used)))
        return cols, rows, ""

    def show_stats(self) -> Result:
        cols = [("shard", T), ("role", T), ("transactions", I8), ("queries", I8),
                ("bytes_in", I8), ("bytes_out", I8), ("waits", I8), ("avg_wait_us", I8),
                ("connects", I8)]
        if self.proxy.worker_figures is not None:  # serve --workers: all of them (workers.py)
            return cols, self.proxy.worker_figures.stats_rows(), ""
        rows = []
        for pool in self.proxy.pools.values():
            s = pool.stats
            avg = int(s.wait_time / s.waits * 1e6) if s.waits else 0
            rows.append((pool.shard, pool.role, s.transactions, s.queries, s.bytes_in,
                         s.bytes_out, s.waits, avg, s.connects))
        return cols, rows, ""

    def show_hot(self) -> Result:
        """This proxy's heat: the window closed last and the one open now, added up. Shards
        first (busiest first), then each rule's hottest keys (most statements first)."""
        heat = self.proxy.heat
        now = time.time()
        windows = [heat.snapshot(now)] if heat.last is None else [heat.last, heat.snapshot(now)]
        window = merge_windows(windows)
        busy_total = sum(s.busy for s in window.shards.values()) or 1.0
        cols = [("kind", T), ("shard", T), ("rule", T), ("key", T), ("statements", I8),
                ("statements_error", I8), ("busy_ms", F8), ("busy_share", F8), ("rows", I8),
                ("errors", I8), ("window_s", F8)]
        seconds = round(window.seconds, 1)
        rows: list[tuple[object, ...]] = []
        for shard, s in sorted(window.shards.items(), key=lambda kv: -kv[1].busy):
            rows.append(("shard", shard, None, None, s.statements, 0, round(s.busy * 1000, 3),
                         round(s.busy / busy_total, 4), s.rows, s.errors, seconds))
        for rule, keys in sorted(window.keys.items()):
            by_busy = sorted(keys, key=lambda k: -k.busy)[:HOT_KEYS_SHOWN]
            shown = list(keys[:HOT_KEYS_SHOWN]) + [k for k in by_busy
                                                   if k not in keys[:HOT_KEYS_SHOWN]]
            for k in shown:
                rows.append(("key", k.shard, rule, canonical_text(k.key), k.statements,
                             k.statements_error, round(k.busy * 1000, 3),
                             round(k.busy / busy_total, 4), None, None, seconds))
        return cols, rows, ""

    def show_workers(self) -> Result:
        """The processes of `serve --workers` (workers.py); one row without it."""
        cols = [("worker", I8), ("pid", I8), ("clients", I8), ("queries", I8),
                ("snapshot_age_s", F8), ("config_loaded", T), ("this", m.BOOL_OID)]
        figures = self.proxy.worker_figures
        if figures is not None:
            return cols, figures.workers_rows(), ""
        queries = sum(pool.stats.queries for pool in self.proxy.pools.values())
        return cols, [(0, os.getpid(), len(self.proxy.clients), queries, 0.0,
                       self.proxy.config_stamp, True)], ""

    def show_state(self) -> Result:
        """Running, paused or shutting down, and the admission figures (admission.py)."""
        cols = [("state", T), ("paused_databases", T), ("transactions_running", I8),
                ("waiting_for_limits", I8), ("held_by_pause", I8), ("rejected_queue_full", I8),
                ("rejected_timeout", I8), ("rejected_rate", I8)]
        return cols, [self.proxy.admission.state_row()], ""

    def show_config(self) -> Result:
        cols = [("key", T), ("value", T), ("default", T), ("reloadable", T)]
        return cols, config_rows(self.proxy.config), ""

    # -- two-phase commit (answered later) --------------------------------------------------

    def _recovery(self) -> Recovery:
        recovery: Recovery | None = getattr(self.proxy, "recovery", None)
        if recovery is None:
            raise PgError("0A000", "this proxy has no two-phase commit recovery",
                          hint="finish prepared transactions with `shardwire recover`")
        return recovery

    async def show_in_doubt(self) -> bytes:
        survey = await self._recovery().survey()
        notices = [m.notice_response(f"shard {shard} could not be looked at: {why}",
                                     sqlstate="01000", severity="WARNING")
                   for shard, why in survey.unreachable]
        if survey.catalog_error:
            notices.append(m.notice_response(
                f"decisions unknown: {survey.catalog_error}", sqlstate="01000",
                severity="WARNING"))
        cols = [("shard", T), ("gid", T), ("prepared", T), ("age", I8), ("decision", T)]
        rows = [(t.shard, t.gid, t.prepared_at.strftime("%Y-%m-%d %H:%M:%S%z"),
                 int(t.age_seconds), t.decision) for t in survey.transactions]
        return b"".join(notices) + _result(cols, rows, "")

    async def resolve_in_doubt(self, gid: str, *, commit: bool) -> bytes:
        shards = await self._recovery().resolve(gid, commit=commit)
        action = "committed" if commit else "rolled back"
        cols = [("shard", T), ("gid", T), ("action", T)]
        rows = [(shard, gid, action) for shard in shards]
        return _result(cols, rows, f"RESOLVE {len(rows)}")


def _result(columns: Sequence[tuple[str, int]], rows: Sequence[Sequence[object]],
            tag: str) -> bytes:
    return (m.row_description(columns) + b"".join(m.data_row(r) for r in rows)
            + m.command_complete(tag or f"SHOW {len(rows)}"))
