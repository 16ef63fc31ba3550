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

import abc
import bisect
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from . import floats, numeric
from . import pgtypes as t
from . import scalar as s
from .errors import MergeError, MergeRefused, overflow
from .planner import Aggregation, LimitSpec, Mode, Param, Plan, Role
from .wire import (
    FRAME_HEADER,
    Field,
    data_row_frame,
    encode_data_row,
    encode_row_description,
    parse_row_description,
)

_I16 = struct.Struct("!h")
_DATA_ROW_HEAD = struct.Struct("!cIh")  # type, length, column count
_UNPACK_I32 = struct.Struct("!i").unpack_from
_INT8_MIN, _INT8_MAX = -(1 << 63), (1 << 63) - 1

Raw = bytes | None


class Merge(abc.ABC):
    """One execution's merge. Single-threaded; the executor calls `columns` (or `describe`)
    once with the shards' RowDescription, then `feed`/`finish` per shard and `take` whenever
    it likes."""

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
        self._base = 0  # where a row's body starts in what feed() gets: 0, or FRAME_HEADER

    # -- interface

    @abc.abstractmethod
    def columns(self, fields: list[Field]) -> list[Field]:
        ...

    def describe(self, row_description: bytes, *, frames: bool = False) -> bytes:
        """`columns` from the shards' RowDescription as it came (the message body); returns
        the client's RowDescription body.

        With `frames`, `feed` takes and `take` returns whole DataRow messages (type byte and
        length word included) instead of bodies: rows that need no change go to the client
        as they came from the shard, without being framed again. The merges keep what this
        builds per plan and RowDescription, so that the next execution of a cached plan
        skips it."""
        self._base = FRAME_HEADER if frames else 0
        return encode_row_description(self.columns(parse_row_description(row_description)))

    @abc.abstractmethod
    def feed(self, shard: int, rows: list[bytes]) -> None:
        ...

    @abc.abstractmethod
    def finish(self, shard: int) -> None:
        ...

    @abc.abstractmethod
    def take(self) -> list[bytes]:
        ...

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


def make_reader(positions: Sequence[int], n_visible: int, strip: bool, base: int = 0) -> Callable[
        [bytes], tuple[list[Raw], int]]:
    """A function of a DataRow (its body; its whole message when `base` is FRAME_HEADER):
    the values at `positions` (in that order) and the byte offset where the visible columns
    end (0 unless `strip`)."""
    slots: dict[int, int] = {}
    for k, p in enumerate(positions):
        slots.setdefault(p, k)
    last = max(list(positions) + ([n_visible - 1] if strip else []), default=-1)
    width = len(positions)
    vis_last = n_visible - 1 if strip else -2
    want = [slots.get(i, -1) for i in range(last + 1)]
    dup = len(slots) != len(positions)
    unpack = _UNPACK_I32
    start = base + 2

    if width == 1 and not strip and not dup:
        target = positions[0]

        def read_one(body: bytes) -> tuple[list[Raw], int]:
            pos = start
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
        pos = start
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


# Sort keys. A row's key is the comparable value of its ORDER BY column (or a tuple of them,
# for several keys), read straight from the DataRow; a NULL is t.NULLS_LAST or t.NULLS_FIRST.
# Keys are computed a batch at a time, as the shard's rows arrive.

_INTEGERS = frozenset({t.INT2, t.INT4, t.INT8, t.OID})
# Integer text of up to 15 characters is read as a float: exact (below 2**53), and faster
# than int(); floats and ints compare (and hash) exactly with each other.
_EXACT_FLOAT_DIGITS = 15


@dataclass(frozen=True, slots=True)
class _KeyPart:
    col: int  # column position in the shards' rows
    value: Callable[[bytes], Any]  # sort key of a non-NULL value's text, descending applied
    null: Any  # t.NULLS_LAST or t.NULLS_FIRST
    integer: bool  # an integer type (`value` is _integer_key or _integer_key_desc)
    desc: bool


def _integer_key(raw: bytes) -> float | int:
    return float(raw) if len(raw) <= _EXACT_FLOAT_DIGITS else int(raw)


def _integer_key_desc(raw: bytes) -> float | int:
    return -float(raw) if len(raw) <= _EXACT_FLOAT_DIGITS else -int(raw)


# A batch of rows -> their sort keys, and the rows without their helper columns (None: the
# rows as they came).
RowKeys = Callable[[list[bytes]], tuple[list[Any], list[bytes] | None]]


def _first_integer_keys(start: int, null: Any, desc: bool) -> RowKeys:
    """ORDER BY an integer first column, the common `ORDER BY id`."""
    low = start + 3  # the low byte of the length word: an integer's text is short
    first = start + 4
    unpack = _UNPACK_I32
    exact = _EXACT_FLOAT_DIGITS

    def keys(rows: list[bytes]) -> tuple[list[Any], list[bytes] | None]:
        out: list[Any] = []
        append = out.append
        for row in rows:
            n = row[low]
            if n <= exact:
                v: Any = float(row[first:first + n])
            else:
                (n,) = unpack(row, start)  # NULL is -1: every byte 0xFF
                if n < 0:
                    append(null)
                    continue
                v = int(row[first:first + n])
            append(-v if desc else v)
        return out, None
    return keys


def _single_key(part: _KeyPart, start: int, n_visible: int, strip: bool,
                frames: bool) -> RowKeys:
    """One ORDER BY key, in any column; with `strip`, the rows without the helper columns
    too, cut in the same pass."""
    fn = part.value
    null = part.null
    col = part.col
    unpack = _UNPACK_I32
    if not strip:
        skip = range(col)

        def keys(rows: list[bytes]) -> tuple[list[Any], list[bytes] | None]:
            out: list[Any] = []
            append = out.append
            for row in rows:
                pos = start
                for _ in skip:
                    (n,) = unpack(row, pos)
                    pos += 4 + n if n > 0 else 4
                (n,) = unpack(row, pos)
                append(null if n < 0 else fn(row[pos + 4:pos + 4 + n]))
            return out, None
        return keys
    pack = _DATA_ROW_HEAD.pack
    head = _I16.pack(n_visible)
    # The helper columns come after the visible ones: walk to the key, and to where the
    # visible columns end, in the order they come.
    hidden = col >= n_visible
    before = range(n_visible if hidden else col)
    between = range(col - n_visible if hidden else n_visible - col - 1)

    def strip_keys(rows: list[bytes]) -> tuple[list[Any], list[bytes] | None]:
        out: list[Any] = []
        append = out.append
        stripped: list[bytes] = []
        keep = stripped.append
        for row in rows:
            pos = start
            for _ in before:
                (n,) = unpack(row, pos)
                pos += 4 + n if n > 0 else 4
            if hidden:
                cut = pos
                for _ in between:
                    (n,) = unpack(row, pos)
                    pos += 4 + n if n > 0 else 4
                (n,) = unpack(row, pos)
                append(null if n < 0 else fn(row[pos + 4:pos + 4 + n]))
            else:
                (n,) = unpack(row, pos)
                if n < 0:
                    append(null)
                    pos += 4
                else:
                    append(fn(row[pos + 4:pos + 4 + n]))
                    pos += 4 + n
                for _ in between:
                    (n,) = unpack(row, pos)
                    pos += 4 + n if n > 0 else 4
                cut = pos
            if frames:
                keep(pack(b"D", cut - start + 6, n_visible) + row[start:cut])
            else:
                keep(head + row[start:cut])
        return out, stripped
    return strip_keys


def _many_keys(parts: list[_KeyPart], start: int, n_visible: int, strip: bool,
               frames: bool) -> RowKeys:
    """Several ORDER BY keys: a tuple per row, the columns read in one pass."""
    width = len(parts)
    cut_at = n_visible - 1 if strip else -1  # after this column, the visible ones end
    last = max([part.col for part in parts] + [cut_at])
    slots_of: list[list[int]] = [[] for _ in range(last + 1)]  # key slots of each column
    for k, part in enumerate(parts):
        slots_of[part.col].append(k)
    # (column, its key slots and readers); columns that are only walked over have none.
    plan = [(c, [(k, parts[k].value, parts[k].null) for k in slots_of[c]])
            for c in range(last + 1)]
    unpack = _UNPACK_I32
    pack = _DATA_ROW_HEAD.pack
    head = _I16.pack(n_visible)

    def keys(rows: list[bytes]) -> tuple[list[Any], list[bytes] | None]:
        out: list[Any] = []
        append = out.append
        stripped: list[bytes] = []
        for row in rows:
            values: list[Any] = [None] * width
            pos = start
            if cut_at == -1 and strip:  # no visible column at all (`SELECT FROM`)
                stripped.append(pack(b"D", 6, 0) if frames else head)
            for c, reads in plan:
                (n,) = unpack(row, pos)
                pos += 4
                for k, fn, null in reads:
                    values[k] = null if n < 0 else fn(row[pos:pos + n])
                if n > 0:
                    pos += n
                if c == cut_at:
                    if frames:
                        stripped.append(pack(b"D", pos - start + 6, n_visible) + row[start:pos])
                    else:
                        stripped.append(head + row[start:pos])
            append(tuple(values))
        return out, stripped if strip else None
    return keys


def _two_keys(first: _KeyPart, second: _KeyPart, start: int) -> RowKeys:
    """Two ORDER BY keys in two columns, no helper columns to strip: `ORDER BY a, b`."""
    low, high = (first, second) if first.col < second.col else (second, first)
    fn_low, null_low, fn_high, null_high = low.value, low.null, high.value, high.null
    before = range(low.col)
    between = range(high.col - low.col - 1)
    swap = low is second
    unpack = _UNPACK_I32

    def keys(rows: list[bytes]) -> tuple[list[Any], list[bytes] | None]:
        out: list[Any] = []
        append = out.append
        for row in rows:
            pos = start
            for _ in before:
                (n,) = unpack(row, pos)
                pos += 4 + n if n > 0 else 4
            (n,) = unpack(row, pos)
            pos += 4
            if n < 0:
                a = null_low
            else:
                a = fn_low(row[pos:pos + n])
                pos += n
            for _ in between:
                (n,) = unpack(row, pos)
                pos += 4 + n if n > 0 else 4
            (n,) = unpack(row, pos)
            b = null_high if n < 0 else fn_high(row[pos + 4:pos + 4 + n])
            append((b, a) if swap else (a, b))
        return out, None
    return keys


def _keys_reader(parts: list[_KeyPart], base: int, n_visible: int, strip: bool) -> RowKeys:
    """Sort keys of a batch of rows: a value per row for one ORDER BY key, a tuple for
    several; and with `strip`, the rows without their helper columns."""
    start = base + 2
    frames = base == FRAME_HEADER
    if len(parts) == 1:
        part = parts[0]
        if part.col == 0 and part.integer and not strip:
            return _first_integer_keys(start, part.null, part.desc)
        return _single_key(part, start, n_visible, strip, frames)
    if len(parts) == 2 and parts[0].col != parts[1].col and not strip:
        return _two_keys(parts[0], parts[1], start)
    return _many_keys(parts, start, n_visible, strip, frames)


def _output_fn(n_visible: int, strip: bool, binary: list[tuple[int, Callable[[bytes], bytes]]],
               base: int) -> Callable[[bytes], bytes] | None:
    """What the client gets for a row: None when the shard's row goes as it is; else the
    row without the helper columns, and with binary values where the client asked."""
    if not strip and not binary:
        return None
    start = base + 2
    unpack = _UNPACK_I32
    head = _I16.pack(n_visible)
    visible = range(n_visible)

    def output(row: bytes) -> bytes:
        pos = start
        if not binary:
            for _ in visible:
                (n,) = unpack(row, pos)
                pos += 4 + n if n > 0 else 4
            if base:
                return _DATA_ROW_HEAD.pack(b"D", pos - start + 6, n_visible) + row[start:pos]
            return head + row[start:pos]
        values: list[Raw] = []
        for _ in visible:
            (n,) = unpack(row, pos)
            pos += 4
            if n < 0:
                values.append(None)
            else:
                values.append(row[pos:pos + n])
                pos += n
        for i, enc in binary:
            v = values[i]
            if v is not None:
                values[i] = enc(v)
        body = encode_data_row(values)
        return data_row_frame(body) if base else body
    return output


@dataclass(frozen=True, slots=True)
class _StreamSetup:
    """What a StreamMerge builds from the shards' columns: the same for every execution of
    a plan with the same RowDescription and client settings (see `_SETUPS`)."""

    fields: tuple[Field, ...]
    n_visible: int
    client: tuple[Field, ...]
    keys: RowKeys | None  # ORDER BY keys of a batch of rows
    reader: Callable[[bytes], tuple[list[Raw], int]] | None  # DISTINCT [ON] columns
    eq: Callable[[list[Raw]], Any] | None
    on: Callable[[list[Raw]], Any] | None
    output: Callable[[bytes], bytes] | None  # None: rows go to the client untouched
    description: bytes  # the client's RowDescription body


class _Setups:
    """Setups kept per plan, keyed by the shards' RowDescription and the client's settings.

    The router caches plans, so the same Plan object comes back for the next execution of a
    statement; an entry holds its plan, so the plan's id is not reused while it is here.
    Bounded: cleared when full. A pure memo: what it returns is what would be built."""

    def __init__(self, plans: int = 1000, per_plan: int = 8) -> None:
        self._plans = plans
        self._per_plan = per_plan
        self._by_plan: dict[int, tuple[Plan, dict[Any, Any]]] = {}

    def get(self, plan: Plan, key: Any) -> Any:
        entry = self._by_plan.get(id(plan))
        if entry is None or entry[0] is not plan:
            return None
        return entry[1].get(key)

    def put(self, plan: Plan, key: Any, setup: Any) -> None:
        entry = self._by_plan.get(id(plan))
        if entry is None or entry[0] is not plan:
            if len(self._by_plan) >= self._plans:
                self._by_plan.clear()
            entry = (plan, {})
            self._by_plan[id(plan)] = entry
        setups = entry[1]
        if len(setups) >= self._per_plan:
            setups.clear()
        setups[key] = setup

    def clear(self) -> None:
        self._by_plan.clear()


_SETUPS = _Setups()


# -- streaming ------------------------------------------------------------------------------


class StreamMerge(Merge):
    def __init__(self, plan: Plan, limit: int | None, offset: int, formats: Sequence[int],
                 collation: str, shards: int, extra_float_digits: int) -> None:
        super().__init__(plan, limit, offset, formats, collation, shards, extra_float_digits)
        self._with_ties = plan.limit is not None and plan.limit.with_ties
        self._out: list[bytes] = []
        # Rows buffered per shard (from _next[shard] on) and their sort keys.
        self._buffered: list[list[bytes]] = [[] for _ in range(shards)]
        self._keys: list[list[Any]] = [[] for _ in range(shards)]
        self._next = [0] * shards
        self._waiting = shards  # unfinished shards with no row buffered
        self._ready = False
        self._last_key: Any = None
        self._run_key: Any = None
        self._seen: set[Any] = set()
        self._sorted = plan.mode is Mode.SORT
        self._key_fn: RowKeys | None = None
        self._reader: Callable[[bytes], tuple[list[Raw], int]] | None = None
        self._eq: Callable[[list[Raw]], Any] | None = None
        self._on: Callable[[list[Raw]], Any] | None = None
        self._output: Callable[[bytes], bytes] | None = None

    def columns(self, fields: list[Field]) -> list[Field]:
        setup = self._build(fields, self._base)
        self._apply(setup)
        return list(setup.client)

    def describe(self, row_description: bytes, *, frames: bool = False) -> bytes:
        base = FRAME_HEADER if frames else 0
        key = (row_description, base, self._formats, self._collation, self._efd)
        setup = _SETUPS.get(self.plan, key)
        if setup is None:
            setup = self._build(parse_row_description(row_description), base)
            _SETUPS.put(self.plan, key, setup)
        self._base = base
        self._apply(setup)
        return setup.description

    def _build(self, fields: list[Field], base: int) -> _StreamSetup:
        client, per = self._client_fields(fields)
        plan = self.plan
        n_visible = self._n_visible
        key_parts: list[_KeyPart] = []
        for key in plan.sort:
            col = self._resolve(key.col)
            if not 0 <= col < len(fields):
                raise MergeError("42P10", f"ORDER BY position {key.col + 1} is not in select "
                                 "list")
            oid = fields[col].type_oid
            fn = self._sort_key_fn(oid, key.collation, "ORDER BY")
            integer = oid in _INTEGERS
            if integer:
                fn = _integer_key_desc if key.desc else _integer_key
            elif key.desc:
                fn = t.descending(fn, oid)
            null = t.NULLS_FIRST if key.nulls_first else t.NULLS_LAST
            key_parts.append(_KeyPart(col, fn, null, integer, key.desc))
        positions: list[int] = []
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
        # Sorted rows lose their helper columns as they arrive, in the pass that reads their
        # keys, unless the client wants binary values or DISTINCT [ON] reads them later.
        strip_early = bool(key_parts) and strip and not binary and not positions
        return _StreamSetup(
            fields=tuple(fields), n_visible=n_visible, client=tuple(client),
            keys=_keys_reader(key_parts, base, n_visible, strip_early) if key_parts else None,
            reader=make_reader(positions, n_visible, False, base) if positions else None,
            eq=_eq_fn(eq_parts) if eq_parts else None,
            on=_eq_fn(on_parts) if on_parts else None,
            output=None if strip_early else _output_fn(n_visible, strip, binary, base),
            description=encode_row_description(client))

    def _apply(self, setup: _StreamSetup) -> None:
        self._fields = list(setup.fields)
        self._n_visible = setup.n_visible
        self._key_fn = setup.keys
        self._reader = setup.reader
        self._eq = setup.eq
        self._on = setup.on
        self._output = setup.output
        self._ready = True

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

    def feed(self, shard: int, rows: list[bytes]) -> None:
        if not self._ready:
            raise MergeError("XX000", "merge: feed() before columns()")
        if self._complete or not rows:
            return
        if not self._sorted:
            self._union(rows)
            return
        key_fn = self._key_fn
        assert key_fn is not None
        keys, stripped = key_fn(rows)
        if stripped is not None:
            rows = stripped
        buffered = self._buffered[shard]
        start = self._next[shard]
        if start == len(buffered):
            self._buffered[shard] = rows if stripped is not None else list(rows)
            self._keys[shard] = keys
            self._next[shard] = 0
            self._waiting -= 1
        else:
            have = self._keys[shard]
            if start * 2 >= len(buffered):  # drop what has left, now and then
                del buffered[:start]
                del have[:start]
                self._next[shard] = 0
            buffered.extend(rows)
            have.extend(keys)
        self._pump()

    def finish(self, shard: int) -> None:
        if self._finished[shard]:
            return
        self._finished[shard] = True
        if self._sorted:
            if self._next[shard] == len(self._buffered[shard]):
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
        return len(self._buffered[shard]) - self._next[shard]

    def _stop(self) -> None:
        self._complete = True
        self._buffered = [[] for _ in self._buffered]
        self._keys = [[] for _ in self._keys]
        self._next = [0] * len(self._next)

    def _union(self, rows: list[bytes]) -> None:
        if self._eq is None and self._on is None:
            if self._offset:
                k = min(self._offset, len(rows))
                self._offset -= k
                rows = rows[k:]
            if self._limit is not None:
                rows = rows[:self._limit]
                self._limit -= len(rows)
                if self._limit == 0:
                    self._complete = True
            output = self._output
            if output is None:
                self._out.extend(rows)  # the common case: rows go on untouched
            else:
                self._out.extend([output(row) for row in rows])
            self._rows += len(rows)
            return
        reader = self._reader
        test = self._eq if self._eq is not None else self._on
        assert reader is not None and test is not None
        seen = self._seen
        for body in rows:
            if self._complete:
                return
            seen_key = test(reader(body)[0])
            if seen_key in seen:
                continue
            seen.add(seen_key)
            self._emit(body, None)

    def _emit(self, body: bytes, key: Any) -> None:
        """One row, past OFFSET and LIMIT."""
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
        self._out.append(body if self._output is None else self._output(body))
        self._rows += 1
        if self._limit == 0 and not self._with_ties:
            self._stop()

    def _pump(self) -> None:
        """Hand on every row known to come next: while every unfinished shard has a row
        buffered, each row up to the smallest of those shards' last rows, included.

        That is what a k-way merge one row at a time hands on (it stops when a shard's last
        buffered row has left), done in one step: a later row of a shard never sorts before
        an earlier one, so whatever the unfinished shards send later sorts after that bound.
        The rows below it are merged by one stable sort of the shards' runs, taken in shard
        order, so that ties leave lower shard first, as with a heap of (key, shard). Rows
        range-sharded on the sort key come from one shard at a time: no sort at all."""
        if self._waiting or self._complete:
            return
        keys_of = self._keys
        rows_of = self._buffered
        nexts = self._next
        finished = self._finished
        shards = [shard for shard, keys in enumerate(keys_of) if nexts[shard] < len(keys)]
        if not shards:
            return
        bound: tuple[Any, int] | None = None
        for shard in shards:
            if not finished[shard]:
                last = (keys_of[shard][-1], shard)
                if bound is None or last < bound:
                    bound = last
        segments: list[tuple[int, int, int]] = []
        for shard in shards:
            buffered = keys_of[shard]
            i = nexts[shard]
            if bound is None:
                j = len(buffered)
            elif shard <= bound[1]:  # its rows equal to the bound's key go first
                j = bisect.bisect_right(buffered, bound[0], i)
            else:
                j = bisect.bisect_left(buffered, bound[0], i)
            if j > i:
                segments.append((shard, i, j))
        rows: list[bytes]
        keys: list[Any]
        if len(segments) == 1:
            shard, i, j = segments[0]
            rows = rows_of[shard][i:j]
            keys = keys_of[shard][i:j]
        else:
            all_rows: list[bytes] = []
            all_keys: list[Any] = []
            for shard, i, j in segments:
                all_rows += rows_of[shard][i:j]
                all_keys += keys_of[shard][i:j]
            order = sorted(range(len(all_keys)), key=all_keys.__getitem__)
            rows = list(map(all_rows.__getitem__, order))
            keys = list(map(all_keys.__getitem__, order))
        for shard, _, j in segments:
            if j == len(keys_of[shard]):
                rows_of[shard] = []
                keys_of[shard] = []
                nexts[shard] = 0
                if not finished[shard]:
                    self._waiting += 1
            else:
                nexts[shard] = j
        if (self._eq is None and self._on is None and self._limit is None
                and not self._offset):
            output = self._output
            self._out.extend(rows if output is None else [output(row) for row in rows])
            self._rows += len(rows)
        else:
            self._leave(rows, keys)

    def _leave(self, rows: list[bytes], keys: list[Any]) -> None:
        """Merged rows (and their keys) leave, in order: DISTINCT [ON], OFFSET, LIMIT [WITH
        TIES]."""
        eq = self._eq
        on = self._on
        i = 0
        j = len(rows)
        if eq is not None or on is not None:
            reader = self._reader
            assert reader is not None
            for k in range(j):
                if self._complete:
                    return
                body = rows[k]
                key = keys[k]
                raws = reader(body)[0]
                if on is not None:
                    seen_key = on(raws)
                    if seen_key == self._run_key and self._run_key is not None:
                        continue
                    self._run_key = seen_key
                else:
                    if key != self._run_key:
                        self._run_key = key
                        self._seen = set()
                    seen_key = eq(raws)  # type: ignore[misc]
                    if seen_key in self._seen:
                        continue
                    self._seen.add(seen_key)
                self._emit(body, key)
            return
        if self._offset:
            skip = min(self._offset, j - i)
            self._offset -= skip
            i += skip
        if i == j:
            return
        limit = self._limit
        if limit is not None:
            if limit > 0:
                end = min(j, i + limit)
                self._limit = limit - (end - i)
                self._last_key = keys[end - 1]
                self._put(rows, i, end)
                if self._limit > 0:
                    return
                if not self._with_ties:
                    self._stop()
                    return
                i = end
            # LIMIT reached WITH TIES: the rows tied with the last one counted go too.
            last = self._last_key
            end = i
            while end < j and keys[end] == last:
                end += 1
            self._put(rows, i, end)
            if end < j:
                self._stop()
            return
        self._put(rows, i, j)

    def _put(self, rows: list[bytes], i: int, j: int) -> None:
        if j <= i:
            return
        output = self._output
        if output is None:
            self._out.extend(rows[i:j])
        else:
            self._out.extend([output(row) for row in rows[i:j]])
        self._rows += j - i


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

    def describe(self, row_description: bytes, *, frames: bool = False) -> bytes:
        base = FRAME_HEADER if frames else 0
        key = (row_description, base, self._formats, self._collation, self._efd)
        self._base = base
        cached = _SETUPS.get(self.plan, key)
        if cached is not None:
            setup, description = cached
            self.__dict__.update(setup)
            return description  # type: ignore[no-any-return]
        # What `columns` sets is the setup (it touches no per-execution state): kept as the
        # attributes it changed.
        before = dict(self.__dict__)
        description = encode_row_description(self.columns(parse_row_description(
            row_description)))
        setup = {name: value for name, value in self.__dict__.items()
                 if name not in before or before[name] is not value}
        _SETUPS.put(self.plan, key, (setup, description))
        return description

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
        self._reader = make_reader(positions, n_visible, False, self._base)
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
        self._group_key = _group_key(group_slots)

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
        group_key = self._group_key
        inits = self._inits
        combines = self._combines
        for body in rows:
            raws, _ = read(body)
            gk = group_key(raws)
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
        if self._base:
            self._out = [data_row_frame(body) for body in self._out]
        self._rows = len(self._out)
        self._complete = True


def _group_key(slots: list[tuple[int, Callable[[bytes], Any]]]) -> Callable[[list[Raw]], Any]:
    """What partial groups are folded by: the equality keys of their GROUP BY values (one
    value, or a tuple of them)."""
    if not slots:
        return lambda raws: ()
    if len(slots) == 1:
        ((j, fn),) = slots
        return lambda raws: None if (v := raws[j]) is None else fn(v)
    return _eq_fn(slots)


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
