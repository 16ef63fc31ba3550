"""From an analysis and the statement's values to a plan. Pure: no I/O, no clock.

`route` evaluates the key conditions the analysis found against literal and parameter values
(`Values`), maps keys to shards with the rule, and checks that the shards agree: tables of one
statement must meet on one shard, or be joined on the key, or the statement is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .analyze import (
    UNKNOWN,
    Analysis,
    And,
    Cond,
    Eq,
    In,
    Interval,
    Kind,
    Or,
    Slot,
    Unknown,
)
from .plan import AnyShard, MultiShard, NeedLookup, Plan, Refusal, SingleShard
from .shardmap import KeyType, KeyValue, Rule, RuleKind, ShardMap

# Resolves a slot to a key value of the given type; None for SQL NULL. Raises ValueError when
# the value cannot be read as that type.
Values = Callable[[Slot, KeyType], KeyValue | None]


@dataclass(frozen=True, slots=True)
class RouteContext:
    """Session state that routing depends on."""

    shard: str | None = None  # SET shardwire.shard: every statement goes there
    key: str | None = None  # SET shardwire.key: statements without a key use this one
    # Directory entries of lookup rules read so far: key → shard, None for "no such key".
    lookups: Mapping[str, Mapping[KeyValue, str | None]] = field(default_factory=dict)


class _Missing(Exception):
    """Lookup keys not yet in the context's directory cache (or, for an INSERT, without a
    shard yet: `assign`)."""

    def __init__(self, rule: Rule, keys: set[KeyValue], assign: bool = False) -> None:
        self.rule = rule
        self.keys = keys
        self.assign = assign


_NO_CONTEXT = RouteContext()


def route(a: Analysis, smap: ShardMap, values: Values,
          ctx: RouteContext = _NO_CONTEXT) -> Plan:
    forced = a.hint_shard or ctx.shard
    if forced is not None:
        if forced not in smap.shards:
            return Refusal("22023", f'unknown shard "{forced}"',
                           hint="known shards: " + ", ".join(smap.shards))
        if a.kind in (Kind.SESSION, Kind.TRANSACTION):
            return AnyShard(a.reason)
        how = "a /* shard */ hint" if a.hint_shard else "SET shardwire.shard"
        return SingleShard(forced, f"{how} names {forced}")
    if a.refusal is not None:
        return a.refusal
    if a.kind in (Kind.SESSION, Kind.TRANSACTION):
        return AnyShard(a.reason)
    try:
        plan = _route(a, smap, values, ctx)
    except _Missing as m:
        return NeedLookup(m.rule.name, tuple(sorted(m.keys, key=repr)), m.assign)
    if a.explain_only and isinstance(plan, MultiShard):
        # EXPLAIN runs nothing: one shard shows the plan.
        return SingleShard(plan.shards[0], "EXPLAIN without ANALYZE: the plan on one shard")
    return plan


def _route(a: Analysis, smap: ShardMap, values: Values, ctx: RouteContext) -> Plan:
    write = a.kind in (Kind.WRITE, Kind.DDL)
    rule = a.rule
    default = smap.default_shard
    if a.kind in (Kind.DDL, Kind.MAINTENANCE) and (rule is not None or a.reference):
        # The table exists on every shard: so does its schema.
        return _many(smap.shards, write, f"{a.reason}: every shard has the table")
    if a.writes and any(t in a.reference for t in a.writes):
        if a.classes or a.unsharded:
            return Refusal("0A000", "a write to a reference table may read only reference "
                           "tables: every shard must compute the same rows",
                           hint="write the reference table in a statement of its own, with "
                           "the values given")
        return _many(smap.shards, True, "a write to a reference table goes to every shard")
    if rule is None:
        if a.unsharded or a.kind is Kind.WRITE:
            return SingleShard(default, "unsharded tables live on the default shard")
        if a.reference:
            return SingleShard(default, "reference tables: any shard has them")
        return AnyShard("no table: any shard")
    key_type = rule.key_type

    def resolve(slot: Slot) -> tuple[KeyValue | None, bool]:
        """(value, ok): ok is False when the value cannot be read as the key type."""
        try:
            return values(slot, key_type), True
        except ValueError:
            return None, False

    inserted: frozenset[str] | None = None
    rows: tuple[str, ...] | None = None
    if a.insert_keys is not None:
        found = _insert(a, rule, resolve, ctx)
        if isinstance(found, Refusal):
            return found
        rows, inserted = found, frozenset(found)
    forced_key: frozenset[str] | None = None
    if ctx.key is not None and all(isinstance(c.condition, Unknown) for c in a.classes):
        try:
            key = values(Slot(literal=ctx.key, string=True), key_type)
        except ValueError as e:
            return Refusal("22P02", f"SET shardwire.key: {e}")
        shard = _shard_of(rule, key, ctx) if key is not None else None
        if shard is None:
            return Refusal("23514", f"no shard for key {key!r} of rule {rule.name}")
        forced_key = frozenset((shard,))
    sets: list[frozenset[str]] = []
    for cls in a.classes:
        if cls.inserted and inserted is not None:
            sets.append(inserted)
            continue
        narrowed = forced_key or _shards(cls.condition, rule, resolve, ctx)
        sets.append(frozenset(rule.shards) if narrowed is None else narrowed)
    union = frozenset().union(*sets) if sets else frozenset()
    if len(sets) > 1 and len(union) > 1:
        tables = [str(t) for cls in a.classes for t in cls.tables]
        return Refusal("0A000", "the statement combines rows of "
                       f"{', '.join(tables[:3])} that are not joined on the sharding key "
                       f"({rule.column}) and may live on different shards",
                       hint=f"join on {rule.column} (or restrict every table to the same "
                       f"{rule.column}), or query the tables separately")
    if a.new_key is not None:
        new, ok = resolve(a.new_key)
        target = _shard_of(rule, new, ctx) if ok and new is not None else None
        if target is None or union != frozenset((target,)):
            return Refusal("0A000", f"the UPDATE would move rows of rule {rule.name} to "
                           "another shard (it changes their sharding key)",
                           hint="delete the rows and insert them with the new key")
    if a.unsharded:
        if union and union != frozenset((default,)):
            return Refusal("0A000", f"the statement joins the unsharded table {a.unsharded[0]} "
                           f"(on the default shard {default}) with rows on other shards",
                           hint=f"restrict the sharded tables to keys on {default}, or make "
                           f"{a.unsharded[0]} a reference table")
        return SingleShard(default, "unsharded and sharded tables meet on the default shard")
    if not union:
        # No key value maps to a shard: the statement touches no rows; any shard of the rule
        # gives the right (empty) answer.
        return SingleShard(rule.shards[0], "no key value maps to a shard: no rows")
    if len(union) == 1:
        shard = next(iter(union))
        return SingleShard(shard, _because(a, rule, shard))
    ordered = tuple(s for s in smap.shards if s in union)
    if rows is not None and union == inserted:
        return MultiShard(ordered, write, f"{rule.name}: the rows go to {', '.join(ordered)}",
                          rows=rows)
    return _many(ordered, write, f"{rule.name}: the key may be on {', '.join(ordered)}")


def _because(a: Analysis, rule: Rule, shard: str) -> str:
    return f"{rule.kind.value} rule {rule.name} puts the key on {shard}"


def _many(shards: tuple[str, ...], write: bool, reason: str) -> Plan:
    if len(shards) == 1:
        return SingleShard(shards[0], reason)
    return MultiShard(tuple(shards), write, reason)


def _insert(a: Analysis, rule: Rule,
            resolve: Callable[[Slot], tuple[KeyValue | None, bool]],
            ctx: RouteContext) -> tuple[str, ...] | Refusal:
    """The shard of each row an INSERT ... VALUES writes, or why it is refused."""
    assert a.insert_keys is not None
    table = next((t for t in a.writes), None)
    shards: list[str] = []
    missing: set[KeyValue] = set()
    for slot in a.insert_keys:
        if slot is None:
            return Refusal("0A000", f"the key of a row inserted into {table} is computed, so "
                           "Shardwire cannot tell its shard",
                           hint=f"give {rule.column} as a literal or a parameter")
        value, ok = resolve(slot)
        if not ok:
            return Refusal("22P02", f"invalid input for the {rule.key_type.value} key "
                           f"{rule.column} of {table}: {_slot_text(slot)}")
        if value is None:
            return Refusal("23514", f"a row inserted into {table} has a NULL sharding key "
                           f"({rule.column})", hint="every row needs a key to have a shard")
        try:
            shard = _shard_of(rule, value, ctx)
        except _Missing as m:
            missing |= m.keys
            continue
        if shard is None and rule.kind is RuleKind.LOOKUP:
            missing.add(value)  # a new key: the directory gives it a shard first
            continue
        if shard is None:
            return Refusal("23514", f"no shard for key {value} of table {table} "
                           f"(rule {rule.name})", hint="add the value or a range covering it "
                           "to the shard map")
        shards.append(shard)
    if missing:
        raise _Missing(rule, missing, assign=True)
    return tuple(shards)


def _slot_text(slot: Slot) -> str:
    return slot.literal if slot.literal is not None else f"${slot.param}"


def _shard_of(rule: Rule, key: KeyValue, ctx: RouteContext) -> str | None:
    if rule.kind is RuleKind.LOOKUP:
        directory = ctx.lookups.get(rule.name, {})
        if key in directory:
            return directory[key]
        raise _Missing(rule, {key})
    return rule.shard_for(key)


def _shards(cond: Cond, rule: Rule, resolve: Callable[[Slot], tuple[KeyValue | None, bool]],
            ctx: RouteContext) -> frozenset[str] | None:
    """The shards that may hold rows satisfying `cond`; None for no restriction."""
    if isinstance(cond, Unknown):
        return None
    if isinstance(cond, Eq):
        return _of_values(rule, [cond.slot], resolve, ctx)
    if isinstance(cond, In):
        return _of_values(rule, list(cond.slots), resolve, ctx)
    if isinstance(cond, Interval):
        if rule.kind is not RuleKind.RANGE or rule.key_type is KeyType.TEXT:
            # Text ranges are placed by code point; PostgreSQL compares `<` under the
            # database's collation, which may order differently: no restriction.
            return None
        low = high = None
        if cond.low is not None:
            low, ok = resolve(cond.low)
            if not ok:
                return None
            if low is None:
                return frozenset()  # key > NULL is never true
        if cond.high is not None:
            high, ok = resolve(cond.high)
            if not ok:
                return None
            if high is None:
                return frozenset()
        low_inclusive, high_inclusive = cond.low_inclusive, cond.high_inclusive
        if rule.key_type is KeyType.INTEGER:
            # Integer keys: `> 99` is `>= 100`, `< 100` is `<= 99`.
            if low is not None and not low_inclusive:
                low, low_inclusive = low + 1, True
            if high is not None and not high_inclusive:
                high, high_inclusive = high - 1, True
        try:
            return rule.shards_between(low, low_inclusive, high, high_inclusive)
        except TypeError:
            return None
    if isinstance(cond, And):
        result: frozenset[str] | None = None
        parts = list(cond.parts)
        intervals = [p for p in parts if isinstance(p, Interval)]
        if len(intervals) > 1 and rule.kind is RuleKind.RANGE:
            # `k >= a AND k < b`: one interval, so that shards holding only values above b or
            # below a are not kept by each bound alone.
            merged = _merge_intervals(intervals, resolve)
            if merged is not None:
                parts = [p for p in parts if not isinstance(p, Interval)] + [merged]
        for part in parts:
            found = _shards(part, rule, resolve, ctx)
            if found is not None:
                result = found if result is None else result & found
        return result
    if isinstance(cond, Or):
        union: frozenset[str] = frozenset()
        for part in cond.parts:
            found = _shards(part, rule, resolve, ctx)
            if found is None:
                return None
            union |= found
        return union
    return None


def _merge_intervals(intervals: list[Interval],
                     resolve: Callable[[Slot], tuple[KeyValue | None, bool]]
                     ) -> Interval | None:
    """The intersection of key intervals, with the tightest bound of each side kept as the
    slot it came from; None when a bound cannot be read (then each counts alone)."""
    low: tuple[KeyValue, Slot, bool] | None = None
    high: tuple[KeyValue, Slot, bool] | None = None
    try:
        for iv in intervals:
            if iv.low is not None:
                value, ok = resolve(iv.low)
                if not ok or value is None:
                    return None
                if low is None or value > low[0] or (value == low[0] and not iv.low_inclusive):
                    low = (value, iv.low, iv.low_inclusive)
            if iv.high is not None:
                value, ok = resolve(iv.high)
                if not ok or value is None:
                    return None
                if high is None or value < high[0] or (
                        value == high[0] and not iv.high_inclusive):
                    high = (value, iv.high, iv.high_inclusive)
    except TypeError:
        return None
    return Interval(low[1] if low else None, low[2] if low else False,
                    high[1] if high else None, high[2] if high else False)


def _of_values(rule: Rule, slots: list[Slot],
               resolve: Callable[[Slot], tuple[KeyValue | None, bool]],
               ctx: RouteContext) -> frozenset[str] | None:
    out: set[str] = set()
    missing: set[KeyValue] = set()
    for slot in slots:
        value, ok = resolve(slot)
        if not ok:
            return None  # PostgreSQL may read it differently: no restriction
        if value is None:
            continue  # key = NULL matches nothing
        try:
            shard = _shard_of(rule, value, ctx)
        except _Missing as m:
            missing |= m.keys
            continue
        except TypeError:
            return None
        if shard is not None:
            out.add(shard)
    if missing:
        raise _Missing(rule, missing)
    return frozenset(out)


__all__ = ["RouteContext", "Values", "route", "UNKNOWN"]
