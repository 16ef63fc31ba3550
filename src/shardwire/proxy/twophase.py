"""Two-phase commit: the coordinator's durable decisions and crash recovery.

A transaction that wrote on several shards is committed in two phases (the driver is in
`distributed.py`): PREPARE TRANSACTION '<gid>' on every shard that wrote, then the commit
decision, written durably to the table `shardwire_decisions` in the catalog database
(`DecisionLog.record_commit`), then COMMIT PREPARED '<gid>' on every shard. Once the decision
row is durable the transaction is committed, whatever happens to the proxy afterwards.

Transaction ids look like ``shardwire:<instance>:<number>``: the prefix lets recovery find
Shardwire's own prepared transactions in `pg_prepared_xacts` and leave every other one alone;
the instance (random, per proxy process) keeps the numbers of two processes apart.

Decisions are "commit" or "rollback", one per gid, and never change: whoever inserts the row
for a gid first decides (INSERT ... ON CONFLICT DO NOTHING, then read what stands). The proxy
inserts "commit"; recovery, before it rolls back a prepared transaction that has no decision,
inserts "rollback". So a proxy that is slow between PREPARE and its decision cannot commit what
recovery has begun to roll back: its insert finds the "rollback" row and it aborts instead
(presumed abort, made safe by a fence). The decisions live in the catalog database, or without
one in the default shard's database (`decision_address`); a recovery that has no decision log
decides nothing.

A decision row is forgotten once no participant holds the gid any more: by the proxy after its
last COMMIT PREPARED, or by recovery, which only forgets rows it read *before* it looked at the
shards (a row written after that look may belong to a transaction whose shards it has not seen)
and only when every participant could be reached. "rollback" rows (rare: only after failures)
are kept for `ROLLBACK_RETENTION`, so that a PREPARE still on its way to some shard when
recovery fenced the gid cannot outlive its fence.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import asyncpg

from ..config.model import Config, ServerAddress
from .protocol.errors import PgError

log = logging.getLogger("shardwire.twophase")

GID_PREFIX = "shardwire"
TABLE = "shardwire_decisions"
GID_MAX_BYTES = 199  # PostgreSQL's GIDSIZE (200) counts the terminating NUL
DECISION_TIMEOUT = 5.0  # seconds a commit decision may take before the commit fails
STATEMENT_TIMEOUT = 30.0  # recovery's statements on shards and the catalog
ROLLBACK_RETENTION = 24 * 3600.0  # seconds a "rollback" decision (a fence) is kept
# Finished decisions are deleted in batches, at most this many seconds after their commit.
FORGET_DELAY = 0.5
SNAPSHOT_LIMIT = 10_000  # decision rows one recovery pass considers for forgetting

Decision = Literal["commit", "rollback"]

_INSTANCE = r"[A-Za-z0-9_-]{1,64}"
_GID = re.compile(rf"{GID_PREFIX}:({_INSTANCE}):(0|[1-9][0-9]{{0,19}})")
_INSTANCE_RE = re.compile(_INSTANCE)

# SQLSTATEs of COMMIT/ROLLBACK PREPARED meaning "someone else finished it, or is finishing it".
_GONE = "42704"  # prepared transaction with identifier "..." does not exist
_BUSY = "55000"  # prepared transaction with identifier "..." is busy


# --- transaction ids ----------------------------------------------------------------------


def make_gid(instance: str, number: int) -> str:
    """The transaction id for PREPARE TRANSACTION.

    >>> make_gid("3f9a0c2e7b1d4a66", 42)
    'shardwire:3f9a0c2e7b1d4a66:42'
    """
    if not _INSTANCE_RE.fullmatch(instance):
        raise ValueError(f"instance {instance!r} must be 1-64 of A-Z a-z 0-9 _ -")
    if number < 0 or number >= 10**20:
        raise ValueError(f"transaction number {number} out of range")
    return f"{GID_PREFIX}:{instance}:{number}"


def parse_gid(gid: str) -> tuple[str, int] | None:
    """(instance, number) of a gid `make_gid` made, else None: a gid that is not ours.

    >>> parse_gid("shardwire:3f9a0c2e7b1d4a66:42")
    ('3f9a0c2e7b1d4a66', 42)
    >>> parse_gid("shardwire:oops") is None, parse_gid("other:x:1") is None
    (True, True)
    """
    found = _GID.fullmatch(gid)
    if found is None:
        return None
    return found.group(1), int(found.group(2))


def new_instance_id() -> str:
    """A random id for this proxy process: 16 hex digits (64 bits)."""
    return secrets.token_hex(8)


def decision_address(config: Config) -> ServerAddress:
    """Where the decisions live: the catalog database, or without one, the default shard's
    database. The proxy and `shardwire recover` must agree on it."""
    return config.catalog or config.shards[config.default_shard].primary


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _connect_args(addr: ServerAddress) -> dict[str, Any]:
    return {"host": addr.host, "port": addr.port, "user": addr.user, "password": addr.password,
            "database": addr.database, "ssl": None if addr.sslmode == "disable" else addr.sslmode}


def _why(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, asyncpg.PostgresError):
        return f"{e.sqlstate} {e}"
    return str(e) or type(e).__name__


# Errors after which we cannot tell whether a statement took effect: the connection broke or
# the server was shut down under it (SQLSTATE classes 08 and 57).
_UNSURE = (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
           asyncpg.exceptions.OperatorInterventionError)
# synchronous_commit on: a decision is durable (and replicated, if the catalog has synchronous
# standbys) before the proxy acts on it, whatever the catalog's default is.
_CATALOG_SETTINGS = {"synchronous_commit": "on", "application_name": "shardwire decisions"}
_CATALOG_ERRORS = (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresError)


class CommitOutcomeUnknown(PgError):
    """`record_commit` sent the decision but cannot tell whether it was stored (the catalog
    went away mid-write and could not be asked again). The prepared transactions must be left
    as they are, neither committed nor rolled back: recovery finishes them once the catalog
    answers, by the decision it finds there. SQLSTATE 08007, transaction_resolution_unknown."""


# --- the decision log ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """One row of shardwire_decisions."""

    gid: str
    decision: Decision
    participants: tuple[str, ...]
    age_seconds: float  # since decided_at, by the catalog's clock


class DecisionLog:
    """The commit decisions, in the table shardwire_decisions of the catalog database
    (created if missing)."""

    def __init__(self, catalog: ServerAddress | None, *, timeout: float = DECISION_TIMEOUT,
                 pool_size: int = 8, decided_by: str | None = None) -> None:
        self.catalog = catalog
        self.timeout = timeout
        self.pool_size = pool_size
        self.decided_by = decided_by  # written with each decision, for people reading the table
        self._pool: Any = None
        self._lock = asyncio.Lock()
        self._to_forget: set[str] = set()
        self._forgetting: asyncio.Future[None] | None = None
        self._forget_timer: asyncio.TimerHandle | None = None
        self._table: str | None = None  # schema-qualified, once known
        # A connection kept for commit decisions (the hot path), out of the pool.
        self._hot: Any = None
        self._hot_busy = False

    @property
    def available(self) -> bool:
        return self.catalog is not None

    @property
    def address(self) -> ServerAddress | None:
        return self.catalog

    @property
    def where(self) -> str:
        c = self.catalog
        return f"{c.host}:{c.port}/{c.database}" if c is not None else "(none configured)"

    def _unreachable(self, e: BaseException, doing: str) -> PgError:
        return PgError("08006", f"cannot reach the two-phase commit decision log at "
                       f"{self.where} to {doing}: {_why(e)}",
                       hint="check that this database runs (docs/transactions.md)")

    async def _connect(self) -> Any:
        if self._pool is not None:
            return self._pool
        async with self._lock:
            if self._pool is not None:
                return self._pool
            if self.catalog is None:
                raise PgError("F0000", "two-phase commit needs the catalog database, and none is "
                              "configured", hint="set catalog: in the config")
            pool = await asyncpg.create_pool(
                **_connect_args(self.catalog), min_size=1, max_size=self.pool_size,
                timeout=self.timeout, server_settings=_CATALOG_SETTINGS, reset=_no_reset)
            try:
                async with pool.acquire() as conn:
                    await _ensure_table(conn, self.timeout)
            except BaseException:
                await pool.close()
                raise
            self._pool = pool
            return pool

    async def table(self) -> str:
        """The decision table's schema-qualified name (created if missing): for statements
        that write it on other connections, whatever their search_path."""
        if self._table is None:
            async def work(conn: Any) -> str:
                name: str = await conn.fetchval(
                    "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_catalog.pg_class c "
                    "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                    f"WHERE c.oid = to_regclass({_literal(TABLE)})", timeout=self.timeout)
                return name
            self._table = await self._run("find the decision table", work)
        return self._table

    def commit_statement(self, table: str, gid: str, participants: Sequence[str]) -> str:
        """SQL that records the decision to commit `gid` inside a transaction of the decision
        database, and commits that transaction: its COMMIT is the decision (the transaction's
        own writes commit with it). It fails, and rolls back, if the gid has a decision
        already (recovery's "rollback", after it waited for this one)."""
        array = "ARRAY[" + ", ".join(_literal(p) for p in participants) + "]::text[]"
        by = _literal(self.decided_by) if self.decided_by is not None else "NULL"
        return (f"SET LOCAL synchronous_commit TO on; INSERT INTO {table} (gid, decision, "
                f"participants, decided_by) VALUES ({_literal(gid)}, 'commit', {array}, {by}); "
                "COMMIT")

    async def _run(self, doing: str, work: Any) -> Any:
        """`await work(conn)` on a pooled connection, within the timeout; errors as PgError."""
        try:
            async with asyncio.timeout(self.timeout):
                pool = await self._connect()
                async with pool.acquire() as conn:
                    return await work(conn)
        except PgError:
            raise
        except asyncpg.PostgresError as e:
            if isinstance(e, _UNSURE):
                raise self._unreachable(e, doing) from None
            raise PgError(e.sqlstate or "XX000", f"the two-phase commit decision log at "
                          f"{self.where} failed to {doing}: {e}",
                          hint="check that database") from None
        except (OSError, TimeoutError, asyncpg.InterfaceError) as e:
            raise self._unreachable(e, doing) from None

    async def record_commit(self, gid: str, participants: Sequence[str]) -> None:
        """Record the decision to commit `gid`: durable when this returns.

        Raises PgError when the decision is certainly not "commit" (the catalog could not be
        reached, 08006; it refused, its SQLSTATE; recovery had already decided to roll the
        gid back, 40000): then roll back the prepared transactions. Raises
        `CommitOutcomeUnknown` (08007) when it cannot tell: then leave them to recovery.
        Takes at most about twice `timeout`.
        """
        if parse_gid(gid) is None:
            raise ValueError(f"{gid!r} is not a Shardwire transaction id")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        hot = self._hot
        if hot is not None and not self._hot_busy and not hot.is_closed():
            conn = hot  # the common case: no pool acquire/release (~0.1 ms each here)
            self._hot_busy = True
        else:
            try:
                async with asyncio.timeout(self.timeout):
                    pool = await self._connect()
                    conn = await pool.acquire()
            except PgError:
                raise
            except _CATALOG_ERRORS as e:  # nothing was sent
                raise self._unreachable(e, f"record the commit of {gid}") from None
            if hot is None or hot.is_closed():
                self._hot, self._hot_busy = conn, True  # kept out of the pool from now on
        failed = True  # unless it answers: a connection left mid-statement is not reused
        try:
            standing = await _decide(conn, gid, "commit", participants, self.decided_by,
                                     max(0.1, deadline - loop.time()))
            failed = False
        except _UNSURE as e:
            first = e
        except asyncpg.PostgresError as e:
            # The server answered with an error: the statement, and so the decision, failed.
            failed = False
            raise PgError(e.sqlstate or "XX000", f"the decision log at {self.where} refused "
                          f"the commit decision of {gid}: {e}",
                          hint="check that database") from None
        else:
            _check_commit(gid, standing)
            return
        finally:
            await self._give_back(conn, broken=failed)
        pool = await self._connect()
        # The write went out and its fate is unknown: ask again, on another connection. The
        # same insert either finds the first one's row or, if that never landed, decides now.
        log.warning("commit decision of %s: %s; asking again", gid, _why(first))
        await pool.expire_connections()  # the others may be as broken as that one
        try:
            standing = await self._decide_alone(gid, "commit", participants)
        except (*_CATALOG_ERRORS, PgError) as e:  # any failure: the first write's fate is open
            raise CommitOutcomeUnknown(
                "08007", f"the commit decision of {gid} was sent to the decision log at "
                f"{self.where}, which did not confirm it ({_why(first)}; again: {_why(e)})",
                hint="recovery commits or rolls back the prepared transactions once that "
                "database answers; see SHOW IN_DOUBT") from None
        _check_commit(gid, standing)

    async def _give_back(self, conn: Any, *, broken: bool) -> None:
        """After a commit decision on `conn`: the hot connection stays out of the pool (it is
        dropped when broken); any other goes back."""
        if conn is self._hot:
            self._hot_busy = False
            if broken:
                self._hot = None
                conn.terminate()
            return
        pool = self._pool
        if pool is None:
            conn.terminate()
        else:
            await _release(pool, conn)

    async def _decide_alone(self, gid: str, decision: Decision,
                            participants: Sequence[str]) -> Decision:
        """`_decide` on a new connection of its own, within the timeout."""
        assert self.catalog is not None
        async with asyncio.timeout(self.timeout):
            conn = await asyncpg.connect(**_connect_args(self.catalog),
                                         server_settings=_CATALOG_SETTINGS)
            try:
                return await _decide(conn, gid, decision, participants, self.decided_by,
                                     self.timeout)
            finally:
                conn.terminate()

    async def decide(self, gid: str, decision: Decision, participants: Sequence[str],
                     decided_by: str | None = None) -> Decision:
        """Record `decision` for `gid` unless one is there already; the one that stands."""
        async def work(conn: Any) -> Decision:
            return await _decide(conn, gid, decision, participants,
                                 decided_by or self.decided_by, self.timeout)
        result: Decision = await self._run(f"record a decision for {gid}", work)
        return result

    async def forget(self, gids: Sequence[str]) -> None:
        """Delete the decisions of these gids (every participant has finished them).

        Calls made while a delete is running are batched into the next one."""
        if not gids or self.catalog is None:
            return
        self._to_forget.update(gids)
        if self._forgetting is None or self._forgetting.done():
            self._forgetting = asyncio.ensure_future(self._forget_pending())
        await asyncio.shield(self._forgetting)

    def forget_soon(self, gid: str) -> None:
        """Delete the decision of `gid` with others, in one statement within
        FORGET_DELAY seconds (a decision row left by a crash in between is recovery's)."""
        if self.catalog is None:
            return
        self._to_forget.add(gid)
        if self._forget_timer is None:
            self._forget_timer = asyncio.get_running_loop().call_later(
                FORGET_DELAY, self._forget_now)

    def _forget_now(self) -> None:
        self._forget_timer = None
        if self._forgetting is None or self._forgetting.done():
            self._forgetting = asyncio.ensure_future(self._forget_quietly())

    async def _forget_quietly(self) -> None:
        try:
            await self._forget_pending()
        except PgError as e:
            log.info("could not forget decisions yet: %s", e.message)

    async def _forget_pending(self) -> None:
        while self._to_forget:
            batch, self._to_forget = sorted(self._to_forget), set()

            async def work(conn: Any, batch: list[str] = batch) -> None:
                await conn.execute(f"DELETE FROM {TABLE} WHERE gid = ANY($1::text[])", batch,
                                   timeout=self.timeout)
            await self._run("forget decisions", work)

    async def committed(self, gids: Sequence[str]) -> set[str]:
        """Which of these gids have a commit decision."""
        return {gid for gid, d in (await self.decisions(gids)).items() if d == "commit"}

    async def decisions(self, gids: Iterable[str]) -> dict[str, Decision]:
        """The decision of each of these gids that has one."""
        wanted = sorted(set(gids))
        if not wanted:
            return {}

        async def work(conn: Any) -> dict[str, Decision]:
            rows = await conn.fetch(f"SELECT gid, decision FROM {TABLE} "
                                    "WHERE gid = ANY($1::text[])", wanted, timeout=self.timeout)
            return {r["gid"]: r["decision"] for r in rows}
        result: dict[str, Decision] = await self._run("read decisions", work)
        return result

    async def snapshot(self, limit: int = SNAPSHOT_LIMIT) -> list[DecisionRecord]:
        """The oldest `limit` decisions."""
        async def work(conn: Any) -> list[DecisionRecord]:
            rows = await conn.fetch(
                f"SELECT gid, decision, participants, "
                f"extract(epoch FROM now() - decided_at)::float8 AS age FROM {TABLE} "
                f"ORDER BY decided_at LIMIT {int(limit)}", timeout=self.timeout)
            return [DecisionRecord(r["gid"], r["decision"], tuple(r["participants"]), r["age"])
                    for r in rows]
        result: list[DecisionRecord] = await self._run("read decisions", work)
        return result

    async def close(self) -> None:
        if self._forget_timer is not None:
            self._forget_timer.cancel()
            self._forget_timer = None
        if self._to_forget and self._pool is not None:
            try:  # what is left is recovery's otherwise
                await asyncio.wait_for(self._forget_pending(), self.timeout)
            except (PgError, TimeoutError):
                pass
        hot, self._hot = self._hot, None
        if hot is not None:
            hot.terminate()
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), self.timeout)
            except (TimeoutError, OSError, asyncpg.InterfaceError):
                pool.terminate()


async def _no_reset(conn: Any) -> None:
    """The decision log's connections keep no session state (no locks, cursors, LISTEN or
    SET): asyncpg's reset on release (a round trip on every commit decision) is skipped."""


async def _ensure_table(conn: Any, timeout: float) -> None:
    # Checked first: CREATE ... IF NOT EXISTS needs the CREATE privilege even when it exists.
    if await conn.fetchval(f"SELECT to_regclass({_literal(TABLE)}) IS NOT NULL",
                           timeout=timeout):
        return
    try:
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} ("
            "gid text PRIMARY KEY, "
            "decision text NOT NULL DEFAULT 'commit' CHECK (decision IN ('commit', 'rollback')), "
            "participants text[] NOT NULL, "
            "decided_by text, "
            "decided_at timestamptz NOT NULL DEFAULT now())", timeout=timeout)
    except asyncpg.UniqueViolationError:
        pass  # another proxy created it at the same moment


async def _decide(conn: Any, gid: str, decision: Decision, participants: Sequence[str],
                  decided_by: str | None, timeout: float) -> Decision:
    """Insert `decision` unless the gid has one; return the decision that stands."""
    for _ in range(3):
        inserted = await conn.fetchval(
            f"INSERT INTO {TABLE} (gid, decision, participants, decided_by) "
            "VALUES ($1, $2, $3::text[], $4) ON CONFLICT (gid) DO NOTHING RETURNING decision",
            gid, decision, list(participants), decided_by, timeout=timeout)
        if inserted is not None:
            return decision
        # Another decision stands (if the insert waited for it, only a new snapshot sees it).
        standing = await conn.fetchval(f"SELECT decision FROM {TABLE} WHERE gid = $1", gid,
                                       timeout=timeout)
        if standing is not None:
            result: Decision = standing
            return result
    raise PgError("40001", f"the decision of {gid} kept changing", hint="try again")


def _check_commit(gid: str, standing: Decision) -> None:
    if standing != "commit":
        raise PgError("40000", f"transaction {gid} was rolled back: recovery had decided to "
                      "roll it back before its commit decision was recorded",
                      hint="the commit took longer than recovery's min age; retry the "
                      "transaction")


async def _release(pool: Any, conn: Any) -> None:
    try:
        await pool.release(conn, timeout=1)
    except (*_CATALOG_ERRORS, PgError):
        conn.terminate()


# --- recovery -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PreparedTransaction:
    """One of our prepared transactions on one shard."""

    shard: str
    gid: str
    prepared_at: datetime.datetime
    age_seconds: float  # by the shard's clock


@dataclass(frozen=True, slots=True)
class InDoubt:
    """A prepared transaction of ours and what the decision log says of it."""

    shard: str
    gid: str
    prepared_at: datetime.datetime
    age_seconds: float
    decision: str  # 'commit' | 'rollback' | 'none' | 'unknown' (catalog unreachable)


@dataclass(frozen=True, slots=True)
class Survey:
    """What `Recovery.survey` found: in-doubt transactions and what could not be looked at."""

    transactions: list[InDoubt]
    unreachable: list[tuple[str, str]]  # (shard, why)
    catalog_error: str | None = None


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What one recovery pass did (or, with dry_run, would do)."""

    committed: list[PreparedTransaction] = field(default_factory=list)
    rolled_back: list[PreparedTransaction] = field(default_factory=list)
    left_young: list[PreparedTransaction] = field(default_factory=list)  # undecided, < min_age
    unreachable: list[tuple[str, str]] = field(default_factory=list)  # (shard, why)
    failed: list[tuple[PreparedTransaction, str]] = field(default_factory=list)  # and why
    elsewhere: list[PreparedTransaction] = field(default_factory=list)  # finished by another
    forgotten: list[str] = field(default_factory=list)  # decision rows deleted
    problems: list[str] = field(default_factory=list)  # shard settings (check_shards)
    catalog_error: str | None = None
    dry_run: bool = False

    @property
    def in_doubt(self) -> int:
        """How many prepared transactions (or unreachable shards) are still unresolved."""
        left = len(self.left_young) + len(self.failed) + len(self.unreachable)
        if self.dry_run:
            left += len(self.committed) + len(self.rolled_back)
        return left

    @property
    def settled(self) -> bool:
        return self.in_doubt == 0


@dataclass(slots=True)
class _Shard:
    """One shard server's look at pg_prepared_xacts, with its connection kept for acting."""

    name: str
    address: ServerAddress
    conn: Any = None
    found: list[PreparedTransaction] = field(default_factory=list)
    max_prepared: int | None = None
    max_connections: int | None = None
    error: str | None = None

    @property
    def reachable(self) -> bool:
        return self.error is None


class Recovery:
    """Finds Shardwire's prepared transactions on the shards and finishes them by the
    decision log. Safe to run in several proxies (and `shardwire recover`) at once."""

    def __init__(self, config: Config, log: DecisionLog, instance: str | None = None, *,
                 statement_timeout: float = STATEMENT_TIMEOUT,
                 rollback_retention: float = ROLLBACK_RETENTION) -> None:
        self.config = config  # replace it on RELOAD
        self.log = log
        self.instance = instance
        self.statement_timeout = statement_timeout
        self.rollback_retention = rollback_retention

    @property
    def _decided_by(self) -> str:
        return f"recovery {self.instance}" if self.instance else "recovery"

    # -- looking ----------------------------------------------------------------------------

    def _servers(self) -> tuple[list[_Shard], dict[str, str]]:
        """A _Shard per distinct server and database, and each shard name's _Shard name."""
        by_address: dict[tuple[str, int, str], _Shard] = {}
        alias: dict[str, str] = {}
        for name, shard in self.config.shards.items():
            key = (shard.primary.host, shard.primary.port, shard.primary.database)
            if key not in by_address:
                by_address[key] = _Shard(name, shard.primary)
            alias[name] = by_address[key].name
        return list(by_address.values()), alias

    async def _open(self, shard: _Shard) -> None:
        a = shard.address
        try:
            shard.conn = await asyncpg.connect(
                **_connect_args(a), timeout=self.config.pool.connect_timeout,
                command_timeout=self.statement_timeout,
                server_settings={"application_name": "shardwire recovery"})
        except (*_CATALOG_ERRORS, PgError) as e:
            shard.error = f"cannot connect to {a.host}:{a.port}/{a.database}: {_why(e)}"
            return
        try:
            rows = await shard.conn.fetch(
                "SELECT gid, prepared, extract(epoch FROM now() - prepared)::float8 AS age "
                "FROM pg_catalog.pg_prepared_xacts WHERE database = current_database() "
                f"AND gid LIKE {_literal(GID_PREFIX + ':%')} ORDER BY prepared, gid")
            shard.found = [PreparedTransaction(shard.name, r["gid"], r["prepared"], r["age"])
                           for r in rows if parse_gid(r["gid"]) is not None]
            settings = await shard.conn.fetchrow(
                "SELECT current_setting('max_prepared_transactions')::int AS mpx, "
                "current_setting('max_connections')::int AS mc")
            shard.max_prepared, shard.max_connections = settings["mpx"], settings["mc"]
        except (*_CATALOG_ERRORS, PgError) as e:
            shard.error = f"cannot read pg_prepared_xacts on {a.host}:{a.port}: {_why(e)}"
            await _close(shard)

    async def _look(self) -> tuple[list[_Shard], dict[str, str]]:
        shards, alias = self._servers()
        await asyncio.gather(*(self._open(s) for s in shards))
        return shards, alias

    async def survey(self) -> Survey:
        """Our prepared transactions on every reachable shard, with their decisions."""
        shards, _ = await self._look()
        try:
            found = [t for s in shards for t in s.found]
            decisions: dict[str, Decision] = {}
            catalog_error = None
            if self.log.available and found:
                try:
                    decisions = await self.log.decisions(t.gid for t in found)
                except PgError as e:
                    catalog_error = e.message
            rows = [InDoubt(t.shard, t.gid, t.prepared_at, t.age_seconds,
                            "unknown" if catalog_error else decisions.get(t.gid, "none"))
                    for t in found]
            rows.sort(key=lambda r: (-r.age_seconds, r.gid, r.shard))
            return Survey(rows, [(s.name, s.error) for s in shards if s.error is not None],
                          catalog_error)
        finally:
            await asyncio.gather(*(_close(s) for s in shards))

    async def in_doubt(self) -> list[InDoubt]:
        return (await self.survey()).transactions

    # -- acting -----------------------------------------------------------------------------

    async def run_once(self, *, min_age: float, dry_run: bool = False) -> RecoveryReport:
        """Finish every prepared transaction of ours that has a decision, roll back those with
        none that are older than `min_age` seconds, leave the younger ones (their proxy may be
        between PREPARE and its decision), then forget decisions no shard needs any more."""
        report = RecoveryReport(dry_run=dry_run)
        catalog_error = None
        # The decisions first: a row read before the shards were looked at cannot belong to a
        # PREPARE that the look missed (see the module docstring).
        before: list[DecisionRecord] | None = None
        if not self.log.available:
            # Not knowing where the decisions are is not knowing them: presuming "rollback"
            # here could undo committed transactions.
            catalog_error = "no decision log to consult"
        else:
            try:
                before = await self.log.snapshot()
            except PgError as e:
                catalog_error = e.message
        shards, alias = await self._look()
        try:
            for s in shards:
                if s.error is not None:
                    report.unreachable.append((s.name, s.error))
                elif s.max_prepared == 0:
                    report.problems.append(_no_prepared_problem(s))
            if before is None:
                for s in shards:
                    report.failed.extend((t, f"its decision is unknown: {catalog_error}")
                                         for t in s.found)
                return replace(report, catalog_error=catalog_error)
            decided = {r.gid: r.decision for r in before}
            gids = {t.gid for s in shards for t in s.found}
            if gids - decided.keys():
                try:  # decided since the snapshot
                    decided.update(await self.log.decisions(gids - decided.keys()))
                except PgError as e:
                    catalog_error = e.message
                    for s in shards:
                        report.failed.extend((t, f"cannot read its decision: {e.message}")
                                             for t in s.found if t.gid not in decided)
                    gids &= decided.keys()
            plan = await self._plan(shards, gids, decided, min_age, dry_run, report)
            finished = await self._act(shards, plan, dry_run, report)
            if not dry_run and catalog_error is None:
                await self._forget(shards, alias, before, finished, report)
            return replace(report, catalog_error=catalog_error)
        finally:
            await asyncio.gather(*(_close(s) for s in shards))

    async def _plan(self, shards: list[_Shard], gids: set[str], decided: dict[str, Decision],
                    min_age: float, dry_run: bool, report: RecoveryReport
                    ) -> dict[str, Decision]:
        """The decision to carry out for each gid; fences undecided old ones."""
        plan: dict[str, Decision] = {}
        for gid in sorted(gids):
            held = [t for s in shards for t in s.found if t.gid == gid]
            decision = decided.get(gid)
            if decision is None:
                # A transaction is as old as its first PREPARE.
                if max(t.age_seconds for t in held) < min_age:
                    report.left_young.extend(held)
                    continue
                if not dry_run:
                    try:
                        decision = await self.log.decide(
                            gid, "rollback", sorted({t.shard for t in held}), self._decided_by)
                    except PgError as e:
                        report.failed.extend(
                            (t, f"cannot record the rollback decision: {e.message}")
                            for t in held)
                        continue
                else:
                    decision = "rollback"
            plan[gid] = decision
        return plan

    async def _act(self, shards: list[_Shard], plan: dict[str, Decision], dry_run: bool,
                   report: RecoveryReport) -> set[tuple[str, str]]:
        """COMMIT or ROLLBACK PREPARED by plan; the (shard, gid) pairs no longer prepared."""
        finished: set[tuple[str, str]] = set()

        async def on(shard: _Shard) -> None:
            for t in shard.found:
                decision = plan.get(t.gid)
                if decision is None:
                    continue
                done = report.committed if decision == "commit" else report.rolled_back
                if dry_run:
                    done.append(t)
                    continue
                outcome = await _finish(shard.conn, t.gid, decision)
                if outcome is None:
                    done.append(t)
                    finished.add((shard.name, t.gid))
                    log.info("%s %s on shard %s (prepared %.0fs ago)",
                             "committed" if decision == "commit" else "rolled back",
                             t.gid, shard.name, t.age_seconds)
                elif outcome == _GONE:
                    report.elsewhere.append(t)
                    finished.add((shard.name, t.gid))
                elif outcome == _BUSY:
                    report.elsewhere.append(t)
                else:
                    report.failed.append((t, outcome))
                    log.warning("could not %s %s on shard %s: %s", decision, t.gid,
                                shard.name, outcome)

        await asyncio.gather(*(on(s) for s in shards if s.reachable))
        for items in (report.committed, report.rolled_back, report.elsewhere):
            items.sort(key=lambda t: (t.gid, t.shard))
        report.failed.sort(key=lambda f: (f[0].gid, f[0].shard))
        return finished

    async def _forget(self, shards: list[_Shard], alias: dict[str, str],
                      before: list[DecisionRecord], finished: set[tuple[str, str]],
                      report: RecoveryReport) -> None:
        reachable = {s.name for s in shards if s.reachable}
        still = {t.gid for s in shards for t in s.found if (s.name, t.gid) not in finished}
        forget = []
        for record in before:
            if record.gid in still:
                continue
            if record.decision == "rollback" and record.age_seconds < self.rollback_retention:
                continue
            servers = {alias.get(p) for p in record.participants}
            if None in servers or not servers <= reachable:
                continue  # a participant we could not look at may still hold it
            forget.append(record.gid)
        if forget:
            try:
                await self.log.forget(forget)
            except PgError as e:
                log.info("could not forget %d decisions yet: %s", len(forget), e.message)
                return
            report.forgotten.extend(forget)

    async def resolve(self, gid: str, *, commit: bool) -> list[str]:
        """Commit (or roll back) `gid` by hand on every shard that holds it; the shards it
        acted on. The decision is recorded first; a gid decided the other way is refused."""
        if parse_gid(gid) is None:
            raise PgError("22023", f"{gid!r} is not a Shardwire transaction id",
                          hint=f"Shardwire resolves only its own ({GID_PREFIX}:...); finish "
                          "others with COMMIT PREPARED or ROLLBACK PREPARED on the shard")
        want: Decision = "commit" if commit else "rollback"
        shards, _ = await self._look()
        try:
            holders = [s for s in shards if any(t.gid == gid for t in s.found)]
            unreachable = [s.name for s in shards if not s.reachable]
            if not holders:
                if unreachable:
                    raise PgError("08006", f"no reachable shard holds {gid}, and shards "
                                  f"{', '.join(unreachable)} cannot be reached",
                                  hint="try again when they can")
                raise PgError("42704", f"no shard holds a prepared transaction {gid}",
                              hint="SHOW IN_DOUBT lists them")
            if self.log.available:
                standing = await self.log.decide(gid, want, [s.name for s in holders],
                                                 f"by hand ({self._decided_by})")
                if standing != want:
                    raise PgError(
                        "55000", f"{gid} is already decided: {standing}",
                        hint=f"some shards may have finished it that way; RESOLVE IN_DOUBT "
                        f"'{gid}' {standing.upper()} (or let recovery do it)")
            acted, errors = [], []
            for s in holders:
                outcome = await _finish(s.conn, gid, want)
                if outcome is None:
                    acted.append(s.name)
                elif outcome != _GONE:
                    errors.append(f"{s.name}: {outcome}")
            log.warning("%s by hand: %s on %s", gid, want, ", ".join(acted) or "no shard")
            if errors:
                raise PgError("XX000", f"{gid}: {want} failed on some shards",
                              detail="\n".join(errors + [f"done on: {', '.join(acted)}"]),
                              hint="fix the shards, then resolve it again (or let recovery)")
            if want == "commit" and not unreachable and self.log.available:
                try:
                    await self.log.forget([gid])
                except PgError:
                    pass  # recovery forgets it later
            return acted
        finally:
            await asyncio.gather(*(_close(s) for s in shards))

    async def run_periodically(self, *, interval: float, min_age: float) -> None:
        """`run_once` every `interval` seconds, forever; logs what it did. For the proxy."""
        warned: set[str] = set()
        while True:
            try:
                report = await self.run_once(min_age=min_age)
            except Exception:  # the loop must outlive any one pass
                log.exception("recovery pass failed")
            else:
                for problem in report.problems:
                    if problem not in warned:
                        warned.add(problem)
                        log.warning("%s", problem)
                for shard, why in report.unreachable:
                    log.info("recovery: shard %s unreachable: %s", shard, why)
                if report.catalog_error:
                    log.warning("recovery: %s", report.catalog_error)
            await asyncio.sleep(interval)


async def _finish(conn: Any, gid: str, decision: Decision) -> str | None:
    """COMMIT or ROLLBACK PREPARED: None when done, 42704 / 55000 when another session has
    finished it / is finishing it, else what went wrong."""
    verb = "COMMIT" if decision == "commit" else "ROLLBACK"
    try:
        await conn.execute(f"{verb} PREPARED {_literal(gid)}")
    except asyncpg.PostgresError as e:
        if e.sqlstate in (_GONE, _BUSY):
            return str(e.sqlstate)
        return _why(e)
    except (OSError, TimeoutError, asyncpg.InterfaceError) as e:
        return _why(e)
    return None


async def _close(shard: _Shard) -> None:
    conn, shard.conn = shard.conn, None
    if conn is None:
        return
    try:
        await asyncio.wait_for(conn.close(), 5)
    except (*_CATALOG_ERRORS, PgError):
        conn.terminate()


def _no_prepared_problem(shard: _Shard) -> str:
    a = shard.address
    return (f"shard {shard.name} ({a.host}:{a.port}) has max_prepared_transactions = "
            f"{shard.max_prepared}, so transactions that write on it and another shard cannot "
            f"commit; set max_prepared_transactions in its postgresql.conf to at least "
            f"max_connections ({shard.max_connections}) and restart it")


async def check_shards(config: Config) -> list[str]:
    """Problems with the shards' settings for two-phase commit, one sentence each: shards
    whose max_prepared_transactions is 0, and shards that could not be checked."""
    recovery = Recovery(config, DecisionLog(None))
    shards, _ = await recovery._look()
    try:
        problems = []
        for s in shards:
            if s.error is not None:
                problems.append(f"shard {s.name}: cannot check max_prepared_transactions: "
                                f"{s.error}")
            elif s.max_prepared == 0:
                problems.append(_no_prepared_problem(s))
        return problems
    finally:
        await asyncio.gather(*(_close(s) for s in shards))
