"""Classify statements by their leading keywords, without a full parse.

sqlglot misparses or falls back on many utility statements (LISTEN, SHOW, DECLARE...), and a
full parse is too slow for the pooling decisions made on every statement. These helpers look at
the first words of each statement in a query string, skipping comments and never looking inside
string literals, quoted identifiers or dollar-quoted bodies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Parameters PostgreSQL reports with ParameterStatus (GUC_REPORT). A session-level SET of one of
# these is visible to the proxy and replayed on whichever server connection serves the client.
REPORTED_PARAMETERS = frozenset({
    "application_name", "client_encoding", "datestyle", "default_transaction_read_only",
    "in_hot_standby", "integer_datetimes", "intervalstyle", "is_superuser", "server_encoding",
    "server_version", "session_authorization", "standard_conforming_strings", "timezone",
})

_WORD = re.compile(rb"[A-Za-z_][A-Za-z0-9_$]*")
# Statements that start like this leave no session state by their leading keyword.
_PLAIN_STARTS = (b"select", b"insert", b"update", b"delete", b"with", b"values", b"table")
# Only a query string containing one of these can leave session state behind.
_MAYBE_STATEFUL = (b"set", b"prepare", b"listen", b"load", b"declare", b"temp", b"advisory")
_SESSION_FUNCTIONS = re.compile(
    rb"pg_advisory_lock|pg_advisory_lock_shared|pg_try_advisory_lock|set_config", re.I)


_SPECIAL = re.compile(rb"[;'\"$]|--|/\*")


def split_statements(sql: bytes) -> list[bytes]:
    """Split a query string at top-level semicolons; drop empty statements.

    Quotes, dollar quotes, quoted identifiers and comments are skipped over, so a `;` inside
    them does not split. Unterminated constructs end at the end of the text.
    """
    out: list[bytes] = []
    start = 0
    i = 0
    n = len(sql)
    search = _SPECIAL.search
    while i < n:
        found = search(sql, i)
        if found is None:
            break
        i = found.start()
        c = sql[i]
        if c == 0x3B:  # ;
            piece = sql[start:i].strip()
            if piece:
                out.append(piece)
            start = i = i + 1
        elif c in (0x27, 0x22):  # ' or "
            i = _skip_quoted(sql, i, c)
        elif c == 0x2D:  # --
            j = sql.find(b"\n", i)
            i = n if j < 0 else j + 1
        elif c == 0x2F:  # /*
            i = skip_block_comment(sql, i)
        else:  # $
            i = _skip_dollar_quote(sql, i)
    piece = sql[start:].strip()
    if piece:
        out.append(piece)
    return out


def _skip_quoted(sql: bytes, i: int, quote: int) -> int:
    n = len(sql)
    i += 1
    while i < n:
        if sql[i] == quote:
            if i + 1 < n and sql[i + 1] == quote:
                i += 2
                continue
            return i + 1
        i += 1
    return n


def skip_block_comment(sql: bytes, i: int) -> int:
    """Past the end of the (nestable) block comment starting at `i`; the text's end if it
    never ends."""
    depth = 0
    n = len(sql)
    while i < n:
        if sql.startswith(b"/*", i):
            depth += 1
            i += 2
        elif sql.startswith(b"*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    return n


_DOLLAR_TAG = re.compile(rb"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


def _skip_dollar_quote(sql: bytes, i: int) -> int:
    if i > 0 and (sql[i - 1:i].isalnum() or sql[i - 1] == 0x5F):
        return i + 1  # part of an identifier such as a$b
    m = _DOLLAR_TAG.match(sql, i)
    if not m:
        return i + 1  # a parameter like $1
    end = sql.find(m.group(0), m.end())
    return len(sql) if end < 0 else end + len(m.group(0))


def leading_words(statement: bytes, count: int = 3) -> list[str]:
    """The first `count` words of one statement, lower-cased, after comments and parentheses."""
    words: list[str] = []
    i = 0
    n = len(statement)
    while i < n and len(words) < count:
        c = statement[i]
        if c in b" \t\r\n\f(":
            i += 1
        elif statement.startswith(b"--", i):
            j = statement.find(b"\n", i)
            i = n if j < 0 else j + 1
        elif statement.startswith(b"/*", i):
            i = skip_block_comment(statement, i)
        else:
            m = _WORD.match(statement, i)
            if not m:
                break
            words.append(m.group(0).decode("ascii").lower())
            i = m.end()
    return words


def session_state_reason(sql: bytes, *, simple: bool = True) -> str | None:
    """Why this query string leaves state on its server connection that outlives the
    transaction and cannot be replayed elsewhere, or None.

    A client whose statement has such a reason is pinned to its server connection for the rest
    of its session (see docs/pooling.md). False positives only cost pooling efficiency.
    `simple` is false for the text of a Parse: there RESET ALL pins too, since the proxy
    restores settings after it only in the simple protocol.
    """
    lowered = sql.lower()
    head = lowered.lstrip()
    if head.startswith(_PLAIN_STARTS) and b";" not in head.rstrip(b" \t\r\n;"):
        # One query or DML statement (the common case, kept fast): only temporary tables and
        # session functions can leave state behind.
        if b"temp" not in lowered and b"advisory" not in lowered and (
                b"set_config" not in lowered):
            return None
    else:
        for word in _MAYBE_STATEFUL:
            if word in lowered:
                break
        else:
            return None
    for stmt in split_statements(sql) if b";" in sql else (sql,):
        reason = _statement_state_reason(stmt, simple)
        if reason:
            return reason
    if _SESSION_FUNCTIONS.search(_HARMLESS_SET_CONFIG.sub(b"", sql)):
        return "session-level function (advisory lock or set_config)"
    return None


# set_config of a setting that changes no result, only how fast it comes: asyncpg turns jit
# off around its type introspection (and back on), which must not pin the session.
_HARMLESS_SET_CONFIG = re.compile(rb"set_config\s*\(\s*'jit'", re.I)


_INTO_TEMP = re.compile(rb"\binto\s+(?:temp|temporary)\b", re.I)
_PG_TEMP = re.compile(rb"\bpg_temp(?:_\d+)?\s*\.", re.I)


def _statement_state_reason(stmt: bytes, simple: bool) -> str | None:
    words = leading_words(stmt, 4)
    if not words:
        return None
    first = words[0]
    if first == "set":
        rest = words[1:]
        if rest and rest[0] == "local":
            return None
        if rest and rest[0] == "session":
            rest = rest[1:]
        if not rest or rest[0] == "transaction":
            return None
        if rest[0] in ("time",):  # SET TIME ZONE is reported (TimeZone)
            return None
        if rest[0] in REPORTED_PARAMETERS or rest[0] == "shardwire":
            return None  # replayed, or (shardwire.*) answered by the proxy itself
        return f"SET {rest[0]}"
    if first == "reset":
        target = words[1] if len(words) > 1 else ""
        if target in REPORTED_PARAMETERS or target == "shardwire" or (
                target == "all" and simple):
            return None
        return f"RESET {target}"
    if first in ("prepare", "listen", "load"):
        return first.upper()
    if first == "declare" and b"hold" in stmt.lower():
        return "DECLARE ... WITH HOLD"
    if first == "create" and len(words) > 1 and (
            words[1] in ("temp", "temporary")
            or (words[1] in ("local", "global") and len(words) > 2
                and words[2] in ("temp", "temporary"))):
        return "CREATE TEMPORARY"
    if first in ("create", "select", "with", "alter") and _PG_TEMP.search(stmt):
        return "object in pg_temp"
    if first in ("select", "with") and _INTO_TEMP.search(stmt):
        return "SELECT INTO TEMPORARY"
    return None


@dataclass(frozen=True, slots=True)
class SessionReset:
    """What a query string resets on its server connection."""

    prepared: bool  # every prepared statement is gone (DISCARD ALL, DEALLOCATE ALL)
    settings: bool  # settings are back to the session's defaults (DISCARD ALL, RESET ALL)


def session_reset(sql: bytes) -> SessionReset | None:
    """DISCARD ALL, DEALLOCATE [PREPARE] ALL or RESET ALL among the statements, or None."""
    prepared = settings = False
    for stmt in split_statements(sql) if b";" in sql else (sql,):
        words = leading_words(stmt, 3)
        if words[:2] == ["discard", "all"]:
            prepared = settings = True
        elif words[:2] == ["deallocate", "all"] or words[:3] == ["deallocate", "prepare", "all"]:
            prepared = True
        elif words[:2] == ["reset", "all"]:
            settings = True
    return SessionReset(prepared, settings) if prepared or settings else None


_SET = re.compile(
    rb"(?is)^\s*set\s+(?:session\s+)?([a-z_][a-z0-9_$]*(?:\.[a-z_][a-z0-9_$]*)?)\s*"
    rb"(?:=|\bto\b)\s*(.*?)\s*;?\s*$")
_RESET = re.compile(rb"(?is)^\s*reset\s+([a-z_][a-z0-9_$]*(?:\.[a-z_][a-z0-9_$]*)?)\s*;?\s*$")
_SIMPLE_VALUE = re.compile(rb"(?s)^(?:'(?:[^']|'')*'|[\w.+\-$\"]+(?:\s*,\s*[\w.+\-$\"]+)*)$")
# Settings whose SET has side effects or a grammar of its own: pin instead of replaying.
_NOT_REPLAYED = frozenset({"role", "authorization", "constraints", "transaction", "time",
                           "local", "session"})


class RawSql(str):
    """A setting's value as SQL text, replayed as written (`a, b` for a list), not quoted."""

    __slots__ = ()


def replayable_setting(sql: bytes) -> tuple[str, str | None] | None:
    """A single session-level `SET name = value` or `RESET name` that the proxy can replay on
    any server connection: (name, value as a string), value None for RESET; else None."""
    if b";" in sql.rstrip(b" \t\r\n;"):
        return None
    m = _SET.match(sql)
    if m:
        name = m.group(1).decode().lower()
        raw = m.group(2)
        if name in _NOT_REPLAYED or not raw or not _SIMPLE_VALUE.match(raw):
            return None
        if raw.lower() == b"default":
            return name, None
        if raw.startswith(b"'"):
            return name, raw[1:-1].replace(b"''", b"'").decode("utf-8", "surrogateescape")
        return name, RawSql(raw.decode("utf-8", "surrogateescape"))
    m = _RESET.match(sql)
    if m:
        name = m.group(1).decode().lower()
        if name in _NOT_REPLAYED or name == "all":
            return None
        return name, None
    return None

