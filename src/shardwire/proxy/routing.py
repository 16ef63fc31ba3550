"""Routing as the proxy uses it: cached analyses, values from literals and Bind messages.

The decisions themselves are the router's pure functions (`shardwire.router`); this module
keeps their caches and reads the values out of the client's messages.
"""

from __future__ import annotations

import re
import struct
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

import sqlglot
from sqlglot import exp

from ..merge import MergeError, MergePlan, MergeRefused, plan_merge
from ..router.analyze import Analysis, Eq, Kind, Slot, analyze, fix_comma_params
from ..router.classify import split_statements
from ..router.fingerprint import INTEGER_HEAD, LITERAL_BASE, FingerprintCache, Literal
from ..router.plan import (
    AnyShard,
    EachStatement,
    MultiShard,
    NeedLookup,
    Plan,
    Refusal,
    SingleShard,
)
from ..router.route import RouteContext, route
from ..router.shardmap import KeyType, KeyValue, Rule, RuleKind, ShardMap
from ..router.values import decode_param, parse_number, to_key

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")

CACHE_LIMIT = 10_000  # analyses kept per proxy; the cache starts over when full


@dataclass(frozen=True, slots=True)
class BindValues:
    """The parameters of a Bind message, undecoded."""

    formats: tuple[int, ...]
    values: tuple[bytes | None, ...]

    def format_of(self, index: int) -> int:
        if not self.formats:
            return 0
        if len(self.formats) == 1:
            return self.formats[0]
        return self.formats[index] if index < len(self.formats) else 0


def read_bind(body: bytes) -> tuple[bytes, bytes, BindValues]:
    """(portal, statement, parameters) of a Bind message body."""
    p = body.index(0)
    s = body.index(0, p + 1)
    pos = s + 1
    (nformats,) = _I16.unpack_from(body, pos)
    pos += 2
    formats = struct.unpack_from(f"!{nformats}h", body, pos) if nformats > 0 else ()
    pos += 2 * max(nformats, 0)
    (nvalues,) = _I16.unpack_from(body, pos)
    pos += 2
    values: list[bytes | None] = []
    for _ in range(max(nvalues, 0)):
        (length,) = _I32.unpack_from(body, pos)
        pos += 4
        if length < 0:
            values.append(None)
        else:
            values.append(body[pos:pos + length])
            pos += length
    return body[:p], body[p + 1:s], BindValues(tuple(formats), tuple(values))


def parse_param_types(parse_body: bytes) -> tuple[int, ...]:
    """The parameter type OIDs a Parse message declares (0 = let the server infer)."""
    q = parse_body.index(0, parse_body.index(0) + 1)
    (count,) = _I16.unpack_from(parse_body, q + 1)
    return struct.unpack_from(f"!{count}I", parse_body, q + 3) if count > 0 else ()


class Prepared:
    """A client's prepared statement as the proxy knows it: the analyses of its text, the
    parameter types its Parse declared, the text, and, once a Bind of it had the commonest
    layout with its key in a lane, that Bind's `BoundLane`. A Parse of the same name makes
    a new one, and a reload of the map analyses the text again (server.py)."""

    __slots__ = ("analyses", "param_types", "sql", "bound", "bound_tried")

    def __init__(self, analyses: tuple[Analysis, ...], param_types: tuple[int, ...],
                 sql: bytes) -> None:
        self.analyses = analyses
        self.param_types = param_types
        self.sql = sql
        self.bound: BoundLane | None = None
        self.bound_tried = False  # whether `bound` was looked for (StatementRouter.bound_lane)


class BoundLane:
    """How one router reads the key of a Bind of one prepared statement with the layout
    libpq and pgbench send: the unnamed portal, no format codes (all text), the key the
    first value. `head` is what every such Bind starts with, up to the key's length: a
    client that binds the same statement again is recognised by one `startswith`."""

    __slots__ = ("head", "lane", "digits", "router")

    def __init__(self, head: bytes, lane: _Lane, digits: int, router: StatementRouter) -> None:
        self.head = head
        self.lane = lane
        self.digits = digits
        self.router = router


class StatementRouter:
    """Routes statements for one shard map, caching what does not depend on values."""

    def __init__(self, smap: ShardMap) -> None:
        self.smap = smap
        self._simple: dict[bytes, tuple[Analysis, ...]] = {}
        self._prepared: dict[bytes, tuple[Analysis, ...]] = {}
        self.hits = 0
        self.misses = 0
        self._fast_slots: dict[int, object] = {}  # id(analysis) -> its key slot, or None
        self._keep: list[Analysis] = []  # the analyses behind those ids stay alive
        self._reasons: dict[tuple[str, str], str] = {}
        self._fingerprint = FingerprintCache()
        self._merges: dict[bytes, tuple[MergePlan, frozenset[str]] | MergeError] = {}
        # Statement shapes (simple protocol: normalised text; extended: id of the analysis)
        # routed by an integer key alone, and how (`_Lane`); None: not such a statement.
        self._lanes: dict[bytes | int, _Lane | None] = {}
        # The simple-protocol shapes with a lane whose one literal is the key, by the first
        # INTEGER_HEAD bytes of their text (FingerprintCache.integer): (the Query message up
        # to the key, the message after it, the lane).
        self._query_lanes: dict[bytes, list[tuple[bytes, bytes, _Lane]]] = {}
        # (rule name, key) of the last statement planned for one shard by its key, else None:
        # the proxy records the key's heat when the statement is answered (rebalancer/heat.py).
        self.last_key: tuple[str, KeyValue] | None = None

    @property
    def active(self) -> bool:
        """Whether routing can send anything anywhere but the default shard."""
        return self.smap.sharded

    def analyses(self, sql: bytes, cache: dict[bytes, tuple[Analysis, ...]]
                 ) -> tuple[Analysis, ...]:
        found = cache.get(sql)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        statements = split_statements(sql) if b";" in sql else [sql]
        result = tuple(analyze(s, self.smap) for s in statements) or (
            Analysis(Kind.SESSION, reason="empty query"),)
        if len(cache) >= CACHE_LIMIT:
            cache.clear()
            self._fast_slots.clear()
            self._keep.clear()
            self._lanes.clear()
            self._query_lanes.clear()
        cache[sql] = result
        return result

    def query_lane(self, message: bytes) -> SingleShard | None:
        """The plan of a simple Query (`message`: its text and closing NUL) of a known shape
        whose one literal is an integer key with a lane, with no routing context (no
        shardwire.shard or .key set); None for any other query (then `plan_query`). Such a
        query is a statement on a sharded table. It is the shape's text before the key,
        ASCII digits and the text after, as `FingerprintCache.integer` tells; the message is
        read as it is, with no copy of the text."""
        shapes = self._query_lanes.get(message[:INTEGER_HEAD])
        if shapes is None:
            return None
        for before, after, lane in shapes:
            if message.startswith(before) and message.endswith(after):
                text = message[len(before):len(message) - len(after)]
                if len(text) < 19 and text.isdigit():  # ASCII digits: int() reads them
                    value = int(text)
                    bounds = lane.bounds
                    plan = lane.slots[bisect_right(bounds, value)] if bounds is not None else (
                        lane.plan(value))
                    if plan is not None:
                        self.hits += 1
                        self.last_key = (lane.key_of, value)
                    return plan
        return None

    def _query_lane_for(self, sql: bytes, lane: _Lane) -> None:
        """Make `query_lane` answer for queries of the shape of `sql`, a one-integer shape
        (if the fingerprint cache keeps it as one) whose lane, `lane`, was just made. Kept
        as long as the lanes are (cleared with them); a shape it does not keep takes
        `plan_query`'s pattern match, as any shape with more than one literal does."""
        shape = self._fingerprint.integer(sql)
        if shape is None:
            return
        before, after, _ = shape
        shapes = self._query_lanes.setdefault(before[:INTEGER_HEAD], [])
        entry = (before, after + b"\0", lane)
        if entry not in shapes:
            if len(shapes) >= 8:
                del shapes[0]
            shapes.append(entry)

    def plan_query(self, sql: bytes, ctx: RouteContext, timezone: str = "UTC", *,
                   lane_tried: bool = False) -> Plan:
        """The plan of a simple Query (all its statements); `lane_tried`: the caller has
        asked `query_lane` already."""
        fingerprint = self._fingerprint
        if not lane_tried and ctx.shard is None and ctx.key is None:
            laned = self.query_lane(sql + b"\0")
            if laned is not None:
                return laned
        known = fingerprint.match(sql)
        printed: tuple[bytes, tuple[Literal, ...]] | None
        if known is not None:
            shape, found, strings = known
            lane = self._lanes.get(shape)
            if (lane is not None and ctx.shard is None and ctx.key is None
                    and not strings[lane.index]):
                text = found.group(lane.index + 1)
                if len(text) < 19 and text.isdigit():  # ASCII digits: int() reads them
                    value = int(text)
                    plan = lane.plan(value)
                    if plan is not None:
                        self.hits += 1
                        self.last_key = (lane.rule.name, value)
                        return plan
            found_literals = fingerprint.literals(found, strings)
            printed = None if found_literals is None else (shape, found_literals)
        else:
            printed = fingerprint.scan(sql)
        literals: tuple[Literal, ...] = ()
        if printed is not None:
            shape, literals = printed
            analyses = self.analyses(shape, self._simple)
        else:
            analyses = self.analyses(sql, self._prepared)

        def values(slot: Slot, key_type: KeyType) -> KeyValue | None:
            if slot.null:
                return None
            if slot.literal is not None:
                return literal_value(slot, slot.literal, slot.string, key_type, timezone)
            index = slot.param - LITERAL_BASE - 1
            if 0 <= index < len(literals):
                lit = literals[index]
                return literal_value(slot, lit.text, lit.is_string, key_type, timezone)
            raise ValueError(f"no value for ${slot.param}")

        if len(analyses) == 1 and ctx.shard is None and ctx.key is None:
            fast = self._fast(analyses[0], values)
            if fast is not None:
                if printed is not None and shape not in self._lanes:
                    lane = self._lanes[shape] = _lane(
                        analyses[0], self._fast_slots[id(analyses[0])], literal=True)
                    if lane is not None:
                        self._query_lane_for(sql, lane)
                return fast
        return self._general(analyses, values, ctx)

    def _general(self, analyses: Sequence[Analysis],
                 values: Callable[[Slot, KeyType], KeyValue | None], ctx: RouteContext) -> Plan:
        plan = combine([route(a, self.smap, values, ctx) for a in analyses], analyses,
                       self.smap.shards)
        self.last_key = _known_key(analyses, values) if type(plan) is SingleShard else None
        return plan

    def _fast(self, a: Analysis, values: Callable[[Slot, KeyType], KeyValue | None]
              ) -> SingleShard | None:
        """The common case without the general machinery: one sharded table (or tables
        joined on the key) with `key = value`, nothing else to check. None: use `route`. Gives
        the same plan `route` would (the routing cases check both paths)."""
        slot = self._fast_slots.get(id(a), _UNSET)
        if slot is _UNSET:
            slot = _fast_slot(a)
            self._fast_slots[id(a)] = slot
            self._keep.append(a)
        if slot is None:
            return None
        rule = a.rule
        assert rule is not None and isinstance(slot, Slot)
        try:
            value = values(slot, rule.key_type)
            shard = rule.shard_for(value) if value is not None else None
        except (ValueError, TypeError):
            return None
        if shard is None:
            return None
        self.last_key = (rule.name, value)
        reason = self._reasons.get((rule.name, shard))
        if reason is None:
            reason = self._reasons[(rule.name, shard)] = (
                f"{rule.kind.value} rule {rule.name} puts the key on {shard}")
        return SingleShard(shard, reason)

    def merge_plan(self, sql: bytes) -> tuple[MergePlan, frozenset[str]]:
        """How a read across shards runs and merges (cached by text), and the names of the
        functions in it that neither sqlglot nor the merge knows (the executor asks a shard
        whether any is an aggregate); MergeError (0A000: a MergeRefused) when it cannot be
        merged exactly."""
        known = self._merges.get(sql)
        if known is None:
            if len(self.prepared(sql)) != 1:
                known = MergeRefused(
                    "a query string that reads several shards must hold that one statement "
                    "only", "send the statements one by one")
            else:
                try:
                    text = sql.decode("utf-8")
                    known = (plan_merge(text, self.smap), _unknown_functions(text))
                except MergeError as e:
                    known = e
                except UnicodeDecodeError:
                    known = MergeError("22021", "the query is not valid UTF-8")
                except Exception:  # a shape the planner does not expect: refuse, never crash
                    known = MergeRefused(
                        "the statement cannot be planned for a merge across shards",
                        "add a condition on the sharding key that selects one shard")
            if len(self._merges) >= CACHE_LIMIT:
                self._merges.clear()
            self._merges[sql] = known
        if isinstance(known, MergeError):
            raise known
        return known

    def prepared(self, sql: bytes) -> tuple[Analysis, ...]:
        return self.analyses(sql, self._prepared)

    def lane_plan(self, analyses: Sequence[Analysis], param_types: Sequence[int], body: bytes,
                  values_at: int) -> SingleShard | None:
        """The plan of a Bind message (parameter formats from `values_at` on) of a statement
        whose shape has a lane, its key read straight from the message for any layout
        (`_Lane.read`), with no routing context (no shardwire.shard or .key set); None when
        there is no lane or its parameter is not plainly an integer: then `plan_bind` of the
        message read whole. A client that binds the same statement again with the commonest
        layout takes `bound_plan` instead."""
        lane = self._lanes.get(id(analyses[0])) if len(analyses) == 1 else None
        if lane is None:
            return None
        value = lane.read(body, values_at, param_types)
        plan = None if value is None else lane.plan(value)
        if plan is not None:
            self.last_key = (lane.key_of, value)
        return plan

    def bound_lane(self, prepared: Prepared, body: bytes, values_at: int) -> BoundLane | None:
        """The `BoundLane` of a Bind message that `lane_plan` has just planned, when it has
        the commonest layout (see BoundLane); else None."""
        analyses = prepared.analyses
        lane = self._lanes.get(id(analyses[0])) if len(analyses) == 1 else None
        param_types = prepared.param_types
        digits = _INT_DIGITS.get(param_types[0] if param_types else 0)
        if (lane is None or lane.index != 0 or digits is None or body[0] != 0
                or body[values_at:values_at + 2] != b"\0\0"
                or _I16.unpack_from(body, values_at + 2)[0] < 1):
            return None
        return BoundLane(body[:values_at + 4], lane, digits, self)

    def bound_plan(self, bound: BoundLane, body: bytes) -> SingleShard | None:
        """`lane_plan` of a Bind message that starts with `bound.head`, read at the place
        that head fixes; None when `bound` is another map's or the key is not plainly an
        integer (then the message takes the general path)."""
        if bound.router is not self:
            return None
        at = len(bound.head)
        try:
            (length,) = _I32.unpack_from(body, at)
        except struct.error:
            return None
        data = body[at + 4:at + 4 + length]
        if not 0 < length <= bound.digits or len(data) != length or not data.isdigit():
            return None
        value = int(data)
        lane = bound.lane
        bounds = lane.bounds
        plan = lane.slots[bisect_right(bounds, value)] if bounds is not None else (
            lane.plan(value))
        if plan is None:
            return None
        self.last_key = (lane.key_of, value)
        return plan

    def plan_bind(self, analyses: Sequence[Analysis], param_types: Sequence[int],
                  params: BindValues, ctx: RouteContext, timezone: str = "UTC") -> Plan:
        if len(analyses) == 1 and ctx.shard is None and ctx.key is None:
            lane = self._lanes.get(id(analyses[0]))
            if lane is not None:
                value = _bound_integer(lane.index, param_types, params)
                if value is not None:
                    plan = lane.plan(value)
                    if plan is not None:
                        self.last_key = (lane.rule.name, value)
                        return plan

        def values(slot: Slot, key_type: KeyType) -> KeyValue | None:
            if slot.null:
                return None
            if slot.literal is not None:
                return literal_value(slot, slot.literal, slot.string, key_type, timezone)
            index = slot.param - 1
            if not 0 <= index < len(params.values):
                raise ValueError(f"no value for ${slot.param}")
            oid = param_types[index] if index < len(param_types) else 0
            cast_type = _cast_type(slot.cast) if slot.cast else None
            if slot.cast and cast_type is None:
                raise ValueError(f"cannot follow the cast to {slot.cast}")
            data, fmt = params.values[index], params.format_of(index)
            if oid == 0 and fmt == 1 and data is not None:
                # Undeclared (asyncpg sends none): the server gives a parameter compared with
                # or stored into the key column that column's type, or its cast's.
                oid = _inferred_oid(cast_type or key_type, len(data))
            value = decode_param(data, fmt, oid, cast_type or key_type, timezone=timezone)
            if value is None:
                return None
            if cast_type is not None and cast_type is not key_type:
                value = to_key(value, key_type, timezone=timezone)
            return _negated(value) if slot.negate else value

        if len(analyses) == 1 and ctx.shard is None and ctx.key is None:
            fast = self._fast(analyses[0], values)
            if fast is not None:
                a = analyses[0]
                if id(a) not in self._lanes:
                    self._lanes[id(a)] = _lane(a, self._fast_slots[id(a)], literal=False)
                return fast
        return self._general(analyses, values, ctx)


_UNSET = object()


class _Lane:
    """The plan of a statement shape whose only decision is an integer key, `key = value`:
    the value's shard, with no analysis looked at (see `_lane`). It is on the path of most
    statements, so it keeps to a few calls: a range rule is a C bisect over its bounds."""

    __slots__ = ("index", "rule", "plans", "bounds", "slots", "key_of")

    def __init__(self, index: int, rule: Rule) -> None:
        self.index = index  # of the literal (simple protocol) or the parameter (extended)
        self.rule = rule
        self.key_of = rule.name
        self.plans = {shard: SingleShard(shard, f"{rule.kind.value} rule {rule.name} puts "
                                         f"the key on {shard}") for shard in rule.shards}
        # A range rule: bounds in order, and the plan of each interval between them (None
        # for a gap): key k is in interval bisect_right(bounds, k), as [lower, upper) says.
        self.bounds: list[int] | None = None
        self.slots: list[SingleShard | None] = []
        if rule.kind is RuleKind.RANGE and all(
                isinstance(b, int) for r in rule.ranges for b in (r.lower, r.upper)
                if b is not None):
            bounds: list[int] = []
            slots: list[SingleShard | None] = []
            for r in rule.ranges:  # sorted, non-overlapping; an open lower end comes first
                if r.lower is not None and (not slots or bounds[-1] != r.lower):
                    slots.append(None)  # a gap below this range
                    bounds.append(r.lower)
                slots.append(self.plans[r.shard])
                if r.upper is None:
                    break
                bounds.append(r.upper)
            else:
                slots.append(None)  # above the last range
            self.bounds, self.slots = bounds, slots

    def plan(self, value: int) -> SingleShard | None:
        bounds = self.bounds
        if bounds is not None:
            return self.slots[bisect_right(bounds, value)]
        shard = self.rule.shard_for(value)
        return None if shard is None else self.plans[shard]

    def read(self, body: bytes, pos: int, param_types: Sequence[int]) -> int | None:
        """The key of a Bind message whose parameter formats start at `pos`, reading only
        the lane's parameter, in place, for any layout of format codes; None when it is not
        plainly an integer (then the message is read whole: `plan_bind`)."""
        index = self.index
        try:
            (nformats,) = _I16.unpack_from(body, pos)
            if nformats == 0:
                fmt = 0
            elif nformats == 1:
                (fmt,) = _I16.unpack_from(body, pos + 2)
            elif index < nformats:  # one format each (a negative count is not taken)
                (fmt,) = _I16.unpack_from(body, pos + 2 + 2 * index)
            else:
                return None
            at = pos + 2 + 2 * nformats
            nvalues, length = _I16_I32.unpack_from(body, at)
            if index >= nvalues:
                return None
            at += 6  # the first value
            if index:
                for _ in range(index):
                    at += length if length > 0 else 0
                    (length,) = _I32.unpack_from(body, at)
                    at += 4
        except struct.error:
            return None
        if length <= 0 or at + length > len(body):
            return None
        oid = param_types[index] if index < len(param_types) else 0
        if fmt == 1:
            reader = _BINARY_INTS.get((oid, length))
            if reader is None:
                return None
            (value,) = reader.unpack_from(body, at)
        elif fmt == 0:
            digits = _INT_DIGITS.get(oid)
            data = body[at:at + length]
            if digits is None or length > digits or not data.isdigit():
                return None
            value = int(data)
        else:
            return None
        return value


def _lane(a: Analysis, slot: object, *, literal: bool) -> _Lane | None:
    """A lane for a statement `_fast` routed, when its key is an integer literal or parameter
    taken as written (no cast, no minus sign): then `int(text)` or the binary integer is the
    key `_fast` would read, and the lane skips the rest. None for other statements."""
    rule = a.rule
    if (rule is None or not isinstance(slot, Slot) or rule.key_type is not KeyType.INTEGER
            or slot.cast or slot.negate or slot.null or slot.literal is not None
            or slot.string):
        return None
    index = slot.param - (LITERAL_BASE + 1 if literal else 1)
    return _Lane(index, rule) if index >= 0 else None


# Integer parameter types, their binary widths and the digits their text may have to be
# taken without a closer look (int2 up to 9999, int4 up to 999,999,999).
_INT_WIDTHS = {0: (2, 4, 8), 21: (2,), 23: (4,), 20: (8,)}
_INT_DIGITS = {0: 18, 21: 4, 23: 9, 20: 18}
# (type OID, width) of a binary integer parameter -> how to read it.
_BINARY_INTS = {(oid, width): struct.Struct({2: "!h", 4: "!i", 8: "!q"}[width])
                for oid, widths in _INT_WIDTHS.items() for width in widths}
_I16_I32 = struct.Struct("!hi")


def _bound_integer(index: int, param_types: Sequence[int], params: BindValues) -> int | None:
    """A Bind parameter's integer value when it is plainly one (a declared or undeclared
    integer type, in binary or plain digits); None for anything that needs `decode_param`."""
    if index >= len(params.values):
        return None
    data = params.values[index]
    if data is None:
        return None
    oid = param_types[index] if index < len(param_types) else 0
    widths = _INT_WIDTHS.get(oid)
    if widths is None:
        return None
    if params.format_of(index) == 1:
        return int.from_bytes(data, "big", signed=True) if len(data) in widths else None
    if 0 < len(data) <= _INT_DIGITS[oid] and data.isdigit():
        return int(data)
    return None


def _known_key(analyses: Sequence[Analysis],
               values: Callable[[Slot, KeyType], KeyValue | None]
               ) -> tuple[str, KeyValue] | None:
    """(rule, key) of a statement that names one key: `key = value`, or an INSERT of rows
    that all have the same key. For heat statistics only: None whenever it is not that
    simple."""
    if len(analyses) != 1:
        return None
    a = analyses[0]
    rule = a.rule
    if rule is None or a.hint_shard is not None:
        return None
    slots: tuple[Slot | None, ...]
    if a.insert_keys is not None:
        slots = a.insert_keys
    elif len(a.classes) == 1 and isinstance(a.classes[0].condition, Eq):
        slots = (a.classes[0].condition.slot,)
    else:
        return None
    try:
        keys = {values(slot, rule.key_type) if slot is not None else None for slot in slots}
    except (ValueError, TypeError):
        return None
    if len(keys) != 1:
        return None
    key = keys.pop()
    return None if key is None else (rule.name, key)


def _fast_slot(a: Analysis) -> Slot | None:
    """The key slot of a statement that `route` would send wherever `key = slot` maps, with
    nothing else to decide; None for every other statement."""
    rule = a.rule
    if (rule is None or rule.kind is RuleKind.LOOKUP or a.hint_shard is not None
            or a.refusal is not None or a.unsharded or a.reference or a.insert_keys is not None
            or a.new_key is not None or a.kind not in (Kind.READ, Kind.WRITE)
            or len(a.classes) != 1):
        return None
    cond = a.classes[0].condition
    return cond.slot if isinstance(cond, Eq) else None


_CAST_TYPES = {
    "int": KeyType.INTEGER, "integer": KeyType.INTEGER, "int4": KeyType.INTEGER,
    "bigint": KeyType.INTEGER, "int8": KeyType.INTEGER, "smallint": KeyType.INTEGER,
    "int2": KeyType.INTEGER, "numeric": KeyType.NUMERIC, "decimal": KeyType.NUMERIC,
    "text": KeyType.TEXT, "varchar": KeyType.TEXT, "character varying": KeyType.TEXT,
    "date": KeyType.DATE, "timestamp": KeyType.TIMESTAMP,
    "timestamp without time zone": KeyType.TIMESTAMP, "timestamptz": KeyType.TIMESTAMPTZ,
    "timestamp with time zone": KeyType.TIMESTAMPTZ, "uuid": KeyType.UUID,
}


_TYPMOD = re.compile(r"^(char|character|bpchar|numeric|decimal)\s*\(\s*(\d+)\s*"
                     r"(?:,\s*(\d+)\s*)?\)$")


def _cast_type(cast: str) -> KeyType | None:
    """The key type a cast gives its value; None for casts routing does not follow (float,
    money...: their values may change in ways routing would not see)."""
    cast = cast.strip()
    found = _CAST_TYPES.get(cast)
    if found is not None:
        return found
    m = _TYPMOD.match(cast)
    if m:
        return KeyType.NUMERIC if m.group(1) in ("numeric", "decimal") else KeyType.TEXT
    if cast in ("char", "character", "bpchar"):
        return KeyType.TEXT
    return None


def _apply_typmod(cast: str, value: KeyValue) -> KeyValue:
    """What char(n) and numeric(p, s) casts do to a value: char pads to n (compared without
    its trailing spaces, so strip them) and cuts what is longer; numeric rounds to s places
    (half away from zero) and fails past p digits."""
    m = _TYPMOD.match(cast.strip())
    if cast.strip() in ("char", "character", "bpchar"):
        return str(value)[:1].rstrip(" ") if cast.strip() != "bpchar" else str(value).rstrip(" ")
    if not m:
        return value
    if m.group(1) in ("numeric", "decimal"):
        scale = int(m.group(3) or 0)
        rounded = Decimal(value).quantize(Decimal(1).scaleb(-scale), rounding=ROUND_HALF_UP)
        if len(rounded.as_tuple().digits) > int(m.group(2)) and rounded != 0:
            raise ValueError(f"numeric field overflow for {cast}")
        return rounded
    return str(value)[:int(m.group(2))].rstrip(" ")


_TYPE_OIDS = {KeyType.NUMERIC: 1700, KeyType.TEXT: 25, KeyType.DATE: 1082,
              KeyType.TIMESTAMP: 1114, KeyType.TIMESTAMPTZ: 1184, KeyType.UUID: 2950}


def _inferred_oid(key_type: KeyType, length: int) -> int:
    if key_type is KeyType.INTEGER:
        # int2, int4 or int8: the column's width, which the value's length tells.
        return {2: 21, 4: 23, 8: 20}.get(length, 0)
    return _TYPE_OIDS[key_type]


def _negated(value: KeyValue) -> KeyValue:
    if isinstance(value, (int, Decimal)) and not isinstance(value, bool):
        return -value
    raise ValueError("a minus sign before a value that is not a number")


def literal_value(slot: Slot, text: str, is_string: bool, key_type: KeyType,
                  timezone: str) -> KeyValue:
    """A literal's value as the key type, following its cast and minus sign as PostgreSQL
    would. Raises ValueError where routing cannot be sure of PostgreSQL's reading."""
    value: str | int | Decimal | KeyValue = text if is_string else parse_number(text)
    if slot.negate:
        value = _negated(value)
    if slot.cast:
        cast_type = _cast_type(slot.cast)
        if cast_type is None:
            raise ValueError(f"cannot follow the cast to {slot.cast}")
        value = _apply_typmod(slot.cast, to_key(value, cast_type, timezone=timezone))
    return to_key(value, key_type, timezone=timezone)


def combine(plans: list[Plan], analyses: Sequence[Analysis], order: Sequence[str]) -> Plan:
    """One plan for the statements of one query string: their shard when they agree on one,
    else each statement on its own shards in one transaction (`EachStatement`)."""
    if len(plans) == 1:
        return plans[0]
    single: SingleShard | None = None
    spread = False
    for plan in plans:
        if isinstance(plan, (Refusal, NeedLookup)):
            return plan  # a directory read comes first; the string is planned again after it
        if isinstance(plan, MultiShard):
            spread = True
        elif isinstance(plan, SingleShard):
            spread = spread or (single is not None and single.shard != plan.shard)
            single = single or plan
    if not spread:
        return single or plans[0]
    begin = (analyses[0].kind is Kind.TRANSACTION and analyses[-1].kind is Kind.TRANSACTION
             and analyses[0].words[:1] in (("begin",), ("start",))
             and analyses[-1].words[:1] in (("commit",), ("end",)))
    body = slice(1, -1) if begin else slice(None)
    steps: list[SingleShard | AnyShard | MultiShard] = []
    for a, plan in zip(analyses[body], plans[body], strict=True):
        if a.kind in (Kind.SESSION, Kind.TRANSACTION):
            return Refusal("0A000", "the statements of this query string need different "
                           f"shards, and one of them ({' '.join(a.words[:2]).upper()}) "
                           "changes the session or the transaction",
                           hint="send that statement as a query of its own")
        if isinstance(plan, MultiShard) and not plan.write and a.kind is Kind.READ:
            return Refusal("0A000", "a statement of this query string reads rows of several "
                           "shards, which Shardwire merges only for a query of its own",
                           hint="send the statements as separate queries")
        assert isinstance(plan, (SingleShard, AnyShard, MultiShard))
        steps.append(plan)
    used = {s for p in steps if isinstance(p, SingleShard) for s in (p.shard,)} | {
        s for p in steps if isinstance(p, MultiShard) for s in p.shards}
    return EachStatement(tuple(steps), tuple(s for s in order if s in used), begin)


def _unknown_functions(sql: str) -> frozenset[str]:
    """Names of the functions sqlglot does not know in `sql` (user-defined ones among them):
    a user-defined aggregate would otherwise pass for a plain function and its per-shard
    results for rows."""
    try:
        tree = sqlglot.parse_one(fix_comma_params(sql), read="postgres")
    except sqlglot.errors.SqlglotError:
        return frozenset()  # plan_merge parsed it; not expected
    return frozenset(f.name.lower() for f in tree.find_all(exp.Anonymous))
