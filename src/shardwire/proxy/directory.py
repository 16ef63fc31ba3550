"""Lookup directories: key → shard tables in the catalog database, read through a cache.

Each lookup rule has a directory table in the catalog (`Rule.directory`). The router reads it
through `Directory.caches` (a bounded LRU per rule, where None means "no such key"); a miss makes
the router return `NeedLookup`, and the proxy calls `Directory.resolve`, then routes again. A key
seen for the first time in an INSERT gets a shard by the rule's `new_keys` policy, written to
the directory (before the row itself goes anywhere) with INSERT ... ON CONFLICT DO NOTHING, so
that concurrent proxies agree on the first writer's choice.

Every change is announced with NOTIFY on the channel `shardwire_directory` (payload: the rule
name), and every proxy drops what it cached for that rule. `shardwire rebalance apply` changes
the rows of the keys it moves at the flip of a lookup move (rebalancer/move.py) and announces
it so too; the proxies also reload at the flip, which starts them on empty caches.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import asyncpg

from ..config.model import ServerAddress
from ..router.shardmap import KeyType, KeyValue, Rule, ShardMap
from .protocol.errors import PgError

log = logging.getLogger("shardwire.directory")

CHANNEL = "shardwire_directory"
CACHE_SIZE = 100_000  # keys cached per rule

SQL_TYPES = {
    KeyType.INTEGER: "bigint", KeyType.NUMERIC: "numeric", KeyType.TEXT: "text",
    KeyType.DATE: "date", KeyType.TIMESTAMP: "timestamp", KeyType.TIMESTAMPTZ: "timestamptz",
    KeyType.UUID: "uuid",
}


class LruCache(OrderedDict[KeyValue, "str | None"]):
    """A bounded mapping; the router only reads it (`in`, `[]`)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def put(self, key: KeyValue, shard: str | None) -> None:
        self[key] = shard
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


class Directory:
    def __init__(self, catalog: ServerAddress | None, smap: ShardMap) -> None:
        self.catalog = catalog
        self.rules = {name: rule for name, rule in smap.rules.items()
                      if rule.kind.value == "lookup"}
        self.caches: dict[str, LruCache] = {name: LruCache(CACHE_SIZE) for name in self.rules}
        self._pool: Any = None
        self._listener: Any = None
        self._ready: set[str] = set()  # rules whose directory table is known to exist
        self._lock = asyncio.Lock()
        self._loads: dict[str, dict[str, int]] = {}  # rule -> shard -> keys (least_loaded)

    @property
    def active(self) -> bool:
        return bool(self.rules)

    async def _connect(self) -> Any:
        if self._pool is not None:
            return self._pool
        async with self._lock:
            if self._pool is not None:
                return self._pool
            if self.catalog is None:
                raise PgError("F0000", "lookup rules need the catalog database",
                              hint="set catalog: in the config")
            c = self.catalog
            try:
                pool = await asyncpg.create_pool(
                    host=c.host, port=c.port, user=c.user, password=c.password,
                    database=c.database, min_size=1, max_size=4, timeout=5,
                    ssl=None if c.sslmode == "disable" else c.sslmode)
                listener = await asyncpg.connect(
                    host=c.host, port=c.port, user=c.user, password=c.password,
                    database=c.database, timeout=5,
                    ssl=None if c.sslmode == "disable" else c.sslmode)
                await listener.add_listener(CHANNEL, self._notified)
            except (OSError, asyncpg.PostgresError, TimeoutError) as e:
                raise PgError("08006", f"cannot reach the catalog database at {c.host}:{c.port}"
                              f" for the lookup directory: {e}",
                              hint="lookup-routed statements need the catalog; check that it "
                              "runs") from None
            self._pool, self._listener = pool, listener
            return pool

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        cache = self.caches.get(payload)
        if cache is not None:
            cache.clear()
        self._loads.pop(payload, None)

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.close()
        if self._pool is not None:
            await self._pool.close()

    async def _ensure_table(self, conn: Any, rule: Rule) -> None:
        if rule.name in self._ready:
            return
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {rule.directory} (key {SQL_TYPES[rule.key_type]} "
            "PRIMARY KEY, shard text NOT NULL, created_at timestamptz NOT NULL DEFAULT now())")
        self._ready.add(rule.name)

    async def resolve(self, rule_name: str, keys: Iterable[KeyValue], *, assign: bool) -> None:
        """Fill the cache for these keys; with `assign`, give keys that have no shard one."""
        rule = self.rules[rule_name]
        cache = self.caches[rule_name]
        keys = list(keys)
        pool = await self._connect()
        try:
            async with pool.acquire() as conn:
                await self._ensure_table(conn, rule)
                rows = await conn.fetch(
                    f"SELECT key, shard FROM {rule.directory} WHERE key = ANY($1::"
                    f"{SQL_TYPES[rule.key_type]}[])", keys)
                found = {r["key"]: r["shard"] for r in rows}
                missing = [k for k in keys if k not in found]
                if missing and assign:
                    for key in missing:
                        shard = await self._place(conn, rule)
                        chosen = await conn.fetchval(
                            f"INSERT INTO {rule.directory} (key, shard) VALUES ($1, $2) "
                            f"ON CONFLICT (key) DO UPDATE SET key = EXCLUDED.key "
                            f"RETURNING shard", key, shard)
                        found[key] = chosen
                        if chosen == shard:
                            loads = self._loads.get(rule.name)
                            if loads is not None:
                                loads[shard] = loads.get(shard, 0) + 1
                    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, rule.name)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            raise PgError("08006", f"the lookup directory of rule {rule.name} failed: {e}",
                          hint="check the catalog database") from None
        for key in keys:
            cache.put(key, found.get(key))

    async def _place(self, conn: Any, rule: Rule) -> str:
        """The shard for a new key: the rule's `new_keys` shard, or the one with the fewest
        keys in the directory (counted once, then kept up to date by this proxy)."""
        if rule.new_keys != "least_loaded":
            return rule.new_keys
        loads = self._loads.get(rule.name)
        if loads is None:
            rows = await conn.fetch(f"SELECT shard, count(*) AS n FROM {rule.directory} "
                                    "GROUP BY shard")
            loads = {shard: 0 for shard in rule.shards}
            for r in rows:
                if r["shard"] in loads:
                    loads[r["shard"]] = r["n"]
            self._loads[rule.name] = loads
        return min(rule.shards, key=lambda s: (loads.get(s, 0), rule.shards.index(s)))
