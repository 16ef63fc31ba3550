"""Leading-keyword classification of statements, for pooling decisions."""

from __future__ import annotations

import pytest

from shardwire.router.classify import (
    SessionReset,
    leading_words,
    session_reset,
    session_state_reason,
    split_statements,
)


def test_split_respects_quotes_comments_and_dollar_quotes() -> None:
    sql = (b"select 1; select ';'; select \"a;b\"; /* ; /* nested ; */ */ select 2;"
           b" select $f$ ; $f$; select $1; -- ;\nselect 3;;")
    assert split_statements(sql) == [
        b"select 1", b"select ';'", b'select "a;b"', b"/* ; /* nested ; */ */ select 2",
        b"select $f$ ; $f$", b"select $1", b"-- ;\nselect 3"]


def test_leading_words_skip_comments_and_parentheses() -> None:
    assert leading_words(b"/* hint */ -- x\n (SELECT a)") == ["select", "a"]


@pytest.mark.parametrize("sql,reason", [
    (b"SET search_path = s", "SET search_path"),
    (b"set session statement_timeout to 5", "SET statement_timeout"),
    (b"SET LOCAL search_path = s", None),
    (b"SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", None),
    (b"SET application_name = 'x'", None),
    (b"SET TIME ZONE 'UTC'", None),
    (b"SET DateStyle = ISO", None),
    (b"RESET ALL", None),  # the proxy restores the startup settings after it
    (b"RESET search_path", "RESET search_path"),
    (b"select 1 as x into temp table t", "SELECT INTO TEMPORARY"),
    (b"create table pg_temp.t (x int)", "object in pg_temp"),
    (b"select * from pg_temp.t", "object in pg_temp"),
    (b"PREPARE p AS SELECT 1", "PREPARE"),
    (b"LISTEN chan", "LISTEN"),
    (b"create temp table t (a int)", "CREATE TEMPORARY"),
    (b"CREATE LOCAL TEMPORARY TABLE t (a int)", "CREATE TEMPORARY"),
    (b"DECLARE c CURSOR WITH HOLD FOR SELECT 1", "DECLARE ... WITH HOLD"),
    (b"DECLARE c CURSOR FOR SELECT 1", None),
    (b"select pg_advisory_lock(1)", "session-level function (advisory lock or set_config)"),
    # asyncpg around its type introspection: jit changes no result, so it does not pin
    (b"SELECT current_setting('jit') AS cur, set_config('jit', 'off', false) AS new", None),
    (b"SELECT set_config('jit', $1, false)", None),
    (b"SELECT set_config('search_path', 'x', false)",
     "session-level function (advisory lock or set_config)"),
    (b"SELECT set_config('jit', 'off', false), set_config('role', 'x', false)",
     "session-level function (advisory lock or set_config)"),
    (b"UPDATE t SET a = 1", None),
    (b"select 'SET search_path = x'", None),
    (b"select 1; set search_path = x", "SET search_path"),
    (b"SELECT abalance FROM pgbench_accounts WHERE aid = 1;", None),
])
def test_session_state_reason(sql: bytes, reason: str | None) -> None:
    assert session_state_reason(sql) == reason


def test_reset_all_pins_in_the_extended_protocol() -> None:
    assert session_state_reason(b"RESET ALL", simple=False) == "RESET all"


@pytest.mark.parametrize("sql,expected", [
    (b"DISCARD ALL", SessionReset(prepared=True, settings=True)),
    (b"deallocate all", SessionReset(prepared=True, settings=False)),
    (b"DEALLOCATE PREPARE ALL", SessionReset(prepared=True, settings=False)),
    (b"RESET ALL", SessionReset(prepared=False, settings=True)),
    (b"SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL",
     SessionReset(prepared=False, settings=True)),
    (b"select 1; discard all", SessionReset(prepared=True, settings=True)),
    (b"DISCARD PLANS", None),
    (b"select 'discard all'", None),
])
def test_session_reset(sql: bytes, expected: SessionReset | None) -> None:
    assert session_reset(sql) == expected
