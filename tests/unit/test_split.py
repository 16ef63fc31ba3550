"""Splitting a multi-row INSERT's text by shard (router/split.py)."""

from __future__ import annotations

import random

import pytest

from shardwire.router.split import ShardText, SplitError, split_insert


def parts(sql: str, rows: list[str]) -> dict[str, tuple[str, tuple[int, ...] | None]]:
    return {shard: (text.sql.decode(), text.params)
            for shard, text in split_insert(sql.encode(), rows).items()}


def test_rows_go_to_their_shards_with_head_and_tail_kept() -> None:
    sql = ("WITH x AS (VALUES (1), (2)) INSERT INTO t (a, b) VALUES (1, 'x'), (2, 'y'), "
           "(3, 'z') ON CONFLICT (a) DO UPDATE SET b = excluded.b RETURNING a;")
    tail = " ON CONFLICT (a) DO UPDATE SET b = excluded.b RETURNING a;"
    head = "WITH x AS (VALUES (1), (2)) INSERT INTO t (a, b) VALUES "
    assert parts(sql, ["s1", "s2", "s1"]) == {
        "s1": (head + "(1, 'x'), (3, 'z')" + tail, None),
        "s2": (head + "(2, 'y')" + tail, None)}


@pytest.mark.parametrize("row", [
    "'a), (b'", "E'it\\'s ), ('", "$$ ), ( $$", "$tag$ $$ ), $1 $tag$", '"col), ("',
    "/* ), ( /* nested ) */ */ 1", "-- ), (\n 1", "U&'d\\0061t), ('", "e'\\\\'",
])
def test_quoted_text_does_not_split_rows(row: str) -> None:
    sql = f"insert into t (k, v) values (1, {row}), (2, 'plain')"
    assert parts(sql, ["a", "b"]) == {
        "a": (f"insert into t (k, v) values (1, {row})", None),
        "b": ("insert into t (k, v) values (2, 'plain')", None)}


def test_parameters_are_renumbered_per_shard() -> None:
    sql = "insert into t (k, v) values ($1, $2), ($3, $2), ($4, 'x') returning v || $5"
    assert parts(sql, ["a", "b", "a"]) == {
        "a": ("insert into t (k, v) values ($1, $2), ($3, 'x') returning v || $4",
              (1, 2, 4, 5)),
        "b": ("insert into t (k, v) values ($1, $2) returning v || $3", (3, 2, 5))}


def test_a_text_whose_rows_cannot_be_found_is_an_error() -> None:
    with pytest.raises(SplitError):
        split_insert(b"insert into t (k) values (1), (2)", ["a", "b", "a"])
    with pytest.raises(SplitError):
        split_insert(b"insert into t (k) values (1), (2", ["a", "b"])
    with pytest.raises(SplitError):  # the INSERT inside a WITH: not at the top level
        split_insert(b"with w as (insert into t (k) values (1), (2)) select 1", ["a", "b"])


def test_random_rows_keep_their_text_and_order() -> None:
    """Property: for random rows and owners, each shard's text holds exactly its rows, in
    their order, and parameters map back to the client's."""
    rng = random.Random(7)
    pieces = ["1", "'a,b'", "$$)$$", "E'\\''", "(1 + 2)", "'x''y'", "NULL", "$P"]
    for _ in range(300):
        count = rng.randint(1, 8)
        rows, owners, params = [], [], 0
        for _ in range(count):
            items = []
            for _ in range(rng.randint(1, 3)):
                item = rng.choice(pieces)
                if item == "$P":
                    params += 1
                    item = f"${params}"
                items.append(item)
            rows.append("(" + ", ".join(items) + ")")
            owners.append(rng.choice("abc"))
        sql = "INSERT INTO t (a) VALUES " + ", ".join(rows)
        out = split_insert(sql.encode(), owners)
        assert set(out) == set(owners)
        for shard, text in out.items():
            mine = [r for r, o in zip(rows, owners, strict=True) if o == shard]
            expected = "INSERT INTO t (a) VALUES " + ", ".join(mine)
            assert _restore(text) == expected


def _restore(text: ShardText) -> str:
    """The shard's text with its parameters numbered as the client's again."""
    sql = text.sql.decode()
    if text.params is None:
        return sql
    for new, old in sorted(enumerate(text.params, 1), reverse=True):
        sql = sql.replace(f"${new}", f"$@{old}")
    return sql.replace("$@", "$")
