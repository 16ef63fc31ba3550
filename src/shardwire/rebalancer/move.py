"""Moving keys online: the steps of `shardwire rebalance apply`, and `abort` (I/O).

One move takes the rows of some keys of a tenant, category or lookup rule, or of part of a
range of a range rule (every table of the rule), from the source shard to the target shard
with PostgreSQL's logical replication, then flips the shard map: the config file's entries
(tenant, category), a split range (range), or the keys' directory rows in the catalog
(lookup) (docs/rebalancing.md, "apply"). Hash rules are refused (plan.HASH_REFUSAL says why).
The steps, as recorded in `shardwire_moves.step` (catalog.py):

    started        the move is recorded; checks passed
    schema         the rule's tables exist on the target (created from the source's schema)
    streaming      publication (row filter: the moving keys) and slot on the source,
                   subscription (copy_data) on the target
    caught_up      the initial copy is done and the target is close behind the source
    fenced         every proxy holds writes to the keys, and the source's transactions
                   that were open then have ended
    final_catchup  the target has replayed the source up to its WAL position after that;
                   the subscription is stopped
    flipped        a new map version is in the catalog, and a lookup move's directory rows
                   name the target, in one transaction (the commit point of a move)
    released       the YAML says target, every proxy has loaded it, the fence is released
    verified       row counts and checksums of the moved rows agree on both sides
    done           subscription, slot and publication dropped, rows deleted from the source

Every step is idempotent. After a crash, `apply` resumes: before `flipped` it releases a fence
left behind and goes through the steps again; from `flipped` on it finishes the flip and
cleans up. `abort` undoes a move that has not reached `flipped`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import asyncpg

from ..config.model import Config, ServerAddress
from ..proxy.directory import CHANNEL as DIRECTORY_CHANNEL
from ..proxy.directory import SQL_TYPES
from ..proxy.protocol.relay import quote_ident, quote_literal
from ..router.shardmap import KeyValue, Rule, RuleKind, TableName, canonical_text
from ..router.values import to_key
from .catalog import CHANNEL, acks, ensure_schema, live_proxies
from .mapfile import MapFileError, place_keys, split_range, write_atomically
from .plan import HASH_REFUSAL
from .store import table_sizes

log = logging.getLogger("shardwire.rebalance")

STEPS = ("started", "schema", "streaming", "caught_up", "fenced", "final_catchup", "flipped",
         "released", "verified", "done")
PRE_FLIP = STEPS[:STEPS.index("flipped")]

ACK_TIMEOUT = 10.0  # seconds to wait for every live proxy's acknowledgement
INFLIGHT_TIMEOUT = 5.0  # seconds for the source's open transactions to end under the fence
FINAL_CATCHUP_TIMEOUT = 10.0  # seconds for the last WAL to be replayed under the fence
CATCHUP_TIMEOUT = 3600.0  # seconds for the initial copy and catch-up
CAUGHT_UP_LAG = 256 * 1024  # bytes of WAL behind the source that count as caught up
APP_NAME = "shardwire rebalance"

# Tests kill `apply` right after it has recorded one of STEPS (SHARDWIRE_REBALANCE_FAULT=step),
# the way a crash would.
FAULT = os.environ.get("SHARDWIRE_REBALANCE_FAULT", "")


def fault(step: str) -> None:
    if FAULT == step:
        print(f"SHARDWIRE_REBALANCE_FAULT={step}: killing this process", file=sys.stderr,
              flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


class MoveError(Exception):
    """A move refused or stopped: the message says what and how to fix it."""


_FAILURES = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


async def connect(addr: ServerAddress, timeout: float = 10) -> Any:
    return await asyncpg.connect(
        host=addr.host, port=addr.port, user=addr.user, password=addr.password,
        database=addr.database, ssl=None if addr.sslmode == "disable" else addr.sslmode,
        timeout=timeout, server_settings={"application_name": APP_NAME})


def _table(table: TableName) -> str:
    return f"{quote_ident(table.schema)}.{quote_ident(table.name)}"


def _conninfo(addr: ServerAddress) -> str:
    def value(v: str) -> str:
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    parts = [f"host={value(addr.host)}", f"port={addr.port}", f"dbname={value(addr.database)}",
             f"user={value(addr.user)}"]
    if addr.password:
        parts.append(f"password={value(addr.password)}")
    if addr.sslmode != "disable":
        parts.append(f"sslmode={value(addr.sslmode)}")
    return " ".join(parts)


@dataclass(slots=True)
class MoveState:
    """A move as recorded in `shardwire_moves`: `keys` (tenant, category, lookup), or for a
    range rule the part that moves, `lower <= key < upper` (None: open), and `split_at`, the
    boundary the map gains (None when a whole range moves)."""

    id: int
    rule: Rule
    keys: tuple[KeyValue, ...]
    source: str
    target: str
    step: str
    created_tables: list[str] = field(default_factory=list)
    lower: KeyValue | None = None
    upper: KeyValue | None = None
    split_at: KeyValue | None = None

    @property
    def name(self) -> str:
        """The publication, slot and subscription of this move."""
        return f"shardwire_move_{self.id}"

    @property
    def ranged(self) -> bool:
        return self.rule.kind is RuleKind.RANGE

    def what(self) -> str:
        """The moving keys, as an operator reads them."""
        if self.ranged:
            low = canonical_text(self.lower) if self.lower is not None else ""
            high = canonical_text(self.upper) if self.upper is not None else ""
            return f"[{low}, {high})"
        return ", ".join(canonical_text(k) for k in self.keys)

    def describe(self) -> str:
        return (f"move {self.id}: {self.rule.name} {self.rule.kind.value} {self.what()} from "
                f"{self.source} to {self.target}")

    def condition(self, column: str) -> str:
        if self.ranged:
            col = quote_ident(column)
            parts = []
            if self.lower is not None:
                parts.append(f"{col} >= {quote_literal(canonical_text(self.lower))}")
            if self.upper is not None:
                parts.append(f"{col} < {quote_literal(canonical_text(self.upper))}")
            # Both ends open cannot happen (a split leaves one end); NULL keys never move.
            return " AND ".join(parts) or f"{col} IS NOT NULL"
        values = ", ".join(quote_literal(canonical_text(k)) for k in self.keys)
        return f"{quote_ident(column)} IN ({values})"

    def keys_json(self) -> str:
        """`keys` of `shardwire_moves` and `shardwire_fences`: a list of keys, or for a range
        move {"from", "to", "split_at"} (canonical text, null for an open end)."""
        if self.ranged:
            def text(v: KeyValue | None) -> str | None:
                return None if v is None else canonical_text(v)
            return json.dumps({"from": text(self.lower), "to": text(self.upper),
                               "split_at": text(self.split_at)})
        return json.dumps([canonical_text(k) for k in self.keys])


def state_from_row(row: Any, config: Config) -> MoveState:
    rule = config.sharding.rules.get(row["rule"])
    if rule is None:
        raise MoveError(f"move {row['id']}: the map has no rule {row['rule']} any more; put it "
                        "back, or finish the move by hand")
    raw = json.loads(row["keys"])

    def key(v: str | None) -> KeyValue | None:
        return None if v is None else to_key(v, rule.key_type)
    if isinstance(raw, dict):
        return MoveState(row["id"], rule, (), row["source"], row["target"], row["step"],
                         json.loads(row["created_tables"]), lower=key(raw.get("from")),
                         upper=key(raw.get("to")), split_at=key(raw.get("split_at")))
    keys = tuple(to_key(k, rule.key_type) for k in raw)
    return MoveState(row["id"], rule, keys, row["source"], row["target"], row["step"],
                     json.loads(row["created_tables"]))


class Progress:
    """One line on stderr: rows copied, WAL lag, ETA (rewritten in place on a terminal)."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.tty = out.isatty()
        self.last = 0.0
        self.width = 0

    def show(self, text: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < (0.5 if self.tty else 5.0):
            return
        self.last = now
        if self.tty:
            self.out.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def done(self) -> None:
        if self.tty and self.width:
            self.out.write("\n")
            self.width = 0
        self.out.flush()


class Mover:
    """Runs (or resumes, or aborts) moves, one at a time, with a catalog connection that holds
    the advisory lock of `apply`."""

    def __init__(self, config: Config, catalog: Any, out: IO[str] = sys.stderr) -> None:
        self.config = config
        self.catalog = catalog
        self.out = out
        self.progress = Progress(out)
        self.pause: float | None = None  # seconds between fence and release, last move

    def say(self, text: str) -> None:
        self.progress.done()
        print(text, file=self.out, flush=True)

    # -- the catalog -----------------------------------------------------------------------

    async def running(self) -> list[Any]:
        return list(await self.catalog.fetch(
            "SELECT * FROM shardwire_moves WHERE state = 'running' ORDER BY id"))

    async def record(self, move: MoveState, step: str, detail: str | None = None) -> None:
        await self.catalog.execute(
            "UPDATE shardwire_moves SET step = $2, updated_at = now(), "
            "steps = steps || jsonb_build_object($2::text, now()::text), "
            "detail = coalesce($3, detail) WHERE id = $1", move.id, step, detail)
        move.step = step
        log.info("%s: step %s", move.describe(), step)
        fault(step)

    async def finish(self, move: MoveState, state: str, detail: str = "") -> None:
        await self.catalog.execute(
            "UPDATE shardwire_moves SET state = $2, detail = $3, updated_at = now(), "
            "finished_at = now() WHERE id = $1", move.id, state, detail)
        await self._notify(f"{state} {move.id}")  # proxies serve the rule in full again

    async def new_move(self, rule: Rule, keys: Sequence[KeyValue], source: str, target: str,
                       plan_move: int | None, *, lower: KeyValue | None = None,
                       upper: KeyValue | None = None, split_at: KeyValue | None = None
                       ) -> MoveState:
        draft = MoveState(0, rule, tuple(keys), source, target, "started", lower=lower,
                          upper=upper, split_at=split_at)
        row = await self.catalog.fetchrow(
            "INSERT INTO shardwire_moves (plan_move, rule, kind, keys, source, target, config, "
            "step) VALUES ($1, $2, $3, $4, $5, $6, $7, 'started') RETURNING *",
            plan_move, rule.name, rule.kind.value, draft.keys_json(), source, target,
            self.config.path or "")
        fault("started")
        return state_from_row(row, self.config)

    async def directory_shards(self, rule: Rule, keys: Sequence[KeyValue]
                               ) -> dict[KeyValue, str]:
        """Where the lookup directory (in the catalog) puts these keys; keys it does not
        hold are left out."""
        try:
            rows = await self.catalog.fetch(
                f"SELECT key, shard FROM {rule.directory} WHERE key = ANY($1::"
                f"{SQL_TYPES[rule.key_type]}[])", list(keys))
        except asyncpg.UndefinedTableError:
            return {}
        return {r["key"]: r["shard"] for r in rows}

    # -- running a move --------------------------------------------------------------------

    async def run(self, move: MoveState, *, resumed: bool = False) -> None:
        """Take a move from wherever it is to done (`resumed`: one an earlier `apply` left
        unfinished)."""
        src = await connect(self.config.shards[move.source].primary)
        dst = await connect(self.config.shards[move.target].primary)
        try:
            if move.step in PRE_FLIP:
                if resumed:
                    self.say(f"{move.describe()}: resuming from step {move.step}")
                await self._release_fences(move)
                try:
                    await self.check(move, src, dst)
                except MoveError as e:
                    if move.step == "started":  # refused before anything was done
                        await self.finish(move, "refused", str(e))
                    raise
                # Every proxy must know of the move before a row is copied: from then on
                # until the clean-up, statements across shards of the rule's tables would
                # see the moving rows twice, and proxies refuse them (fence.py).
                await self._notify(f"moving {move.id}")
                await self._wait_acks("moving", move.id)
                await self.ensure_schema(move, src, dst)
                await self.record(move, "schema")
                await self.ensure_streaming(move, src, dst)
                await self.record(move, "streaming")
                await self.wait_caught_up(move, src, dst)
                await self.record(move, "caught_up")
                snapshots = await self.fence_and_flip(move, src, dst)
            else:
                self.say(f"{move.describe()}: resuming after the flip (step {move.step})")
                snapshots = None
                if move.step == "flipped":
                    await self.finish_flip(move)
            if move.step == "released":
                await self.verify(move, src, dst, snapshots)
                await self.record(move, "verified")
            await self.clean_up(move, src, dst)
            await self.record(move, "done")
            await self.finish(move, "done")
        finally:
            self.progress.done()
            for conn in (src, dst):
                conn.terminate()

    # 0. checks

    async def check(self, move: MoveState, src: Any, dst: Any) -> None:
        """Refuse what would fail later, saying how to fix it."""
        rule = move.rule
        if rule.kind is RuleKind.HASH:
            raise MoveError(HASH_REFUSAL.format(rule=rule.name))
        if rule.kind is RuleKind.LOOKUP and move.step == "started":
            found = await self.directory_shards(rule, move.keys)
            wrong = [f"{canonical_text(k)} ({found.get(k) or 'not in the directory'})"
                     for k in move.keys if found.get(k) != move.source]
            if wrong:
                raise MoveError(f"{move.describe()}: the directory {rule.directory} does not "
                                f"put these keys on {move.source}: {', '.join(wrong)}. Fix: "
                                "move only keys the directory places on the source (rebalance "
                                "plan again)")
        level = await src.fetchval("SHOW wal_level")
        if level != "logical":
            raise MoveError(f"shard {move.source}: wal_level is {level}; a move streams changes "
                            "with logical replication. Fix: ALTER SYSTEM SET wal_level = "
                            "logical on the source shard, then restart it")
        problems = []
        for table, column in rule.tables.items():
            name = _table(table)
            row = await src.fetchrow(
                "SELECT c.relreplident::text AS relreplident, "
                "coalesce((SELECT array_agg(a.attname::text) FROM pg_index i "
                "JOIN pg_attribute a ON a.attrelid = i.indrelid "
                "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = c.oid AND "
                "((c.relreplident = 'd' AND i.indisprimary) OR "
                "(c.relreplident = 'i' AND i.indisreplident))), '{}') AS columns "
                "FROM pg_class c WHERE c.oid = to_regclass($1)", name)
            if row is None:
                continue  # not on the source: nothing of it to move
            ident, columns = row["relreplident"], row["columns"]
            if ident == "f":
                continue
            if ident == "n" or not columns:
                what = ("REPLICA IDENTITY NOTHING" if ident == "n" else
                        "no primary key" if ident == "d" else "no replica identity index")
                problems.append(
                    f"table {table} on {move.source} has {what}: logical replication cannot "
                    f"carry its UPDATEs and DELETEs. Fix: add a primary key that includes "
                    f"{column}, or ALTER TABLE {name} REPLICA IDENTITY FULL")
            elif column not in columns:
                problems.append(
                    f"table {table} on {move.source}: its replica identity ({', '.join(columns)})"
                    f" does not cover the key column {column}, which the publication's row "
                    f"filter needs. Fix: make the primary key include {column} (e.g. "
                    f"PRIMARY KEY ({column}, {', '.join(columns)})), or ALTER TABLE {name} "
                    "REPLICA IDENTITY FULL")
        if problems:
            raise MoveError("\n".join(problems))
        if move.step in ("started", "schema"):
            slots = await src.fetchrow(
                "SELECT current_setting('max_replication_slots')::int AS max, "
                "(SELECT count(*) FROM pg_replication_slots) AS used, "
                "current_setting('max_wal_senders')::int AS senders, "
                "(SELECT count(*) FROM pg_stat_replication) AS sending, "
                "(SELECT 1 FROM pg_replication_slots WHERE slot_name = $1) AS mine", move.name)
            need = min(len(rule.tables), 2) + 1  # the move's slot, and its table copies
            if slots["mine"] is None and slots["max"] - slots["used"] < need:
                raise MoveError(
                    f"shard {move.source}: {slots['used']} of max_replication_slots = "
                    f"{slots['max']} are in use; a move needs {need} free. Fix: raise "
                    "max_replication_slots (restart), or drop unused slots "
                    "(SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                    "WHERE NOT active)")
            if slots["senders"] - slots["sending"] < need:
                raise MoveError(
                    f"shard {move.source}: {slots['sending']} of max_wal_senders = "
                    f"{slots['senders']} are in use; a move needs {need} free. Fix: raise "
                    "max_wal_senders (restart)")
            workers = await dst.fetchval(
                "SELECT current_setting('max_logical_replication_workers')::int")
            if workers < 2:
                raise MoveError(f"shard {move.target}: max_logical_replication_workers = "
                                f"{workers}; a move needs 2. Fix: raise it (restart)")
        if move.step == "started":
            await self.check_room(move, src, dst)
        # Rows of these keys already on the target (left over, or written around the proxy)
        # would collide with the copy: refuse before the subscription exists.
        exists = await dst.fetchval("SELECT 1 FROM pg_subscription WHERE subname = $1",
                                    move.name)
        if not exists and move.step in ("started", "schema"):
            for table, column in rule.tables.items():
                found = await dst.fetchval(f"SELECT to_regclass({quote_literal(_table(table))})")
                if found is None:
                    continue
                n = await dst.fetchval(f"SELECT count(*) FROM {_table(table)} "
                                       f"WHERE {move.condition(column)}")
                if n:
                    raise MoveError(
                        f"shard {move.target} already holds {n} row(s) of these keys in "
                        f"{table}, which the map places on {move.source}. Fix: delete them "
                        f"there (DELETE FROM {_table(table)} WHERE {move.condition(column)}), "
                        "or choose another target")

    async def check_room(self, move: MoveState, src: Any, dst: Any) -> None:
        """Refuse a move the target has no room for (rebalance.max_shard_bytes): the target
        database's size plus the moving rows' bytes, at each table's average row size (table,
        indexes and TOAST), as `rebalance plan` counts them."""
        capacity = self.config.rebalance.max_shard_bytes
        if capacity <= 0:
            return
        sizes = await table_sizes(src, list(move.rule.tables))
        nbytes = 0
        for table, column in move.rule.tables.items():
            size = sizes.get(table)
            if size is None or size.rows <= 0:
                continue
            count = await src.fetchval(f"SELECT count(*) FROM {_table(table)} "
                                       f"WHERE {move.condition(column)}")
            nbytes += count * size.bytes // size.rows
        held = await dst.fetchval("SELECT pg_database_size(current_database())")
        if held + nbytes > capacity:
            raise MoveError(
                f"{move.describe()}: shard {move.target} has no room: its database holds "
                f"{held} bytes ({_size(held)}), the move copies about {nbytes} bytes "
                f"({_size(nbytes)}), together {_size(held + nbytes)}, over "
                f"rebalance.max_shard_bytes = {capacity} ({_size(capacity)}). Fix: choose "
                "another target (rebalance plan proposes one with room), free space on "
                f"{move.target} (VACUUM FULL, drop what is not needed), or, if its disk has "
                "room, raise rebalance.max_shard_bytes")

    # 1. schema

    async def ensure_schema(self, move: MoveState, src: Any, dst: Any) -> None:
        missing = []
        for table in move.rule.tables:
            name = _table(table)
            on_src = await src.fetchval(f"SELECT to_regclass({quote_literal(name)})")
            on_dst = await dst.fetchval(f"SELECT to_regclass({quote_literal(name)})")
            if on_src is not None and on_dst is None:
                missing.append(table)
        if not missing:
            return
        ddl = dump_schema(self.config.shards[move.source].primary, missing)
        conn = await connect(self.config.shards[move.target].primary)
        try:
            async with conn.transaction():
                await conn.execute(ddl)
        except asyncpg.PostgresError as e:
            raise MoveError(f"creating {', '.join(map(str, missing))} on {move.target} from "
                            f"the schema of {move.source} failed: {e}. Fix: create the "
                            "table(s) on the target by hand (and what they depend on), then "
                            "run apply again") from None
        finally:
            await conn.close()
        move.created_tables.extend(str(t) for t in missing)
        await self.catalog.execute("UPDATE shardwire_moves SET created_tables = $2 WHERE id = $1",
                                   move.id, json.dumps(move.created_tables))
        self.say(f"{move.describe()}: created {', '.join(map(str, missing))} on {move.target}")

    # 2. copy and stream

    def _moving_tables(self, move: MoveState, present: set[str]) -> list[tuple[TableName, str]]:
        return [(t, c) for t, c in move.rule.tables.items() if _table(t) in present]

    async def _present(self, conn: Any, move: MoveState) -> set[str]:
        names = [_table(t) for t in move.rule.tables]
        rows = await conn.fetch("SELECT n FROM unnest($1::text[]) n WHERE to_regclass(n) "
                                "IS NOT NULL", names)
        return {r["n"] for r in rows}

    async def ensure_streaming(self, move: MoveState, src: Any, dst: Any) -> None:
        name = move.name
        tables = self._moving_tables(move, await self._present(src, move))
        if not tables:
            raise MoveError(f"none of the tables of rule {move.rule.name} exists on "
                            f"{move.source}")
        # The publication first: a slot made before it would stream WAL from before it
        # existed, which pgoutput refuses.
        if not await src.fetchval("SELECT 1 FROM pg_publication WHERE pubname = $1", name):
            parts = ", ".join(f"TABLE {_table(t)} WHERE ({move.condition(c)})" for t, c in tables)
            await src.execute(f"CREATE PUBLICATION {quote_ident(name)} FOR {parts} "
                              "WITH (publish = 'insert, update, delete')")
        if not await src.fetchval("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
                                  name):
            await src.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", name)
        sub = await dst.fetchrow("SELECT subenabled, subslotname FROM pg_subscription "
                                 "WHERE subname = $1", name)
        if sub is None:
            conninfo = _conninfo(self.config.shards[move.source].primary)
            await dst.execute(
                f"CREATE SUBSCRIPTION {quote_ident(name)} CONNECTION {quote_literal(conninfo)} "
                f"PUBLICATION {quote_ident(name)} WITH (create_slot = false, "
                f"slot_name = {quote_literal(name)}, copy_data = true, "
                # Commits flushed at once, so that the source learns at once how far the
                # target is (off would wait for the target's WAL writer: the fence waits).
                "synchronous_commit = 'local')")
        else:
            if sub["subslotname"] is None:
                await dst.execute(f"ALTER SUBSCRIPTION {quote_ident(name)} "
                                  f"SET (slot_name = {quote_literal(name)})")
            if not sub["subenabled"]:
                await dst.execute(f"ALTER SUBSCRIPTION {quote_ident(name)} ENABLE")

    async def _lag(self, src: Any, move: MoveState) -> int | None:
        return await src.fetchval(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint "
            "FROM pg_replication_slots WHERE slot_name = $1", move.name)

    async def _sync_states(self, dst: Any, move: MoveState) -> dict[str, str]:
        rows = await dst.fetch(
            "SELECT r.srrelid::regclass::text AS rel, r.srsubstate::text AS state "
            "FROM pg_subscription_rel r JOIN pg_subscription s ON s.oid = r.srsubid "
            "WHERE s.subname = $1", move.name)
        return {r["rel"]: r["state"] for r in rows}

    async def wait_caught_up(self, move: MoveState, src: Any, dst: Any) -> None:
        tables = self._moving_tables(move, await self._present(src, move))
        expected = 0
        for table, column in tables:
            expected += await src.fetchval(
                f"SELECT count(*) FROM {_table(table)} WHERE {move.condition(column)}")
        started = time.monotonic()
        while True:
            states = await self._sync_states(dst, move)
            copying = await dst.fetchval(
                "SELECT coalesce(sum(tuples_processed), 0)::bigint FROM pg_stat_progress_copy "
                "WHERE datname = current_database()")
            ready = bool(states) and all(s in ("r", "s") for s in states.values())
            lag = await self._lag(src, move)
            copied = expected if ready else int(copying)
            if ready:
                copied = expected
            else:
                done_tables = [t for t, s in states.items() if s in ("r", "s")]
                copied = min(expected, int(copying) + await self._rows_on(dst, move, done_tables))
            elapsed = time.monotonic() - started
            rate = copied / elapsed if elapsed > 0 else 0
            eta = ((expected - copied) / rate if rate > 0 else None) if not ready else 0
            self.progress.show(
                f"{move.describe()}: {copied}/{expected} rows copied, lag "
                f"{_size(lag)}" + (f", ETA {eta:.0f} s" if eta is not None else ""))
            if ready and all(s == "r" for s in states.values()) and lag is not None and (
                    lag <= CAUGHT_UP_LAG):
                self.progress.show(f"{move.describe()}: {expected} rows copied, lag "
                                   f"{_size(lag)}: caught up", force=True)
                self.progress.done()
                return
            if time.monotonic() - started > CATCHUP_TIMEOUT:
                raise MoveError(f"{move.describe()}: the target did not catch up within "
                                f"{CATCHUP_TIMEOUT:.0f} s; run apply again to keep waiting, "
                                "or abort")
            await asyncio.sleep(0.2)

    async def _rows_on(self, dst: Any, move: MoveState, names: list[str]) -> int:
        total = 0
        for table, column in move.rule.tables.items():
            if _table(table) in names or str(table.name) in names or str(table) in names:
                total += await dst.fetchval(
                    f"SELECT count(*) FROM {_table(table)} WHERE {move.condition(column)}")
        return total

    # 3-6. fence, final catch-up, flip, release

    async def _notify(self, payload: str) -> None:
        await self.catalog.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)

    async def _wait_acks(self, kind: str, ident: int, timeout: float = ACK_TIMEOUT) -> None:
        """Until every live proxy has acknowledged `kind` `ident` successfully. A proxy that
        failed (it read the file before it was written, say) tries again and replaces its
        acknowledgement; the failures are reported only if they last."""
        deadline = time.monotonic() + timeout
        while True:
            live = await live_proxies(self.catalog)
            got = await acks(self.catalog, kind, ident)
            failed = {i: d for i, (ok, d) in got.items() if not ok}
            missing = live - {i for i, (ok, _) in got.items() if ok}
            if not missing:
                return
            if time.monotonic() > deadline:
                if failed:
                    raise MoveError("; ".join(f"proxy {i}: {d}" for i, d in failed.items()))
                raise MoveError(f"proxies {', '.join(sorted(missing))} did not acknowledge "
                                f"within {timeout:g} s (are they running, and reaching the "
                                "catalog database?)")
            await asyncio.sleep(0.01)

    async def _release_fences(self, move: MoveState) -> None:
        ids = await self.catalog.fetch(
            "UPDATE shardwire_fences SET released_at = now() WHERE move_id = $1 "
            "AND released_at IS NULL RETURNING id", move.id)
        for r in ids:
            await self._notify(f"release:{r['id']}")

    async def fence_and_flip(self, move: MoveState, src: Any, dst: Any
                             ) -> tuple[Any, Any] | None:
        if not await live_proxies(self.catalog):
            self.say(f"{move.describe()}: warning: no proxy has registered in the catalog "
                     "recently: nothing holds writes during the flip")
        # Everything that can be done before the fence is: the new map file's text (ruamel.yaml
        # takes a while), and the connections that keep both sides' snapshots.
        before, after = self._map_texts(move)
        spare = [await connect(self.config.shards[s].primary)
                 for s in (move.source, move.target)]
        times: list[tuple[str, float]] = []
        fenced_at = time.monotonic()

        def lap(what: str) -> None:
            times.append((what, time.monotonic() - fenced_at))

        fence = await self.catalog.fetchval(
            "INSERT INTO shardwire_fences (move_id, rule, keys, source, target) "
            "VALUES ($1, $2, $3, $4, $5) RETURNING id", move.id, move.rule.name,
            move.keys_json(), move.source, move.target)
        await self._notify(f"fence:{fence}")
        snapshots: tuple[Any, Any] | None = None
        try:
            await self._wait_acks("fence", fence)
            lap("fence acknowledged")
            await self._wait_in_flight(move, src)
            await self.record(move, "fenced")
            lap("open transactions ended")
            await self._final_catchup(move, src, dst)
            lap("final catch-up")
            snapshots = await self._snapshots(spare)
            # Stop the stream: from the flip on, the target's rows of these keys are the
            # only ones written; nothing on the source may reach them again.
            sub = quote_ident(move.name)
            await dst.execute(f"ALTER SUBSCRIPTION {sub} DISABLE")
            await self.record(move, "final_catchup")
            lap("snapshots taken, subscription stopped")
        except BaseException:
            for conn in spare:
                conn.terminate()
            if move.step in PRE_FLIP:
                try:
                    await self._release_fences(move)
                    await self.record(move, "caught_up")
                except _FAILURES:
                    pass
            raise
        try:
            version = await self._flip(move, before, after)
            lap("map flipped")
            await self._notify(f"map:{version}")
            try:
                await self._wait_acks("map", version)
            except MoveError as e:
                await self._revert(move, version, str(e))
                raise
            lap("proxies loaded the map")
            await self._release_fences(move)
            self.pause = time.monotonic() - fenced_at
            await self.record(move, "released")
            self.say(f"{move.describe()}: map flipped; writes to the keys were held for "
                     f"{self.pause * 1000:.0f} ms ("
                     + ", ".join(f"{what} {t * 1000:.0f}" for what, t in times) + ")")
        except BaseException:
            if snapshots is not None:
                for conn in snapshots:
                    conn.terminate()
            if move.step in PRE_FLIP:  # the flip was not recorded
                try:
                    await self._release_fences(move)
                    await self.record(move, "caught_up")
                except _FAILURES:
                    pass
            raise
        return snapshots

    async def _wait_in_flight(self, move: MoveState, src: Any) -> None:
        """Wait until the transactions on the source that may have written rows of the keys
        before the fence have ended: those open before the proxies acknowledged that have
        written something (an xid) or are running a statement that is not a SELECT, and
        prepared transactions. A transaction that has only read may stay open: its next
        write of these keys waits at the proxy."""
        await asyncio.sleep(0.05)  # statements sent just before the fence reach the server
        since = await src.fetchval("SELECT clock_timestamp()")
        deadline = time.monotonic() + INFLIGHT_TIMEOUT
        while True:
            rows = await src.fetch(
                "SELECT pid::text || ' (' || state || ': ' || left(query, 60) || ')' AS what "
                "FROM pg_stat_activity WHERE datname = current_database() "
                "AND backend_type = 'client backend' AND pid <> pg_backend_pid() "
                "AND application_name NOT LIKE 'shardwire rebalance%' AND xact_start < $1 "
                "AND (backend_xid IS NOT NULL OR (state = 'active' AND "
                "lower(left(ltrim(query), 6)) <> 'select')) "
                "UNION ALL SELECT 'prepared transaction ' || gid FROM pg_prepared_xacts "
                "WHERE database = current_database() AND prepared < $1", since)
            if not rows:
                return
            if time.monotonic() > deadline:
                raise MoveError(
                    f"{move.describe()}: transactions on {move.source} that were open when "
                    f"the writes were fenced did not end within {INFLIGHT_TIMEOUT:g} s: "
                    + "; ".join(r["what"] for r in rows[:5])
                    + ". The fence was released; run apply again (it resumes)")
            await asyncio.sleep(0.01)

    async def _final_catchup(self, move: MoveState, src: Any, dst: Any) -> None:
        # Not pg_current_wal_lsn(): with synchronous_commit = off, commits already acknowledged
        # may sit in WAL buffers beyond the write position it gives. A message committed with
        # synchronous_commit = on is flushed, and everything before it with it; the walsender
        # decodes only flushed WAL.
        async with src.transaction():
            await src.execute("SET LOCAL synchronous_commit = on")
            lsn = await src.fetchval("SELECT pg_logical_emit_message(true, 'shardwire', $1)"
                                     "::text", move.name)
        deadline = time.monotonic() + FINAL_CATCHUP_TIMEOUT
        while True:
            done = await src.fetchval(
                "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots "
                "WHERE slot_name = $2", lsn, move.name)
            if done:
                return
            if time.monotonic() > deadline:
                raise MoveError(f"{move.describe()}: the target did not replay the source up "
                                f"to {lsn} within {FINAL_CATCHUP_TIMEOUT:g} s; the fence was "
                                "released; run apply again")
            await asyncio.sleep(0.005)

    async def _snapshots(self, conns: list[Any]) -> tuple[Any, Any]:
        """Both sides as of now (under the fence, caught up), kept for the verification after
        the release."""
        for conn in conns:
            # The snapshot is taken at the first query after BEGIN: both in one round trip.
            await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SELECT 1")
        return conns[0], conns[1]

    def _config_path(self) -> str:
        if not self.config.path:
            raise MoveError("the config was not loaded from a file; apply rewrites that file")
        return self.config.path

    def _map_texts(self, move: MoveState) -> tuple[str, str]:
        """The config file now, and with the keys on the target."""
        path = self._config_path()
        before = Path(path).read_text()
        try:
            return before, _placed_text(before, move)
        except MapFileError as e:
            raise MoveError(f"{path}: {e}") from None

    async def _flip(self, move: MoveState, before: str, after: str) -> int:
        path = self._config_path()
        if Path(path).read_text() != before:
            raise MoveError(f"{path} changed during the move; run apply again")
        async with self.catalog.transaction():
            version = await self.catalog.fetchval(
                "INSERT INTO shardwire_map_versions (move_id, config, yaml_before) "
                "VALUES ($1, $2, $3) RETURNING version", move.id, path, before)
            await self.catalog.execute(
                "UPDATE shardwire_moves SET step = 'flipped', updated_at = now(), "
                "steps = steps || jsonb_build_object('flipped', now()::text) WHERE id = $1",
                move.id)
            await self._set_directory(move, move.target)  # lookup keys: in the same commit
        move.step = "flipped"
        fault("flipped")
        if after != before:
            write_atomically(path, after)
        return int(version)

    def _write_map(self, move: MoveState) -> None:
        path = self._config_path()
        text = Path(path).read_text()
        new = _placed_text(text, move)
        if new != text:
            write_atomically(path, new)

    async def _set_directory(self, move: MoveState, shard: str) -> None:
        """A lookup move: the keys' directory rows name `shard`, and the proxies drop what
        they cached of the rule (directory.py listens; a map version reloads them anyway)."""
        rule = move.rule
        if rule.kind is not RuleKind.LOOKUP:
            return
        await self.catalog.execute(
            f"UPDATE {rule.directory} SET shard = $1 WHERE key = ANY($2::"
            f"{SQL_TYPES[rule.key_type]}[]) AND shard <> $1", shard, list(move.keys))
        await self.catalog.execute("SELECT pg_notify($1, $2)", DIRECTORY_CHANNEL, rule.name)

    async def finish_flip(self, move: MoveState) -> None:
        """After a crash at `flipped`: the map file, the proxies, the fence."""
        version = await self.catalog.fetchval(
            "SELECT max(version) FROM shardwire_map_versions WHERE move_id = $1", move.id)
        async with self.catalog.transaction():
            await self.catalog.execute("UPDATE shardwire_map_versions SET reverted = false "
                                       "WHERE version = $1", version)
            await self._set_directory(move, move.target)
        self._write_map(move)
        await self._notify(f"map:{version}")
        await self._wait_acks("map", int(version))
        await self._release_fences(move)
        await self.record(move, "released")

    async def _revert(self, move: MoveState, version: int, why: str) -> None:
        """A proxy could not take the new map: put the old file back, let every proxy load
        it, release the fence; the move stays resumable from caught_up."""
        before = await self.catalog.fetchval(
            "SELECT yaml_before FROM shardwire_map_versions WHERE version = $1", version)
        write_atomically(self._config_path(), before)
        async with self.catalog.transaction():
            await self.catalog.execute("UPDATE shardwire_map_versions SET reverted = true "
                                       "WHERE version = $1", version)
            await self._set_directory(move, move.source)
        await self._notify(f"map:{version}")
        try:
            await self._wait_acks("unmap", version)
        except MoveError as e:
            self.say(f"{move.describe()}: warning: after reverting the map: {e}")
        await self._release_fences(move)
        await self.record(move, "caught_up", f"flip reverted: {why}")

    # 7. verify

    async def verify(self, move: MoveState, src: Any, dst: Any,
                     snapshots: tuple[Any, Any] | None) -> None:
        if snapshots is None:
            self.say(f"{move.describe()}: verification skipped: apply was resumed after the "
                     "flip, and the snapshots of both sides taken at the flip are gone")
            return
        try:
            problems = []
            for table, column in move.rule.tables.items():
                name = _table(table)
                columns = await snapshots[0].fetchval(
                    "SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) "
                    "FROM pg_attribute WHERE attrelid = to_regclass($1) AND attnum > 0 "
                    "AND NOT attisdropped", name)
                if columns is None:
                    continue
                query = (f"SELECT count(*), coalesce(sum(hashtextextended(ROW({columns})::text,"
                         f" 0)::numeric), 0) FROM {name} WHERE {move.condition(column)}")
                a = await snapshots[0].fetchrow(query)
                b = await snapshots[1].fetchrow(query)
                if tuple(a) != tuple(b):
                    problems.append(f"{table}: {a[0]} rows (checksum {a[1]}) on {move.source}, "
                                    f"{b[0]} rows (checksum {b[1]}) on {move.target}")
                else:
                    self.say(f"{move.describe()}: {table}: {a[0]} rows verified")
        finally:
            for conn in snapshots:
                conn.terminate()
        if problems:
            detail = "verification failed: " + "; ".join(problems)
            await self.finish(move, "failed", detail)
            raise MoveError(f"{move.describe()}: {detail}. The map has flipped; the rows on "
                            f"{move.source} were kept for you to compare (the subscription "
                            f"{move.name} is disabled, its slot and publication remain)")

    # 8. clean up

    async def drop_stream(self, move: MoveState, src: Any, dst: Any) -> None:
        name = quote_ident(move.name)
        subid = await dst.fetchval("SELECT oid FROM pg_subscription WHERE subname = $1",
                                   move.name)
        if subid is not None:
            await dst.execute(f"ALTER SUBSCRIPTION {name} DISABLE")
            await dst.execute(f"ALTER SUBSCRIPTION {name} SET (slot_name = NONE)")
            await dst.execute(f"DROP SUBSCRIPTION IF EXISTS {name}")
        deadline = time.monotonic() + 30
        while True:
            rows = await src.fetch(
                "SELECT slot_name, active FROM pg_replication_slots WHERE slot_name = $1 "
                "OR ($2::oid IS NOT NULL AND slot_name LIKE 'pg\\_' || $2::text || '\\_sync\\_%')",
                move.name, subid)
            if not rows:
                break
            for r in rows:
                if not r["active"]:
                    try:
                        await src.execute("SELECT pg_drop_replication_slot($1)", r["slot_name"])
                    except asyncpg.ObjectInUseError:
                        pass
            if time.monotonic() > deadline:
                raise MoveError(f"slot {move.name} on {move.source} stays active; drop it "
                                "when it is not (SELECT pg_drop_replication_slot(...))")
            await asyncio.sleep(0.1)
        await src.execute(f"DROP PUBLICATION IF EXISTS {name}")

    async def clean_up(self, move: MoveState, src: Any, dst: Any) -> None:
        await self.drop_stream(move, src, dst)
        tables = [(t, c) for t, c in move.rule.tables.items()
                  if _table(t) in await self._present(src, move)]
        deleted = await _delete_rows(src, move, tables)
        self.say(f"{move.describe()}: done; {deleted} row(s) deleted from {move.source}")

    # abort

    async def abort(self, move: MoveState) -> None:
        if move.step not in PRE_FLIP:
            raise MoveError(f"{move.describe()} has flipped the map (step {move.step}): it "
                            "cannot be undone; run apply to finish it")
        src = await connect(self.config.shards[move.source].primary)
        dst = await connect(self.config.shards[move.target].primary)
        try:
            await self._release_fences(move)
            await self.drop_stream(move, src, dst)
            tables = [(t, c) for t, c in move.rule.tables.items()
                      if _table(t) in await self._present(dst, move)]
            deleted = await _delete_rows(dst, move, tables)
            dropped = []
            for name in move.created_tables:
                table = next((t for t in move.rule.tables if str(t) == name), None)
                if table is None:
                    continue
                if await dst.fetchval(f"SELECT to_regclass({quote_literal(_table(table))})") \
                        and not await dst.fetchval(f"SELECT EXISTS (SELECT FROM {_table(table)})"):
                    await dst.execute(f"DROP TABLE {_table(table)}")
                    dropped.append(name)
            await self.finish(move, "aborted", f"aborted at step {move.step}")
            self.say(f"{move.describe()}: aborted at step {move.step}; {deleted} copied row(s) "
                     f"deleted from {move.target}"
                     + (f", tables dropped there: {', '.join(dropped)}" if dropped else ""))
        finally:
            src.terminate()
            dst.terminate()


def _placed_text(text: str, move: MoveState) -> str:
    """The config file `text` with the move's keys on its target. A lookup move changes
    nothing there (the directory rows move); a range move splits the range (or moves it
    whole). The same text when it is so already (a resumed move)."""
    rule = move.rule
    if rule.kind is RuleKind.LOOKUP:
        return text
    if rule.kind is RuleKind.RANGE:
        return split_range(text, rule.name, rule.key_type, move.lower, move.upper,
                           move.split_at, move.target)
    return place_keys(text, rule.name, rule.kind, rule.key_type, move.keys, move.target)


async def _delete_rows(conn: Any, move: MoveState, tables: list[tuple[TableName, str]]) -> int:
    """Delete the keys' rows of these tables; tables referenced by others' foreign keys go
    after them (tried again until nothing is left or nothing more can go)."""
    left = list(tables)
    total = 0
    while left:
        progress = False
        errors = []
        for table, column in list(left):
            try:
                async with conn.transaction():
                    status = await conn.execute(f"DELETE FROM {_table(table)} "
                                                f"WHERE {move.condition(column)}")
                total += int(status.split()[-1])
                left.remove((table, column))
                progress = True
            except asyncpg.ForeignKeyViolationError as e:
                errors.append(f"{table}: {e}")
        if not progress:
            raise MoveError(f"{move.describe()}: deleting the moved rows failed: "
                            + "; ".join(errors))
    return total


def dump_schema(addr: ServerAddress, tables: Sequence[TableName]) -> str:
    """The DDL of `tables` (pg_dump --schema-only), ready to run on another shard."""
    program = shutil.which("pg_dump") or _newest("pg_dump")
    if program is None:
        raise MoveError("pg_dump is needed to copy the tables' schema to the target: install "
                        "PostgreSQL's client programs, or create the tables there by hand")
    args = [program, "--schema-only", "--no-owner", "--no-privileges", "--no-publications",
            "--no-subscriptions", "-h", addr.host, "-p", str(addr.port), "-U", addr.user,
            "-d", addr.database]
    for table in tables:
        args += ["-t", _table(table)]
    env = dict(os.environ)
    if addr.password:
        env["PGPASSWORD"] = addr.password
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    if result.returncode != 0:
        raise MoveError(f"pg_dump of {', '.join(map(str, tables))} failed: "
                        f"{result.stderr.strip()}")
    # psql meta-commands (\restrict in recent versions) are not SQL.
    return "\n".join(line for line in result.stdout.splitlines() if not line.startswith("\\"))


def _newest(program: str) -> str | None:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{program}"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                   else 0)
    return str(found[-1]) if found else None


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(max(n, 0))
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


async def open_catalog(config: Config) -> Any:
    if config.catalog is None:
        raise MoveError("rebalance apply needs `catalog:` in the config: the proxies learn of "
                        "fences and map flips there, and the move's steps are recorded there")
    try:
        conn = await connect(config.catalog)
    except _FAILURES as e:
        raise MoveError(f"cannot reach the catalog database: {e}") from None
    await ensure_schema(conn)
    if not await conn.fetchval("SELECT pg_try_advisory_lock(hashtext('shardwire apply'))"):
        await conn.close()
        raise MoveError("another `shardwire rebalance apply` (or abort) is running")
    return conn
