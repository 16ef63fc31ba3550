"""The differential test rig: run a query on the reference server and through Shardwire, and
judge the difference.

A query runs through the proxy and on the reference server with the same client and protocol:

- ``text``: psycopg, simple query protocol, text results (every query);
- ``text-tz``: the same in sessions whose TimeZone is Asia/Kolkata (UTC+05:30);
- ``extended``: psycopg with the filter values as parameters, extended protocol, text results;
- ``binary``: asyncpg, a prepared statement with the values as parameters, binary results.

Column names and type OIDs must be equal, and the rows: as lists when the query's ORDER BY
makes the order total, as multisets otherwise, and when ORDER BY sorts by some output columns
with ties, the sequence of those columns' values must be equal too (rows within a tie may come
in any order). Values are compared exactly as the server sent them (text), or as asyncpg
decoded them (binary; numerics keep their scale), except float4/float8 values, which may differ
in the last bits because shards add up in another order: they are equal within a relative (and
absolute) tolerance of 1e-9 (float8) or 1e-5 (float4).

Each run gets an `Outcome`; `Tally` counts them.
"""

from __future__ import annotations

import asyncio
import enum
import math
import re
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import asyncpg
import psycopg
import yaml
from psycopg.types.string import TextLoader

from shardwire.proxy.routing import StatementRouter
from shardwire.router.plan import AnyShard, MultiShard, NeedLookup, Refusal, SingleShard
from shardwire.router.route import RouteContext
from shardwire.router.shardmap import ShardMap

from .generator import REFUSED_CONSTRUCTS, Order, Query

FEATURE_NOT_SUPPORTED = "0A000"
_BINARY_REFUSAL = "which the proxy cannot encode in a multi-shard result"
FLOAT4_OID, FLOAT8_OID, NUMERIC_OID = 700, 701, 1700
TOLERANCE = {FLOAT4_OID: 1e-5, FLOAT8_OID: 1e-9}
# The session TimeZone of the "text-tz" runs: timestamptz text without a zone is local time
# there, which the proxy must take into account when it routes by a timestamptz key.
OTHER_TIME_ZONE = "Asia/Kolkata"
QUERY_TIMEOUT = 30.0  # seconds before a query counts as hung and is cancelled
SHOWN_ROWS = 8


class Outcome(enum.Enum):
    MATCH = "match"  # same columns and rows as the reference (or the same SQLSTATE)
    REFUSED = "refused"  # 0A000 for a construct that stays refused across shards
    REFUSED_PENDING = "refused-pending"  # 0A000 for a supported construct across shards
    MISMATCH = "mismatch"  # other columns or rows than the reference: a bug
    ERROR = "error"  # an error where the reference answered, or a refusal on one shard
    INVALID = "invalid"  # the reference rejected a generated query: a generator bug


@dataclass(frozen=True, slots=True)
class Result:
    columns: tuple[tuple[str, int], ...] = ()
    rows: tuple[tuple[Any, ...], ...] = ()
    error: tuple[str, str] | None = None  # (SQLSTATE, message)

    def describe(self) -> str:
        if self.error is not None:
            return f"ERROR {self.error[0]}: {self.error[1]}"
        cols = ", ".join(f"{n}:{oid}" for n, oid in self.columns)
        shown = "\n".join(f"      {r!r}" for r in self.rows[:SHOWN_ROWS])
        more = f"\n      ... {len(self.rows) - SHOWN_ROWS} more" if len(
            self.rows) > SHOWN_ROWS else ""
        return f"columns ({cols}), {len(self.rows)} rows\n{shown}{more}".rstrip()


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    protocol: str
    route: str  # single, any, multi, refused (by the router)
    construct: str
    report: str = ""  # for failures: the SQL, both results, how to replay
    proxy_sqlstate: str | None = None  # the proxy's error, if it gave one

    @property
    def failed(self) -> bool:
        return self.outcome in (Outcome.MISMATCH, Outcome.ERROR, Outcome.INVALID)


@dataclass(slots=True)
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    by_route: Counter[tuple[str, str]] = field(default_factory=Counter)
    by_protocol: Counter[tuple[str, str]] = field(default_factory=Counter)
    refused_constructs: Counter[str] = field(default_factory=Counter)
    pending_constructs: Counter[str] = field(default_factory=Counter)
    known_issues: Counter[str] = field(default_factory=Counter)
    routes: Counter[str] = field(default_factory=Counter)  # queries by the router's decision
    queries: int = 0

    def add_query(self, route: str) -> None:
        self.queries += 1
        self.routes[route] += 1

    def add(self, verdict: Verdict) -> None:
        self.outcomes[verdict.outcome.value] += 1
        self.by_route[(verdict.route, verdict.outcome.value)] += 1
        self.by_protocol[(verdict.protocol, verdict.outcome.value)] += 1
        if verdict.outcome is Outcome.REFUSED:
            self.refused_constructs[verdict.construct] += 1
        elif verdict.outcome is Outcome.REFUSED_PENDING:
            self.pending_constructs[verdict.construct] += 1

    def merge(self, other: Tally) -> None:
        self.outcomes.update(other.outcomes)
        self.by_route.update(other.by_route)
        self.by_protocol.update(other.by_protocol)
        self.refused_constructs.update(other.refused_constructs)
        self.pending_constructs.update(other.pending_constructs)
        self.known_issues.update(other.known_issues)
        self.routes.update(other.routes)
        self.queries += other.queries

    def summary(self) -> str:
        runs = sum(self.outcomes.values())
        lines = [f"{self.queries} queries (by route: " + ", ".join(
                     f"{k} {v}" for k, v in self.routes.most_common()) + f"); {runs} runs "
                 "(a query runs once per protocol): "
                 + ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))]
        for route in ("single", "any", "multi", "refused"):
            row = {o: n for (r, o), n in self.by_route.items() if r == route}
            if row:
                lines.append(f"  route {route:<8} " + ", ".join(
                    f"{k} {v}" for k, v in sorted(row.items())))
        for protocol in ("text", "text-tz", "extended", "binary"):
            row = {o: n for (p, o), n in self.by_protocol.items() if p == protocol}
            if row:
                lines.append(f"  via {protocol:<10} " + ", ".join(
                    f"{k} {v}" for k, v in sorted(row.items())))
        if self.pending_constructs:
            lines.append("  refused, to be supported by scatter-gather: " + ", ".join(
                f"{k} {v}" for k, v in self.pending_constructs.most_common()))
        if self.refused_constructs:
            lines.append("  refused, on the refuse list: " + ", ".join(
                f"{k} {v}" for k, v in self.refused_constructs.most_common()))
        if self.known_issues:
            lines.append("  known proxy issues (not counted as failures): " + ", ".join(
                f"{k} {v}" for k, v in self.known_issues.most_common()))
        return "\n".join(lines)


# --- routes -----------------------------------------------------------------------------------


class RouteBook:
    """What Shardwire's router decides for a statement (the same code the proxy runs)."""

    def __init__(self, smap: ShardMap) -> None:
        self.router = StatementRouter(smap)

    def route(self, sql: str, timezone: str = "UTC") -> str:
        try:
            plan = self.router.plan_query(sql.encode(), RouteContext(), timezone)
        except Exception as e:  # a crash of the router is the proxy's crash too
            return f"router raised {type(e).__name__}"
        match plan:
            case SingleShard():
                return "single"
            case AnyShard():
                return "any"
            case MultiShard():
                return "multi"
            case Refusal():
                return "refused"
            case NeedLookup():
                return "lookup"
        return "?"


# --- running a query --------------------------------------------------------------------------


def text_connection(dsn: str) -> psycopg.Connection[Any]:
    """An autocommit connection whose rows hold the server's text, untouched (floats are
    parsed, for the tolerance)."""
    conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    conn.prepare_threshold = None  # never prepare behind our back: text runs stay simple
    for info in psycopg.postgres.types:
        for oid in (info.oid, info.array_oid):
            if oid and oid not in (FLOAT4_OID, FLOAT8_OID):
                conn.adapters.register_loader(oid, TextLoader)
    return conn


def _pg_error(e: psycopg.Error) -> tuple[str, str]:
    return (e.sqlstate or "", (e.diag.message_primary or str(e)).strip())


_DOLLAR = re.compile(r"\$\d+")


def _pyformat(param_sql: str) -> str:
    """$1, $2... as psycopg's %s placeholders (parameters are numbered in order of use)."""
    return _DOLLAR.sub("%s", param_sql.replace("%", "%%"))


class TextSide:
    """One psycopg connection (reconnected if it breaks), with `setup` run after connecting."""

    def __init__(self, dsn: str, setup: str | None = None) -> None:
        self.dsn = dsn
        self.setup = setup
        self.conn = self._connect()

    def _connect(self) -> psycopg.Connection[Any]:
        conn = text_connection(self.dsn)
        if self.setup:
            conn.execute(self.setup)
        return conn

    def run(self, sql: str, params: Sequence[Any] | None) -> Result:
        conn = self.conn
        timer = threading.Timer(QUERY_TIMEOUT, conn.cancel_safe)
        timer.start()
        try:
            cur = conn.execute(sql, params) if params is not None else conn.execute(sql)
            if cur.description is None:
                return Result()
            columns = tuple((d.name, d.type_code) for d in cur.description)
            return Result(columns, tuple(cur.fetchall()))
        except psycopg.Error as e:
            if conn.closed or conn.broken:
                self.conn = self._connect()
                return Result(error=("connection", f"connection lost: {e}"))
            state = _pg_error(e)
            if state[0] == "57014" and not timer.is_alive():
                return Result(error=("timeout", f"no answer within {QUERY_TIMEOUT}s"))
            return Result(error=state)
        finally:
            timer.cancel()

    def close(self) -> None:
        self.conn.close()


def _canonical(value: Any) -> Any:
    """An asyncpg value as something hashable that keeps what the wire said: numerics keep
    their scale (Decimal('1.50') and Decimal('1.5') are == in Python)."""
    if isinstance(value, Decimal):
        return ("numeric", str(value))
    if isinstance(value, list | tuple):
        return tuple(_canonical(v) for v in value)
    return value


class BinarySide:
    def __init__(self, dsn: str, loop: asyncio.AbstractEventLoop) -> None:
        self.dsn = dsn
        self.loop = loop
        self.conn = self._connect()

    def _connect(self) -> asyncpg.Connection:
        return self.loop.run_until_complete(asyncpg.connect(self.dsn, timeout=10))

    async def _run(self, sql: str, params: Sequence[Any]) -> Result:
        stmt = await self.conn.prepare(sql, timeout=QUERY_TIMEOUT)
        columns = tuple((a.name, a.type.oid) for a in stmt.get_attributes())
        records = await stmt.fetch(*params, timeout=QUERY_TIMEOUT)
        return Result(columns, tuple(tuple(_canonical(v) for v in r) for r in records))

    def run(self, sql: str, params: Sequence[Any]) -> Result:
        try:
            return self.loop.run_until_complete(self._run(sql, params))
        except asyncpg.PostgresError as e:
            return Result(error=(e.sqlstate or "", str(getattr(e, "message", e))))
        except asyncpg.InterfaceError as e:
            if isinstance(e, ValueError):  # a parameter asyncpg cannot encode: nothing sent
                return Result(error=("client", str(e)))
            self._reconnect()
            return Result(error=("connection", f"connection lost: {type(e).__name__}: {e}"))
        except TimeoutError:
            self._reconnect()
            return Result(error=("timeout", f"no answer within {QUERY_TIMEOUT}s"))
        except (ConnectionError, OSError) as e:
            self._reconnect()
            return Result(error=("connection", f"connection lost: {type(e).__name__}: {e}"))

    def _reconnect(self) -> None:
        try:
            self.loop.run_until_complete(self.conn.close(timeout=2))
        except Exception:
            self.conn.terminate()
        self.conn = self._connect()

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close(timeout=5))


# --- comparing ----------------------------------------------------------------------------------


def _same(a: Any, b: Any, oid: int) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        if math.isinf(a) or math.isinf(b):
            return a == b
        tol = TOLERANCE.get(oid, TOLERANCE[FLOAT8_OID])
        return math.isclose(a, b, rel_tol=tol, abs_tol=tol)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y, oid) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _same_row(a: Sequence[Any], b: Sequence[Any], oids: Sequence[int]) -> bool:
    return len(a) == len(b) and all(_same(x, y, o) for x, y, o in zip(a, b, oids, strict=False))


def _sort_value(v: Any) -> tuple[int, Any]:
    if v is None:
        return (0, "")
    if isinstance(v, float):
        if math.isnan(v):
            return (3, "")
        return (1, float(f"{v:.6g}"))  # equal within the tolerance: next to each other
    if isinstance(v, tuple):
        return (2, tuple(_sort_value(x) for x in v))
    return (2, v)


def _sort_key(row: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(_sort_value(v) for v in row)


def _first_difference(ref: Sequence[Sequence[Any]], got: Sequence[Sequence[Any]],
                      oids: Sequence[int]) -> str:
    for i, (a, b) in enumerate(zip(ref, got, strict=False)):
        if not _same_row(a, b, oids):
            return f"first difference at row {i}: reference {a!r}, proxy {b!r}"
    return f"reference has {len(ref)} rows, proxy {len(got)}"


def _by_value(value: Any) -> Any:
    """A numeric as its value alone (Decimal equality ignores the scale)."""
    if value is None:
        return None
    text = value[1] if isinstance(value, tuple) else value
    return ("numeric value", Decimal(text))


def _loosen(result: Result, loose: Sequence[int]) -> Result:
    if not loose:
        return result
    rows = tuple(tuple(_by_value(v) if i in loose else v for i, v in enumerate(r))
                 for r in result.rows)
    return Result(result.columns, rows, result.error)


def compare_rows(ref: Result, got: Result, order: Order, loose: Sequence[int] = ()
                 ) -> str | None:
    """None when the rows agree under `order`, else what differs. Columns in `loose` are
    compared by numeric value."""
    ref, got = _loosen(ref, loose), _loosen(got, loose)
    oids = [oid for _, oid in ref.columns]
    if order == "total":
        if len(ref.rows) == len(got.rows) and all(
                _same_row(a, b, oids) for a, b in zip(ref.rows, got.rows, strict=True)):
            return None
        return "rows differ (ordered): " + _first_difference(ref.rows, got.rows, oids)
    a = sorted(ref.rows, key=_sort_key)
    b = sorted(got.rows, key=_sort_key)
    if len(a) != len(b) or not all(_same_row(x, y, oids) for x, y in zip(a, b, strict=True)):
        return "rows differ (as multisets): " + _first_difference(a, b, oids)
    if order != "none":
        # Sort keys tie as ORDER BY ties them: a numeric by its value (1.0 and 1.00 tie, and
        # may come in either order).
        cols = list(order)

        def sort_keys(rows: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
            return [tuple(_by_value(r[c]) if oids[c] == NUMERIC_OID else r[c] for c in cols)
                    for r in rows]

        ka, kb = sort_keys(ref.rows), sort_keys(got.rows)
        key_oids = [oids[c] for c in cols]
        if not all(_same_row(x, y, key_oids) for x, y in zip(ka, kb, strict=True)):
            return (f"rows not in ORDER BY order (sort columns {cols}): "
                    + _first_difference(ka, kb, key_oids))
    return None


def regression_entry(query: Query, note: str) -> str:
    """The YAML to paste into tests/oracle/regressions.yaml for this query."""
    entry: dict[str, Any] = {"sql": query.sql, "order": query.order if isinstance(
        query.order, str) else list(query.order), "construct": query.construct}
    if query.loose:
        entry["loose"] = list(query.loose)
    if not query.supported:
        entry["supported"] = False
    entry["note"] = note
    return yaml.safe_dump([entry], allow_unicode=True, sort_keys=False, width=100)


class Rig:
    """Connections to the reference server and to the proxy, and the judge of each run."""

    def __init__(self, reference_dsn: str, proxy_dsn: str, smap: ShardMap) -> None:
        self.routes = RouteBook(smap)
        self.loop = asyncio.new_event_loop()
        self.text = (TextSide(reference_dsn), TextSide(proxy_dsn))
        zone = f"SET TIME ZONE '{OTHER_TIME_ZONE}'"
        self.text_tz = (TextSide(reference_dsn, zone), TextSide(proxy_dsn, zone))
        self.binary = (BinarySide(reference_dsn, self.loop), BinarySide(proxy_dsn, self.loop))

    def close(self) -> None:
        for side in (*self.text, *self.text_tz, *self.binary):
            try:
                side.close()
            except Exception:
                pass
        self.loop.close()

    def run(self, query: Query, protocol: str) -> tuple[Result, Result]:
        """The reference's result and the proxy's."""
        if protocol == "binary":
            sql, params = query.param_sql or query.sql, query.params
            return self.binary[0].run(sql, params), self.binary[1].run(sql, params)
        if protocol == "extended":
            sql = _pyformat(query.param_sql or query.sql)
            return self.text[0].run(sql, query.params), self.text[1].run(sql, query.params)
        sides = {"text": self.text, "text-tz": self.text_tz}[protocol]
        return sides[0].run(query.sql, None), sides[1].run(query.sql, None)

    def check(self, query: Query, protocol: str, *, label: str, generated: bool = True,
              route: str | None = None) -> Verdict:
        """Run `query` with `protocol` on both sides and judge. `route` is the router's
        decision for the statement in a UTC session, if already known."""
        if protocol == "text-tz":
            route = self.routes.route(query.sql, OTHER_TIME_ZONE)
        route = route or self.routes.route(query.sql)
        ref, got = self.run(query, protocol)
        outcome, why = self.judge(query, route, ref, got, generated=generated)
        report = ""
        if outcome not in (Outcome.MATCH, Outcome.REFUSED):
            report = self.report(query, protocol, route, label, outcome, why, ref, got)
        construct = query.construct
        if query.supported == (construct in REFUSED_CONSTRUCTS):
            # e.g. count(DISTINCT key) merges, avg(real) does not: say so in the counts
            construct += " (mergeable here)" if query.supported else " (not mergeable here)"
        return Verdict(outcome, protocol, route, construct, report,
                       got.error[0] if got.error else None)

    def judge(self, query: Query, route: str, ref: Result, got: Result, *,
              generated: bool) -> tuple[Outcome, str]:
        if ref.error is not None:
            if generated:
                return Outcome.INVALID, "the reference server rejected a generated query"
            if got.error is not None and got.error[0] == ref.error[0]:
                return Outcome.MATCH, ""
            return Outcome.MISMATCH, "the reference failed, the proxy did not fail the same way"
        if got.error is not None:
            if got.error[0] != FEATURE_NOT_SUPPORTED:
                return Outcome.ERROR, "the proxy failed where the reference answered"
            if route in ("single", "any"):
                return Outcome.ERROR, "a query on one shard was refused"
            if not query.supported or _BINARY_REFUSAL in got.error[1]:
                # (binary output of a type the merge cannot encode: a documented refusal,
                # docs/scatter-gather.md "Binary results")
                return Outcome.REFUSED, ""
            return Outcome.REFUSED_PENDING, "a supported construct across shards was refused"
        if got.columns != ref.columns:
            return Outcome.MISMATCH, "columns (name, type OID) differ"
        why = compare_rows(ref, got, query.order, query.loose)
        if why is not None:
            return Outcome.MISMATCH, why
        return Outcome.MATCH, ""

    @staticmethod
    def report(query: Query, protocol: str, route: str, label: str, outcome: Outcome, why: str,
               ref: Result, got: Result) -> str:
        lines = [
            f"{outcome.value.upper()} [{label}] construct={query.construct} route={route} "
            f"protocol={protocol} order={query.order}: {why}",
            f"  sql: {query.sql}",
        ]
        if protocol != "text" and query.param_sql:
            lines.append(f"  as run: {query.param_sql}  params={query.params!r}")
        lines += [f"  reference: {ref.describe()}", f"  proxy:     {got.describe()}"]
        if outcome is not Outcome.INVALID:
            lines.append("  regression entry for tests/oracle/regressions.yaml:")
            entry = regression_entry(query, f"{outcome.value} found by {label} via {protocol}")
            lines += ["    " + line for line in entry.splitlines()]
        return "\n".join(lines)
