"""Health checks: one dedicated connection per shard server, one cheap query per interval.

A server that fails a check (cannot connect or log in, errors, or answers slower than
`health.timeout`) is out of rotation (`Pool.mark_down`): a replica gets no reads, and a
primary's statements fail at once with 57P03 (`Pool.down_error`) instead of each client
waiting for its own connect timeout. It is checked again after 0.5 s, then twice as long
each time up to `health.max_backoff`; the first check that passes puts it back.

The same query measures a standby's replay lag, on the standby itself:

- if everything received has been replayed (`pg_last_wal_receive_lsn() =
  pg_last_wal_replay_lsn()`), the lag is 0: the standby has all the primary sent, however
  long ago the last commit was (an idle primary must not look like a lagging replica);
- otherwise it is the age of the last replayed commit (`now() -
  pg_last_xact_replay_timestamp()`), an upper bound: right after a quiet spell, the first
  new commit makes a replica look as far behind as the quiet spell was long, until it is
  replayed (a few milliseconds later, noticed at the next check);
- with WAL waiting and nothing replayed since the standby started, the lag is unknown: no
  reads.

Caveats: the primary's and the standby's clocks are compared (commit timestamps come from the
primary); and a standby whose WAL receiver lost the primary keeps a receive position that
replay has reached, so it reports 0 while no longer following — when the primary is down
nothing newer exists anyway, and after a failover its check finds it either promoted or
lagging.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ..config.model import HealthSettings
from .fanout import ShardFailure, query_rows
from .pool import Pool, ServerConnection
from .protocol.errors import PgError

log = logging.getLogger("shardwire.health")

FIRST_RETRY = 0.5  # seconds before a failed server is checked again; doubles each time

CHECK_QUERY = (
    "SELECT pg_catalog.pg_is_in_recovery(), CASE"
    " WHEN NOT pg_catalog.pg_is_in_recovery() THEN 0"
    " WHEN pg_catalog.pg_last_wal_receive_lsn() = pg_catalog.pg_last_wal_replay_lsn() THEN 0"
    " ELSE extract(epoch FROM now() - pg_catalog.pg_last_xact_replay_timestamp()) END"
)


class CheckConnection(ServerConnection):
    """A server connection of the health checker's own: not in the pool, and its queries
    are not the shard's load (heat statistics count only clients' statements)."""

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


def backoff(failures: int, settings: HealthSettings) -> float:
    """Seconds until a server that failed `failures` checks in a row is checked again."""
    return min(FIRST_RETRY * 2 ** min(max(failures - 1, 0), 30), settings.max_backoff)


async def check_once(pool: Pool, conn: CheckConnection, *, connect: bool) -> None:
    """Run the check on `conn` (connecting it first if `connect`); record the result."""
    if connect:
        await conn.connect()
    rows = await query_rows(conn, CHECK_QUERY)
    in_recovery = rows[0][0] == "t"
    raw = rows[0][1]
    lag = None if raw is None else max(0.0, float(raw))
    pool.check_passed(in_recovery, lag)


async def watch(pool: Pool, settings: Callable[[], HealthSettings]) -> None:
    """Check `pool`'s server until the pool is closed (its task is cancelled then)."""
    conn: CheckConnection | None = None
    try:
        while not pool.closed:
            current = settings()
            fresh = conn is None or conn.closed
            if conn is None or fresh:
                conn = CheckConnection(pool)
            try:
                await asyncio.wait_for(check_once(pool, conn, connect=fresh), current.timeout)
                delay = current.interval
            except asyncio.CancelledError:
                raise
            except Exception as e:  # every failure means the same: out of rotation
                conn.abort("health check failed")
                conn = None
                pool.mark_down(_describe(e, current))
                delay = backoff(pool.failures, current)
            pool.next_check = time.time() + delay
            await asyncio.sleep(delay)
    finally:
        if conn is not None:
            conn.close()


def _describe(e: Exception, settings: HealthSettings) -> str:
    match e:
        case TimeoutError():
            return f"health check timed out after {settings.timeout:g}s"
        case ShardFailure():
            return f"health check failed: {e.error.message}"
        case PgError():
            return f"health check failed: {e.message}"
        case OSError():
            return f"health check failed: {e.strerror or e}"
    return f"health check failed: {e}"


