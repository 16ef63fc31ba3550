"""The proxy's side of an online move (`shardwire rebalance apply`, docs/rebalancing.md).

A proxy with a catalog database registers itself there (`shardwire_proxies`, renewed every
`HEARTBEAT_SECONDS`) and LISTENs on `shardwire_rebalance`, as `directory.py` does for lookup
directories. Whatever the notification, it reads the catalog again (`Fences.sync`), which also
catches up on notifications missed while the catalog was out of reach:

- a fence not yet known (`shardwire_fences`, not released) is installed, then acknowledged
  (`shardwire_acks`, kind `fence`): from then on, a statement that would write rows of the
  fenced keys waits (`Fences.hold`) until the fence is released, or fails after
  `rebalance.fence_timeout` seconds with SQLSTATE 55P03. Reads go on; other keys are untouched.
- a fence released in the catalog is released here: the statements it held are routed again,
  with the map in force by then.
- a new map version (`shardwire_map_versions`) makes the proxy RELOAD its config file (the
  same as the admin console's RELOAD: statements routed afterwards use the new map; a
  transaction already open keeps its server connections) and acknowledge (kind `map`, or
  `unmap` when the version was reverted) whether the map now places the moved keys where
  the move says.

Which statements are held: writes (anything but SELECT/SHOW/SET/transaction control) that
reach the move's source or target shard, under the fenced rule, whose key is one of the
fenced keys (for a range move: within the moving part), or whose key the router could not
name (a write of several keys, a write without a key condition across shards, a COPY ...
FROM sent to one shard by a hint): those are held too, to be safe.

For a lookup move the map file does not change: the flip changes the keys' directory rows,
and the reload empties the directory cache, so the acknowledgement reads them again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg

from ..rebalancer.catalog import CHANNEL, HEARTBEAT_SECONDS, ensure_schema
from ..router.analyze import Kind
from ..router.plan import EachStatement, MultiShard, Plan, SingleShard
from ..router.shardmap import KeyType, RuleKind
from ..router.values import to_key
from .protocol.errors import PgError
from .routing import read_bind

if TYPE_CHECKING:
    from .server import ClientConnection, Proxy

log = logging.getLogger("shardwire.fence")

_Q, _B = ord("Q"), ord("B")


@dataclass(slots=True)
class Fence:
    """Writes held: keys of `rule` (a set, or for a range move `lower <= key < upper`, None
    an open end) reaching the move's source or target."""

    id: int
    rule: str
    keys: frozenset[Any]
    shards: frozenset[str]  # the move's source and target
    released: asyncio.Event = field(default_factory=asyncio.Event)
    ranged: bool = False
    lower: Any = None
    upper: Any = None

    def covers(self, key: Any) -> bool:
        if not self.ranged:
            return key in self.keys
        try:
            return (self.lower is None or key >= self.lower) and (
                self.upper is None or key < self.upper)
        except TypeError:  # a key of another type than the rule's: cannot tell, so hold
            return True


def _bound(keys: dict[str, str | None], end: str, key_type: KeyType) -> Any:
    """One end of a range move's part (`from` or `to`); None is open."""
    text = keys.get(end)
    return None if text is None else to_key(text, key_type)


class Fences:
    """Fences in force on this proxy, and the catalog connection that learns of them."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.fences: dict[int, Fence] = {}
        self.active = False  # any fence in force: checked on the hot path, so a plain bool
        self.held = 0  # statements held so far
        self.held_seconds: list[float] = []  # how long the last held statements waited
        self._task: asyncio.Task[None] | None = None
        self._conn: Any = None
        self._lock = asyncio.Lock()
        self._map_seen: tuple[int, bool] | None = None
        self._registered = False
        # Moves running now (move id -> rule name): from their copy to their clean-up, the
        # moving rows are on both shards, so statements across shards of the rule's tables
        # are refused (`moving_rule`) rather than see them twice.
        self.moving: dict[int, str] = {}
        # Set once the catalog was read (or could not be): the proxy waits for it, briefly,
        # before it takes clients, so that it knows of a move already running.
        self.first_look = asyncio.Event()

    # -- life cycle --------------------------------------------------------------------------

    async def start(self, wait: float = 2.0) -> None:
        """Start following the catalog, and wait (up to `wait` seconds) for its first reading:
        a proxy starting during a move must know of it before it serves a statement."""
        if self.proxy.config.catalog is None or not self.proxy.routing:
            return
        self._task = asyncio.get_running_loop().create_task(self._run())
        try:
            await asyncio.wait_for(self.first_look.wait(), wait)
        except TimeoutError:
            log.warning("rebalance fences: the catalog was not read within %g s of start-up; "
                        "serving anyway", wait)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        conn = self._conn
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.execute(
                    "DELETE FROM shardwire_proxies WHERE instance = $1", self.instance), 2)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                pass
            await conn.close()
        for fence in self.fences.values():
            fence.released.set()

    @property
    def instance(self) -> str:
        return self.proxy.coordinator.instance

    async def _run(self) -> None:
        while True:
            addr = self.proxy.config.catalog
            assert addr is not None
            try:
                conn = await asyncpg.connect(
                    host=addr.host, port=addr.port, user=addr.user, password=addr.password,
                    database=addr.database, timeout=5,
                    ssl=None if addr.sslmode == "disable" else addr.sslmode,
                    server_settings={"application_name": "shardwire proxy fences"})
                self._conn = conn
                await ensure_schema(conn)
                await conn.add_listener(CHANNEL, self._notified)
                while True:
                    async with self._lock:
                        await conn.execute(
                            "INSERT INTO shardwire_proxies (instance, host, pid) "
                            "VALUES ($1, $2, $3) ON CONFLICT (instance) DO UPDATE "
                            "SET seen_at = now()", self.instance, socket.gethostname(),
                            os.getpid())
                        await self._sync(conn)
                    self.first_look.set()
                    await asyncio.sleep(HEARTBEAT_SECONDS)
            except asyncio.CancelledError:
                raise
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                log.warning("rebalance fences: the catalog database is out of reach (%s); "
                            "trying again", e)
            except Exception:
                log.exception("rebalance fences: unexpected failure; trying again")
            self.first_look.set()  # the first try is over: start-up does not wait longer
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.terminate()
            await asyncio.sleep(1)

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        asyncio.get_running_loop().create_task(self._on_notice(payload))

    async def _on_notice(self, payload: str) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            async with self._lock:
                await self._sync(conn)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            log.warning("rebalance fences: reading the catalog after %r failed: %s", payload, e)

    # -- the catalog -------------------------------------------------------------------------

    def moving_rule(self, rule: str) -> int | None:
        """The move in progress of keys of `rule`, if there is one."""
        return next((ident for ident, name in self.moving.items() if name == rule), None)

    async def _sync(self, conn: Any) -> None:
        running = {r["id"]: r["rule"] for r in await conn.fetch(
            "SELECT id, rule FROM shardwire_moves WHERE state = 'running'")}
        for ident in running:
            if ident not in self.moving:
                # `apply` copies no row before every live proxy has said it knows.
                await conn.execute(
                    "INSERT INTO shardwire_acks (kind, id, instance, ok, detail) "
                    "VALUES ('moving', $1, $2, true, '') ON CONFLICT DO NOTHING",
                    ident, self.instance)
        self.moving = running
        rows = await conn.fetch("SELECT id, rule, keys, source, target FROM shardwire_fences "
                                "WHERE released_at IS NULL ORDER BY id")
        current = set()
        for r in rows:
            current.add(r["id"])
            if r["id"] in self.fences:
                continue
            ok, detail = self._install(r["id"], r["rule"], json.loads(r["keys"]),
                                       {r["source"], r["target"]})
            await conn.execute(
                "INSERT INTO shardwire_acks (kind, id, instance, ok, detail) "
                "VALUES ('fence', $1, $2, $3, $4) ON CONFLICT DO NOTHING",
                r["id"], self.instance, ok, detail)
        for ident in [i for i in self.fences if i not in current]:
            self._release(ident)
        row = await conn.fetchrow(
            "SELECT v.version, v.reverted, m.rule, m.keys, m.source, m.target "
            "FROM shardwire_map_versions v JOIN shardwire_moves m ON m.id = v.move_id "
            "WHERE m.state = 'running' ORDER BY v.version DESC LIMIT 1")
        if row is None or (row["version"], row["reverted"]) == self._map_seen:
            return
        problems = self.proxy.reload()
        expected = row["source"] if row["reverted"] else row["target"]
        if problems:
            ok, detail = False, "; ".join(problems)
        else:
            ok, detail = await self._placed(row["rule"], json.loads(row["keys"]), expected)
        if not ok:
            # Read again at the next notification or heartbeat: `apply` may not have
            # written the file yet (it records the version first).
            log.warning("map version %s: %s", row["version"], detail)
        else:
            self._map_seen = (row["version"], row["reverted"])
            log.info("map version %s%s loaded", row["version"],
                     " (reverted)" if row["reverted"] else "")
        await conn.execute(
            "INSERT INTO shardwire_acks (kind, id, instance, ok, detail) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (kind, id, instance) DO UPDATE "
            "SET ok = EXCLUDED.ok, detail = EXCLUDED.detail, acked_at = now()",
            "unmap" if row["reverted"] else "map", row["version"], self.instance, ok, detail)

    async def _placed(self, rule_name: str, keys: list[str] | dict[str, str | None],
                      shard: str) -> tuple[bool, str]:
        """Whether this proxy now routes the moved keys to `shard`: by its map (tenant,
        category, range), or by the lookup directory, read again (the reload emptied its
        cache)."""
        rule = self.proxy.router.smap.rules.get(rule_name)
        path = self.proxy.config.path
        if rule is None:
            return False, f"the map in {path} has no rule {rule_name}"
        if isinstance(keys, dict):  # a range move: {"from", "to", "split_at"}
            lower, upper = (_bound(keys, end, rule.key_type) for end in ("from", "to"))
            for r in rule.ranges:
                if r.shard == shard and (r.lower is None or (
                        lower is not None and r.lower <= lower)) and (r.upper is None or (
                        upper is not None and upper <= r.upper)):
                    return True, ""
            return False, (f"the map in {path} has no range of {rule_name} on {shard} that "
                           f"holds {keys.get('from') or ''}..{keys.get('to') or ''}")
        values = [to_key(text, rule.key_type) for text in keys]
        if rule.kind is RuleKind.LOOKUP:
            directory = self.proxy.directory
            try:
                await directory.resolve(rule_name, values, assign=False)
            except PgError as e:
                return False, e.message
            cache = directory.caches[rule_name]
            for text, value in zip(keys, values, strict=True):
                if cache.get(value) != shard:
                    return False, (f"the directory {rule.directory} puts {rule_name} key "
                                   f"{text} on {cache.get(value)}, not {shard}")
            return True, ""
        for text, value in zip(keys, values, strict=True):
            where = rule.shard_for(value)
            if where != shard:
                return False, (f"the map in {path} puts {rule_name} key {text} on {where}, "
                               f"not {shard}")
        return True, ""

    def _install(self, ident: int, rule_name: str, keys: list[str] | dict[str, str | None],
                 shards: set[str]) -> tuple[bool, str]:
        rule = self.proxy.router.smap.rules.get(rule_name)
        if rule is None:
            return False, f"no rule {rule_name} in this proxy's map"
        try:
            if isinstance(keys, dict):  # a range move: {"from", "to", "split_at"}
                lower, upper = (_bound(keys, end, rule.key_type) for end in ("from", "to"))
                fence = Fence(ident, rule_name, frozenset(), frozenset(shards), ranged=True,
                              lower=lower, upper=upper)
                shown = f"{keys.get('from') or ''}..{keys.get('to') or ''}"
            else:
                fence = Fence(ident, rule_name, frozenset(to_key(k, rule.key_type)
                                                          for k in keys), frozenset(shards))
                shown = ", ".join(keys)
        except ValueError as e:
            return False, str(e)
        self.fences[ident] = fence
        self.active = True
        log.info("fence %d: holding writes to %s keys %s", ident, rule_name, shown)
        return True, ""

    def _release(self, ident: int) -> None:
        fence = self.fences.pop(ident)
        self.active = bool(self.fences)
        fence.released.set()
        log.info("fence %d released", ident)

    # -- holding statements ------------------------------------------------------------------

    def hold(self, client: ClientConnection, plan: Plan, msg: tuple[int, bytes],
             ends_unit: bool) -> bool:
        """Whether `msg` (planned as `plan`) must wait for a fence; if so, it waits (the
        client's later messages queue behind it) and is routed again when the fence is
        released."""
        if type(plan) is SingleShard:
            shards: frozenset[str] | tuple[str, ...] = (plan.shard,)
        elif isinstance(plan, (MultiShard, EachStatement)):
            shards = plan.shards
        else:
            return False
        for fence in self.fences.values():
            if not any(s in fence.shards for s in shards):
                continue
            key = client.heat_key
            if key is not None and (key[0] != fence.rule or not fence.covers(key[1])):
                continue
            if not client._writes([msg]):
                continue
            if key is None and not self._touches(client, msg, fence.rule):
                continue
            client.waiting = client.retry = True
            client.queries -= 1
            self.held += 1
            asyncio.get_running_loop().create_task(self._wait(client, fence, ends_unit))
            return True
        return False

    def _touches(self, client: ClientConnection, msg: tuple[int, bytes], rule: str) -> bool:
        kind, body = msg
        if kind == _Q:
            analyses = self.proxy.router.prepared(body[:-1])
        elif kind == _B:
            known = client.analyses.get(read_bind(body)[1])
            if known is None:
                return True
            analyses = known.analyses
        else:
            return True
        # COPY ... FROM names no rule (it is refused unless a shard hint or SET
        # shardwire.shard sends it to one shard) and its rows' keys are not read: held.
        return any((a.rule is not None and a.rule.name == rule) or (
            a.words[:1] == ("copy",) and a.kind is Kind.WRITE) for a in analyses)

    async def _wait(self, client: ClientConnection, fence: Fence, ends_unit: bool) -> None:
        started = time.monotonic()
        timeout = self.proxy.config.rebalance.fence_timeout
        try:
            await asyncio.wait_for(fence.released.wait(), timeout)
        except TimeoutError:
            self._note(started)
            if client.closed or not client.backlog:
                return
            msg = client.backlog.pop(0)
            client.waiting = False
            client._refuse(PgError(
                "55P03", f"writes to keys of rule {fence.rule} are held while `shardwire "
                f"rebalance apply` moves them, and this one waited {timeout:g} s",
                hint="retry the statement; if writes stay held, check the move with "
                "`shardwire rebalance apply` (it resumes) or `shardwire rebalance abort`"),
                msg, ends_unit=ends_unit)
            if client.retry:  # the refusal waits for a server connection
                client.retry = False
                client.backlog.insert(0, msg)
            if not client.waiting:
                client._resume()
            return
        self._note(started)
        if not client.closed:
            client._resume()

    def _note(self, started: float) -> None:
        self.held_seconds.append(time.monotonic() - started)
        del self.held_seconds[:-1000]
