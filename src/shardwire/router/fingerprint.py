"""Literal normalisation of simple-protocol queries, so that statements differing only in their
literal values share one cached analysis. Pure: no I/O.

`fingerprint(b"SELECT abalance FROM pgbench_accounts WHERE aid = 123")` is
`(b"SELECT abalance FROM pgbench_accounts WHERE aid = $10001", (Literal("123", False),))`.
Placeholders are numbered from `LITERAL_BASE + 1`, so they never collide with a statement's
own `$1..$n`; sqlglot parses them as `exp.Parameter`, and the router binds them from the
literals. The normalised text is for analysis and caching only: the client's text is what
reaches the servers.

What is replaced: string constants ('..', E'..', $tag$..$tag$) and unsigned numbers (a minus sign
stays outside: `-$10001`) in SELECT, INSERT, UPDATE, DELETE, MERGE, WITH, VALUES and TABLE
statements. What is left as written, because a parameter would not parse or would mean
something else there:

- a string after a type or function name (`DATE '2026-01-01'`, `int4 '5'`, `INTERVAL '1 day'`,
  `TIMESTAMP(3) '..'`, `"int4" '5'`, `UESCAPE '!'`): after any word other than a handful of
  keywords that begin an expression (WHERE, AND, LIKE, THEN...), after `)` or a quoted name;
- prefixed strings: `B'..'`, `X'..'`, `N'..'`, `U&'..'`;
- every literal inside type modifiers and similar (`varchar(10)`, `::numeric(10,2)`,
  `::int[3]`, `CAST(x AS numeric(10,2))`, `CURRENT_TIMESTAMP(3)`, `EXTRACT('year' FROM ..)`),
  in `DISTINCT ON (..)` and in ORDER BY / GROUP BY / PARTITION BY lists (`ORDER BY 1` is a
  column position, `ORDER BY $1` is not) until the clause ends (LIMIT, OFFSET, HAVING...);
- a literal glued to a following identifier character.

`fingerprint` returns None, and the query is analysed as written, for anything else: utility
statements (SET, SHOW, COPY, EXPLAIN...: their literals are often not expressions), a string
right after another one (`'a'\\n'b'` is one literal continued over a newline), unterminated
quotes or comments, unbalanced parentheses, numbers PostgreSQL versions read differently
(`0x1F`, `1_000`, `123abc`), strings PostgreSQL would refuse (a NUL, a lone surrogate) or that
are not valid UTF-8 (the client encoding is taken to be UTF8).

sqlglot 30.30 reads `$10001,$10002` (a parameter, no space, then a `$` before the next space)
as the start of a dollar-quoted string and fails, so the normalised text has one space after a
placeholder or a `$n` parameter in exactly that situation: `IN (1,2)` -> `IN ($10001 ,$10002)`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["LITERAL_BASE", "FingerprintCache", "Literal", "fingerprint"]

LITERAL_BASE = 10000


@dataclass(frozen=True, slots=True)
class Literal:
    """A literal taken out of a query: its value as text and whether it was a string (quoted)
    or a number. Strings are unescaped ('it''s' -> it's; E'\\n' -> a newline; dollar-quoted as
    written); numbers are their text as written ('1.5e3')."""

    text: str
    is_string: bool

    def sql(self) -> str:
        """The literal as a PostgreSQL constant (standard_conforming_strings on)."""
        if self.is_string:
            return "'" + self.text.replace("'", "''") + "'"
        return self.text


# The scanner jumps from one byte that may start something that matters to the next (a C-speed
# search for _CANDIDATE) and decides in Python. Words, operators and whitespace between two
# such tokens form a "run"; the few keywords that change how literals are read are looked at
# only where they can matter: the last words before a string or a `(`, the first word of a
# statement, and, in queries that contain "by", every word.
_CANDIDATE = re.compile(rb"[-'\"0-9.$/()\[\];:]")
_NUMBER = re.compile(rb"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_PLAIN_STRING = re.compile(rb"'(?:[^']|'')*'")
_ESCAPE_STRING = re.compile(rb"'(?:[^'\\]|\\.|'')*'", re.S)  # E'', or any string with
# standard_conforming_strings off
_QUOTED_NAME = re.compile(rb'"(?:[^"]|"")*"')
_DOLLAR = re.compile(rb"\$(?:([0-9]+)|((?:[A-Za-z_\x80-\xff][A-Za-z0-9_\x80-\xff]*)?)\$)")
_COMMENT_MARK = re.compile(rb"/\*|\*/")
_WORD = rb"[A-Za-z_\x80-\xff][A-Za-z0-9_$\x80-\xff]*"
_WORDS = re.compile(_WORD)
_WORD_TAIL = re.compile(rb"[A-Za-z0-9_$\x80-\xff]*")
_TYPE_NAME = re.compile(_WORD + rb"(?:\." + _WORD + rb")*")
_STATEMENT = re.compile(
    rb"(?:select|insert|update|delete|merge|with|values|table)(?![A-Za-z0-9_$\x80-\xff])", re.I)

_IDENT_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_$"
                         + bytes(range(0x80, 0x100)))
_SPACE_BYTES = frozenset(b" \t\n\r\f\v")
_OPERATOR_BYTES = frozenset(b",=<>!~+*-/%^&|#@?:")
# sqlglot's tokenizer bug: `$n` then non-space bytes up to another `$`.
_NEEDS_SPACE = re.compile(rb"[^ \t\n\r\f\v$]*\$")

# Keywords after which a string is an ordinary constant, not a typed literal's text.
_BEFORE_STRING = frozenset({
    b"select", b"where", b"and", b"or", b"not", b"like", b"ilike", b"to", b"then", b"else",
    b"when", b"case", b"between", b"symmetric", b"asymmetric", b"from", b"distinct", b"all",
    b"returning", b"limit", b"offset", b"having"})
# A `(` after these holds type modifiers or arguments PostgreSQL wants as constants.
_LITERAL_ARGS = frozenset({
    b"varchar", b"char", b"character", b"varying", b"nchar", b"bpchar", b"numeric", b"decimal",
    b"dec", b"float", b"time", b"timestamp", b"timetz", b"timestamptz", b"interval", b"bit",
    b"second", b"current_time", b"current_timestamp", b"localtime", b"localtimestamp",
    b"extract"})
# Words that continue a type name after its first word (`double precision`,
# `timestamp with time zone`, `interval day to second`).
_TYPE_WORDS = frozenset({
    b"precision", b"varying", b"with", b"without", b"time", b"zone", b"character", b"char",
    b"year", b"month", b"day", b"hour", b"minute", b"second", b"to"})
# Words that end an ORDER BY / GROUP BY / PARTITION BY list at its own depth.
_BY_END = frozenset({
    b"having", b"window", b"limit", b"offset", b"fetch", b"for", b"union", b"intersect",
    b"except", b"returning", b"rows", b"range", b"groups", b"on"})

# Kinds of significant tokens.
_START, _RUN, _OPEN, _CLOSE, _NAME, _STRING, _NUMERIC, _PARAM, _CAST, _SEMICOLON, _FIXED, \
    _COMMENT = range(12)  # _FIXED: B'', X'', N'', U&'' strings, which stay as written


def fingerprint(sql: bytes, *, standard_conforming_strings: bool = True
                ) -> tuple[bytes, tuple[Literal, ...]] | None:
    """The query with its literals replaced by `$10001`, `$10002`... and the literals in order;
    None when the query cannot be normalised safely (see the module docstring).

    Pass the session's standard_conforming_strings (PostgreSQL reports it): when off,
    backslashes escape in plain strings too, which changes where a string ends.
    """
    return _scan(sql, standard_conforming_strings, None)


def _scan(sql: bytes, standard_conforming_strings: bool, spans: list[tuple[int, int]] | None
          ) -> tuple[bytes, tuple[Literal, ...]] | None:
    """`fingerprint`; with `spans`, also where each literal is in `sql` (start, end)."""
    plain_string = _PLAIN_STRING if standard_conforming_strings else _ESCAPE_STRING
    search = _CANDIDATE.search
    size = len(sql)
    out: list[bytes] = []
    literals: list[Literal] = []
    param_ends: list[int] = []  # offsets in the output just after each $n
    copied = 0  # sql[:copied] is in out
    out_len = 0
    number = LITERAL_BASE
    at_start = True
    # The kinds and extents of the last two significant tokens (comments do not count).
    prev = before = _START
    prev_start = prev_end = before_start = before_end = 0
    keep_stack: list[bool] = []  # per open ( or [: do literals inside stay as written?
    watch_by = b"by" in sql.lower()
    by_depth = -1  # depth of an open ORDER/GROUP/PARTITION BY list, -1 when none
    last_end = 0  # end of the last token, comments included
    pos = 0

    while True:
        found = search(sql, pos)
        if found is None:
            start = end = size
            kind = _START
        else:
            start = found.start()
            c = sql[start]
            if 0x30 <= c <= 0x39 or c == 0x2E:  # a digit or a dot
                if start and sql[start - 1] in _IDENT_BYTES:
                    # a digit inside a word (t1, a$1) or the dot of a qualified name
                    pos = (_WORD_TAIL.match(sql, start).end()  # type: ignore[union-attr]
                           if c != 0x2E else start + 1)
                    continue
                if c == 0x2E and (start + 1 == size or not 0x30 <= sql[start + 1] <= 0x39):
                    pos = start + 1
                    continue
                if start and sql[start - 1] == 0x2E:  # t.5 or (x).5: PostgreSQL reads `.5`
                    return None
                end = _NUMBER.match(sql, start).end()  # type: ignore[union-attr]
                nxt = sql[end] if end < size else 0x20
                # `123abc`, `0x1F`, `1_000`, `1..2`: lexed differently across versions.
                if nxt in _IDENT_BYTES or nxt == 0x2E:
                    return None
                kind = _NUMERIC
            elif c == 0x27:  # '
                kind = _STRING
                pattern = plain_string
                quote = start
                if start:  # a one-letter prefix standing alone: E'', B'', X'', N'', U&''
                    p = sql[start - 1]
                    if p in b"eEbBxXnN" and (start == 1 or sql[start - 2] not in _IDENT_BYTES):
                        if p in b"eE":
                            pattern = _ESCAPE_STRING
                        else:
                            kind = _FIXED
                        start -= 1
                    elif (p == 0x26 and start >= 2 and sql[start - 2] in b"uU"
                          and (start == 2 or sql[start - 3] not in _IDENT_BYTES)):
                        kind = _FIXED
                        start -= 2
                string = pattern.match(sql, quote)
                if string is None:
                    return None
                end = string.end()
            elif c == 0x28 or c == 0x5B:  # ( [
                kind = _OPEN
                end = start + 1
            elif c == 0x29 or c == 0x5D:  # ) ]
                kind = _CLOSE
                end = start + 1
            elif c == 0x3B:  # ;
                kind = _SEMICOLON
                end = start + 1
            elif c == 0x24:  # $
                if start and sql[start - 1] in _IDENT_BYTES:  # inside a word: a$b
                    pos = start + 1
                    continue
                dollar = _DOLLAR.match(sql, start)
                if dollar is None:
                    return None
                end = dollar.end()
                if dollar.group(1) is not None:
                    kind = _PARAM
                else:
                    close = sql.find(dollar.group(), end)
                    if close < 0:
                        return None
                    kind = _STRING
                    end = close + len(dollar.group())
            elif c == 0x3A:  # :
                if sql[start + 1:start + 2] != b":":
                    pos = start + 1
                    continue
                kind = _CAST
                end = start + 2
            elif c == 0x22:  # "
                name = _QUOTED_NAME.match(sql, start)
                if name is None:
                    return None
                kind = _NAME
                end = name.end()
            elif c == 0x2D:  # -
                if sql[start + 1:start + 2] != b"-":
                    pos = start + 1
                    continue
                newline = sql.find(b"\n", start)
                end = size if newline < 0 else newline
                kind = _COMMENT
            else:  # /
                if sql[start + 1:start + 2] != b"*":
                    pos = start + 1
                    continue
                end = _skip_block_comment(sql, start)
                if end < 0:
                    return None
                kind = _COMMENT

        # The run of words and operators between the last token and this one.
        if start > last_end:
            run_end = start
            while run_end > last_end and sql[run_end - 1] in _SPACE_BYTES:
                run_end -= 1
            if run_end > last_end:
                run_start = last_end
                while sql[run_start] in _SPACE_BYTES:
                    run_start += 1
                if at_start:
                    if not _STATEMENT.match(sql, run_start):
                        return None
                    at_start = False
                if watch_by:
                    by_depth = _follow_by(sql[run_start:run_end], by_depth, len(keep_stack))
                before, before_start, before_end = prev, prev_start, prev_end
                prev, prev_start, prev_end = _RUN, run_start, run_end
        if found is None:
            break
        last_end = pos = end
        if kind == _COMMENT:  # ends a run, but is no token: prev stays the run or token before
            continue

        if at_start:
            if kind == _SEMICOLON:
                continue
            if kind != _OPEN:
                return None
            at_start = False

        if kind == _NUMERIC or kind == _STRING:
            keep = by_depth >= 0 or (bool(keep_stack) and keep_stack[-1])
            if prev == _STRING and kind == _STRING:
                return None  # 'a'<newline>'b' is one string; 'a' 'b' is an error
            literal = None
            if kind == _NUMERIC:
                if not keep:
                    literal = Literal(sql[start:end].decode("ascii"), False)
            elif not keep and (end == size or sql[end] not in _IDENT_BYTES) and \
                    _expression_before(sql, prev, prev_start, prev_end, start):
                text = _string_value(sql[start:end], standard_conforming_strings)
                if text is None:
                    return None
                literal = Literal(text, True)
            if literal is not None:
                number += 1
                placeholder = b"$%d" % number
                out.append(sql[copied:start])
                out.append(placeholder)
                out_len += start - copied + len(placeholder)
                param_ends.append(out_len)
                copied = end
                literals.append(literal)
                if spans is not None:
                    spans.append((start, end))
        elif kind == _FIXED:
            if prev == _STRING:
                return None  # B'0'<newline>'1' is one string too
            kind = _STRING
        elif kind == _OPEN:
            keep = bool(keep_stack) and keep_stack[-1]
            if not keep:
                if prev == _RUN:
                    keep = _modifiers_follow(sql, prev_start, prev_end, before, before_start,
                                             before_end)
                else:
                    keep = prev == _NAME  # "MyType"(3)
            keep_stack.append(keep)
        elif kind == _CLOSE:
            if not keep_stack:
                return None
            keep_stack.pop()
            if by_depth > len(keep_stack):
                by_depth = -1
        elif kind == _PARAM:
            param_ends.append(out_len + end - copied)
        elif kind == _SEMICOLON:
            if keep_stack:
                return None
            at_start = True
            by_depth = -1
            kind = _START
        before, before_start, before_end = prev, prev_start, prev_end
        prev, prev_start, prev_end = kind, start, end

    if keep_stack:
        return None
    if not literals:
        normalised = sql
    else:
        out.append(sql[copied:])
        normalised = b"".join(out)
    if param_ends and normalised.find(b"$", param_ends[0]) >= 0:
        normalised = _space_parameters(normalised, param_ends)
    return normalised, tuple(literals)


def _skip_block_comment(sql: bytes, start: int) -> int:
    """The end of the (possibly nested) comment that starts at `start`; -1 if it never ends."""
    depth = 0
    pos = start
    while True:
        mark = _COMMENT_MARK.search(sql, pos)
        if mark is None:
            return -1
        pos = mark.end()
        depth += 1 if mark.group() == b"/*" else -1
        if depth == 0:
            return pos


def _follow_by(run: bytes, by_depth: int, depth: int) -> int:
    """The ORDER/GROUP/PARTITION BY state after the words of a run at `depth`."""
    for word in _WORDS.findall(run):
        word = word.lower()
        if word == b"by":
            if by_depth < 0:
                by_depth = depth
        elif by_depth == depth and word in _BY_END:
            by_depth = -1
    return by_depth


def _last_word(sql: bytes, start: int, end: int) -> bytes:
    """The word that ends sql[start:end] (lower case), or b"" when it ends otherwise."""
    i = end
    while i > start and sql[i - 1] in _IDENT_BYTES:
        i -= 1
    return sql[i:end].lower()


def _expression_before(sql: bytes, prev: int, prev_start: int, prev_end: int,
                       start: int) -> bool:
    """Whether a string starting at `start` is an ordinary constant, judging by the token
    before it: an operator, `(` or `[`, or a keyword that begins an expression. After any other
    word, `)` or a quoted name it is the text of a typed literal (`DATE '..'`, `int4 '5'`,
    `varchar(3) 'abc'`, `"int4" '5'`) and must stay."""
    if sql[start - 1] in _IDENT_BYTES:  # SELECT'x' -> SELECT$10001 would be one identifier
        return False
    if prev == _OPEN:
        return True
    if prev != _RUN:
        return False
    last = sql[prev_end - 1]
    if last not in _IDENT_BYTES:
        return last in _OPERATOR_BYTES  # not after `.` or a byte SQL does not use
    return _last_word(sql, prev_start, prev_end) in _BEFORE_STRING


def _modifiers_follow(sql: bytes, prev_start: int, prev_end: int, before: int,
                      before_start: int, before_end: int) -> bool:
    """Whether a `(` or `[` after the run sql[prev_start:prev_end] holds literals that must
    stay: type modifiers (`varchar(10)`, `::mytype(5)`, `::int[3]`), constant-only arguments
    (`CURRENT_TIMESTAMP(3)`, `EXTRACT('year' FROM ..)`), or `DISTINCT ON (1)`, whose numbers
    name columns by position like ORDER BY's."""
    if sql[prev_end - 1] not in _IDENT_BYTES:
        return False
    word = _last_word(sql, prev_start, prev_end)
    if word in _LITERAL_ARGS:
        return True
    if word == b"on":
        rest = prev_end - len(word)
        while rest > prev_start and sql[rest - 1] in _SPACE_BYTES:
            rest -= 1
        if rest > prev_start:
            return _last_word(sql, prev_start, rest) == b"distinct"
        return before == _RUN and _last_word(sql, before_start, before_end) == b"distinct"
    return before == _CAST and _is_type_name(sql[prev_start:prev_end])


def _is_type_name(run: bytes) -> bool:
    """Whether a run after `::` is a type name: a (qualified) name, then only words that
    continue a type name (`double precision`), so that a ( or [ after it holds modifiers."""
    words = run.split()
    if not words or _TYPE_NAME.fullmatch(words[0]) is None:
        return False
    return all(w.lower() in _TYPE_WORDS for w in words[1:])


def _space_parameters(text: bytes, ends: list[int]) -> bytes:
    size = len(text)
    gaps = [end for end in ends
            if end < size and text[end] not in _SPACE_BYTES and _NEEDS_SPACE.match(text, end)]
    if not gaps:
        return text
    pieces = []
    last = 0
    for end in gaps:
        pieces.append(text[last:end])
        last = end
    pieces.append(text[last:])
    return b" ".join(pieces)


_ESCAPE = re.compile(
    rb"''|\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|u([0-9A-Fa-f]{4})|U([0-9A-Fa-f]{8})|(.))", re.S)
_SIMPLE_ESCAPES = {ord("b"): b"\b", ord("f"): b"\f", ord("n"): b"\n", ord("r"): b"\r",
                   ord("t"): b"\t"}


def _string_value(raw: bytes, standard_conforming_strings: bool) -> str | None:
    """The value of a string constant as written ('..', E'..', $tag$..$tag$); None when
    PostgreSQL would reject it."""
    body: bytes | None
    first = raw[0]
    if first == 0x24:  # $
        delimiter = raw.index(b"$", 1) + 1
        body = raw[delimiter:-delimiter]
    elif first != 0x27:  # E''
        body = _unescape(raw[2:-1])
    elif standard_conforming_strings:
        body = raw[1:-1].replace(b"''", b"'")
    else:
        body = _unescape(raw[1:-1])
    if body is None or 0 in body:
        return None
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _unescape(body: bytes) -> bytes | None:
    r"""PostgreSQL's backslash escapes (E'' strings): \b \f \n \r \t, octal \ooo, hex \xhh,
    \uXXXX and \UXXXXXXXX (UTF-16 surrogate pairs combined), any other \c is c; '' is '."""
    if b"\\" not in body:
        return body.replace(b"''", b"'")
    out = bytearray()
    last = 0
    high = 0  # a pending high surrogate, which must be followed by a low one at once
    for m in _ESCAPE.finditer(body):
        if high and m.start() != last:
            return None
        out += body[last:m.start()]
        last = m.end()
        octal, hexa, short, long, other = m.groups()
        if m.end() - m.start() == 2 and body[m.start()] == 0x27:  # ''
            if high:
                return None
            out.append(0x27)
        elif octal is not None:
            out.append(int(octal, 8) & 0xFF)
        elif hexa is not None:
            out.append(int(hexa, 16))
        elif short is not None or long is not None:
            code = int(short if short is not None else long, 16)
            if high:
                if not 0xDC00 <= code <= 0xDFFF:
                    return None
                code = 0x10000 + ((high - 0xD800) << 10) + (code - 0xDC00)
                high = 0
            elif 0xD800 <= code <= 0xDBFF:
                high = code
                continue
            elif 0xDC00 <= code <= 0xDFFF or code == 0 or code > 0x10FFFF:
                return None
            out += chr(code).encode("utf-8")
        else:
            assert other is not None
            if other in (b"u", b"U"):  # \u without four hex digits: PostgreSQL refuses it
                return None
            out += _SIMPLE_ESCAPES.get(other[0], other)
    if high:
        return None
    out += body[last:]
    return bytes(out)


# -- known shapes ----------------------------------------------------------------------------
#
# An application sends the same few statements with different values. Once a query has been
# scanned, its text with each literal's place left open is a pattern: a later query that
# matches it exactly has the same normalised text, and its literals are the pattern's groups.
# The fixed text around the literals is the same, so the scanner would decide the same way;
# only plain numbers and plain quoted strings become open places (other literals: no pattern).

_NUMBER_SLOT = rb"((?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)"
_STRING_SLOT = rb"'((?:[^']|'')*)'"
# Where a query's first literal may start; the text before the first such byte names the
# patterns to try (the fixed text before it is the same for every query of one shape).
_FIRST = re.compile(rb"[0-9.']")
_SHAPES_PER_KEY = 8
# A shape whose one literal is a plain integer with at least INTEGER_HEAD bytes before it is also
# kept by those first bytes, as (the text before the literal, the text after it): a query
# that begins and ends with them and has only ASCII digits between is of that shape. Two
# comparisons and a slice tell, where a pattern match reads the text a byte at a time.
INTEGER_HEAD = 16


class FingerprintCache:
    """`fingerprint` with a memory of the shapes it has seen (standard_conforming_strings on).
    Gives exactly what `fingerprint` gives; a query of a known shape costs one regex match
    instead of a scan."""

    __slots__ = ("_shapes", "_integers", "_limit")

    def __init__(self, limit: int = 2000) -> None:
        # Text before the first candidate byte -> the shapes starting so: (pattern, normalised,
        # which groups are strings).
        self._shapes: dict[bytes, list[tuple[re.Pattern[bytes], bytes, tuple[bool, ...]]]] = {}
        # The first INTEGER_HEAD bytes -> the shapes with one integer literal after them: (text
        # before the literal, text after it, normalised).
        self._integers: dict[bytes, list[tuple[bytes, bytes, bytes]]] = {}
        self._limit = limit

    def __call__(self, sql: bytes) -> tuple[bytes, tuple[Literal, ...]] | None:
        known = self.match(sql)
        if known is not None:
            normalised, found, strings = known
            literals = self.literals(found, strings)
            return None if literals is None else (normalised, literals)
        return self.scan(sql)

    def match(self, sql: bytes) -> tuple[bytes, re.Match[bytes], tuple[bool, ...]] | None:
        """A known shape's normalised text, the match of its pattern (group i + 1 is literal
        i, without its quotes) and which literals are strings; None for a shape not seen."""
        first = _FIRST.search(sql)
        shapes = self._shapes.get(sql if first is None else sql[:first.start()])
        if shapes is not None:
            for pattern, normalised, strings in shapes:
                found = pattern.fullmatch(sql)
                if found is not None:
                    return normalised, found, strings
        return None

    def integer(self, sql: bytes) -> tuple[bytes, bytes, bytes] | None:
        """For a known shape whose only literal is a plain integer (`WHERE id = 42`): the
        text before the literal, the text after it and the normalised text, as `match` would
        give them; None for any other query (then `match`). The query is the text before,
        ASCII digits, and the text after: the same fixed text on both sides as when the shape
        was learnt, so the scanner would read the digits between as one literal."""
        shapes = self._integers.get(sql[:INTEGER_HEAD])
        if shapes is not None:
            for shape in shapes:
                before, after, _ = shape
                if sql.startswith(before) and sql.endswith(after):
                    if sql[len(before):len(sql) - len(after)].isdigit():
                        return shape
        return None

    @staticmethod
    def literals(found: re.Match[bytes], strings: tuple[bool, ...]
                 ) -> tuple[Literal, ...] | None:
        """The literals of a `match`; None where the scan would give no fingerprint (a string
        with a NUL or bad UTF-8)."""
        literals = []
        for text, is_string in zip(found.groups(), strings, strict=True):
            if is_string:
                value = _string_value(b"'" + text + b"'", True)
                if value is None:
                    return None
                literals.append(Literal(value, True))
            else:
                literals.append(Literal(text.decode("ascii"), False))
        return tuple(literals)

    def scan(self, sql: bytes) -> tuple[bytes, tuple[Literal, ...]] | None:
        """`fingerprint`, by a scan of the text; the shape is learnt for `match`."""
        first = _FIRST.search(sql)
        key = sql if first is None else sql[:first.start()]
        spans: list[tuple[int, int]] = []
        printed = _scan(sql, True, spans)
        if printed is not None:
            self._learn(key, sql, printed, spans)
        return printed

    def _learn(self, key: bytes, sql: bytes, printed: tuple[bytes, tuple[Literal, ...]],
               spans: list[tuple[int, int]]) -> None:
        pieces = []
        last = 0
        strings = []
        for start, end in spans:
            is_string = sql[start] == 0x27
            if not is_string and sql[start] not in b"0123456789.":
                return  # E'', $$..$$: read by the scan every time
            pieces.append(re.escape(sql[last:start]))
            pieces.append(_STRING_SLOT if is_string else _NUMBER_SLOT)
            strings.append(is_string)
            last = end
        pieces.append(re.escape(sql[last:]))
        if len(self._shapes) >= self._limit or len(self._integers) >= self._limit:
            self._shapes.clear()
            self._integers.clear()
        shapes = self._shapes.setdefault(key, [])
        if len(shapes) >= _SHAPES_PER_KEY:
            del shapes[0]  # IN lists of every length, say: keep the recent ones
        shapes.append((re.compile(b"".join(pieces), re.S), printed[0], tuple(strings)))
        if len(spans) == 1:
            start, end = spans[0]
            if start >= INTEGER_HEAD and sql[start:end].isdigit():
                integers = self._integers.setdefault(sql[:INTEGER_HEAD], [])
                if len(integers) >= _SHAPES_PER_KEY:
                    del integers[0]
                integers.append((sql[:start], sql[end:], printed[0]))
