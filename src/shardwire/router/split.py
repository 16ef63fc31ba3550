"""Split a multi-row INSERT ... VALUES into one INSERT per shard. Pure: text in, text out.

The router says which shard each VALUES row belongs to (`MultiShard.rows`); this module finds
the rows in the client's own text and writes, for each shard, the same statement with only
that shard's rows: what comes before the first row (WITH, INSERT INTO, the column list) and
after the last one (ON CONFLICT, RETURNING) is kept as written. Parameters are renumbered so
that each shard's statement uses $1..$n, and `ShardText.params` says which of the client's
parameters each number stands for.

The scan skips string constants (including E'' strings with backslash escapes), quoted
identifiers, dollar quotes and comments. A text whose rows cannot be found exactly (their
count differs from the router's) raises `SplitError`: the proxy refuses the statement rather
than guess.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .classify import skip_block_comment
from .plan import MultiShard


class SplitError(ValueError):
    """The statement's VALUES rows could not be found in its text."""


@dataclass(frozen=True, slots=True)
class ShardText:
    """One shard's INSERT."""

    sql: bytes
    # The client's parameter numbers ($n) this text uses, in the order of its own $1, $2...;
    # None when the text uses the client's numbers unchanged.
    params: tuple[int, ...] | None


@dataclass(frozen=True, slots=True)
class _Scan:
    rows: list[tuple[int, int]]  # [start, end) of each VALUES row, parentheses included
    params: list[tuple[int, int, int]]  # (start, end, number) of each $n, in text order


_TOKEN = re.compile(rb"[()',\"$]|--|/\*|[A-Za-z_\x80-\xff][A-Za-z0-9_$\x80-\xff]*")
_DOLLAR_TAG = re.compile(rb"\$([A-Za-z_\x80-\xff][A-Za-z0-9_\x80-\xff]*)?\$")
_DIGITS = re.compile(rb"\$([0-9]+)")


def with_split_sql(plan: MultiShard, sql: bytes) -> MultiShard:
    """The plan with each shard's statement, for a split INSERT (for `shardwire explain`)."""
    if plan.rows is None:
        return plan
    return replace(plan, sql={shard: text.sql for shard, text in
                              sorted(split_insert(sql, plan.rows).items())})


def split_insert(sql: bytes, rows: Sequence[str]) -> dict[str, ShardText]:
    """Each shard's INSERT, given the shard of every VALUES row in order."""
    scan = _scan(sql)
    if len(scan.rows) != len(rows):
        raise SplitError(f"found {len(scan.rows)} VALUES rows in the text, expected {len(rows)}")
    head = (0, scan.rows[0][0])
    tail = (scan.rows[-1][1], len(sql))
    out: dict[str, ShardText] = {}
    for shard in dict.fromkeys(rows):
        spans = [span for span, owner in zip(scan.rows, rows, strict=True) if owner == shard]
        out[shard] = _write(sql, [head, *spans, tail], scan.params)
    return out


def _write(sql: bytes, spans: list[tuple[int, int]], params: list[tuple[int, int, int]]
           ) -> ShardText:
    """The text of `spans` (head, rows joined by commas, tail), parameters renumbered."""
    pieces: list[bytes] = []
    numbers: dict[int, int] = {}  # the client's $n -> this text's
    last = len(spans) - 1
    for i, (start, end) in enumerate(spans):
        if 1 < i < last:
            pieces.append(b", ")
        pos = start
        for p in range(bisect_left(params, (start,)), len(params)):
            p_start, p_end, number = params[p]
            if p_start >= end:
                break
            pieces.append(sql[pos:p_start])
            pieces.append(b"$%d" % numbers.setdefault(number, len(numbers) + 1))
            pos = p_end
        pieces.append(sql[pos:end])
    return ShardText(b"".join(pieces), tuple(numbers) if params else None)


def _scan(sql: bytes) -> _Scan:
    """Find the INSERT's VALUES rows and every parameter, skipping quoted text."""
    rows: list[tuple[int, int]] = []
    params: list[tuple[int, int, int]] = []
    depth = 0
    state = "insert"  # insert -> values -> row -> comma -> done
    row_start = 0
    n = len(sql)
    i = 0
    search = _TOKEN.search
    while True:
        found = search(sql, i)
        if found is None:
            break
        i, token = found.end(), found.group()
        c = token[0]
        if c == 0x27:  # '
            prev = found.start() - 1
            escapes = prev >= 0 and sql[prev] in b"eE" and (
                prev == 0 or not _word_char(sql[prev - 1]))
            i = _skip_string(sql, i, escapes)
            continue
        if c == 0x22:  # "
            i = _skip_quoted_name(sql, i)
            continue
        if token == b"--":
            j = sql.find(b"\n", i)
            i = n if j < 0 else j + 1
            continue
        if token == b"/*":
            i = skip_block_comment(sql, found.start())
            continue
        if c == 0x24:  # $
            param = _DIGITS.match(sql, found.start())
            if param:
                params.append((found.start(), param.end(), int(param.group(1))))
                i = param.end()
                continue
            tag = _DOLLAR_TAG.match(sql, found.start())
            if tag:
                end = sql.find(tag.group(), tag.end())
                i = n if end < 0 else end + len(tag.group())
            continue
        if state == "done":
            continue
        if c == 0x28:  # (
            if depth == 0 and state == "row":
                row_start = found.start()
            depth += 1
            continue
        if c == 0x29:  # )
            depth -= 1
            if depth == 0 and state == "row":
                rows.append((row_start, i))
                state = "comma"
            continue
        if depth != 0:
            continue
        if state == "comma":
            state = "row" if token == b"," else "done"
        elif state == "row":
            raise SplitError("a VALUES row that is not in parentheses")
        elif token.lower() == b"insert" and state == "insert":
            state = "values"
        elif token.lower() == b"values" and state == "values":
            state = "row"
    if depth != 0 or state == "row":
        raise SplitError("unbalanced parentheses")
    return _Scan(rows, params)


def _word_char(c: int) -> bool:
    return c == 0x5F or c >= 0x80 or 0x30 <= c <= 0x39 or 0x41 <= c <= 0x5A or 0x61 <= c <= 0x7A


def _skip_string(sql: bytes, i: int, escapes: bool) -> int:
    """Past the end of a string constant whose text starts at `i`."""
    n = len(sql)
    while i < n:
        c = sql[i]
        if c == 0x5C and escapes:  # backslash
            i += 2
        elif c == 0x27:
            if i + 1 < n and sql[i + 1] == 0x27:
                i += 2
            else:
                return i + 1
        else:
            i += 1
    return n


def _skip_quoted_name(sql: bytes, i: int) -> int:
    n = len(sql)
    while i < n:
        j = sql.find(b'"', i)
        if j < 0:
            return n
        if sql[j + 1:j + 2] == b'"':
            i = j + 2
        else:
            return j + 1
    return n
