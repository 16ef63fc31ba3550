"""Rows in, rows out: what the client gets from the shards' rows. Expected values are what
PostgreSQL 15 returns for the same statement over all the rows on one server."""

from __future__ import annotations

import struct

import pytest

from shardwire.merge import (
    Field,
    MergeError,
    MergeRefused,
    encode_data_row,
    encode_row_description,
    parse_data_row,
    parse_row_description,
)
from shardwire.merge import pgtypes as t

from .conftest import body, field, plan, run

INT4, INT8, TEXT, NUMERIC, FLOAT8 = t.INT4, t.INT8, t.TEXT, t.NUMERIC, t.FLOAT8


def test_wire_round_trip() -> None:
    fields = [Field("id", 16384, 1, INT4, 4, -1, 0), Field("?column?", 0, 0, TEXT, -1, -1, 1)]
    assert parse_row_description(encode_row_description(fields)) == fields
    values = [b"1", None, b"", b"x" * 300]
    assert parse_data_row(encode_data_row(values)) == values


def test_plain_union_hands_bodies_on_untouched() -> None:
    p = plan("SELECT id, note FROM orders")
    m = p.start({}, (), shards=2)
    assert m.columns([field("id", INT4), field("note", TEXT)]) == [
        field("id", INT4), field("note", TEXT)]
    rows = [body(["1", "a"]), body(["2", None])]
    m.feed(0, rows)
    out = m.take()
    assert out == rows and all(a is b for a, b in zip(out, rows, strict=True))
    m.feed(1, [body(["3", "c"])])
    m.finish(0)
    m.finish(1)
    assert m.take() == [body(["3", "c"])]
    assert m.rows == 3 and m.complete


def test_union_limit_offset_completes() -> None:
    p = plan("SELECT id FROM orders LIMIT 3 OFFSET 2")
    m = p.start({}, (), shards=2)
    m.columns([field("id", INT4)])
    m.feed(0, [body([str(i)]) for i in range(4)])
    assert len(m.take()) == 2 and not m.complete
    m.feed(1, [body([str(i)]) for i in range(4)])
    assert len(m.take()) == 1 and m.complete
    assert m.rows == 3


def test_k_way_merge_waits_for_every_shard() -> None:
    p = plan("SELECT id FROM orders ORDER BY id")
    m = p.start({}, (), shards=2)
    m.columns([field("id", INT4)])
    m.feed(0, [body(["1"]), body(["4"])])
    assert m.take() == []  # shard 1 may still send something smaller
    assert m.buffered(0) == 2
    m.feed(1, [body(["2"])])
    assert m.take() == [body(["1"]), body(["2"])]
    m.finish(1)
    assert m.take() == [body(["4"])]
    m.finish(0)
    assert m.complete and m.rows == 3


@pytest.mark.parametrize(("sql", "oid", "shards", "expected"), [
    ("SELECT x FROM orders ORDER BY x", INT4, [["-1", "3", None], ["2", "10"]],
     ["-1", "2", "3", "10", None]),
    ("SELECT x FROM orders ORDER BY x DESC", INT4, [[None, "3", "-1"], ["10", "2"]],
     [None, "10", "3", "2", "-1"]),
    ("SELECT x FROM orders ORDER BY x NULLS FIRST", INT4, [[None, "1"], ["0"]], [None, "0", "1"]),
    ("SELECT x FROM orders ORDER BY x DESC NULLS LAST", INT4, [["1", None], ["0"]],
     ["1", "0", None]),
    ("SELECT x FROM orders ORDER BY x", FLOAT8, [["-Infinity", "0", "NaN"], ["-0", "Infinity"]],
     ["-Infinity", "0", "-0", "Infinity", "NaN"]),
    ("SELECT x FROM orders ORDER BY x DESC", FLOAT8, [["NaN", "1.5"], ["Infinity", "-1"]],
     ["NaN", "Infinity", "1.5", "-1"]),
    ("SELECT x FROM orders ORDER BY x", NUMERIC, [["1.10", "NaN"], ["-Infinity", "1.2", "9"]],
     ["-Infinity", "1.10", "1.2", "9", "NaN"]),
    ("SELECT x FROM orders ORDER BY x", TEXT, [["B", "a", "é"], ["", "ab", "b"]],
     ["", "B", "a", "ab", "b", "é"]),
    ("SELECT x FROM orders ORDER BY x DESC", TEXT, [["é", "a", ""], ["b", "ab", "B"]],
     ["é", "b", "ab", "a", "B", ""]),
    ("SELECT x FROM orders ORDER BY x", t.BPCHAR, [["a   ", "b   "], ["a b ", "ab  "]],
     ["a   ", "a b ", "ab  ", "b   "]),
    ("SELECT x FROM orders ORDER BY x", t.DATE,
     [["0010-01-01 BC", "2000-02-29", "infinity"], ["-infinity", "1999-12-31"]],
     ["-infinity", "0010-01-01 BC", "1999-12-31", "2000-02-29", "infinity"]),
    ("SELECT x FROM orders ORDER BY x", t.TIMESTAMPTZ,
     [["2019-12-31 23:59:59.999999-05", "2021-06-01 12:30:00.5+02"],
      ["0044-03-15 10:00:00+00 BC", "2020-01-01 10:00:00+00"]],
     ["0044-03-15 10:00:00+00 BC", "2019-12-31 23:59:59.999999-05", "2020-01-01 10:00:00+00",
      "2021-06-01 12:30:00.5+02"]),
    ("SELECT x FROM orders ORDER BY x", t.TIME, [["00:00:00", "24:00:00"], ["12:30:00.5"]],
     ["00:00:00", "12:30:00.5", "24:00:00"]),
    ("SELECT x FROM orders ORDER BY x", t.BYTEA, [["\\x", "\\x0001"], ["\\x00", "\\xff"]],
     ["\\x", "\\x00", "\\x0001", "\\xff"]),
    ("SELECT x FROM orders ORDER BY x", t.BOOL, [["t"], ["f", "t"]], ["f", "t", "t"]),
    ("SELECT x FROM orders ORDER BY x", t.UUID,
     [["ffffffff-0000-0000-0000-000000000000"], ["00000000-0000-0000-0000-000000000001"]],
     ["00000000-0000-0000-0000-000000000001", "ffffffff-0000-0000-0000-000000000000"]),
])
def test_order_by_types(sql: str, oid: int, shards: list[list[str | None]],
                        expected: list[str | None]) -> None:
    _, rows = run(sql, [field("x", oid)], [[[v] for v in s] for s in shards], batch=1)
    assert [r[0] for r in rows] == expected


def test_hidden_sort_columns_are_stripped() -> None:
    sql = "SELECT id FROM orders ORDER BY amount DESC, id LIMIT 3 OFFSET 1"
    fields = [field("id", INT4), field("__sw_1", NUMERIC)]
    client, rows = run(sql, fields, [[["1", "5.0"], ["2", "1"]], [["3", "7"], ["4", "5"]]])
    assert [f.name for f in client] == ["id"]
    assert rows == [["1"], ["4"], ["2"]]


def test_limit_parameters() -> None:
    sql = "SELECT id FROM orders ORDER BY id LIMIT $1 OFFSET $2"
    data = [[[str(i)] for i in range(0, 10, 2)], [[str(i)] for i in range(1, 10, 2)]]
    _, rows = run(sql, [field("id", INT4)], data, params={1: 3, 2: 4})
    assert rows == [["4"], ["5"], ["6"]]
    _, rows = run(sql, [field("id", INT4)], data, params={1: None, 2: 8})
    assert rows == [["8"], ["9"]]
    with pytest.raises(MergeError) as e:
        plan(sql).start({1: -1, 2: 0}, (), shards=2)
    assert e.value.sqlstate == "2201W"
    with pytest.raises(MergeError) as e:
        plan(sql).start({1: 1, 2: -1}, (), shards=2)
    assert e.value.sqlstate == "2201X"


def test_fetch_with_ties() -> None:
    sql = "SELECT id, qty FROM orders ORDER BY qty FETCH FIRST 2 ROWS WITH TIES"
    fields = [field("id", INT4), field("qty", INT4)]
    _, rows = run(sql, fields, [[["1", "1"], ["2", "2"]], [["3", "2"], ["4", "3"]]])
    assert sorted(rows) == [["1", "1"], ["2", "2"], ["3", "2"]]


def test_distinct_union_and_sorted() -> None:
    _, rows = run("SELECT DISTINCT x FROM orders", [field("x", NUMERIC)],
                  [[["1.0"], ["2"]], [["1.00"], [None], ["2"]], [[None]]])
    assert sorted(r[0] or "" for r in rows) == ["", "1.0", "2"]
    _, rows = run("SELECT DISTINCT s, f FROM orders ORDER BY s", [field("s", TEXT),
                  field("f", t.BOOL)], [[["a", "t"], ["a", "f"], ["b", "t"]], [["a", "t"],
                                                                             ["b", "t"]]])
    assert sorted(rows) == [["a", "f"], ["a", "t"], ["b", "t"]]
    assert rows[-1] == ["b", "t"]


def test_distinct_on() -> None:
    sql = "SELECT DISTINCT ON (status) status, id FROM orders ORDER BY status, id DESC"
    fields = [field("status", TEXT), field("id", INT4)]
    _, rows = run(sql, fields, [[["a", "5"], ["a", "1"], ["b", "2"]], [["a", "7"], ["c", "3"]]])
    assert rows == [["a", "7"], ["b", "2"], ["c", "3"]]


def test_aggregates_without_group_by() -> None:
    sql = ("SELECT count(*), count(x), sum(x), sum(n), min(n), max(s), avg(x), avg(n), "
           "bool_and(b), bool_or(b), every(b) FROM orders")
    fields = [field("count", INT8), field("count", INT8), field("sum", INT8),
              field("sum", NUMERIC), field("min", NUMERIC), field("max", TEXT),
              field("avg", NUMERIC), field("avg", NUMERIC), field("bool_and", t.BOOL),
              field("bool_or", t.BOOL), field("every", t.BOOL),
              field("__sw_1", INT8), field("__sw_2", INT8), field("__sw_3", NUMERIC),
              field("__sw_4", INT8)]
    s1 = [["2", "2", "3", "1.50", "0.5", "b", "1.5", "0.75", "t", "t", "t", "3", "2", "1.50",
           "2"]]
    s2 = [["1", "1", "4", "2.25", "1.25", "a", "4", "2.25", "f", "f", "f", "4", "1", "2.25", "1"]]
    s3 = [["0", "0", None, None, None, None, None, None, None, None, None, None, "0", None, "0"]]
    _, rows = run(sql, fields, [s1, s2, s3])
    assert rows == [["3", "3", "7", "3.75", "0.5", "b", "2.3333333333333333",
                     "1.25000000000000000000", "f", "t", "f"]]


def test_aggregates_over_no_rows_return_one_row() -> None:
    sql = "SELECT count(*), sum(x), max(x) FROM orders"
    fields = [field("count", INT8), field("sum", INT8), field("max", INT4)]
    _, rows = run(sql, fields, [[["0", None, None]], [["0", None, None]]])
    assert rows == [["0", None, None]]
    _, rows = run(sql, fields, [[], []])
    assert rows == [["0", None, None]]


def test_group_by_having_order_limit() -> None:
    sql = ("SELECT status, count(*) AS n, avg(qty) FROM orders GROUP BY status "
           "HAVING count(*) > 1 ORDER BY n DESC, status LIMIT 2")
    fields = [field("status", TEXT), field("n", INT8), field("avg", NUMERIC),
              field("__sw_1", INT8), field("__sw_2", INT8)]
    s1 = [["a", "2", "1.5", "3", "2"], ["b", "1", "4", "4", "1"], [None, "1", "1", "1", "1"]]
    s2 = [["a", "1", "7", "7", "1"], ["c", "3", "2", "6", "3"], [None, "1", "2", "2", "1"]]
    _, rows = run(sql, fields, [s1, s2])
    assert rows == [["a", "3", "3.3333333333333333"], ["c", "3", "2.0000000000000000"]]


def test_having_three_valued_logic_and_integer_division() -> None:
    sql = "SELECT g, sum(x) FROM orders GROUP BY g HAVING sum(x) / count(*) > 2 OR max(y) IS NULL"
    fields = [field("g", INT4), field("sum", INT8), field("__sw_1", INT8),
              field("__sw_2", INT4)]
    s1 = [["1", "5", "2", "1"], ["2", "9", "3", None], ["3", None, "1", "1"]]
    s2 = [["1", "2", "1", "1"], ["2", "1", "1", None]]
    _, rows = run(sql, fields, [s1, s2])
    # g=1: 7/3 = 2 (integer division) -> false; g=2: max(y) is NULL; g=3: NULL/1 -> NULL.
    assert rows == [["2", "10"]]


def test_computed_items_and_errors() -> None:
    sql = "SELECT sum(x) / count(*) AS ratio FROM orders"
    fields = [field("ratio", INT8), field("__sw_1", INT8), field("__sw_2", INT8)]
    # A shard with no rows would fail computing 7 / 0 itself: the merge computes instead.
    _, rows = run(sql, fields, [[[None, "7", "2"]], [[None, None, "0"]]])
    assert rows == [["3"]]
    _, rows = run(sql, fields, [[[None, None, "0"]], [[None, None, "0"]]])
    assert rows == [[None]]  # NULL / 0 is NULL: division is strict
    sql = "SELECT count(*) / (count(*) - 3) AS r FROM orders"
    fields = [field("r", INT8), field("__sw_1", INT8)]
    with pytest.raises(MergeError) as e:
        run(sql, fields, [[[None, "1"]], [[None, "2"]]])
    assert e.value.sqlstate == "22012"


def test_sum_overflow_is_reported() -> None:
    sql = "SELECT sum(x) FROM orders"
    big = str(2 ** 62)
    with pytest.raises(MergeError) as e:
        run(sql, [field("sum", INT8)], [[[big]], [[big]]])
    assert e.value.sqlstate == "22003" and e.value.message == "bigint out of range"


def test_float_sum_and_avg() -> None:
    sql = "SELECT sum(f), avg(f) FROM orders"
    fields = [field("sum", FLOAT8), field("avg", FLOAT8), field("__sw_1", FLOAT8),
              field("__sw_2", INT8)]
    _, rows = run(sql, fields, [[["0.1", "0.1", "0.1", "1"]], [["0.2", "0.2", "0.2", "1"]]])
    assert rows == [["0.30000000000000004", "0.15000000000000002"]]


def test_group_keys_compare_by_value() -> None:
    sql = "SELECT n, count(*) FROM orders GROUP BY n"
    _, rows = run(sql, [field("n", NUMERIC), field("count", INT8)],
                  [[["1.0", "2"]], [["1.00", "3"], [None, "1"]], [[None, "1"]]])
    assert sorted(rows, key=lambda r: r[0] or "") == [[None, "2"], ["1.0", "5"]]


def test_group_local_is_a_plain_merge() -> None:
    sql = ("SELECT customer_id, string_agg(note, ',') FROM orders GROUP BY customer_id "
           "ORDER BY customer_id")
    fields = [field("customer_id", INT4), field("string_agg", TEXT)]
    _, rows = run(sql, fields, [[["1", "a,b"], ["3", "c"]], [["2", "d"]]])
    assert rows == [["1", "a,b"], ["2", "d"], ["3", "c"]]


def test_binary_output() -> None:
    sql = "SELECT id, n, f, s FROM orders ORDER BY id"
    fields = [field("id", INT4), field("n", NUMERIC), field("f", FLOAT8), field("s", TEXT)]
    p = plan(sql)
    m = p.start({}, (1, 1, 1, 0), shards=1)
    client = m.columns(fields)
    assert [f.format for f in client] == [1, 1, 1, 0]
    m.feed(0, [body(["7", "-1.50", "0.5", "x"])])
    m.finish(0)
    (row,) = m.take()
    values = parse_data_row(row)
    assert values[0] == struct.pack("!i", 7)
    assert values[1] == struct.pack("!hhHhhh", 2, 0, 0x4000, 2, 1, 5000)
    assert values[2] == struct.pack("!d", 0.5)
    assert values[3] == b"x"


def test_binary_aggregate_output() -> None:
    sql = "SELECT count(*), avg(x) FROM orders"
    fields = [field("count", INT8), field("avg", NUMERIC), field("__sw_1", INT8),
              field("__sw_2", INT8)]
    p = plan(sql)
    m = p.start({}, (1,), shards=1)
    m.columns(fields)
    m.feed(0, [body(["2", "1.5", "3", "2"])])
    m.finish(0)
    (row,) = m.take()
    count, avg = parse_data_row(row)
    assert count == struct.pack("!q", 2)
    assert avg == struct.pack("!hhHh", 2, 0, 0, 16) + struct.pack("!hh", 1, 5000)


def test_format_count_mismatch() -> None:
    m = plan("SELECT a, b FROM orders").start({}, (0, 1, 0), shards=1)
    with pytest.raises(MergeError) as e:
        m.columns([field("a", INT4), field("b", INT4)])
    assert e.value.sqlstate == "08P01"


@pytest.mark.parametrize(("sql", "fields", "fragment"), [
    ("SELECT x FROM orders ORDER BY x", [field("x", t.INTERVAL)], "interval"),
    ("SELECT x FROM orders ORDER BY x", [field("x", t.JSONB)], "jsonb"),
    ("SELECT x FROM orders ORDER BY x", [field("x", 1007)], "integer[]"),
    ("SELECT x FROM orders ORDER BY x", [field("x", 16500)], "OID 16500"),
    ("SELECT DISTINCT x FROM orders", [field("x", t.JSONB)], "duplicates"),
    ("SELECT x, count(*) FROM orders GROUP BY x", [field("x", t.INTERVAL),
                                                  field("count", INT8)], "GROUP BY"),
    ("SELECT avg(x) FROM orders", [field("avg", FLOAT8), field("__sw_1", t.FLOAT4),
                                   field("__sw_2", INT8)], "real"),
])
def test_refused_types(sql: str, fields: list[Field], fragment: str) -> None:
    m = plan(sql).start({}, (), shards=2)
    with pytest.raises(MergeRefused) as e:
        m.columns(fields)
    assert fragment in e.value.message and e.value.hint


def test_text_order_under_a_non_c_collation_is_refused() -> None:
    m = plan("SELECT s FROM orders ORDER BY s").start({}, (), "en_US.UTF-8", shards=2)
    with pytest.raises(MergeRefused) as e:
        m.columns([field("s", TEXT)])
    assert "COLLATE" in (e.value.hint or "")
    m = plan('SELECT s FROM orders ORDER BY s COLLATE "C"').start({}, (), "en_US.UTF-8",
                                                                  shards=2)
    m.columns([field("s", TEXT), field("__sw_1", TEXT)])
    m = plan("SELECT s FROM orders ORDER BY s").start({}, (), "en_US.UTF-8", shards=2)
    m.columns([field("s", t.NAME)])  # name always sorts as "C"


def test_binary_for_an_unknown_type_is_refused() -> None:
    m = plan("SELECT x FROM orders").start({}, (1,), shards=2)
    with pytest.raises(MergeRefused) as e:
        m.columns([field("x", t.INTERVAL)])
    assert "binary" in e.value.message
