"""Clients that talk to PostgreSQL servers directly, with no proxy in between: the floors the
proxy benchmarks are read against.

- ``FanoutClient`` (asyncpg on uvloop): one connection per server; a query goes to all of them
  at once and the client merges their rows itself. On one server it is a plain client; on
  four it is the least any 4-way fan-out can cost on this machine, before a proxy adds a hop.
- ``point_queries`` (psycopg): pgbench -S's point query, each one sent to the server that holds
  its key, as ``-M simple`` or ``-M prepared`` would send it. Over two servers a random key
  per query alternates between them, the way a sharding proxy's routing does; pgbench itself
  can only talk to one server.

Both time each query on the client with ``time.perf_counter_ns``, one after the other.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import itertools
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import asyncpg
import psycopg
import uvloop

POINT_QUERY = "SELECT abalance FROM pgbench_accounts WHERE aid = "


def percentile(values: Sequence[float], fraction: float) -> float:
    """The value below which ``fraction`` of ``values`` lie (the rank rounded down).

    >>> percentile([4.0, 1.0, 3.0, 2.0], 0.5), percentile([4.0, 1.0, 3.0, 2.0], 0.9)
    (3.0, 4.0)
    """
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass(frozen=True, slots=True)
class Server:
    host: str
    port: int


class FanoutClient:
    """One asyncpg connection to each server, on an event loop of its own (asyncpg's
    connections belong to the loop that opened them, so the loop lives as long as they do).

    asyncpg prepares a statement at its first execution and reuses it afterwards, like the
    prepared statements the psycopg client of the same benchmark uses.
    """

    def __init__(self, servers: Sequence[Server], *, user: str, database: str) -> None:
        self._loop = uvloop.new_event_loop()
        self._conns: list[Any] = []
        try:
            for server in servers:
                self._conns.append(
                    self._loop.run_until_complete(
                        asyncpg.connect(
                            host=server.host, port=server.port, user=user, database=database,
                            timeout=10,
                        )
                    )
                )  # fmt: skip
        except BaseException:
            self.close()
            raise

    def merged(self, sql: str, *, limit: int) -> list[tuple[Any, ...]]:
        """``sql`` on every server, the rows merged on their first column, the first
        ``limit`` of them (each server must return its rows in that order)."""
        rows = self._loop.run_until_complete(self._merged(sql, limit))
        return [tuple(row) for row in rows]

    def repeat(self, sql: str, *, limit: int, seconds: float, minimum: int) -> list[float]:
        """Milliseconds per execution of :meth:`merged`, one after the other."""
        return self._loop.run_until_complete(self._repeat(sql, limit, seconds, minimum))

    async def _merged(self, sql: str, limit: int) -> list[Any]:
        if len(self._conns) == 1:
            return list(await self._conns[0].fetch(sql))[:limit]
        parts = await asyncio.gather(*(conn.fetch(sql) for conn in self._conns))
        return list(itertools.islice(heapq.merge(*parts, key=itemgetter(0)), limit))

    async def _repeat(self, sql: str, limit: int, seconds: float, minimum: int) -> list[float]:
        times: list[float] = []
        clock = time.perf_counter_ns
        deadline = time.monotonic() + seconds
        while len(times) < minimum or time.monotonic() < deadline:
            started = clock()
            await self._merged(sql, limit)
            times.append((clock() - started) / 1e6)
        return times

    def close(self) -> None:
        for conn in self._conns:
            try:
                self._loop.run_until_complete(conn.close(timeout=5))
            except Exception:  # closing is best effort; the servers go away anyway
                conn.terminate()
        self._conns = []
        self._loop.close()


@dataclass(frozen=True, slots=True)
class KeyRange:
    """A server and the keys it holds: ``low <= aid < high``."""

    server: Server
    low: int
    high: int


@dataclass(frozen=True, slots=True)
class PointResult:
    """One client sending point queries for ``seconds``."""

    queries: int
    seconds: float
    p50_ms: float | None
    p99_ms: float | None
    per_server: tuple[int, ...]  # how many queries each server answered

    @property
    def qps(self) -> float | None:
        return self.queries / self.seconds if self.seconds > 0 else None


def point_queries(
    ranges: Sequence[KeyRange],
    *,
    protocol: str,
    seconds: float,
    user: str,
    database: str,
    seed: int | None = None,
) -> PointResult:
    """pgbench -S's query with a key drawn uniformly from all of ``ranges``' keys, sent to the
    server that holds it, over and over for ``seconds``.

    ``protocol`` is pgbench's ``-M``: ``simple`` sends the text with the key in it (simple
    query protocol), ``prepared`` a statement prepared once per connection and executed with
    the key as parameter. Connecting and preparing happen before the clock starts.
    """
    if protocol not in ("simple", "prepared"):
        raise ValueError(f"protocol must be simple or prepared, not {protocol!r}")
    ordered = sorted(ranges, key=lambda r: r.low)
    lows = [r.low for r in ordered]
    low, high = ordered[0].low, max(r.high for r in ordered)
    draw = random.Random(seed).randrange
    conns = []
    try:
        for r in ordered:
            conns.append(psycopg.connect(
                host=r.server.host, port=r.server.port, user=user, dbname=database,
                autocommit=True, connect_timeout=10,
            ))  # fmt: skip
        cursors = [conn.cursor() for conn in conns]
        prepared = protocol == "prepared"
        statement = (POINT_QUERY + "%s").encode()

        def run(cursor: psycopg.Cursor[Any], aid: int) -> None:
            if prepared:
                cursor.execute(statement, (aid,), prepare=True)
            else:
                cursor.execute(f"{POINT_QUERY}{aid}".encode(), prepare=False)
            cursor.fetchone()

        for r, cursor in zip(ordered, cursors, strict=True):
            run(cursor, r.low)  # prepares, when prepared
        times: list[float] = []
        counts = [0] * len(ordered)
        clock = time.perf_counter_ns
        started = time.monotonic()
        deadline = started + seconds
        while time.monotonic() < deadline:
            aid = draw(low, high)
            index = bisect.bisect_right(lows, aid) - 1
            begun = clock()
            run(cursors[index], aid)
            times.append((clock() - begun) / 1e6)
            counts[index] += 1
        elapsed = time.monotonic() - started
    finally:
        for conn in conns:
            conn.close()
    return PointResult(
        queries=len(times),
        seconds=elapsed,
        p50_ms=statistics.median(times) if times else None,
        p99_ms=percentile(times, 0.99) if times else None,
        per_server=tuple(counts),
    )
