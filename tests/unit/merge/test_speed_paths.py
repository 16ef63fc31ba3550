"""The fast paths of a scatter read give what the plain ones gave, row for row and byte for
byte: framing that hands whole messages, sort keys read straight from DataRows, runs and
batches merged without a heap operation per row, setups reused across executions, and a
small result written to the client at once.

The reference here is the merge one row at a time: a heap of (key, shard) where a key is the
pair (null rank, value) per ORDER BY key, and a row leaves while every unfinished shard has
one buffered."""

from __future__ import annotations

import heapq
import random
import struct
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from shardwire.merge import Field, encode_data_row, encode_row_description, engine, parse_data_row
from shardwire.merge import pgtypes as t
from shardwire.merge.planner import Mode, Plan, SortKey
from shardwire.merge.wire import data_row_frame
from shardwire.proxy import scatter
from shardwire.proxy.fanout import BACKEND_TYPES
from shardwire.proxy.protocol import messages as m
from shardwire.proxy.protocol.framing import FrameError, MessageReader

from .conftest import field, plan

INT4, INT8, TEXT, NUMERIC, FLOAT8 = t.INT4, t.INT8, t.TEXT, t.NUMERIC, t.FLOAT8
Value = str | None


# -- framing --------------------------------------------------------------------------------


def _stream(rng: random.Random, count: int) -> tuple[bytes, list[tuple[int, bytes]]]:
    msgs = []
    for _ in range(count):
        kind = rng.choice(b"DDDDTCNZ")
        body = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 3, 40, 700])))
        msgs.append((kind, body))
    return b"".join(m.message(bytes([k]), b) for k, b in msgs), msgs


@pytest.mark.parametrize("seed", range(5))
def test_frames_are_whole_messages_however_the_bytes_arrive(seed: int) -> None:
    rng = random.Random(seed)
    data, msgs = _stream(rng, 200)
    frames_reader = MessageReader(1 << 20, BACKEND_TYPES)
    feed_reader = MessageReader(1 << 20, BACKEND_TYPES)
    frames: list[bytes] = []
    fed: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        step = rng.choice([1, 2, 4, 5, 6, 100, 4096])
        piece = data[pos:pos + step]
        pos += step
        frames += frames_reader.frames(piece)
        fed += feed_reader.feed(piece)
    assert fed == msgs
    assert [(f[0], f[5:]) for f in frames] == msgs
    assert b"".join(frames) == data
    assert all(type(f) is bytes for f in frames) and all(type(b) is bytes for _, b in fed)
    assert frames_reader.pending == feed_reader.pending == 0


def test_frames_hold_back_a_partial_message() -> None:
    reader = MessageReader(1 << 20)
    msg = m.message(b"D", b"x" * 100)
    assert reader.frames(msg[:3]) == []
    assert reader.pending == 3
    assert reader.frames(msg[3:50]) == []
    assert reader.frames(msg[50:] + msg[:7]) == [msg]
    assert reader.pending == 7
    assert reader.frames(msg[7:]) == [msg]
    assert reader.pending == 0
    assert reader.feed(bytearray(msg)) == [(ord("D"), b"x" * 100)]


def test_frames_refuse_what_feed_refuses() -> None:
    reader = MessageReader(100, BACKEND_TYPES)
    with pytest.raises(FrameError) as e:
        reader.frames(b"D" + struct.pack("!I", 1000) + b"x")
    assert e.value.sqlstate == "08P01" and e.value.fatal
    assert reader.pending == 0
    with pytest.raises(FrameError):
        MessageReader(100, BACKEND_TYPES).frames(b"Q\x00\x00\x00\x04")


# -- sort keys --------------------------------------------------------------------------------


def test_null_keys_sort_around_every_value_nan_included() -> None:
    values = [t.NAN, 1.5, -3, t.NULLS_LAST, t.NULLS_FIRST, float("inf")]
    ordered = sorted(values)
    assert ordered[0] is t.NULLS_FIRST and ordered[-1] is t.NULLS_LAST
    assert ordered[-2] is t.NAN
    assert t.NEG_NAN < t.NULLS_LAST and t.NULLS_FIRST < t.NEG_NAN
    assert not t.NAN < t.NULLS_FIRST and t.NAN > t.NULLS_FIRST and t.NAN <= t.NULLS_LAST
    assert not t.NEG_NAN >= t.NULLS_LAST and t.NEG_NAN >= t.NULLS_FIRST
    assert t.NULLS_LAST == t.NULLS_LAST and t.NULLS_LAST != t.NULLS_FIRST
    assert (t.NULLS_LAST, 1) > (5, 2) and (1, t.NULLS_FIRST) < (1, 0)


@pytest.mark.parametrize("desc", [False, True])
@pytest.mark.parametrize("first", [0, 1])
def test_integer_keys_order_as_integers(desc: bool, first: int) -> None:
    values = sorted(set(BIG + [-b for b in BIG if b > -(2**63)] + [0, 1, -1]), reverse=desc)
    for fields, sql in [([field("k", INT8)], "SELECT k FROM orders ORDER BY k"),
                        ([field("g", INT4), field("k", INT8)],
                         "SELECT g, k FROM orders ORDER BY k")]:
        merge = plan(sql + (" DESC" if desc else "")).start({}, (), shards=2)
        merge.columns(fields)
        # Neighbours go to different shards: their keys decide, not the shard.
        for shard in (first, 1 - first):
            part = values[shard::2] if shard == first else values[1 - first::2]
            merge.feed(shard, [encode_data_row([b"1"] * (len(fields) - 1) + [str(v).encode()])
                               for v in part])
        merge.finish(0)
        merge.finish(1)
        assert [int(parse_data_row(r)[-1] or b"") for r in merge.take()] == values


def _timestamp(rng: random.Random, zone: bool) -> bytes:
    year = rng.choice([1, 44, 1969, 2000, 2020, 2024, 9999, 12000])
    text = (f"{year:04d}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d} "
            f"{rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}")
    if rng.random() < 0.5:
        text += "." + str(rng.randrange(1, 10**6)).rjust(rng.randrange(1, 7), "0")[:6]
    if zone:
        text += rng.choice(["+00", "-05", "+05:30", "-03:30", "+05:53:28", "+14"])
    if rng.random() < 0.1:
        text += " BC"
    return text.encode()


@pytest.mark.parametrize("zone", [False, True])
def test_timestamps_read_the_same_on_the_fast_path(zone: bool) -> None:
    rng = random.Random(7)
    texts = [_timestamp(rng, zone) for _ in range(3000)]
    texts += [b"infinity", b"-infinity"]
    slow = []
    for text in texts:
        t._DAYS.clear()
        t._ZONES.clear()
        slow.append(t.timestamp_micros(text, zone))
    for text in texts:
        t.timestamp_micros(text, zone)  # fills the memos
    assert [t.timestamp_micros(text, zone) for text in texts] == slow
    key = t.SORT_KEY[t.TIMESTAMPTZ if zone else t.TIMESTAMP]
    assert [key(text) for text in texts] == slow
    dates = [text[:10] for text in texts if text[10:11] == b" "]
    assert [t.date_days(d) for d in dates] == [t.date_days(d) for d in dates]


def test_a_timestamp_in_another_datestyle_is_still_refused() -> None:
    t.timestamp_micros(b"2020-01-31 12:00:00+00", True)
    with pytest.raises(Exception) as e:
        t.timestamp_micros(b"2020-01-31T12:00:00+00", True)
    assert "DateStyle" in str(getattr(e.value, "hint", ""))


# -- the merge against the reference -----------------------------------------------------------

# Column types of the rows generated: name -> (type, value generator)
Gen = Callable[[random.Random], Value]


def _maybe_null(gen: Gen, share: float = 0.1) -> Gen:
    return lambda rng: None if rng.random() < share else gen(rng)


# Integers that floats cannot tell apart, and the longest text still read as a float.
BIG = [2**53 - 1, 2**53, 2**53 + 1, 2**53 + 2, 10**17 + 1, 10**17, -(2**63), 2**63 - 1,
       999_999_999_999_999, -99_999_999_999_999, 1_000_000_000_000_000, -(10**15)]

COLUMNS: dict[str, tuple[int, Gen]] = {
    "k": (INT8, _maybe_null(lambda r: str(r.choice([
        r.randrange(-50, 50), r.randrange(-10**18, 10**18), r.choice(BIG),
        r.choice(BIG) * r.choice([1, -1]) // 2])))),
    "g": (INT4, lambda r: str(r.randrange(5))),
    "n": (NUMERIC, _maybe_null(lambda r: r.choice(["NaN", "1.0", "1.00", "-2.5", "3",
                                                    "Infinity", "-Infinity", "0.001"]))),
    "f": (FLOAT8, _maybe_null(lambda r: r.choice(["NaN", "0", "-0", "1.5", "-1e+100",
                                                   "Infinity", "-Infinity", "2"]))),
    "s": (TEXT, _maybe_null(lambda r: r.choice(["", "a", "ab", "b", "B", "é", "a b"]))),
    "ts": (t.TIMESTAMPTZ, _maybe_null(lambda r: _timestamp(r, True).decode())),
}


def _reference_key(fields: Sequence[Field], sort: Sequence[tuple[int, bool, bool]]) -> Callable[
        [list[bytes | None]], tuple[Any, ...]]:
    """The key the merge used to compute: (null rank, value) per ORDER BY key."""
    parts = []
    for col, desc, nulls_first in sort:
        oid = fields[col].type_oid
        fn = t.SORT_KEY[oid]
        parts.append((col, t.descending(fn, oid) if desc else fn, -1 if nulls_first else 1))

    def key(values: list[bytes | None]) -> tuple[Any, ...]:
        out: list[Any] = []
        for col, fn, null in parts:
            v = values[col]
            out += [null, 0] if v is None else [0, fn(v)]
        return tuple(out)
    return key


class Reference:
    """The k-way merge one row at a time."""

    def __init__(self, shards: int, key: Callable[[list[bytes | None]], tuple[Any, ...]]):
        self.key = key
        self.queues: list[list[bytes]] = [[] for _ in range(shards)]
        self.finished = [False] * shards
        self.heap: list[tuple[Any, int, int]] = []
        self.seq = 0

    def feed(self, shard: int, rows: list[bytes]) -> list[bytes]:
        q = self.queues[shard]
        if not q and not any(s == shard for _, s, _ in self.heap):
            first, rows = rows[0], rows[1:]
            heapq.heappush(self.heap, (self.key(parse_data_row(first)), shard, 0))
            q.append(first)
        q.extend(rows)
        return self.pump()

    def finish(self, shard: int) -> list[bytes]:
        self.finished[shard] = True
        return self.pump()

    def pump(self) -> list[bytes]:
        out = []
        while self.heap:
            waiting = [s for s, q in enumerate(self.queues) if not q and not self.finished[s]]
            if waiting:
                break
            _, shard, _ = heapq.heappop(self.heap)
            q = self.queues[shard]
            out.append(q.pop(0))
            if q:
                heapq.heappush(self.heap, (self.key(parse_data_row(q[0])), shard, 0))
        return out


def _shard_rows(rng: random.Random, names: Sequence[str], count: int,
                key: Callable[[list[bytes | None]], tuple[Any, ...]]) -> list[bytes]:
    rows = []
    for _ in range(count):
        values = [COLUMNS[name][1](rng) for name in names]
        rows.append(encode_data_row([None if v is None else v.encode() for v in values]))
    # Each shard sends its rows sorted (ties in any order, as PostgreSQL may).
    rng.shuffle(rows)
    rows.sort(key=lambda row: key(parse_data_row(row)))
    return rows


ORDERS = [
    ("k", [(0, False, False)]),
    ("k DESC", [(0, True, True)]),
    ("k NULLS FIRST", [(0, False, True)]),
    ("k DESC NULLS LAST", [(0, True, False)]),
    ("g, k", [(1, False, False), (0, False, False)]),
    ("g DESC, s, k", [(1, True, True), (4, False, False), (0, False, False)]),
    ("n", [(2, False, False)]),
    ("n DESC, f", [(2, True, True), (3, False, False)]),
    ("f DESC", [(3, True, True)]),
    ("s", [(4, False, False)]),
    ("ts", [(5, False, False)]),
    ("ts DESC, k", [(5, True, True), (0, False, False)]),
    ("g", [(1, False, False)]),  # long runs of ties across shards
]
NAMES = ["k", "g", "n", "f", "s", "ts"]
FIELDS = [field(name, COLUMNS[name][0]) for name in NAMES]


def _schedule(rng: random.Random, data: list[list[bytes]], layout: str) -> list[tuple[int, int]]:
    """(shard, batch size) steps feeding every row; a shard finishes after its last."""
    cursors = [0] * len(data)
    steps = []
    live = [s for s in range(len(data))]
    while live:
        shard = rng.choice(live) if layout == "random" else live[0]
        size = rng.choice([1, 2, 3, 7, 50]) if layout == "random" else rng.choice([1, 40])
        size = min(size, len(data[shard]) - cursors[shard])
        steps.append((shard, size))
        cursors[shard] += size
        if cursors[shard] == len(data[shard]):
            live.remove(shard)
    return steps


@pytest.mark.parametrize("order", ORDERS, ids=[o for o, _ in ORDERS])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("frames", [False, True])
def test_sorted_merge_hands_on_what_the_row_at_a_time_merge_did(
        order: tuple[str, list[tuple[int, bool, bool]]], seed: int, frames: bool) -> None:
    sql = f"SELECT {', '.join(NAMES)} FROM orders ORDER BY {order[0]}"
    rng = random.Random(seed)
    shards = rng.choice([1, 2, 3, 4, 6])
    key = _reference_key(FIELDS, order[1])
    data = [_shard_rows(rng, NAMES, rng.choice([0, 1, 5, 60]), key) for _ in range(shards)]
    merge = plan(sql).start({}, (), shards=shards)
    merge.describe(encode_row_description(FIELDS), frames=frames)
    reference = Reference(shards, key)
    cursors = [0] * shards
    got: list[bytes] = []
    for shard, size in _schedule(rng, data, rng.choice(["random", "ranges"])):
        batch = data[shard][cursors[shard]:cursors[shard] + size]
        cursors[shard] += size
        expected = reference.feed(shard, batch) if batch else []
        merge.feed(shard, [data_row_frame(b) for b in batch] if frames else batch)
        if cursors[shard] == len(data[shard]):
            expected += reference.finish(shard)
            merge.finish(shard)
        taken = merge.take()
        # The same rows leave at the same moment, in the same order.
        assert taken == ([data_row_frame(b) for b in expected] if frames else expected)
        got += taken
        for s in range(shards):
            assert merge.buffered(s) == len(reference.queues[s])
    for shard in range(shards):
        if not data[shard]:
            merge.finish(shard)
    assert merge.complete and merge.rows == len(got) == sum(len(d) for d in data)


def _expected_rows(rows: list[bytes], key: Callable[[list[bytes | None]], tuple[Any, ...]], *,
                   limit: int | None, offset: int, ties: bool, visible: int,
                   distinct: bool = False, on: int | None = None,
                   binary: Sequence[int] = (), fields: Sequence[Field] = FIELDS) -> list[bytes]:
    values = [parse_data_row(r) for r in rows]
    values.sort(key=key)  # stable: the shards' rows go in shard order
    if distinct:
        seen: set[Any] = set()
        unique = []
        for v in values:
            k = tuple(v[:visible])
            if k not in seen:
                seen.add(k)
                unique.append(v)
        values = unique
    if on is not None:
        kept: list[list[bytes | None]] = []
        for v in values:
            if not kept or kept[-1][on] != v[on]:
                kept.append(v)
        values = kept
    values = values[offset:]
    if limit is not None:
        end = limit
        while ties and 0 < end < len(values) and key(values[end]) == key(values[end - 1]):
            end += 1
        values = values[:end]
    out = []
    for v in values:
        v = v[:visible]
        for col in binary:
            raw = v[col]
            if raw is not None:
                v[col] = t.TO_BINARY[fields[col].type_oid](raw)
        out.append(encode_data_row(v))
    return out


def _run_merge(sql: str, fields: list[Field], data: list[list[bytes]], rng: random.Random, *,
               frames: bool, params: dict[int, int | None] | None = None,
               formats: Sequence[int] = ()) -> list[bytes]:
    merge = plan(sql).start(params or {}, formats, shards=len(data))
    merge.describe(encode_row_description(fields), frames=frames)
    out: list[bytes] = []
    for shard, size in _schedule(rng, data, "random"):
        batch, data[shard] = data[shard][:size], data[shard][size:]
        merge.feed(shard, [data_row_frame(b) for b in batch] if frames else batch)
        if not data[shard]:
            merge.finish(shard)
        out += merge.take()
        if merge.complete:
            break
    if frames:
        assert all(r[:1] == b"D" and struct.unpack_from("!I", r, 1)[0] == len(r) - 1
                   for r in out)
        out = [r[5:] for r in out]
    assert merge.rows == len(out)
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("frames", [False, True])
@pytest.mark.parametrize(("clause", "limit", "offset", "ties"), [
    ("LIMIT 5", 5, 0, False),
    ("LIMIT 7 OFFSET 3", 7, 3, False),
    ("OFFSET 4", None, 4, False),
    ("LIMIT 0", 0, 0, False),
    ("FETCH FIRST 3 ROWS WITH TIES", 3, 0, True),
    ("OFFSET 2 FETCH FIRST 1 ROW WITH TIES", 1, 2, True),
])
def test_limit_offset_and_ties_over_runs(seed: int, frames: bool, clause: str,
                                         limit: int | None, offset: int, ties: bool) -> None:
    rng = random.Random(seed)
    sort = [(1, False, False)]  # g: few values, long runs of ties
    key = _reference_key(FIELDS, sort)
    data = [_shard_rows(rng, NAMES, rng.choice([3, 20]), key) for _ in range(3)]
    expected = _expected_rows([r for d in data for r in d], key, limit=limit, offset=offset,
                              ties=ties, visible=len(NAMES))
    got = _run_merge(f"SELECT {', '.join(NAMES)} FROM orders ORDER BY g {clause}", FIELDS,
                     data, rng, frames=frames)
    # Ties leave lower shard first, each shard's in its order: the order is fixed.
    assert got == expected


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("frames", [False, True])
def test_helper_columns_and_binary_values(seed: int, frames: bool) -> None:
    rng = random.Random(seed)
    # k is not selected: the shards send it as a helper column after the client's ones.
    names = ["g", "s", "n", "k"]
    fields = [field(n, COLUMNS[n][0]) for n in names[:3]] + [field("__sw_1", INT8)]
    for sql, sort, formats in [
        ("SELECT g, s, n FROM orders ORDER BY k", [(3, False, False)], ()),
        ("SELECT g, s, n FROM orders ORDER BY k DESC, g", [(3, True, True), (0, False, False)],
         ()),
        ("SELECT g, s, n FROM orders ORDER BY g, k", [(0, False, False), (3, False, False)],
         ()),
        ("SELECT g, s, n FROM orders ORDER BY k", [(3, False, False)], (1, 0, 1)),
        ("SELECT g, s, n FROM orders ORDER BY k LIMIT 4", [(3, False, False)], ()),
    ]:
        key = _reference_key(fields, sort)
        data = [_shard_rows(rng, names, rng.choice([0, 4, 30]), key) for _ in range(3)]
        binary = [i for i, f in enumerate(formats) if f == 1]
        expected = _expected_rows([r for d in data for r in d], key,
                                  limit=4 if "LIMIT" in sql else None, offset=0, ties=False,
                                  visible=3, binary=binary, fields=fields)
        got = _run_merge(sql, fields, data, rng, frames=frames, formats=formats)
        assert got == expected


@pytest.mark.parametrize("frames", [False, True])
@pytest.mark.parametrize("keys", [1, 2, 3])
def test_no_visible_column(frames: bool, keys: int) -> None:
    # `SELECT FROM t ORDER BY ...`: every column the shards send is a helper (built by hand:
    # the planner does not take an empty select list).
    sort = tuple(SortKey(~h, h == 1, False, None) for h in range(keys))
    merge = engine.start(Plan(Mode.SORT, hidden=keys, sort=sort), {}, (), "C", 2, 1)
    fields = [field(f"__sw_{h + 1}", INT8) for h in range(keys)]
    assert merge.describe(encode_row_description(fields), frames=frames) == \
        encode_row_description([])
    rows = [encode_data_row([str(i).encode()] * keys) for i in range(3)]
    merge.feed(0, [data_row_frame(r) for r in rows] if frames else rows)
    merge.finish(0)
    merge.finish(1)
    empty = encode_data_row([])
    assert merge.take() == [data_row_frame(empty) if frames else empty] * 3


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("frames", [False, True])
def test_distinct_and_distinct_on_over_runs(seed: int, frames: bool) -> None:
    rng = random.Random(seed)
    names = ["g", "s"]
    fields = [field("g", INT4), field("s", TEXT)]
    key = _reference_key(fields, [(0, False, False), (1, False, False)])
    data = [_shard_rows(rng, names, rng.choice([5, 40]), key) for _ in range(3)]
    rows = [r for d in data for r in d]
    expected = _expected_rows(rows, key, limit=None, offset=0, ties=False, visible=2,
                              distinct=True)
    got = _run_merge("SELECT DISTINCT g, s FROM orders ORDER BY g, s", fields,
                     [list(d) for d in data], rng, frames=frames)
    assert got == expected
    expected = _expected_rows(rows, key, limit=None, offset=0, ties=False, visible=2, on=0)
    got = _run_merge("SELECT DISTINCT ON (g) g, s FROM orders ORDER BY g, s", fields,
                     [list(d) for d in data], rng, frames=frames)
    assert got == expected


def test_union_passes_frames_untouched() -> None:
    p = plan("SELECT id, note FROM orders")
    merge = p.start({}, (), shards=2)
    fields = [field("id", INT4), field("note", TEXT)]
    assert merge.describe(encode_row_description(fields), frames=True) == \
        encode_row_description(fields)
    rows = [data_row_frame(encode_data_row([b"1", b"a"])), data_row_frame(encode_data_row(
        [b"2", None]))]
    merge.feed(0, rows)
    out = merge.take()
    assert out == rows and all(a is b for a, b in zip(out, rows, strict=True))


def test_aggregates_take_frames_too_and_keep_their_setup() -> None:
    p = plan("SELECT g, count(*), avg(x) FROM orders GROUP BY g HAVING count(*) > 1 ORDER BY g")
    fields = [field("g", INT4), field("count", INT8), field("avg", NUMERIC),
              field("__sw_1", INT8), field("__sw_2", INT8)]
    description = encode_row_description(fields)
    shard_rows = [[encode_data_row([b"1", b"2", b"1.5", b"3", b"2"])],
                  [encode_data_row([b"1", b"3", b"2", b"6", b"3"]),
                   encode_data_row([b"0", b"1", b"5", b"5", b"1"])]]
    expected = [encode_data_row([b"1", b"5", b"1.8000000000000000"])]
    client = encode_row_description(fields[:3])
    for frames in [True, False, True, False]:  # built, built, then kept
        merge = p.start({}, (), shards=2)
        assert merge.describe(description, frames=frames) == client
        for shard, rows in enumerate(shard_rows):
            merge.feed(shard, [data_row_frame(r) for r in rows] if frames else rows)
            merge.finish(shard)
        assert merge.take() == ([data_row_frame(r) for r in expected] if frames else expected)
        assert merge.complete and merge.rows == 1


# -- setups kept per plan -------------------------------------------------------------------


def test_setup_is_reused_only_for_the_same_plan_and_settings() -> None:
    p = plan("SELECT id, amount FROM orders ORDER BY id LIMIT 2")
    description = encode_row_description([field("id", INT4), field("amount", NUMERIC)])
    rows = [[encode_data_row([b"1", b"1.5"]), encode_data_row([b"3", b"2"])],
            [encode_data_row([b"2", b"7"])]]
    for _ in range(3):
        merge = p.start({}, (), shards=2)
        assert merge.describe(description) == description
        merge.feed(0, rows[0])
        merge.feed(1, rows[1])
        assert merge.take() == [rows[0][0], rows[1][0]] and merge.complete
    # Another result format: another setup (the client's RowDescription says binary).
    merge = p.start({}, (1,), shards=2)
    fields = [f.with_format(1) for f in [field("id", INT4), field("amount", NUMERIC)]]
    assert merge.describe(description) == encode_row_description(fields)
    merge.feed(0, rows[0])
    merge.feed(1, rows[1])
    assert [parse_data_row(r)[0] for r in merge.take()] == [struct.pack("!i", 1),
                                                            struct.pack("!i", 2)]
    # The same shard SQL for another statement: its own plan, its own merge.
    other = plan("SELECT id, amount FROM orders ORDER BY id LIMIT 1 OFFSET 1")
    merge = other.start({}, (), shards=2)
    merge.describe(description)
    merge.feed(0, rows[0])
    merge.feed(1, rows[1])
    assert merge.take() == [rows[1][0]]


def test_a_refused_setup_is_refused_every_time() -> None:
    p = plan("SELECT id, d FROM orders ORDER BY d")
    description = encode_row_description([field("id", INT4), field("d", t.INTERVAL)])
    for _ in range(2):
        with pytest.raises(Exception) as e:
            p.start({}, (), shards=2).describe(description)
        assert getattr(e.value, "sqlstate", None) == "0A000"


# -- the executor: one write for a small result ---------------------------------------------


class _Client:
    closed = False

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)


class _Pool:
    shard = "s1"


class _Conn:
    pool = _Pool()
    transport = None


def test_a_small_result_reaches_the_client_in_one_write() -> None:
    p = plan("SELECT id, note FROM orders ORDER BY id LIMIT 3")
    fields = [field("id", INT4), field("note", TEXT)]
    bind = b"\x00\x00\x00\x00\x00\x00\x00\x00"
    unit = [(ord("B"), bind), (ord("D"), b"P\x00"), (ord("E"), b"\x00\x00\x00\x00\x00"),
            (ord("S"), b"")]
    client = _Client()
    read = scatter.ScatterRead(client, ["s1", "s2"], p, unit)  # type: ignore[arg-type]
    _, params, formats = read._request()
    read.merge = p.start(params, formats, shards=2)
    read.held.append(m.BIND_COMPLETE)  # as run() does
    read.calls = [scatter.ScatterCall(i, _Conn(), read._frames)  # type: ignore[arg-type]
                  for i in range(2)]
    rows = [[encode_data_row([b"1", b"a"]), encode_data_row([b"4", b"d"])],
            [encode_data_row([b"2", None]), encode_data_row([b"3", b"c"])]]
    replies = [m.PARSE_COMPLETE + m.BIND_COMPLETE + m.message(b"T", encode_row_description(
        fields)) + b"".join(m.message(b"D", r) for r in shard_rows) + m.command_complete(
        "SELECT 2") + m.ready_for_query(b"I") for shard_rows in rows]
    read.calls[0].data(_Conn(), replies[0][:20])  # type: ignore[arg-type]
    read.calls[0].data(_Conn(), replies[0][20:])  # type: ignore[arg-type]
    assert client.writes == []  # nothing for the client before the rows
    read.calls[1].data(_Conn(), replies[1])  # type: ignore[arg-type]
    assert client.writes == [
        m.BIND_COMPLETE + m.message(b"T", encode_row_description(fields))
        + b"".join(m.message(b"D", r) for r in [rows[0][0], rows[1][0], rows[1][1]])
        + m.command_complete("SELECT 3") + m.ready_for_query(b"I")]


def test_a_notice_is_not_held_back() -> None:
    p = plan("SELECT id FROM orders ORDER BY id")
    client = _Client()
    read = scatter.ScatterRead(client, ["s1", "s2"], p,  # type: ignore[arg-type]
                               [(ord("Q"), b"")])
    read.merge = p.start({}, (), shards=2)
    read.calls = [scatter.ScatterCall(i, _Conn(), read._frames)  # type: ignore[arg-type]
                  for i in range(2)]
    description = m.message(b"T", encode_row_description([field("id", INT4)]))
    notice = m.notice_response("working")
    read.calls[0].data(_Conn(), description + notice)  # type: ignore[arg-type]
    assert client.writes == [description + notice]
    read.calls[0].data(_Conn(), m.message(b"D", encode_data_row([b"1"])))  # type: ignore
    assert client.writes == [description + notice]  # the other shard may have a smaller id
