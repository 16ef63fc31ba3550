"""The admin console: the virtual database `shardwire` answering SHOW commands and RELOAD
with ordinary result sets, so psql and any driver can read them."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .. import __version__
from ..config.settings import config_rows
from ..router.classify import leading_words, split_statements
from .protocol import messages as m
from .protocol.errors import PgError
from .protocol.framing import FRONTEND_TYPES, FrameError, MessageReader

if TYPE_CHECKING:
    from .server import ClientConnection, Proxy

T, I8 = m.TEXT_OID, m.INT8_OID

Result = tuple[Sequence[tuple[str, int]], Sequence[Sequence[object]], str]


class AdminSession:
    def __init__(self, proxy: Proxy, client: ClientConnection) -> None:
        self.proxy = proxy
        self.client = client
        self.reader = MessageReader(1 << 20, FRONTEND_TYPES)
        self.skip_to_sync = False
        self.commands: dict[str, Callable[[], Result]] = {
            "shards": self.show_shards, "pools": self.show_pools, "clients": self.show_clients,
            "servers": self.show_servers, "stats": self.show_stats, "config": self.show_config,
            "version": self.show_version, "help": self.show_help,
        }

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
        for kind, body in msgs:
            if kind == ord("X"):
                self.client.close()
                return
            if kind == ord("Q"):
                self.client.write(self.run(body[:-1]) + m.ready_for_query(b"I"))
            elif kind == ord("S"):
                if self.skip_to_sync:
                    self.skip_to_sync = False
                self.client.write(m.ready_for_query(b"I"))
            elif not self.skip_to_sync:
                self.skip_to_sync = True
                self.client.write(m.error_response(PgError(
                    "0A000", "the admin console supports only the simple query protocol",
                    hint="use psql, or your driver's simple-query mode")))

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
            return (m.row_description(columns) + b"".join(m.data_row(r) for r in rows)
                    + m.command_complete(tag or f"SHOW {len(rows)}"))
        if words == ["reload"]:
            problems = self.proxy.reload()
            if problems:
                raise PgError("F0000", "the new configuration was rejected; the old one stays "
                              "in force", detail="\n".join(problems),
                              hint="fix the file and RELOAD again")
            return m.command_complete("RELOAD")
        if words in (["begin"], ["commit"], ["rollback"], ["set"]) or (
                words and words[0] == "set"):
            # psql and drivers send these; the console has no state to change.
            return m.command_complete(words[0].upper())
        raise PgError("42601", f"unknown admin command: {stmt.decode('utf-8', 'replace')[:80]}",
                      hint="SHOW HELP lists the commands")

    # -- the commands -----------------------------------------------------------------------

    def show_help(self) -> Result:
        rows = [(f"SHOW {name.upper()}",) for name in self.commands] + [("RELOAD",)]
        return [("command", T)], rows, ""

    def show_version(self) -> Result:
        return [("version", T)], [(f"Shardwire {__version__}",)], ""

    def show_shards(self) -> Result:
        cols = [("shard", T), ("role", T), ("host", T), ("port", I8), ("database", T),
                ("user", T), ("default", m.BOOL_OID)]
        rows = []
        cfg = self.proxy.config
        for shard in cfg.shards.values():
            servers = [("primary", shard.primary)] + [("replica", r) for r in shard.replicas]
            for role, addr in servers:
                rows.append((shard.name, role, addr.host, addr.port, addr.database, addr.user,
                             shard.name == cfg.default_shard))
        return cols, rows, ""

    def show_pools(self) -> Result:
        cols = [("shard", T), ("role", T), ("pool_size", I8), ("active", I8), ("idle", I8),
                ("connecting", I8), ("waiting_clients", I8), ("max_wait_ms", I8),
                ("last_error", T)]
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
        rows = []
        for pool in self.proxy.pools.values():
            s = pool.stats
            avg = int(s.wait_time / s.waits * 1e6) if s.waits else 0
            rows.append((pool.shard, pool.role, s.transactions, s.queries, s.bytes_in,
                         s.bytes_out, s.waits, avg, s.connects))
        return cols, rows, ""

    def show_config(self) -> Result:
        cols = [("key", T), ("value", T), ("default", T), ("reloadable", T)]
        return cols, config_rows(self.proxy.config), ""
