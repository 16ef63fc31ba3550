"""A seeded generator of SELECT statements over the oracle's tables (see `data`).

`QueryGenerator(seed).queries(n)` gives the same `n` queries for the same seed. Each `Query`
carries its SQL, the same statement with its filter values as parameters ($1, $2...), the
construct it exercises, whether a multi-shard run of that construct is meant to be supported
(scatter-gather) or refused, and how its rows may be compared:

- ``"total"``: ORDER BY determines the order completely (the generator appends a unique key
  whenever it uses LIMIT/OFFSET, sorts by a column outside the select list, or wants to);
  the rows are compared as lists.
- a tuple of output column positions (0-based): ORDER BY sorts by exactly these output
  columns, with ties; the sequence of their values must be the same, the rows within ties may
  come in any order.
- ``"none"``: no ORDER BY; the rows are compared as multisets.

Every generated statement is valid for PostgreSQL 15 (the rig fails a query that the reference
server rejects: that is a generator bug). Constructs:

supported across shards: filter, join, join_reference, reference (countries alone), semi_join,
cte (a filter in a CTE or derived table), aggregate, group_by, distinct, distinct_on;
refused across shards (REFUSED_CONSTRUCTS): window, count_distinct, ordered_set_aggregate
(string_agg, array_agg), aggregate_subquery, set_operation, cross_rule_join, non_key_join;
except count(DISTINCT) of the key and either of the last two grouped by the key, which merge as
a plain union, and any query with avg() of a real column, which stays refused (see
docs/scatter-gather.md). On one shard every construct must run and match.
"""

from __future__ import annotations

import datetime as dt
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from shardwire.router.values import to_key

from .data import (
    GAP,
    RULE_OF_TABLE,
    TABLES,
    TIME_BOUNDARIES,
    Column,
    Table,
    generate_rows,
    shard_map,
)

Order = Literal["total", "none"] | tuple[int, ...]

REFUSED_CONSTRUCTS = frozenset({
    "window", "count_distinct", "ordered_set_aggregate", "aggregate_subquery", "set_operation",
    "cross_rule_join", "non_key_join",
})


@dataclass(frozen=True, slots=True)
class Query:
    sql: str
    construct: str
    order: Order = "none"
    # The construct is meant to run across shards once scatter-gather is in (False: it stays
    # refused with 0A000 when it needs several shards).
    supported: bool = True
    # The same statement with its filter values as parameters, for the extended protocol.
    param_sql: str | None = None
    params: tuple[Any, ...] = ()
    # Output columns compared by numeric value, not by spelling: min/max (or a set operation's
    # deduplication) over a numeric column holding one value in several scales (1.0, 1.00)
    # returns whichever of them it meets first, on one server as across shards.
    loose: tuple[int, ...] = ()


# --- values taken from the data -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Values:
    """Distinct non-NULL values of each column, and key values grouped by shard."""

    column: dict[tuple[str, str], list[Any]]
    # table -> shard (or "none": maps to no shard) -> key values, some of them in no row
    keys_by_shard: dict[str, dict[str, list[Any]]]


def _collect_values() -> _Values:
    rows = generate_rows()
    smap = shard_map()
    column: dict[tuple[str, str], list[Any]] = {}
    keys: dict[str, dict[str, list[Any]]] = {}
    for name, table in TABLES.items():
        for i, col in enumerate(table.columns):
            seen = {r[i] for r in rows[name] if r[i] is not None}
            column[(name, col.name)] = sorted(seen, key=lambda v: (str(type(v)), v))
        if table.key is None or table.name == "events":  # events: see _time_filter
            continue
        rule = smap.rules[RULE_OF_TABLE[name]]
        candidates = set(column[(name, table.key)]) | set(_EXTRA_KEYS.get(rule.name, ()))
        by_shard: dict[str, list[Any]] = {}
        for key in sorted(candidates):
            by_shard.setdefault(rule.shard_for(to_key(key, rule.key_type)) or "none",
                                []).append(key)
        keys[name] = by_shard
    return _Values(column, keys)


# Keys in no row: a tenant on the default shard, categories that map to no shard.
_EXTRA_KEYS = {"by_tenant": (99,), "by_category": ("BOOKS", "unknown")}


_VALUES: _Values | None = None


def _values() -> _Values:
    global _VALUES
    if _VALUES is None:
        _VALUES = _collect_values()
    return _VALUES


# Values that are in no row, by kind: filters on them find nothing.
_ABSENT: dict[str, tuple[Any, ...]] = {
    "int": (99_999, -77),
    "numeric": (Decimal("123456.789"), Decimal("-999.5")),
    "float": (-12345.5,),
    "text": ("nope", "ZZZ", "ünknown"),
    "date": (dt.date(2031, 1, 1),),
    "ts": (dt.datetime(2031, 1, 1, tzinfo=dt.UTC),),
}


# --- SQL text of values -----------------------------------------------------------------------


def sql_text(value: Any) -> str:
    """`value` as a PostgreSQL literal."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, float):
        return f"{value!r}::float8"
    if isinstance(value, dt.datetime):
        return "'" + value.isoformat(sep=" ") + "'"
    if isinstance(value, dt.date):
        return f"'{value.isoformat()}'"
    return "'" + str(value).replace("'", "''") + "'"


_MARK = re.compile("\x01(\\d+)\x02")
# A numeric expression whose equal values come in several scales (unconstrained numeric).
_SCALES_VARY = re.compile(r"\w+\.(?:amount|gdp)(?: \* 2| - 0\.5)?")
_PICKS_ONE = re.compile(r"(?:min|max)\((.*)\)")
# Sums and averages of floats differ in the last bits with the order of addition: never sort
# by them (two groups with equal sums could swap) nor compare them with round numbers.
_FLOAT_SUM = re.compile(r"(?:sum|avg)\(\w+\.(?:weight|score|rating)\b")
# avg() of real stays refused across shards: PostgreSQL sums real in double precision there.
_AVG_OF_REAL = re.compile(r"avg\(\w+\.rating\b")


def _loose(exprs: Sequence[str], *, deduplicated: bool = False) -> list[int]:
    """Positions of output expressions that pick one of several equal numerics: min/max of
    one, or (deduplicated: DISTINCT, GROUP BY key, UNION) the expression itself."""
    out = []
    for i, e in enumerate(exprs):
        m = _PICKS_ONE.fullmatch(e)
        if (m and _SCALES_VARY.fullmatch(m[1])) or (deduplicated and _SCALES_VARY.fullmatch(e)):
            out.append(i)
    return out


# --- the shapes of FROM -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Col:
    expr: str  # qualified: o.amount
    column: Column
    table: Table
    nullable: bool


@dataclass(slots=True)
class _Source:
    sql: str
    aliases: dict[str, Table]  # alias -> table
    unique: list[str]  # expressions that together are unique per row
    outer: set[str] = field(default_factory=set)  # aliases on the nullable side of a join
    construct: str = "filter"

    def columns(self) -> list[_Col]:
        return [_Col(f"{a}.{c.name}", c, t, c.nullable or a in self.outer)
                for a, t in self.aliases.items() for c in t.columns]


def _single(name: str, alias: str) -> _Source:
    table = TABLES[name]
    construct = "reference" if table.key is None else "filter"
    return _Source(f"{name} {alias}", {alias: table}, [f"{alias}.{table.unique}"],
                   construct=construct)


# --- the generator ------------------------------------------------------------------------------


class QueryGenerator:
    def __init__(self, seed: int | str) -> None:
        self.rng = random.Random(seed)
        self.values = _values()
        self._lits: list[tuple[Any, str]] = []

    # -- public

    def queries(self, n: int) -> list[Query]:
        return [self.query() for _ in range(n)]

    def query(self) -> Query:
        self._lits = []
        builders: list[tuple[Callable[[], Query], int]] = [
            (self._plain, 26), (self._aggregate, 10), (self._group_by, 22),
            (self._distinct, 8), (self._distinct_on, 7), (self._semi_join, 3),
            (self._cte, 3), (self._refused, 12),
        ]
        builder = self.rng.choices([b for b, _ in builders], [w for _, w in builders])[0]
        return builder()

    # -- helpers

    def _chance(self, p: float) -> bool:
        return self.rng.random() < p

    def _lit(self, value: Any) -> str:
        """A filter value: a literal in `sql`, a parameter in `param_sql`."""
        self._lits.append((value, sql_text(value)))
        return f"\x01{len(self._lits) - 1}\x02"

    def _finish(self, template: str, construct: str, order: Order,
                supported: bool | None = None, loose: Sequence[int] = ()) -> Query:
        sql = _MARK.sub(lambda m: self._lits[int(m[1])][1], template)
        params: list[Any] = []

        def param(m: re.Match[str]) -> str:
            params.append(self._lits[int(m[1])][0])
            return f"${len(params)}"

        param_sql = _MARK.sub(param, template)
        if supported is None:
            supported = construct not in REFUSED_CONSTRUCTS and not _AVG_OF_REAL.search(sql)
        return Query(sql, construct, order, supported,
                     param_sql if params else None, tuple(params), tuple(loose))

    def _source(self, *, reference: bool = True) -> _Source:
        r = self.rng.random()
        if r < 0.2:
            return _single("orders", "o")
        if r < 0.3:
            return _single("order_items", "i")
        if r < 0.42:
            return _single("events", "e")
        if r < 0.52:
            return _single("products", "p")
        if r < 0.6:
            return _single("customers", "c")
        if r < 0.65 and reference:
            return _single("countries", "r")
        if r < 0.85:
            kind = self.rng.choice(("JOIN", "JOIN", "LEFT JOIN", "USING"))
            if kind == "USING":
                sql = "orders o JOIN order_items i USING (tenant_id, order_id)"
            else:
                sql = (f"orders o {kind} order_items i "
                       "ON i.tenant_id = o.tenant_id AND i.order_id = o.order_id")
            return _Source(sql, {"o": TABLES["orders"], "i": TABLES["order_items"]},
                           ["o.order_id", "i.item_id"],
                           {"i"} if kind == "LEFT JOIN" else set(), "join")
        if r < 0.93:
            kind = self.rng.choice(("JOIN", "LEFT JOIN"))
            return _Source(f"orders o {kind} countries r ON r.code = o.country",
                           {"o": TABLES["orders"], "r": TABLES["countries"]}, ["o.order_id"],
                           {"r"} if kind == "LEFT JOIN" else set(), "join_reference")
        kind = self.rng.choice(("JOIN", "LEFT JOIN"))
        return _Source(f"customers c {kind} countries r ON r.code = c.country",
                       {"c": TABLES["customers"], "r": TABLES["countries"]}, ["c.customer_id"],
                       {"r"} if kind == "LEFT JOIN" else set(), "join_reference")

    def _value(self, col: _Col) -> Any:
        """A value of the column: mostly one from the data, sometimes one in no row."""
        kind = col.column.kind
        if kind == "bool":
            return self._chance(0.5)
        if self._chance(0.07) and kind in _ABSENT:
            absent = self.rng.choice(_ABSENT[kind])
            return absent if col.column.sql_type != "smallint" else -77
        found = self.values.column[(col.table.name, col.column.name)]
        return self.rng.choice(found)

    # -- WHERE

    def _key_filter(self, src: _Source) -> str | None:
        """A condition on the sharding key of one sharded table of the source: one shard
        most of the time, several shards sometimes."""
        sharded = [(a, t, t.key) for a, t in src.aliases.items() if t.key is not None]
        if not sharded:
            return None
        alias, table, key_column = self.rng.choice(sharded)
        key = f"{alias}.{key_column}"
        if table.name == "events":
            return self._time_filter(key)
        groups = self.values.keys_by_shard[table.name]
        one_shard = self._chance(0.75)
        shard = self.rng.choice(sorted(groups))
        pool: list[Any] = list(groups[shard]) if one_shard else [
            v for vs in groups.values() for v in vs]
        picks = self.rng.sample(pool, min(len(pool), self.rng.choice((1, 1, 1, 2, 3))))
        if len(picks) == 1:
            form = self.rng.random()
            if form < 0.3:
                return self._spelled(key, table.column(key_column).kind, picks[0])
            if form < 0.4:
                return f"{self._lit(picks[0])} = {key}"
            return f"{key} = {self._lit(picks[0])}"
        if self._chance(0.3):
            return "(" + " OR ".join(f"{key} = {self._lit(v)}" for v in picks) + ")"
        return f"{key} IN ({', '.join(self._lit(v) for v in picks)})"

    def _spelled(self, key: str, kind: str, v: Any) -> str:
        """`key = v` written another way that PostgreSQL reads the same (TESTING idea 8):
        casts, quoted numbers, ANY, IS NOT DISTINCT FROM, sub-selects, other time zones. Some
        of these narrow to one shard, some do not; the answer must be right either way."""
        q = sql_text(v)
        typed = f"{q}::timestamptz" if kind == "ts" else q  # a sub-select's literal is text
        forms: list[str] = [f"{q} = {key}", f"{key} IN ({q}, NULL)", f"NOT ({key} <> {q})",
                            f"{key} IS NOT DISTINCT FROM {q}", f"{key} = (SELECT {typed})",
                            f"{key} IN (SELECT {typed})", f"{key} = {q} AND {key} = {q}",
                            f"({key}) = ({q})", f"{key} BETWEEN {q} AND {q}"]
        if kind == "int":
            forms += [f"{key} = '{v}'", f"{key} = ' {v} '", f"{key} = '{v}'::int",
                      f"{key} = CAST({v} AS bigint)", f"{key} = {v}.0", f"{key} = {v}::smallint",
                      f"{key} = ANY(ARRAY[{v}])", f"{key} = ANY('{{{v}}}')",
                      f"{key} BETWEEN SYMMETRIC {v} AND {v}", f"{key} + 0 = {v}",
                      f"{key}::text = '{v}'", f"{key} = {v} + 0"]
            if v >= 0:
                forms += [f"{key} = '0{v}'", f"{key} = {v}e0"]
        elif kind == "text":
            forms += [f"{key} = {q}::text", f"{key} = {q}::varchar", f"{key} = E{q}",
                      f"{key} = ANY('{{{v}}}')", f"{key} COLLATE \"C\" = {q}",
                      f"{key} = {q}::char(20)", f"{key} = '{v} '", f"{key}::text = {q}",
                      f"lower({key}) = lower({q})",
                      f"{key} = {sql_text(v[:1])} || {sql_text(v[1:])}"]
        elif kind == "ts":
            kolkata = dt.timezone(dt.timedelta(hours=5, minutes=30))
            naive = v.astimezone(dt.UTC).replace(tzinfo=None)
            forms += [f"{key} = '{v.isoformat()}'",
                      f"{key} = '{v.astimezone(kolkata).isoformat(sep=' ')}'",
                      f"{key} = {q}::timestamptz", f"{key} = TIMESTAMPTZ {q}",
                      f"{key} = '{naive.isoformat(sep=' ')} UTC'",
                      f"{key} = '{naive.isoformat(sep=' ')}'",  # in the session's TimeZone
                      # the same instant as local time in the other sessions' zone
                      f"{key} = '{v.astimezone(kolkata).replace(tzinfo=None).isoformat(sep=' ')}'",
                      f"{key} = '{naive.isoformat(sep=' ')}'::timestamp",
                      f"{key} = {q} AND {key} < 'infinity'"]
            if naive.time() == dt.time(0):
                forms.append(f"{key} = '{naive.date().isoformat()}'::date")
        return self.rng.choice(forms)

    def _time_filter(self, key: str) -> str:
        """A condition on events.created_at, the key of the range rule."""
        found = self.values.column[("events", "created_at")]
        bounds = [None, *TIME_BOUNDARIES, None]
        r = self.rng.random()
        if r < 0.3:
            v = self.rng.choice(found)
            if self._chance(0.4):
                return self._spelled(key, "ts", v)
            return f"{key} = {self._lit(v)}"
        if r < 0.4:  # in the gap: no shard, no rows
            t = GAP[0] + dt.timedelta(days=self.rng.randrange(30))
            return f"{key} = {self._lit(t)}"
        if r < 0.75:  # within one range, or across a boundary
            i = self.rng.randrange(len(bounds) - 1)
            inside = [t for t in found if (bounds[i] is None or t >= bounds[i]) and (
                bounds[i + 1] is None or t < bounds[i + 1])]
            if not inside or self._chance(0.3):
                inside = found
            a, b = sorted(self.rng.sample(inside, 2))
            if self._chance(0.2):  # without a zone: in the session's TimeZone
                a_text, b_text = (f"'{t.replace(tzinfo=None).isoformat(sep=' ')}'" for t in (a, b))
                return f"{key} BETWEEN {a_text} AND {b_text}"
            if self._chance(0.5):
                return f"{key} BETWEEN {self._lit(a)} AND {self._lit(b)}"
            return f"{key} >= {self._lit(a)} AND {key} < {self._lit(b)}"
        b = self.rng.choice(TIME_BOUNDARIES)
        if self._chance(0.3):  # the same instant written in another zone
            shown = b.astimezone(dt.timezone(dt.timedelta(hours=-2)))
            return f"{key} {self.rng.choice(('<', '>=', '>'))} '{shown.isoformat(sep=' ')}'"
        op = self.rng.choice(("<", "<=", ">=", ">"))
        return f"{key} {op} {self._lit(b)}"

    def _column_filter(self, cols: list[_Col]) -> str:
        """A condition on a column that is (mostly) not the key."""
        col = self.rng.choice(cols)
        e, kind = col.expr, col.column.kind
        r = self.rng.random()
        if col.nullable and r < 0.12:
            return f"{e} IS {self.rng.choice(('NULL', 'NOT NULL'))}"
        if kind == "bool":
            return self.rng.choice((e, f"NOT {e}", f"{e} IS TRUE", f"{e} IS NOT FALSE",
                                    f"{e} = {self._lit(self._chance(0.5))}"))
        if kind == "text" and r < 0.35:
            s = str(self._value(col))
            prefix = s[:1] if s else "a"
            return self.rng.choice((
                f"{e} LIKE {self._lit(prefix + '%')}",
                f"lower({e}) = {self._lit(s.lower())}",
                f"{e} ILIKE {self._lit('%' + s[-1:] + '%')}",
                f"{e} <> {self._lit(s)}",
                f"{e} >= {self._lit(s)}",
            ))
        if r < 0.5:
            op = self.rng.choice(("=", "<>", "<", "<=", ">", ">="))
            return f"{e} {op} {self._lit(self._value(col))}"
        if r < 0.7:
            a, b = sorted((self._value(col), self._value(col)))
            neg = "NOT " if self._chance(0.15) else ""
            return f"{e} {neg}BETWEEN {self._lit(a)} AND {self._lit(b)}"
        vals = [self._value(col) for _ in range(self.rng.randint(1, 4))]
        neg = "NOT " if self._chance(0.15) else ""
        return f"{e} {neg}IN ({', '.join(self._lit(v) for v in vals)})"

    def _where(self, src: _Source, *, key_share: float = 0.45) -> str:
        parts: list[str] = []
        cols = src.columns()
        if self._chance(key_share):
            key = self._key_filter(src)
            if key is not None:
                parts.append(key)
        for _ in range(self.rng.choice((0, 1, 1, 1, 2, 2, 3))):
            if self._chance(0.15):
                parts.append(f"({self._column_filter(cols)} OR {self._column_filter(cols)})")
            else:
                parts.append(self._column_filter(cols))
        if self._chance(0.05):  # a key or another condition: every shard again
            key = self._key_filter(src)
            if key is not None:
                parts.append(f"({key} OR {self._column_filter(cols)})")
        return f" WHERE {' AND '.join(parts)}" if parts else ""

    # -- expressions

    def _expr(self, col: _Col) -> tuple[str, str]:
        """An expression over the column for a select list, and its kind."""
        e, kind = col.expr, col.column.kind
        options: list[tuple[str, str]] = [(e, kind)]
        match kind:
            case "int":
                options += [(f"{e} + 1", "int"), (f"{e} * -2", "int"), (f"abs({e})", "int")]
            case "numeric":
                options += [(f"{e} * 2", "numeric"), (f"round({e}, 1)", "numeric"),
                            (f"{e} - 0.5", "numeric")]
            case "float":
                options += [(f"{e} * 2", "float")]
            case "text":
                options += [(f"upper({e})", "text"), (f"lower({e})", "text"),
                            (f"length({e})", "int"), (f"coalesce({e}, '∅')", "text"),
                            (f"{e} || '!'", "text")]
            case "date":
                options += [(f"{e} + 1", "date"), (f"extract(year from {e})", "numeric")]
            case "ts":
                options += [(f"{e}::date", "date"), (f"date_trunc('month', {e})", "ts")]
            case "bool":
                options += [(f"NOT {e}", "bool"), (f"coalesce({e}, false)", "bool")]
        return options[0] if self._chance(0.6) else self.rng.choice(options)

    def _group_expr(self, cols: list[_Col]) -> tuple[str, str]:
        """An expression with few distinct values, to group or DISTINCT by."""
        low = [c for c in cols if c.column.kind in ("text", "bool", "int", "date")
               and c.column.name not in ("order_id", "item_id", "event_id", "customer_id",
                                         "population", "sku", "name", "payload")]
        col = self.rng.choice(low or cols)
        e, kind = col.expr, col.column.kind
        options = [(e, kind)]
        if kind == "text":
            options += [(f"lower({e})", "text"), (f"coalesce({e}, '?')", "text")]
        elif kind == "int":
            options += [(f"{e} % 3", "int"), (f"{e} > 0", "bool")]
        elif kind == "date":
            options += [(f"extract(month from {e})", "numeric")]
        for c in cols:
            if c.column.kind == "ts":
                options.append((f"date_trunc('month', {c.expr})", "ts"))
            elif c.column.kind == "numeric" and c.column.name in ("amount", "price"):
                options.append((f"{c.expr} > 0", "bool"))
        return options[0] if self._chance(0.5) else self.rng.choice(options)

    def _aggregate_expr(self, cols: list[_Col]) -> str:
        col = self.rng.choice(cols)
        e, kind = col.expr, col.column.kind
        options = ["count(*)", f"count({e})"]
        if kind in ("int", "numeric", "float"):
            options += [f"sum({e})", f"avg({e})", f"min({e})", f"max({e})", f"sum({e} * 2)"]
        elif kind in ("text", "date", "ts"):
            options += [f"min({e})", f"max({e})"]
            if kind == "text":
                options.append(f"max(lower({e}))")
        elif kind == "bool":
            options += [f"bool_and({e})", f"bool_or({e})"]
        if kind == "numeric":
            options.append(f"bool_and({e} > 0)")
        return self.rng.choice(options)

    def _having_condition(self, cols: list[_Col]) -> str:
        agg = self._aggregate_expr(cols)
        if agg.startswith(("bool_and", "bool_or")):
            return agg if self._chance(0.7) else f"NOT {agg}"
        if agg.startswith("count"):
            return f"{agg} {self.rng.choice(('>', '>=', '<', '='))} {self.rng.randint(0, 40)}"
        if _FLOAT_SUM.match(agg):
            return f"{agg} {self.rng.choice(('>', '<'))} {self.rng.choice((0.123, 7.77, 321.5))}"
        if agg.startswith(("min", "max")) and not any(k in agg for k in ("*", "sum", "avg")):
            return f"{agg} IS {self.rng.choice(('NULL', 'NOT NULL'))}"
        return f"{agg} {self.rng.choice(('>', '<'))} {self.rng.choice((0, 1, 10, 100, 1000))}"

    @staticmethod
    def _alias_sql(alias: str) -> str:
        return alias if alias.isidentifier() and alias.islower() else f'"{alias}"'

    def _alias(self, n: int) -> str | None:
        r = self.rng.random()
        if r < 0.55:
            return None
        if r < 0.95:
            return f"x{n}"
        return self.rng.choice(("Mixed Case", "Summe €", "ÄÖÜ"))[: 6 + n % 3] + str(n)

    def _direction(self) -> str:
        d = self.rng.choice(("", "", " ASC", " DESC", " DESC"))
        nulls = self.rng.choice(("", "", " NULLS FIRST", " NULLS LAST"))
        return d + nulls

    def _limit(self, allowed: bool) -> str:
        if not allowed or not self._chance(0.35):
            return ""
        r = self.rng.random()
        limit = self.rng.choice((0, 1, 3, 5, 20, 1000))
        offset = self.rng.choice((0, 2, 7, 50, 5000))
        if r < 0.45:
            return f" LIMIT {limit}"
        if r < 0.8:
            return f" LIMIT {limit} OFFSET {offset}"
        if r < 0.9:
            return f" OFFSET {offset}"
        return f" OFFSET {offset} ROWS FETCH FIRST {limit} ROWS ONLY"

    # -- ORDER BY over a select list

    def _order_by(self, items: list[tuple[str, str | None]], extra: list[str],
                  unique: list[str], *, force_total: bool = False) -> tuple[str, Order]:
        """ORDER BY for a select list of (expression, alias) items; `extra` are sortable
        expressions outside the select list, `unique` the expressions that make the order
        total (a table's unique column, or every GROUP BY key). Returns the clause and the
        order it gives."""
        if not items:
            return "", "none"
        parts: list[str] = []
        positions: list[int] = []
        hidden = False
        sortable = [i for i, (e, _) in enumerate(items) if not _FLOAT_SUM.match(e)]
        extra = [e for e in extra if not _FLOAT_SUM.match(e)]
        for _ in range(self.rng.choice((1, 1, 2, 2, 3))):
            if extra and (self._chance(0.2) or not sortable):
                parts.append(self.rng.choice(extra) + self._direction())
                hidden = True
                continue
            if not sortable:
                break
            i = self.rng.choice(sortable)
            expr, alias = items[i]
            form = self.rng.random()
            if alias is not None and form < 0.35:
                ref = self._alias_sql(alias)
            elif form < 0.7:
                ref = str(i + 1)
            else:
                ref = expr
            parts.append(ref + self._direction())
            positions.append(i)
        if not parts:
            return "", "none"
        total = force_total or hidden or self._chance(0.5)
        if total:
            parts += [u + self.rng.choice(("", " DESC")) for u in unique]
        order: Order = "total" if total else tuple(positions)
        return " ORDER BY " + ", ".join(parts), order

    # -- constructs

    def _select_items(self, cols: list[_Col]) -> list[tuple[str, str | None]]:
        items = []
        for n in range(self.rng.randint(1, 5)):
            expr, _ = self._expr(self.rng.choice(cols))
            items.append((expr, self._alias(n)))
        return items

    @staticmethod
    def _select_list(items: list[tuple[str, str | None]]) -> str:
        return ", ".join(e if a is None else f"{e} AS {QueryGenerator._alias_sql(a)}"
                         for e, a in items)

    def _plain(self) -> Query:
        src = self._source()
        cols = src.columns()
        where = self._where(src)
        if self._chance(0.08):
            select, items = "*", []
        else:
            items = self._select_items(cols)
            select = self._select_list(items)
        order_sql = ""
        order: Order = "none"
        if self._chance(0.7):
            extra = [c.expr for c in cols]
            if items:
                order_sql, order = self._order_by(items, extra, src.unique)
            else:  # SELECT *: sort by columns, then the unique key
                order_sql = " ORDER BY " + ", ".join(
                    [self.rng.choice(extra) + self._direction()] + src.unique)
                order = "total"
        limit = self._limit(order == "total")
        return self._finish(f"SELECT {select} FROM {src.sql}{where}{order_sql}{limit}",
                            src.construct, order)

    def _aggregate(self) -> Query:
        src = self._source()
        cols = src.columns()
        aggs = [self._aggregate_expr(cols) for _ in range(self.rng.randint(1, 5))]
        select = ", ".join(a if self._chance(0.6) else f"{a} AS a{n}" for n, a in enumerate(aggs))
        having = f" HAVING {self._having_condition(cols)}" if self._chance(0.1) else ""
        return self._finish(f"SELECT {select} FROM {src.sql}{self._where(src)}{having}",
                            "aggregate", "total", loose=_loose(aggs))

    def _group_by(self) -> Query:
        src = self._source()
        cols = src.columns()
        groups = list(dict.fromkeys(self._group_expr(cols)[0]
                                    for _ in range(self.rng.choice((1, 1, 2, 2, 3)))))
        shown = [g for g in groups if self._chance(0.9)] or (groups if self._chance(0.8) else [])
        items: list[tuple[str, str | None]] = [(g, f"g{n}" if self._chance(0.3) else None)
                                               for n, g in enumerate(shown)]
        for n in range(self.rng.randint(1, 4)):
            items.append((self._aggregate_expr(cols), f"a{n}" if self._chance(0.4) else None))
        self.rng.shuffle(items)
        group_refs = []
        for g in groups:
            i = next((k for k, (e, _) in enumerate(items) if e == g), None)
            if i is not None and self._chance(0.4):
                group_refs.append(str(i + 1))
            else:
                group_refs.append(g)
        having = f" HAVING {self._having_condition(cols)}" if self._chance(0.3) else ""
        order_sql = ""
        order: Order = "none"
        if self._chance(0.7):
            extra = [self._aggregate_expr(cols)]
            # Every group key (shown or not) at the end makes the order total.
            order_sql, order = self._order_by(items, extra, groups)
        limit = self._limit(order == "total")
        sql = (f"SELECT {self._select_list(items)} FROM {src.sql}{self._where(src)} "
               f"GROUP BY {', '.join(group_refs)}{having}{order_sql}{limit}")
        loose = _loose([e for e, _ in items], deduplicated=True)
        return self._finish(sql, "group_by", order, loose=loose)

    def _distinct(self) -> Query:
        src = self._source()
        cols = src.columns()
        items = list(dict.fromkeys(self._group_expr(cols)
                                   for _ in range(self.rng.choice((1, 2, 2, 3)))))
        select_items: list[tuple[str, str | None]] = [(e, None) for e, _ in items]
        order_sql = ""
        order: Order = "none"
        if self._chance(0.6):
            parts = []
            positions = []
            for i in self.rng.sample(range(len(items)), self.rng.randint(1, len(items))):
                parts.append(str(i + 1) + self._direction())
                positions.append(i)
            if len(positions) == len(items):
                order = "total"
            elif self._chance(0.5):
                parts += [str(i + 1) for i in range(len(items)) if i not in positions]
                order = "total"
            else:
                order = tuple(positions)
            order_sql = " ORDER BY " + ", ".join(parts)
        limit = self._limit(order == "total")
        sql = (f"SELECT DISTINCT {self._select_list(select_items)} FROM {src.sql}"
               f"{self._where(src)}{order_sql}{limit}")
        loose = _loose([e for e, _ in select_items], deduplicated=True)
        return self._finish(sql, "distinct", order, loose=loose)

    def _distinct_on(self) -> Query:
        src = self._source()
        cols = src.columns()
        on = list(dict.fromkeys(self._group_expr(cols)[0] for _ in range(self.rng.choice((1, 2)))))
        items: list[tuple[str, str | None]] = [(d, None) for d in on if self._chance(0.85)]
        for n in range(self.rng.randint(1, 3)):
            items.append((self._expr(self.rng.choice(cols))[0], self._alias(n)))
        tiebreak = [self.rng.choice(cols).expr + self._direction()
                    for _ in range(self.rng.randint(0, 2))]
        order = ", ".join([d + self._direction() for d in on] + tiebreak
                          + [u + self.rng.choice(("", " DESC")) for u in src.unique])
        sql = (f"SELECT DISTINCT ON ({', '.join(on)}) {self._select_list(items)} FROM {src.sql}"
               f"{self._where(src)} ORDER BY {order}{self._limit(True)}")
        return self._finish(sql, "distinct_on", "total")

    def _cte(self) -> Query:
        """A filter inside a CTE or a derived table, read by an outer SELECT (no aggregate)."""
        src = self._source()
        items = self._select_items(src.columns())
        inner = ", ".join(f"{e} AS c{n}" for n, (e, _) in enumerate(items))
        body = f"SELECT {inner} FROM {src.sql}{self._where(src)}"
        if self._chance(0.5):
            head, tail = f"WITH s AS ({body}) ", "FROM s"
        else:
            head, tail = "", f"FROM ({body}) AS s"
        outer = " WHERE s.c0 IS NOT NULL" if self._chance(0.3) else ""
        positions = self.rng.sample(range(len(items)), self.rng.randint(1, len(items)))
        order: Order = "none"
        order_sql = ""
        if self._chance(0.7):
            order_sql = " ORDER BY " + ", ".join(f"{i + 1}{self._direction()}" for i in positions)
            if len(positions) == len(items) and not any(
                    _SCALES_VARY.fullmatch(e) for e, _ in items):
                order = "total"  # rows equal in every column cannot be told apart
            else:
                order = tuple(positions)  # (1.0 and 1.00 tie, yet differ)
        limit = self._limit(order == "total")
        sql = f"{head}SELECT * {tail}{outer}{order_sql}{limit}"
        return self._finish(sql, "cte", order)

    def _semi_join(self) -> Query:
        """Orders with (or without) items: a subquery correlated on the key, no aggregate."""
        neg = "NOT " if self._chance(0.3) else ""
        src = _single("orders", "o")
        inner = "i.tenant_id = o.tenant_id AND i.order_id = o.order_id"
        if self._chance(0.5):
            inner += f" AND i.qty > {self._lit(self.rng.randint(1, 5))}"
        where = self._where(src)
        where = (where + " AND " if where else " WHERE ") + (
            f"{neg}EXISTS (SELECT 1 FROM order_items i WHERE {inner})")
        sql = f"SELECT o.order_id, o.tenant_id, o.amount FROM orders o{where} ORDER BY 1"
        return self._finish(sql + self._limit(True), "semi_join", "total")

    def _refused(self) -> Query:
        """A construct that must be refused when it needs several shards (and must run and
        match on one shard)."""
        src = self._source(reference=False)
        cols = src.columns()
        unique = src.unique
        r = self.rng.random()
        if r < 0.2:
            part = f"PARTITION BY {self._group_expr(cols)[0]} " if self._chance(0.6) else ""
            col = self.rng.choice([c for c in cols if c.column.kind in ("int", "numeric")])
            win = self.rng.choice((
                f"row_number() OVER ({part}ORDER BY {', '.join(unique)})",
                f"rank() OVER ({part}ORDER BY {col.expr}, {', '.join(unique)})",
                f"sum({col.expr}) OVER ({part.strip()})",
                "count(*) OVER ()",
            ))
            sql = (f"SELECT {', '.join(unique)}, {win} AS w FROM {src.sql}{self._where(src)} "
                   f"ORDER BY {', '.join(unique)}")
            return self._finish(sql, "window", "total")
        # Grouped by the sharding key (of a table no outer join NULL-extends), every group is
        # on one shard: these constructs then merge as a plain union (docs/scatter-gather.md).
        keys = [f"{a}.{t.key}" for a, t in src.aliases.items()
                if t.key is not None and a not in src.outer]
        if r < 0.35:
            col = self.rng.choice(cols)
            group = ""
            select = f"count(DISTINCT {col.expr})"
            by_key = col.expr in keys  # distinct keys of different shards add up
            if self._chance(0.4):
                g = self.rng.choice(keys) if keys and self._chance(0.3) else self._group_expr(
                    cols)[0]
                select, group = f"{g}, {select}", " GROUP BY 1 ORDER BY 1"
                by_key = by_key or g in keys
            sql = f"SELECT {select} FROM {src.sql}{self._where(src)}{group}"
            return self._finish(sql, "count_distinct", "total", supported=by_key)
        if r < 0.47:
            text_cols = [c for c in cols if c.column.kind == "text"]
            if text_cols and self._chance(0.6):
                agg = (f"string_agg({self.rng.choice(text_cols).expr}, ',' "
                       f"ORDER BY {', '.join(unique)})")
            else:
                agg = f"array_agg({self.rng.choice(cols).expr} ORDER BY {', '.join(unique)})"
            if keys and self._chance(0.3):
                key = self.rng.choice(keys)
                sql = (f"SELECT {key}, {agg} FROM {src.sql}{self._where(src)} "
                       "GROUP BY 1 ORDER BY 1")
                return self._finish(sql, "ordered_set_aggregate", "total", supported=True)
            sql = f"SELECT {agg} FROM {src.sql}{self._where(src)}"
            return self._finish(sql, "ordered_set_aggregate", "total")
        if r < 0.62:
            inner = _single("orders", "x")
            inner_where = self._where(inner, key_share=0.6)
            agg = self.rng.choice(("avg(x.amount)", "max(x.qty)", "min(x.amount)"))
            outer = _single("orders", "o")
            where = self._where(outer, key_share=0.6)
            column = "o.amount" if "amount" in agg else "o.qty"
            cond = f"{column} > (SELECT {agg} FROM orders x{inner_where})"
            where = (where + " AND " if where else " WHERE ") + cond
            sql = f"SELECT o.order_id, {column} FROM orders o{where} ORDER BY 1"
            return self._finish(sql, "aggregate_subquery", "total")
        if r < 0.8:
            name, alias = self.rng.choice((("orders", "o"), ("events", "e"), ("products", "p"),
                                           ("customers", "c")))
            left, right = _single(name, alias), _single(name, alias + "2")
            cols_l = left.columns()
            col = self.rng.choice(cols_l)
            op = self.rng.choice(("UNION", "UNION ALL", "INTERSECT", "EXCEPT", "EXCEPT ALL"))
            expr = col.expr
            expr2 = expr.replace(f"{alias}.", f"{alias}2.", 1)
            sql = (f"SELECT {expr} FROM {left.sql}{self._where(left, key_share=0.7)} {op} "
                   f"SELECT {expr2} FROM {right.sql}{self._where(right, key_share=0.7)} "
                   f"ORDER BY 1")
            loose = _loose([expr], deduplicated=op != "UNION ALL")
            if _SCALES_VARY.fullmatch(expr):  # 1.0 and 1.00 tie in ORDER BY 1, yet differ
                return self._finish(sql, "set_operation", (0,), loose=loose)
            return self._finish(sql + self._limit(True), "set_operation", "total", loose=loose)
        if r < 0.92:
            src = _Source("orders o JOIN customers c ON c.customer_id = o.customer_id",
                          {"o": TABLES["orders"], "c": TABLES["customers"]}, ["o.order_id"])
            where = self._where(src, key_share=0.9)
            if self._chance(0.5):
                second = self._key_filter(src)
                if second is not None:
                    where = (where + " AND " if where else " WHERE ") + second
            sql = (f"SELECT o.order_id, o.tenant_id, c.customer_id, c.name FROM {src.sql}"
                   f"{where} ORDER BY 1")
            return self._finish(sql, "cross_rule_join", "total")
        src = _Source("orders o JOIN order_items i ON i.order_id = o.order_id",
                      {"o": TABLES["orders"], "i": TABLES["order_items"]},
                      ["o.order_id", "i.item_id"])
        sql = (f"SELECT o.order_id, i.item_id, i.qty FROM {src.sql}"
               f"{self._where(src, key_share=0.8)} ORDER BY 1, 2")
        return self._finish(sql, "non_key_join", "total")

