"""Heat windows in the catalog database, and table sizes read from the shards (I/O).

Each proxy writes every closed window of its heat to the table `shardwire_heat` (created if
missing) in the catalog database, or without a catalog, in the default shard's database, as
the two-phase-commit decision log does. `shardwire rebalance` adds up the windows of every
proxy from there, so it needs no running proxy.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg

from ..config.model import Config, ServerAddress
from ..proxy.protocol.relay import quote_ident, quote_literal
from ..router.shardmap import KeyValue, Rule, TableName, canonical_text
from .heat import DRAIN_INTERVAL, Heat, HeatWindow, KeyLoad, ShardLoad

if TYPE_CHECKING:
    from ..proxy.server import Proxy

log = logging.getLogger("shardwire.heat")

TABLE = "shardwire_heat"
TIMEOUT = 10.0  # seconds for any one catalog or shard round trip
EXACT_COUNT_BYTES = 64 * 1024 * 1024  # tables up to this size are counted, not estimated


def heat_address(config: Config) -> ServerAddress:
    """Where heat windows live: the catalog database, or the default shard's database."""
    return config.catalog or config.shards[config.default_shard].primary


async def connect(addr: ServerAddress, timeout: float = TIMEOUT) -> Any:
    return await asyncpg.connect(
        host=addr.host, port=addr.port, user=addr.user, password=addr.password,
        database=addr.database, ssl=None if addr.sslmode == "disable" else addr.sslmode,
        timeout=timeout, server_settings={"application_name": "shardwire heat"})


async def ensure_table(conn: Any) -> None:
    # Checked first: CREATE ... IF NOT EXISTS needs the CREATE privilege even when it exists.
    if await conn.fetchval(f"SELECT to_regclass('{TABLE}') IS NOT NULL"):
        return
    try:
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} ("
            "proxy text NOT NULL, "
            "window_start timestamptz NOT NULL, "
            "window_end timestamptz NOT NULL, "
            "shard text NOT NULL, "
            "rule text NOT NULL DEFAULT '', "  # '' (and key ''): the shard's totals
            "key text NOT NULL DEFAULT '', "
            "statements bigint NOT NULL DEFAULT 0, "
            "statements_error bigint NOT NULL DEFAULT 0, "
            "busy double precision NOT NULL DEFAULT 0, "
            "busy_error double precision NOT NULL DEFAULT 0, "
            "rows bigint NOT NULL DEFAULT 0, "
            "errors bigint NOT NULL DEFAULT 0, "
            "PRIMARY KEY (proxy, window_start, shard, rule, key))")
        await conn.execute(f"CREATE INDEX IF NOT EXISTS {TABLE}_window_end "
                           f"ON {TABLE} (window_end)")
    except (asyncpg.UniqueViolationError, asyncpg.DuplicateTableError):
        pass  # another proxy created it at the same moment


def _stamp(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC)


async def write_window(conn: Any, proxy: str, window: HeatWindow, retention: float) -> int:
    """Store one window (only shards and keys that saw work); drop windows older than
    `retention` seconds. Returns the rows written."""
    start, end = _stamp(window.start), _stamp(window.end)
    rows: list[tuple[Any, ...]] = [
        (proxy, start, end, shard, "", "", s.statements, 0, s.busy, 0.0, s.rows, s.errors)
        for shard, s in window.shards.items() if s.statements or s.errors]
    for rule, keys in window.keys.items():
        rows.extend((proxy, start, end, k.shard, rule, canonical_text(k.key), k.statements,
                     k.statements_error, k.busy, k.busy_error, 0, 0) for k in keys)
    async with conn.transaction():
        if rows:
            await conn.executemany(
                f"INSERT INTO {TABLE} (proxy, window_start, window_end, shard, rule, key, "
                "statements, statements_error, busy, busy_error, rows, errors) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) "
                "ON CONFLICT DO NOTHING", rows)
        await conn.execute(f"DELETE FROM {TABLE} WHERE window_end < now() - "
                           "make_interval(secs => $1)", retention)
    return len(rows)


async def drain_forever(heat: Heat) -> None:
    """Record the statements answered since the last time, every DRAIN_INTERVAL seconds
    (`Heat.drain`: in a batch, off the path of each statement)."""
    while True:
        await asyncio.sleep(DRAIN_INTERVAL)
        heat.drain()


async def flush_forever(proxy: Proxy) -> None:
    """The proxy's heat flusher: close a window every rebalance.heat_flush_interval seconds
    and write it to the catalog. A window that cannot be written is logged and dropped (the
    next one starts afresh: memory stays bounded)."""
    ready = False
    while True:
        settings = proxy.config.rebalance
        await asyncio.sleep(settings.heat_flush_interval)
        window = proxy.heat.rotate(time.time(), settings.heat_top_keys)
        if not window.shards and not window.keys:
            continue
        conn = None
        try:
            conn = await connect(heat_address(proxy.config))
            if not ready:
                await ensure_table(conn)
                ready = True
            await asyncio.wait_for(write_window(conn, proxy.coordinator.instance, window,
                                                settings.heat_retention), TIMEOUT)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            log.warning("heat statistics of %.0fs not written to the catalog: %s",
                        window.seconds, e)
        finally:
            if conn is not None:
                await conn.close()


@dataclass(frozen=True, slots=True)
class StoredHeat:
    """Heat read back from the catalog: every proxy's windows of a period added up. Keys are
    the text the proxies wrote (`canonical_text`)."""

    window: HeatWindow
    proxies: int
    windows: int


async def read_heat(conn: Any, seconds: float) -> StoredHeat:
    """The windows that ended in the last `seconds`, added up over proxies and windows."""
    if not await conn.fetchval(f"SELECT to_regclass('{TABLE}') IS NOT NULL"):
        return StoredHeat(HeatWindow(0.0, 0.0), 0, 0)
    found = await conn.fetch(
        f"SELECT shard, rule, key, sum(statements)::bigint AS statements, "
        "sum(statements_error)::bigint AS statements_error, sum(busy) AS busy, "
        "sum(busy_error) AS busy_error, sum(rows)::bigint AS rows, "
        "sum(errors)::bigint AS errors, "
        "extract(epoch FROM min(window_start))::float8 AS start, "
        "extract(epoch FROM max(window_end))::float8 AS end, "
        "count(DISTINCT proxy) AS proxies, count(DISTINCT (proxy, window_start)) AS windows "
        f"FROM {TABLE} WHERE window_end > now() - make_interval(secs => $1) "
        "GROUP BY shard, rule, key", seconds)
    shards: dict[str, ShardLoad] = {}
    keys: dict[str, list[KeyLoad]] = {}
    start, end, proxies, windows = None, None, 0, 0
    for r in found:
        start = r["start"] if start is None else min(start, r["start"])
        end = r["end"] if end is None else max(end, r["end"])
        if not r["rule"]:
            shards[r["shard"]] = ShardLoad(r["statements"], r["rows"], r["busy"], r["errors"])
            proxies = max(proxies, r["proxies"])
            windows = max(windows, r["windows"])
            continue
        keys.setdefault(r["rule"], []).append(KeyLoad(
            r["rule"], r["key"], r["shard"], r["statements"], r["statements_error"],
            r["busy"], r["busy_error"]))
    ranked = {rule: tuple(sorted(found_keys, key=lambda k: (k.statements, k.busy),
                                 reverse=True)) for rule, found_keys in keys.items()}
    return StoredHeat(HeatWindow(start or 0.0, end or 0.0, shards, ranked), proxies, windows)


# -- sizes on the shards -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TableSize:
    bytes: int  # pg_total_relation_size: the table, its indexes and TOAST
    rows: int
    exact: bool  # counted; otherwise pg_class.reltuples


async def table_sizes(conn: Any, tables: Sequence[TableName]) -> dict[TableName, TableSize]:
    """Sizes of the tables that exist on one shard (missing ones are left out)."""
    out = {}
    for table in tables:
        found = await conn.fetchrow(
            "SELECT c.oid::regclass::text AS name, pg_total_relation_size(c.oid) AS total, "
            "pg_relation_size(c.oid) AS heap, c.reltuples FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            table.schema, table.name)
        if found is None:
            continue
        if found["reltuples"] >= 0 and found["heap"] > EXACT_COUNT_BYTES:
            out[table] = TableSize(found["total"], int(found["reltuples"]), False)
        else:
            count = await conn.fetchval(f"SELECT count(*) FROM {_table(table)}")
            out[table] = TableSize(found["total"], count, True)
    return out


def _table(table: TableName) -> str:
    return f"{quote_ident(table.schema)}.{quote_ident(table.name)}"


def key_condition(column: str, lower: KeyValue | None, upper: KeyValue | None = None, *,
                  equal: KeyValue | None = None) -> str:
    """A WHERE clause on the key column with the values as literals (PostgreSQL reads them
    as the column's type)."""
    col = quote_ident(column)
    if equal is not None:
        return f"{col} = {quote_literal(canonical_text(equal))}"
    parts = []
    if lower is not None:
        parts.append(f"{col} >= {quote_literal(canonical_text(lower))}")
    if upper is not None:
        parts.append(f"{col} < {quote_literal(canonical_text(upper))}")
    return " AND ".join(parts) or "true"


async def rows_where(conn: Any, rule: Rule, condition: dict[str, Any],
                     sizes: dict[TableName, TableSize]) -> tuple[int, int]:
    """(rows, estimated bytes) of the rule's tables on one shard where the key meets
    `condition` (`key_condition`'s arguments); bytes at each table's average row size."""
    rows = nbytes = 0
    for table, column in rule.tables.items():
        size = sizes.get(table)
        if size is None:
            continue
        count = await conn.fetchval(
            f"SELECT count(*) FROM {_table(table)} WHERE {key_condition(column, **condition)}")
        rows += count
        if size.rows > 0:
            nbytes += count * size.bytes // size.rows
    return rows, nbytes
