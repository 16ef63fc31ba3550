"""Literal normalisation of simple-protocol queries (router.fingerprint)."""

from __future__ import annotations

import random
import re

import pytest
import sqlglot
from sqlglot import exp

from shardwire.router.fingerprint import LITERAL_BASE, FingerprintCache, Literal, fingerprint


def n(text: str) -> Literal:
    return Literal(text, False)


def s(text: str) -> Literal:
    return Literal(text, True)


@pytest.mark.parametrize("sql,normalised,literals", [
    (b"SELECT abalance FROM pgbench_accounts WHERE aid = 123;",
     b"SELECT abalance FROM pgbench_accounts WHERE aid = $10001;", [n("123")]),
    (b"select * from t where a = 'x' and b = 2",
     b"select * from t where a = $10001 and b = $10002", [s("x"), n("2")]),
    # quotes: doubled quotes, E'' escapes, dollar quotes with and without tags
    (b"select 'it''s', '', 'a\\b'", b"select $10001, $10002, $10003",
     [s("it's"), s(""), s("a\\b")]),
    (b"select E'it\\'s\\n', e'\\t\\\\', E'a''b', E'\\x41\\101\\u00e9\\U0001F600'",
     b"select $10001, $10002, $10003, $10004",
     [s("it's\n"), s("\t\\"), s("a'b"), s("AA\u00e9\U0001F600")]),
    (b"select E'\\uD83D\\uDE00', E'\\q'", b"select $10001, $10002", [s("\U0001F600"), s("q")]),
    (b"select $$a'b$$, $tag$ $$ x $tag$, $a$$b$$a$", b"select $10001, $10002, $10003",
     [s("a'b"), s(" $$ x "), s("$b$")]),
    # numbers: scientific notation, leading and trailing dots; the sign stays outside
    (b"select 1e5, .5, 5., 1.5e-3, 2E+10, -7, - 7", b"select $10001, $10002, $10003, $10004, "
     b"$10005, -$10006, - $10007", [n("1e5"), n(".5"), n("5."), n("1.5e-3"), n("2E+10"), n("7"),
                                    n("7")]),
    # numbers inside identifiers are not literals; $n parameters stay
    (b"select t1.c2, a$1, \"x1\" from t1 where c2 = $1 and c3 = 3",
     b"select t1.c2, a$1, \"x1\" from t1 where c2 = $1 and c3 = $10001", [n("3")]),
    # comments and quoted identifiers are never touched
    (b"select /* it's 1 */ 1 -- and 'two'\n, \"a'b\" from \"t\"\"1\" where x = '--'",
     b"select /* it's 1 */ $10001 -- and 'two'\n, \"a'b\" from \"t\"\"1\" where x = $10002",
     [n("1"), s("--")]),
    (b"select /* a /* nested ' */ comment */ 1", b"select /* a /* nested ' */ comment */ $10001",
     [n("1")]),
    # casts after a literal stay
    (b"select '42'::int, 1::text, '1 day'::interval",
     b"select $10001::int, $10002::text, $10003::interval", [s("42"), n("1"), s("1 day")]),
    # typed literals stay as written
    (b"select DATE '2026-01-01', TIMESTAMP '2026-01-01 10:00', INTERVAL '1 day', "
     b"TIME '10:00', int4 '5', \"int4\" '5', pg_catalog.int4 '5', double precision '1.5', "
     b"varchar(3) 'abc', timestamp(3) with time zone '2026-01-01', interval '1' day",
     b"select DATE '2026-01-01', TIMESTAMP '2026-01-01 10:00', INTERVAL '1 day', "
     b"TIME '10:00', int4 '5', \"int4\" '5', pg_catalog.int4 '5', double precision '1.5', "
     b"varchar(3) 'abc', timestamp(3) with time zone '2026-01-01', interval '1' day", []),
    (b"select U&'d\\0061t' UESCAPE '!', B'0101', X'1F', N'abc', u&'x' from t",
     b"select U&'d\\0061t' UESCAPE '!', B'0101', X'1F', N'abc', u&'x' from t", []),
    # ...but keywords that start an expression are followed by plain strings
    (b"select 'a' where x like 'b%' and not y ilike 'c' or z between 'd' and 'e' "
     b"and w is distinct from 'f'",
     b"select $10001 where x like $10002 and not y ilike $10003 or z between $10004 and $10005 "
     b"and w is distinct from $10006",
     [s("a"), s("b%"), s("c"), s("d"), s("e"), s("f")]),
    (b"select case when a = 1 then 'x' else 'y' end", b"select case when a = $10001 then $10002 "
     b"else $10003 end", [n("1"), s("x"), s("y")]),
    (b"select x from t where y similar to 'a|b'", b"select x from t where y similar to $10001",
     [s("a|b")]),
    (b"SELECT * FROM t WHERE ts > now() - interval '1 day' AND x AT TIME ZONE 'UTC' > '2026-01-01'",
     b"SELECT * FROM t WHERE ts > now() - interval '1 day' AND x AT TIME ZONE 'UTC' > $10001",
     [s("2026-01-01")]),
    # type modifiers and constant-only arguments stay
    (b"select x::numeric(10,2), cast(y as varchar(10)), z::int[3], w::mytype(5), "
     b"v::pg_catalog.numeric(4, 1), current_timestamp(3), extract('year' from ts), "
     b"u::character varying(20), '1'::bit(8)",
     b"select x::numeric(10,2), cast(y as varchar(10)), z::int[3], w::mytype(5), "
     b"v::pg_catalog.numeric(4, 1), current_timestamp(3), extract('year' from ts), "
     b"u::character varying(20), $10001::bit(8)", [s("1")]),
    (b"select x::int in (1, 2), coalesce(a, 0), round(b, 2) from t",
     b"select x::int in ($10001, $10002), coalesce(a, $10003), round(b, $10004) from t",
     [n("1"), n("2"), n("0"), n("2")]),
    # ORDER BY 1 is a column position, ORDER BY $1 is not: BY lists keep their literals
    (b"select a, b from t where c = 1 group by 1, 2 having count(*) > 5 order by 2 desc, 1 "
     b"limit 10 offset 20",
     b"select a, b from t where c = $10001 group by 1, 2 having count(*) > $10002 order by 2 "
     b"desc, 1 limit $10003 offset $10004", [n("1"), n("5"), n("10"), n("20")]),
    (b"select distinct on (1) a, b from t order by 1, b", b"select distinct on (1) a, b from t "
     b"order by 1, b", []),
    (b"select distinct /* c */ on (1) a from t", b"select distinct /* c */ on (1) a from t", []),
    (b"select sum(x) over (partition by 1 order by 2), 3 from t",
     b"select sum(x) over (partition by 1 order by 2), $10001 from t", [n("3")]),
    (b"select a from t order by 1 /* limit */, 2 limit 3",
     b"select a from t order by 1 /* limit */, 2 limit $10001", [n("3")]),
    (b"select (select a from u order by 1 limit 1), 2 from t",
     b"select (select a from u order by 1 limit $10001), $10002 from t", [n("1"), n("2")]),
    # sqlglot 30.30 cannot tokenize `$1,$2`: a space after a parameter in exactly that case
    (b"select * from t where a in (1,2,3) and b = any(array['x','y'])",
     b"select * from t where a in ($10001 ,$10002 ,$10003) and b = any(array[$10004 ,$10005])",
     [n("1"), n("2"), n("3"), s("x"), s("y")]),
    (b"select 1||'a', x[1:2], 2-1 from t where y in ($1,$2)",
     b"select $10001 ||$10002, x[$10003 :$10004], $10005 -$10006 from t where y in ($1 ,$2)",
     [n("1"), s("a"), n("1"), n("2"), n("2"), n("1")]),
    # DML
    (b"INSERT INTO t (a, b) VALUES (1, 'x'), (2, 'y') ON CONFLICT (a) DO UPDATE SET b = 'z' "
     b"RETURNING a",
     b"INSERT INTO t (a, b) VALUES ($10001, $10002), ($10003, $10004) ON CONFLICT (a) DO UPDATE "
     b"SET b = $10005 RETURNING a", [n("1"), s("x"), n("2"), s("y"), s("z")]),
    (b"UPDATE pgbench_accounts SET abalance = abalance + -4321 WHERE aid = 98765;",
     b"UPDATE pgbench_accounts SET abalance = abalance + -$10001 WHERE aid = $10002;",
     [n("4321"), n("98765")]),
    (b"delete from t where id = 5 returning *", b"delete from t where id = $10001 returning *",
     [n("5")]),
    (b"with x as (select 1 as a) select * from x where a = 2",
     b"with x as (select $10001 as a) select * from x where a = $10002", [n("1"), n("2")]),
    (b"values (1, 'a')", b"values ($10001, $10002)", [n("1"), s("a")]),
    (b"  /* shard: s1 */ (select 1) union all select 'x'",
     b"  /* shard: s1 */ (select $10001) union all select $10002", [n("1"), s("x")]),
    (b"select 1; select 'a';", b"select $10001; select $10002;", [n("1"), s("a")]),
    (b"select a from t", b"select a from t", []),
    # a literal glued to a following identifier character stays
    (b"select 'x'as y", b"select 'x'as y", []),
    (b"SELECT'x'", b"SELECT'x'", []),
    (b"select x->>'a', y @> '{\"a\":1}'::jsonb from t",
     b"select x->>$10001, y @> $10002::jsonb from t", [s("a"), s('{"a":1}')]),
    (b"select 'caf\xc3\xa9'", b"select $10001", [s("caf\u00e9")]),
])
def test_fingerprint(sql: bytes, normalised: bytes, literals: list[Literal]) -> None:
    assert fingerprint(sql) == (normalised, tuple(literals))


@pytest.mark.parametrize("sql", [
    b"SET statement_timeout = 5", b"SHOW search_path", b"select 1; show x",
    b"EXPLAIN SELECT 1", b"COPY t FROM STDIN", b"PREPARE p AS SELECT 1", b"FETCH 5 FROM c",
    b"DECLARE c CURSOR FOR SELECT 1", b"NOTIFY ch, 'x'", b"BEGIN", b"'x'", b"1",
    b"select 'a'\n'b'",  # one string: continued over a newline
    b"select 'a' 'b'", b"select 'a' /* c */ 'b'", b"select B'0'\n'1'",
    b"select 'unterminated", b"select E'unterminated\\'", b'select "unterminated',
    b"select $$unterminated", b"select $a$x$b$", b"select /* unterminated",
    b"select /* nested /* */", b"select (1", b"select 1)", b"select 1; (", b"select $ 1",
    b"select 0x1F", b"select 1_000", b"select 123abc", b"select 1..2", b"select t.5 from t",
    b"select 1e", b"select 'ok', E'\\uD83D'", b"select E'\\u12'", b"select E'\\0'",
    b"select E'\\xff'", b"select '\xff'", b"select $$\xc3$$",
])
def test_not_normalised(sql: bytes) -> None:
    assert fingerprint(sql) is None


def test_standard_conforming_strings_off() -> None:
    sql = b"select 'a\\'b', 'c''d', 'e\\\\'"
    assert fingerprint(sql, standard_conforming_strings=False) == (
        b"select $10001, $10002, $10003", (s("a'b"), s("c'd"), s("e\\")))
    # with the setting on, the same text is a different sequence of strings
    assert fingerprint(b"select 'a\\', 'b'") == (b"select $10001, $10002", (s("a\\"), s("b")))


def test_literal_sql() -> None:
    assert s("it's").sql() == "'it''s'"
    assert n("1.5e3").sql() == "1.5e3"


@pytest.mark.parametrize("template", [
    "SELECT abalance FROM pgbench_accounts WHERE aid = {n}",
    "select * from t where a = {s} and b in ({n},{n},{n}) limit {n}",
    "insert into orders (tenant, id, note) values ({s}, {n}, {s}), ({s}, {n}, {s})",
    "update t set x = x + {n} where id = {n} and tenant = {s}",
])
def test_literal_values_share_a_fingerprint(template: str) -> None:
    first = fingerprint(_fill(template, 1).encode())
    second = fingerprint(_fill(template, 987).encode())
    assert first is not None and second is not None
    assert first[0] == second[0]
    assert first[1] != second[1]


def _fill(template: str, seed: int) -> str:
    counter = iter(range(seed, seed + 100))
    return re.sub(r"\{(n|s)\}", lambda m: str(next(counter)) if m.group(1) == "n"
                  else f"'v{next(counter)}'", template)


# Queries that sqlglot must parse once normalised, and that the literals restore exactly.
CORPUS = [
    "SELECT abalance FROM pgbench_accounts WHERE aid = 123",
    "SELECT * FROM t WHERE a IN (1,2,3) AND b = 'x'",
    "SELECT * FROM t WHERE a IN (1, 2, 3) AND b NOT IN ('x','y')",
    "SELECT a, count(*) FROM t WHERE b > 1.5 GROUP BY 1 HAVING count(*) > 2 ORDER BY 1 LIMIT 10",
    "SELECT * FROM t WHERE ts >= '2026-01-01' AND ts < '2026-02-01'::timestamptz",
    "SELECT * FROM t WHERE x = -1 AND y = +2 AND z = 3e10 AND w = .5",
    "SELECT 1||'a', 2-1, 3*-1, 'a'||'b'",
    "SELECT * FROM t WHERE a = ANY(ARRAY[1,2]) OR b = ANY('{1,2}')",
    "SELECT x->>'k', y #>> '{a,b}' FROM t WHERE z @> '{\"a\": 1}'::jsonb",
    "SELECT CASE WHEN a = 1 THEN 'one' WHEN a = 2 THEN 'two' ELSE 'many' END FROM t",
    "SELECT * FROM t WHERE name LIKE 'a%' AND note ILIKE '%b' AND x BETWEEN 1 AND 10",
    "SELECT * FROM t WHERE ts > now() - INTERVAL '1 day' AND d = DATE '2026-01-01' AND x = 1",
    "SELECT * FROM t ORDER BY a OFFSET 5 ROWS FETCH NEXT 10 ROWS ONLY",
    "SELECT x::numeric(10,2), CAST(y AS varchar(10)), z::int FROM t WHERE z = 1",
    "SELECT * FROM t JOIN u ON t.id = u.id AND u.kind = 'a' WHERE t.id = 42 FOR UPDATE",
    "SELECT * FROM (SELECT a FROM t WHERE b = 1) AS s WHERE a > 2",
    "SELECT (a, b) IN ((1, 'x'), (2, 'y')) FROM t",
    "SELECT sum(x) OVER (PARTITION BY a ORDER BY b ROWS BETWEEN 1 PRECEDING AND CURRENT ROW)",
    "WITH RECURSIVE r(n) AS (VALUES (1) UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT * FROM r",
    "INSERT INTO t (a, b, c) VALUES (1, 'x', 2.5), (2, 'y', -3)",
    "INSERT INTO t (a) VALUES (1) ON CONFLICT (a) DO UPDATE SET b = 'z' RETURNING a",
    "INSERT INTO t SELECT a, 'x' FROM u WHERE b = 2",
    "UPDATE t SET a = a + 1, b = 'x' WHERE id IN (1,2) RETURNING *",
    "UPDATE t SET a = u.a FROM u WHERE t.id = u.id AND u.x = 'q'",
    "DELETE FROM t USING u WHERE t.id = u.id AND u.k = 7",
    "DELETE FROM t WHERE id = 5",
    "SELECT * FROM t WHERE a = $1 AND b = 2 AND c IN ($2,$3)",
    "SELECT * FROM t WHERE a = 'it''s' /* hint: 'x' */ AND b = 1 -- tail 'y'\n AND c = 2",
    "SELECT DISTINCT ON (a) a, b FROM t WHERE c = 'x' ORDER BY a, b DESC",
    "SELECT * FROM t WHERE a = 1 UNION ALL SELECT * FROM u WHERE b = 'x' ORDER BY 1 LIMIT 5",
    "SELECT * FROM t WHERE x ~ '^a' AND y !~ 'b$' AND z SIMILAR TO 'c'",
    "SELECT * FROM t WHERE col IS DISTINCT FROM 'x' AND d IS NOT NULL",
    "SELECT coalesce(a, 0), nullif(b, ''), greatest(1, 2), round(c, 2) FROM t",
    "SELECT * FROM t TABLESAMPLE BERNOULLI (10) WHERE a = 1",
    "SELECT * FROM t WHERE a = 1 AND b = 2 FOR UPDATE SKIP LOCKED",
    "SELECT count(*) FILTER (WHERE x > 5) FROM t",
    "SELECT arr[1], arr[1:2] FROM t WHERE arr[3] = 4",
]


@pytest.mark.parametrize("sql", CORPUS)
def test_normalised_text_parses_and_restores(sql: str) -> None:
    result = fingerprint(sql.encode())
    assert result is not None
    normalised, literals = result
    assert len(literals) > 0
    tree = sqlglot.parse_one(normalised.decode(), read="postgres")
    indexes = {int(p.this.name) for p in tree.find_all(exp.Parameter)}
    placeholders = set(range(LITERAL_BASE + 1, LITERAL_BASE + 1 + len(literals)))
    assert placeholders <= indexes
    assert indexes - placeholders == {int(i) for i in re.findall(r"\$(\d+)", sql)}
    restored = re.sub(rb"\$(\d+)", lambda m: (
        literals[int(m.group(1)) - LITERAL_BASE - 1].sql().encode()
        if int(m.group(1)) > LITERAL_BASE else m.group()), normalised)
    # Spaces may have been added after parameters (the sqlglot workaround), nothing else.
    assert restored.replace(b" ", b"") == sql.encode().replace(b" ", b"")


def test_sqlglot_tokenizer_bug_is_still_there() -> None:
    # When this starts passing, the spacing workaround in fingerprint() can go.
    with pytest.raises(sqlglot.errors.TokenError):
        sqlglot.parse_one("SELECT * FROM t WHERE a IN ($2,$3)", read="postgres")
    sqlglot.parse_one("SELECT * FROM t WHERE a IN ($2 ,$3)", read="postgres")


# Bytes that change how a query is read when they land in or next to a literal.
_MUTATIONS = b"'.e1 -\n\x00\xff$a;()E\\"


@pytest.mark.parametrize("sql", CORPUS + [
    "select 'caf\u00e9', 'it''s', 1.5e3, .5 from t where a = 1",
    "select * from t where a in (1,2,3)", "select * from t where a in (1,2,3,4)",
    "select E'x\\n', $$y$$, 'z' from t", "select x from t order by 1 limit 5",
])
def test_shape_cache_gives_what_the_scan_gives(sql: str) -> None:
    """The cache answers a query of a known shape by a pattern match: for the query itself, for
    the same shape with other values, and for texts one byte away (which may or may not keep the
    shape), its answer is always the scanner's."""
    cache = FingerprintCache()
    original = sql.encode()
    rng = random.Random(original)
    assert cache(original) == fingerprint(original)
    assert cache(original) == fingerprint(original)
    for _ in range(200):
        pos = rng.randrange(len(original))
        mutant = original[:pos] + bytes([rng.choice(_MUTATIONS)]) + original[pos + 1:]
        cache(original)
        assert cache(mutant) == fingerprint(mutant), mutant
        assert cache(mutant) == fingerprint(mutant), mutant


@pytest.mark.parametrize("template", [
    "SELECT abalance FROM pgbench_accounts WHERE aid = {n}",
    "select * from t where a = {s} and b in ({n},{n},{n}) limit {n}",
])
def test_shape_cache_reads_new_values(template: str) -> None:
    cache = FingerprintCache()
    for seed in (1, 987, 5, 123456):
        sql = _fill(template, seed).encode()
        assert cache(sql) == fingerprint(sql)
    assert cache(b"select * from t where a = 'it''s' and b in (1,2,3) limit 4")[1][0] == s("it's")


@pytest.mark.parametrize("sql", [
    "SELECT abalance FROM pgbench_accounts WHERE aid = 123",
    "SELECT abalance FROM pgbench_accounts WHERE aid = 123;",
    "select * from orders where id=7 for update",
    "DELETE FROM t WHERE id = 5 RETURNING *",
    "select x from some_table where a = 1e5",
    "select x from some_table where a = 'x'",
])
def test_integer_shapes_answer_as_the_scan_does(sql: str) -> None:
    """`integer` answers a query of a learnt one-integer shape by its fixed text on both sides:
    for new digits it gives the scanner's normalised text and literal, and for texts that
    differ near or in the literal (a decimal point, an exponent, a quote, a letter, a second
    number...) it gives either that or nothing, never another answer."""
    cache = FingerprintCache()
    original = sql.encode()
    printed = cache(original)
    single = (printed is not None and len(printed[1]) == 1 and not printed[1][0].is_string
              and printed[1][0].text.isdigit())
    digits = re.search(rb"\d+", original)
    rng = random.Random(original)
    for _ in range(300):
        if digits is not None and rng.random() < 0.5:
            middle = bytes(rng.choice(b"0123456789" + _MUTATIONS) for _ in range(rng.randint(0, 4)))
            query = original[:digits.start()] + middle + original[digits.end():]
        else:
            pos = rng.randrange(len(original))
            query = original[:pos] + bytes([rng.choice(_MUTATIONS)]) + original[pos + 1:]
        answer = cache.integer(query)
        if answer is not None:
            before, after, normalised = answer
            literal = query[len(before):len(query) - len(after)]
            assert query == before + literal + after
            expected = fingerprint(query)
            assert expected is not None, query
            assert (normalised, (Literal(literal.decode(), False),)) == expected, query
    if single:
        assert digits is not None and printed is not None
        other = original[:digits.start()] + b"987654" + original[digits.end():]
        assert cache.integer(other) == (original[:digits.start()], original[digits.end():],
                                        printed[0])
    else:  # not a one-integer shape: `match` answers
        assert cache.integer(original) is None


def test_integer_shapes_need_fixed_text_before_the_literal() -> None:
    """A literal within the first bytes would change the key the shape is kept by: such a
    shape is left to `match`."""
    cache = FingerprintCache()
    assert cache(b"select 5 from t") is not None
    assert cache.integer(b"select 6 from t") is None
    assert cache.match(b"select 6 from t") is not None
