"""One execution of a merge: shards' DataRows in, the client's DataRows out. No I/O.

Two engines:

- `StreamMerge` (union, ORDER BY, DISTINCT, DISTINCT ON, LIMIT/OFFSET): rows flow through.
  Without ORDER BY a row is handed on as it arrives, byte for byte when nothing must change.
  With ORDER BY it is a k-way merge: a row leaves only when every unfinished shard has a row
  buffered, smallest first; memory is bounded by what the executor lets each shard buffer.
- `AggregateMerge` (GROUP BY, aggregates, HAVING): partial groups are folded into a hash
  table keyed by the group key; rows are produced when every shard has finished, after
  HAVING, DISTINCT, ORDER BY and LIMIT/OFFSET. Memory grows with the number of groups.
"""

from __future__ import annotations

import heapq
import struct
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from . import floats, numeric
from . import pgtypes as t
from . import scalar as s
from .errors import MergeError, MergeRefused, overflow
from .planner import Aggregation, LimitSpec, Mode, Param, Plan, Role
from .wire import Field, encode_data_row, parse_data_row

_I16 = struct.Struct("!h")
_UNPACK_I32 = struct.Struct("!i").unpack_from
_INT8_MIN, _INT8_MAX = -(1 << 63), (1 << 63) - 1

Raw = bytes | None


class Merge:
    """One execution's merge. Single-threaded; the executor calls `columns` once with the
    shards' RowDescription, then `feed`/`finish` per shard and `take` whenever it likes."""

    def __init__(self, plan: Plan, limit: int | None, offset: int, formats: Sequence[int],
                 collation: str, shards: int, extra_float_digits: int) -> None:
        self.plan = plan
        self._limit = limit
        self._offset = offset
        self._formats = tuple(formats)
        self._collation = collation
        self._shards = shards
        self._efd = extra_float_digits
        self._rows = 0
        self._complete = limit == 0
        self._finished = [False] * shards
        self._fields: list[Field] | None = None
        self._n_visible = 0

    # -- interface

    def columns(self, fields: list[Field]) -> list[Field]:  # pragma: no cover - abstract
        raise NotImplementedError

    def feed(self, shard: int, rows: list[bytes]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def finish(self, shard: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def take(self) -> list[bytes]:  # pragma: no cover - abstract
        raise NotImplementedError

    def buffered(self, shard: int) -> int:
        return 0

    @property
    def complete(self) -> bool:
        """No more rows will be produced: the executor may cancel unfinished shards."""
        return self._complete

    @property
    def rows(self) -> int:
        """Rows handed to the client so far."""
        return self._rows

    # -- shared

    def _resolve(self, col: int) -> int:
        return col if col >= 0 else self._n_visible + ~col

    def _client_fields(self, fields: list[Field]) -> tuple[list[Field], list[int]]:
        n = len(fields)
        n_visible = n - self.plan.hidden
        if n_visible < 0:
            raise MergeError("XX000", f"the shards returned {n} columns, fewer than the "
                             f"{self.plan.hidden} helper columns the merge added")
        self._fields = fields
        self._n_visible = n_visible
        formats = self._formats
        if not formats:
            per = [0] * n_visible
        elif len(formats) == 1:
            per = [formats[0]] * n_visible
        elif len(formats) == n_visible:
            per = list(formats)
        else:
            raise MergeError("08P01", f"bind message has {len(formats)} result formats but "
                             f"query has {n_visible} columns")
        for f in per:
            if f not in (0, 1):
                raise MergeError("22023", f"unsupported format code: {f}")
        return [fields[i].with_format(per[i]) for i in range(n_visible)], per

    def _binary_check(self, per: list[int], skip: frozenset[int] = frozenset()) -> list[
            tuple[int, Callable[[bytes], bytes]]]:
        """Encoders for the columns the client wants in binary (the shards send text)."""
        assert self._fields is not None
        out = []
        for i, fmt in enumerate(per):
            if fmt != 1 or i in skip:
                continue
            oid = self._fields[i].type_oid
            enc = t.TO_BINARY.get(oid)
            if enc is None:
                raise MergeRefused(
                    f"the client asked binary format for column {self._fields[i].name!r} of "
                    f"type {t.type_name(oid)}, which the proxy cannot encode in a multi-shard "
                    "result", hint="ask for text format for this column")
            if oid in t.FLOAT_TYPES and self._efd < 1:
                raise MergeRefused(
                    "binary float output of a multi-shard result needs extra_float_digits "
                    ">= 1", hint="SET extra_float_digits = 1, or ask for text format")
            out.append((i, enc))
        return out

    def _sort_key_fn(self, oid: int, collation: str | None, what: str) -> Callable[
            [bytes], Any]:
        key = t.SORT_KEY.get(oid)
        if key is None:
            raise MergeRefused(
                f"cannot {what} a value of type {t.type_name(oid)} across shards: the proxy "
                "cannot compare it as PostgreSQL does",
                hint="order by a column of a numeric, text, date/time, boolean, uuid or bytea "
                "type, or cast the value (to text under the C collation, for example)")
        if oid in t.COLLATABLE:
            name = collation if collation is not None else self._collation
            if not t.is_c_collation(name):
                raise MergeRefused(
                    f'cannot {what} text under the collation "{name}" across shards: the '
                    "proxy compares text only as the C collation does",
                    hint='add COLLATE "C" to the key (ORDER BY name COLLATE "C"), or use a '
                    "database whose collation is C")
        return key


def _resolve_limit(spec: LimitSpec | None, params: Mapping[int, int | None]) -> tuple[
        int | None, int, bool]:
    if spec is None:
        return None, 0, False

    def value(v: int | Param | None) -> int | None:
        if isinstance(v, Param):
            if v.number not in params:
                raise MergeError("08P01", f"no value for parameter ${v.number} of LIMIT/OFFSET")
            return params[v.number]
        return v
    count = value(spec.count)
    offset = value(spec.offset)
    if spec.with_ties and count is None and spec.count is not None:
        raise MergeError("2201W", "row count cannot be null in FETCH FIRST ... WITH TIES "
                         "clause")
    if count is not None and count < 0:
        raise MergeError("2201W", "LIMIT must not be negative")
    if offset is not None and offset < 0:
        raise MergeError("2201X", "OFFSET must not be negative")
    return count, offset or 0, spec.with_ties


def start(plan: Plan, params: Mapping[int, int | None], client_formats: Sequence[int],
          collation: str, shards: int, extra_float_digits: int) -> Merge:
    limit, offset, _ = _resolve_limit(plan.limit, params)
    if plan.mode is Mode.AGGREGATE:
        return AggregateMerge(plan, limit, offset, client_formats, collation, shards,
                              extra_float_digits)
    return StreamMerge(plan, limit, offset, client_formats, collation, shards,
                       extra_float_digits)


# -- reading rows ---------------------------------------------------------------------------


def make_reader(positions: Sequence[int], n_visible: int, strip: bool) -> Callable[
        [bytes], tuple[list[Raw], int]]:
    """A function of a DataRow body: the values at `positions` (in that order) and the byte
    offset where the visible columns end (0 unless `strip`)."""
    slots: dict[int, int] = {}
    for k, p in enumerate(positions):
        slots.setdefault(p, k)
    last = max(list(positions) + ([n_visible - 1] if strip else []), default=-1)
    width = len(positions)
    vis_last = n_visible - 1 if strip else -2
    want = [slots.get(i, -1) for i in range(last + 1)]
    dup = len(slots) != len(positions)
    unpack = _UNPACK_I32

    if width == 1 and not strip and not dup:
        target = positions[0]

        def read_one(body: bytes) -> tuple[list[Raw], int]:
            pos = 2
            i = 0
            while True:
                (n,) = unpack(body, pos)
                pos += 4
                if i == target:
                    return [body[pos:pos + n] if n >= 0 else None], 0
                if n > 0:
                    pos += n
                i += 1
        return read_one

    def read(body: bytes) -> tuple[list[Raw], int]:
        out: list[Raw] = [None] * width
        pos = 2
        cut = 0
        i = 0
        for k in want:
            (n,) = unpack(body, pos)
            pos += 4
            if n >= 0:
                if k >= 0:
                    out[k] = body[pos:pos + n]
                pos += n
            if i == vis_last:
                cut = pos
            i += 1
        if dup:
            for k, p in enumerate(positions):
                out[k] = out[slots[p]]
        return out, cut
    return read


# -- streaming ------------------------------------------------------------------------------


class StreamMerge(Merge):
    def __init__(self, plan: Plan, limit: int | None, offset: int, formats: Sequence[int],
                 collation: str, shards: int, extra_float_digits: int) -> None:
        super().__init__(plan, limit, offset, formats, collation, shards, extra_float_digits)
        self._with_ties = plan.limit is not None and plan.limit.with_ties
        self._out: list[bytes] = []
        self._queues: list[deque[tuple[Any, int, Any]]] = [deque() for _ in range(shards)]
        self._in_heap = [False] * shards
        self._waiting = shards  # unfinished shards with no row buffered
        self._heap: list[tuple[Any, int, Any]] = []
        self._ready = False
        self._last_key: Any = None
        self._run_key: Any = None
        self._seen: set[Any] = set()
        self._sorted = plan.mode is Mode.SORT

    def columns(self, fields: list[Field]) -> list[Field]:
        client, per = self._client_fields(fields)
        plan = self.plan
        n_visible = self._n_visible
        positions: list[int] = []
        key_parts: list[tuple[int, Callable[[bytes], Any], int]] = []
        for key in plan.sort:
            col = self._resolve(key.col)
            if not 0 <= col < len(fields):
                raise MergeError("42P10", f"ORDER BY position {key.col + 1} is not in select "
                                 "list")
            fn = self._sort_key_fn(fields[col].type_oid, key.collation, "ORDER BY")
            if key.desc:
                fn = t.descending(fn, fields[col].type_oid)
            # NULLs: +1 sorts them after every value, -1 before.
            key_parts.append((len(positions), fn, -1 if key.nulls_first else 1))
            positions.append(col)
        eq_parts: list[tuple[int, Callable[[bytes], Any]]] = []
        if plan.distinct:
            for col in range(n_visible):
                eq_parts.append((len(positions), self._equality(col)))
                positions.append(col)
        on_parts: list[tuple[int, Callable[[bytes], Any]]] = []
        for c in plan.distinct_on:
            col = self._resolve(c)
            on_parts.append((len(positions), self._equality(col)))
            positions.append(col)
        binary = self._binary_check(per)
        strip = plan.hidden > 0
        self._strip = strip
        self._reader = make_reader(positions, n_visible, strip) if positions or strip else None
        self._key = _tuple_fn(key_parts) if key_parts else None
        self._eq = _eq_fn(eq_parts) if eq_parts else None
        self._on = _eq_fn(on_parts) if on_parts else None
        self._binary = binary
        self._head = _I16.pack(n_visible)
        self._passthrough = not strip and not binary
        self._ready = True
        return client

    def _equality(self, col: int) -> Callable[[bytes], Any]:
        assert self._fields is not None
        oid = self._fields[col].type_oid
        fn = t.EQUALITY_KEY.get(oid)
        if fn is None:
            raise MergeRefused(
                f"cannot remove duplicates of type {t.type_name(oid)} across shards: the proxy "
                "cannot tell equal values apart from their text",
                hint="cast the column to a simple type, or include the sharding key in the "
                "DISTINCT columns")
        return fn

    # -- rows

    def _output(self, body: bytes, cut: int) -> bytes:
        if self._strip:
            body = self._head + body[2:cut]
        if self._binary:
            values = parse_data_row(body)
            for i, enc in self._binary:
                v = values[i]
                if v is not None:
                    values[i] = enc(v)
            body = encode_data_row(values)
        return body

    def feed(self, shard: int, rows: list[bytes]) -> None:
        if not self._ready:
            raise MergeError("XX000", "merge: feed() before columns()")
        if self._complete or not rows:
            return
        if not self._sorted:
            self._union(rows)
            return
        read = self._reader
        key = self._key
        assert read is not None and key is not None
        entries: list[tuple[Any, int, Any]] = []
        for body in rows:
            raws, cut = read(body)
            entries.append((key(raws), shard, body if not cut else (body, cut, raws)))
        q = self._queues[shard]
        if not self._in_heap[shard]:
            heapq.heappush(self._heap, entries[0])
            self._in_heap[shard] = True
            self._waiting -= 1
            q.extend(entries[1:])
        else:
            q.extend(entries)
        self._pump()

    def finish(self, shard: int) -> None:
        if self._finished[shard]:
            return
        self._finished[shard] = True
        if self._sorted:
            if not self._in_heap[shard]:
                self._waiting -= 1
            self._pump()
        if all(self._finished):
            self._complete = True

    def take(self) -> list[bytes]:
        out = self._out
        self._out = []
        return out

    def buffered(self, shard: int) -> int:
        if not self._sorted:
            return 0
        return len(self._queues[shard]) + self._in_heap[shard]

    def _stop(self) -> None:
        self._complete = True
        self._heap.clear()
        for q in self._queues:
            q.clear()

    def _union(self, rows: list[bytes]) -> None:
        if self._passthrough and self._eq is None and self._on is None:
            # The common case: hand the bodies on untouched.
            if self._offset:
                k = min(self._offset, len(rows))
                self._offset -= k
                rows = rows[k:]
            if self._limit is not None:
                rows = rows[:self._limit]
                self._limit -= len(rows)
                if self._limit == 0:
                    self._complete = True
            self._out.extend(rows)
            self._rows += len(rows)
            return
        for body in rows:
            if self._complete:
                return
            raws: list[Raw]
            cut = 0
            if self._reader is not None:
                raws, cut = self._reader(body)
            else:
                raws = []
            test = self._eq if self._eq is not None else self._on
            if test is not None:
                seen_key = test(raws)
                if seen_key in self._seen:
                    continue
                self._seen.add(seen_key)
            self._emit(body, cut, None)

    def _emit(self, body: bytes, cut: int, key: Any) -> None:
        if self._offset:
            self._offset -= 1
            return
        if self._limit is not None:
            if self._limit == 0:
                if not (self._with_ties and key == self._last_key):
                    self._stop()
                    return
            else:
                self._limit -= 1
                self._last_key = key
        self._out.append(body if self._passthrough else self._output(body, cut))
        self._rows += 1
        if self._limit == 0 and not self._with_ties:
            self._stop()

    def _pump(self) -> None:
        heap = self._heap
        queues = self._queues
        in_heap = self._in_heap
        finished = self._finished
        eq = self._eq
        on = self._on
        heapreplace = heapq.heapreplace
        heappop = heapq.heappop
        while heap and self._waiting == 0 and not self._complete:
            entry = heap[0]
            shard = entry[1]
            q = queues[shard]
            if q:
                heapreplace(heap, q.popleft())
            else:
                heappop(heap)
                in_heap[shard] = False
                if not finished[shard]:
                    self._waiting += 1
            key = entry[0]
            payload = entry[2]
            if isinstance(payload, tuple):
                body, cut, raws = payload
            else:
                body, cut, raws = payload, 0, None
            if eq is not None or on is not None:
                if raws is None:
                    raws = self._reader(body)[0]  # type: ignore[misc]
                if on is not None:
                    k = on(raws)
                    if k == self._run_key and self._run_key is not None:
                        continue
                    self._run_key = k
                else:
                    assert eq is not None
                    if key != self._run_key:
                        self._run_key = key
                        self._seen = set()
                    k = eq(raws)
                    if k in self._seen:
                        continue
                    self._seen.add(k)
            self._emit(body, cut, key)


def _tuple_fn(parts: list[tuple[int, Callable[[bytes], Any], int]]) -> Callable[
        [list[Raw]], tuple[Any, ...]]:
    """Sort key of a row: (null rank, value) per ORDER BY key, flattened."""
    if len(parts) == 1:
        (i, fn, null_rank) = parts[0]
        null_key = (null_rank, 0)

        def one(raws: list[Raw]) -> tuple[Any, ...]:
            v = raws[i]
            return null_key if v is None else (0, fn(v))
        return one

    if len(parts) == 2:
        (i1, fn1, n1), (i2, fn2, n2) = parts

        def two(raws: list[Raw]) -> tuple[Any, ...]:
            a = raws[i1]
            b = raws[i2]
            if a is not None and b is not None:
                return (0, fn1(a), 0, fn2(b))
            return ((n1, 0) if a is None else (0, fn1(a))) + (
                (n2, 0) if b is None else (0, fn2(b)))
        return two

    def many(raws: list[Raw]) -> tuple[Any, ...]:
        out: list[Any] = []
        for i, fn, null_rank in parts:
            v = raws[i]
            if v is None:
                out.append(null_rank)
                out.append(0)
            else:
                out.append(0)
                out.append(fn(v))
        return tuple(out)
    return many


def _eq_fn(parts: list[tuple[int, Callable[[bytes], Any]]]) -> Callable[
        [list[Raw]], tuple[Any, ...]]:
    def key(raws: list[Raw]) -> tuple[Any, ...]:
        return tuple(None if (v := raws[i]) is None else fn(v) for i, fn in parts)
    return key


# -- re-aggregation ---------------------------------------------------------------------------


class AggregateMerge(Merge, s.Columns):
    def __init__(self, plan: Plan, limit: int | None, offset: int, formats: Sequence[int],
                 collation: str, shards: int, extra_float_digits: int) -> None:
        super().__init__(plan, limit, offset, formats, collation, shards, extra_float_digits)
        assert plan.aggregation is not None
        self.agg: Aggregation = plan.aggregation
        self._groups: dict[tuple[Any, ...], list[Any]] = {}
        self._out: list[bytes] = []
        self._done = False
        self._ready = False
        self._complete = False  # even LIMIT 0: the shards' rows are read to the end

    # -- scalar.Columns: what trees see of the merged columns

    def kind(self, col: int) -> str:
        c = self._resolve(col)
        role = self._role_of.get(c)
        assert self._fields is not None
        oid = self._fields[c].type_oid
        if role is Role.COUNT:
            return "int8"
        if role is Role.SUM:
            kind = s.kind_of_oid(oid)
            if kind not in ("int8", "numeric", "float4", "float8"):
                raise MergeRefused(f"cannot merge sum() of {t.type_name(oid)} across shards",
                                   hint="sum() merges for integer, numeric, real and double "
                                   "precision values")
            return kind
        if role in (Role.AND, Role.OR):
            return "bool"
        return s.kind_of_oid(oid)

    def getter(self, col: int) -> s.Getter:
        c = self._resolve(col)
        j = self._slot[c]
        role = self._role_of[c]
        assert self._fields is not None
        oid = self._fields[c].type_oid
        if role in (Role.COUNT, Role.AND, Role.OR):
            return lambda group: group[j]
        if role is Role.SUM:
            if oid == t.INT8:
                def int8_sum(group: list[Any]) -> Any:
                    v = group[j]
                    if v is not None and not _INT8_MIN <= v <= _INT8_MAX:
                        raise overflow("bigint")
                    return v
                return int8_sum
            return lambda group: group[j]
        kind = s.kind_of_oid(oid)
        decode = _DECODERS.get(kind)
        if oid == t.BPCHAR:
            decode = _bpchar_value  # character(n) compares without its padding
        if decode is None:
            decode = self._sort_key_fn(oid, None, "compare")
        minmax = role in (Role.MIN, Role.MAX)

        def raw_value(group: list[Any]) -> Any:
            v = group[j]
            if minmax:
                v = None if v is None else v[1]
            return None if v is None else decode(v)
        return raw_value

    def text_collation_is_c(self) -> bool:
        return t.is_c_collation(self._collation)

    # -- columns

    def columns(self, fields: list[Field]) -> list[Field]:
        client, per = self._client_fields(fields)
        agg = self.agg
        n_visible = self._n_visible
        roles = {self._resolve(r.col): r for r in agg.roles}
        if agg.star is not None:
            # The columns of a `*` item are constant within a group (PostgreSQL checked).
            width = n_visible - (len(agg.outputs) - 1)
            first = self._resolve(agg.star)
            for c in range(first, first + width):
                if c not in roles:
                    roles[c] = _FirstRole(c)  # type: ignore[assignment]
        self._role_of = {c: r.role for c, r in roles.items()}
        positions = sorted(roles)
        for c in positions:
            if not 0 <= c < len(fields):
                raise MergeError("42P10", f"GROUP BY position {c + 1} is not in select list")
        self._slot = {c: k for k, c in enumerate(positions)}
        self._reader = make_reader(positions, n_visible, False)
        inits: list[Callable[[Raw], Any]] = []
        combines: list[tuple[int, Callable[[Any, Raw], Any]]] = []
        for k, c in enumerate(positions):
            init, combine = self._role_fns(c, roles[c].role, roles[c].collation)
            inits.append(init)
            if combine is not None:
                combines.append((k, combine))
        self._inits = inits
        self._combines = combines
        group_slots = []
        for g in agg.group:
            c = self._resolve(g)
            oid = fields[c].type_oid
            fn = t.EQUALITY_KEY.get(oid)
            if fn is None:
                raise MergeRefused(
                    f"cannot GROUP BY a value of type {t.type_name(oid)} across shards: the "
                    "proxy cannot tell equal values apart from their text",
                    hint="group by a simpler type (cast it), or GROUP BY the sharding key so "
                    "that each group stays on one shard")
            group_slots.append((self._slot[c], fn))
        self._group_slots = group_slots

        # Outputs: the client's columns, from merged columns or computed.
        out_fns: list[Callable[[list[Any]], Raw]] = []
        value_fns: list[tuple[str, s.Getter] | None] = []
        expanded: list[s.Node] = []
        for i, node in enumerate(agg.outputs):
            if agg.star is not None and i == agg.star:
                width = n_visible - (len(agg.outputs) - 1)
                first = self._resolve(agg.star)
                expanded.extend(s.Ref(c) for c in range(first, first + width))
            else:
                expanded.append(node)
        if len(expanded) != n_visible:
            raise MergeError("XX000", f"the merge expected {len(expanded)} columns, the shards "
                             f"returned {n_visible}")
        for col, node in enumerate(expanded):
            fmt = per[col]
            oid = fields[col].type_oid
            if isinstance(node, s.Ref) and self._role_of.get(self._resolve(node.col)) in (
                    Role.KEY, Role.FIRST, Role.MIN, Role.MAX):
                c = self._resolve(node.col)
                j = self._slot[c]
                minmax = self._role_of[c] in (Role.MIN, Role.MAX)
                enc = None
                if fmt == 1:
                    enc = self._binary_check([1 if i == c else 0 for i in range(c + 1)])[0][1]
                out_fns.append(_raw_output(j, minmax, enc))
                value_fns.append(None)
                continue
            bound = s.bind(node, self)
            if fmt == 1:
                encode = s.binary_encoder(bound.kind, oid)
            else:
                encode = s.text_encoder(bound.kind, oid, self._efd)
            out_fns.append(_computed_output(bound.fn, encode))
            value_fns.append((bound.kind, bound.fn))
        self._out_fns = out_fns
        self._value_fns = value_fns
        self._having = s.bind(agg.having, self).fn if agg.having is not None else None
        if agg.having is not None and s.bind(agg.having, self).kind not in ("bool", "null"):
            raise MergeError("42804", "argument of HAVING must be type boolean")
        self._order = [self._order_fn(term.node, term.desc, term.nulls_first, term.collation)
                       for term in agg.order]
        self._distinct_on = [self._order_fn(n, False, False, None) for n in agg.distinct_on]
        if agg.distinct:
            self._distinct_eq = [self._output_eq(col, node, value_fns[col])
                                 for col, node in enumerate(expanded)]
        self._ready = True
        return client

    def _output_eq(self, col: int, node: s.Node, value: tuple[str, s.Getter] | None) -> Callable[
            [list[Any]], Any]:
        """Equality key of an output column, for DISTINCT."""
        if value is not None:
            kind, fn = value
            return lambda g: s._cmp_key(fn(g))
        assert isinstance(node, s.Ref) and self._fields is not None
        c = self._resolve(node.col)
        j = self._slot[c]
        minmax = self._role_of[c] in (Role.MIN, Role.MAX)
        eq = t.EQUALITY_KEY.get(self._fields[c].type_oid)
        if eq is None:
            raise MergeRefused(
                f"cannot remove duplicates of type {t.type_name(self._fields[c].type_oid)} "
                "across shards", hint="cast the column to a simple type")

        def key(g: list[Any]) -> Any:
            v = g[j]
            if minmax and v is not None:
                v = v[1]
            return None if v is None else eq(v)
        return key

    def _order_fn(self, node: s.Node, desc: bool, nulls_first: bool,
                  collation: str | None) -> Callable[[list[Any]], tuple[int, Any]]:
        assert self._fields is not None
        if isinstance(node, s.Ref):
            c = self._resolve(node.col)
            role = self._role_of.get(c)
            if role in (Role.KEY, Role.FIRST, Role.MIN, Role.MAX):
                oid = self._fields[c].type_oid
                fn = self._sort_key_fn(oid, collation, "ORDER BY")
                if desc:
                    fn = t.descending(fn, oid)
                j = self._slot[c]
                minmax = role in (Role.MIN, Role.MAX)
                null = (-1 if nulls_first else 1, 0)

                def raw_key(g: list[Any]) -> tuple[int, Any]:
                    v = g[j]
                    if minmax and v is not None:
                        v = v[1]
                    return null if v is None else (0, fn(v))
                return raw_key
        bound = s.bind(node, self)
        if bound.kind == "text":
            name = collation if collation is not None else self._collation
            if not t.is_c_collation(name):
                raise MergeRefused(
                    f'cannot ORDER BY text under the collation "{name}" across shards',
                    hint='add COLLATE "C" to the key, or use a database whose collation is C')
        key = s.order_key(bound.kind, desc)
        value = bound.fn
        null = (-1 if nulls_first else 1, 0)

        def computed_key(g: list[Any]) -> tuple[int, Any]:
            v = value(g)
            return null if v is None else (0, key(v))
        return computed_key

    def _role_fns(self, col: int, role: Role, collation: str | None) -> tuple[
            Callable[[Raw], Any], Callable[[Any, Raw], Any] | None]:
        assert self._fields is not None
        oid = self._fields[col].type_oid
        if role in (Role.KEY, Role.FIRST):
            return _identity, None
        if role is Role.COUNT:
            return _count_init, _count_add
        if role is Role.SUM:
            kind = self.kind(col)
            return _SUMS[kind]
        if role in (Role.AND, Role.OR):
            return (t.read_bool_or_none, _and if role is Role.AND else _or)
        key = self._sort_key_fn(oid, collation, "compute min()/max() of")
        return _minmax(key, role is Role.MAX)

    # -- rows

    def feed(self, shard: int, rows: list[bytes]) -> None:
        if not self._ready:
            raise MergeError("XX000", "merge: feed() before columns()")
        groups = self._groups
        read = self._reader
        group_slots = self._group_slots
        inits = self._inits
        combines = self._combines
        for body in rows:
            raws, _ = read(body)
            gk = tuple(None if (v := raws[j]) is None else fn(v) for j, fn in group_slots)
            state = groups.get(gk)
            if state is None:
                groups[gk] = [init(raw) for init, raw in zip(inits, raws, strict=True)]
            else:
                for k, combine in combines:
                    state[k] = combine(state[k], raws[k])

    def finish(self, shard: int) -> None:
        self._finished[shard] = True
        if all(self._finished) and not self._done:
            self._done = True
            self._produce()

    def take(self) -> list[bytes]:
        out = self._out
        self._out = []
        return out

    def _produce(self) -> None:
        agg = self.agg
        groups = list(self._groups.values())
        self._groups = {}
        if not groups and not agg.group:
            # No GROUP BY: one row even when no shard returned one.
            groups = [[init(None) for init in self._inits]]
        if self._having is not None:
            having = self._having
            groups = [g for g in groups if having(g) is True]
        if agg.distinct:
            seen: set[Any] = set()
            unique = []
            for g in groups:
                k = tuple(fn(g) for fn in self._distinct_eq)
                if k not in seen:
                    seen.add(k)
                    unique.append(g)
            groups = unique
        if self._order:
            order = self._order
            groups.sort(key=lambda g: tuple(part for fn in order for part in fn(g)))
        if self._distinct_on:
            on = self._distinct_on
            kept = []
            last: Any = object()
            for g in groups:
                k = tuple(fn(g) for fn in on)
                if k != last:
                    kept.append(g)
                    last = k
            groups = kept
        start = self._offset
        if self._limit is not None:
            end = start + self._limit
            if self.plan.limit is not None and self.plan.limit.with_ties and self._order:
                order = self._order
                last_key = None
                while end < len(groups) and end > start:
                    last_key = last_key or tuple(p for fn in order for p in fn(groups[end - 1]))
                    if tuple(p for fn in order for p in fn(groups[end])) != last_key:
                        break
                    end += 1
            groups = groups[start:end]
        else:
            groups = groups[start:]
        out_fns = self._out_fns
        self._out = [encode_data_row([fn(g) for fn in out_fns]) for g in groups]
        self._rows = len(self._out)
        self._complete = True


class _FirstRole:
    """The role of a column that a `*` brings into an aggregate query."""

    def __init__(self, col: int) -> None:
        self.col = col
        self.role = Role.FIRST
        self.collation = None


def _identity(raw: Raw) -> Raw:
    return raw


def _count_init(raw: Raw) -> int:
    return int(raw) if raw is not None else 0


def _count_add(state: int, raw: Raw) -> int:
    return state + int(raw) if raw is not None else state


def _and(state: bool | None, raw: Raw) -> bool | None:
    if raw is None:
        return state
    v = raw == b"t"
    return v if state is None else (state and v)


def _or(state: bool | None, raw: Raw) -> bool | None:
    if raw is None:
        return state
    v = raw == b"t"
    return v if state is None else (state or v)


def _minmax(key: Callable[[bytes], Any], largest: bool) -> tuple[
        Callable[[Raw], Any], Callable[[Any, Raw], Any]]:
    def init(raw: Raw) -> Any:
        return None if raw is None else (key(raw), raw)

    def combine(state: Any, raw: Raw) -> Any:
        if raw is None:
            return state
        k = key(raw)
        if state is None:
            return (k, raw)
        if (k > state[0]) if largest else (k < state[0]):
            return (k, raw)
        return state
    return init, combine


def _sum_fns(read: Callable[[bytes], Any], add: Callable[[Any, Any], Any]) -> tuple[
        Callable[[Raw], Any], Callable[[Any, Raw], Any]]:
    def init(raw: Raw) -> Any:
        return None if raw is None else read(raw)

    def combine(state: Any, raw: Raw) -> Any:
        if raw is None:
            return state
        v = read(raw)
        return v if state is None else add(state, v)
    return init, combine


def _float8_add(a: float, b: float) -> float:
    r = a + b
    if r in (float("inf"), float("-inf")) and a not in (float("inf"), float("-inf")) and \
            b not in (float("inf"), float("-inf")):
        raise floats.overflow()
    return r


def _float4_add(a: float, b: float) -> float:
    return floats.to_float4(_float8_add(a, b))


_SUMS = {
    "int8": _sum_fns(int, lambda a, b: a + b),
    "numeric": _sum_fns(t.read_numeric, numeric.add),
    "float8": _sum_fns(float, _float8_add),
    "float4": _sum_fns(float, _float4_add),
}

_DECODERS: dict[str, Callable[[bytes], Any]] = {
    "int2": int, "int4": int, "int8": int, "numeric": t.read_numeric, "float4": float,
    "float8": float, "bool": t.read_bool, "text": bytes,
}


def _bpchar_value(raw: bytes) -> bytes:
    return raw.rstrip(b" ")


def _raw_output(j: int, minmax: bool, enc: Callable[[bytes], bytes] | None) -> Callable[
        [list[Any]], Raw]:
    def out(g: list[Any]) -> Raw:
        v = g[j]
        if minmax and v is not None:
            v = v[1]
        if v is None or enc is None:
            return v
        return enc(v)
    return out


def _computed_output(value: s.Getter, encode: Callable[[Any], bytes]) -> Callable[
        [list[Any]], Raw]:
    def out(g: list[Any]) -> Raw:
        v = value(g)
        return None if v is None else encode(v)
    return out


__all__ = ["Merge", "StreamMerge", "AggregateMerge", "start", "make_reader", "Decimal"]
