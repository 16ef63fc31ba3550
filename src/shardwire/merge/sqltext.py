"""Where the parts of a SELECT are in its text, so that a rewrite can splice the client's
own text (appending helper columns, dropping HAVING or ORDER BY, changing LIMIT) instead of
regenerating the statement with sqlglot, which keeps meaning but not spelling (and so not
always the column names a client sees).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlglot.dialects.postgres import Postgres
from sqlglot.tokens import Token, TokenType

from .errors import MergeRefused

_DIALECT = Postgres()

# Keywords that end the select list or a clause, at the statement's own level.
_CLAUSES = {
    TokenType.FROM: "from", TokenType.WHERE: "where", TokenType.GROUP_BY: "group",
    TokenType.HAVING: "having", TokenType.WINDOW: "window", TokenType.ORDER_BY: "order",
    TokenType.LIMIT: "limit", TokenType.OFFSET: "offset", TokenType.FETCH: "fetch",
    TokenType.FOR: "for", TokenType.INTO: "into", TokenType.UNION: "union",
    TokenType.INTERSECT: "intersect", TokenType.EXCEPT: "except",
}
_OPEN = {TokenType.L_PAREN, TokenType.L_BRACKET}
_CLOSE = {TokenType.R_PAREN, TokenType.R_BRACKET}


@dataclass(slots=True)
class Layout:
    """Character spans (start, end) of the main SELECT's parts; ends are exclusive."""

    text: str
    distinct: tuple[int, int] | None = None  # DISTINCT or DISTINCT ON (...)
    items: list[tuple[int, int]] = field(default_factory=list)
    clauses: dict[str, tuple[int, int]] = field(default_factory=dict)
    end: int = 0  # end of the statement, before a trailing semicolon


def _cannot(why: str) -> MergeRefused:
    return MergeRefused(f"cannot rewrite the statement for a multi-shard merge: {why}",
                        hint="simplify the statement, or restrict it to one shard's key")


def layout(text: str) -> Layout:
    tokens: list[Token] = list(_DIALECT.tokenize(text))
    while tokens and tokens[-1].token_type is TokenType.SEMICOLON:
        tokens.pop()
    if not tokens:
        raise _cannot("empty statement")
    out = Layout(text, end=tokens[-1].end + 1)
    depth = 0
    i = 0
    n = len(tokens)
    # The main SELECT: the first at depth 0 (a WITH clause's queries are in parentheses).
    while i < n:
        t = tokens[i]
        if t.token_type in _OPEN:
            depth += 1
        elif t.token_type in _CLOSE:
            depth -= 1
        elif depth == 0 and t.token_type is TokenType.SELECT:
            break
        i += 1
    if i == n:
        raise _cannot("no SELECT at the top level")
    i += 1
    if i < n and tokens[i].token_type is TokenType.DISTINCT:
        start = tokens[i].start
        stop = tokens[i].end + 1
        i += 1
        if i < n and tokens[i].token_type is TokenType.ON:
            i += 1
            if i >= n or tokens[i].token_type is not TokenType.L_PAREN:
                raise _cannot("DISTINCT ON without parentheses")
            level = 0
            while i < n:
                tt = tokens[i].token_type
                if tt in _OPEN:
                    level += 1
                elif tt in _CLOSE:
                    level -= 1
                    if level == 0:
                        break
                i += 1
            if i >= n:
                raise _cannot("unbalanced parentheses")
            stop = tokens[i].end + 1
            i += 1
        out.distinct = (start, stop)
    elif i < n and tokens[i].token_type is TokenType.ALL:
        i += 1
    # Select items: split on commas at depth 0 until a clause keyword.
    item_start: int | None = None
    item_end = 0
    depth = 0
    clause: str | None = None
    clause_start = 0
    while i < n:
        t = tokens[i]
        tt = t.token_type
        if tt in _OPEN:
            depth += 1
        elif tt in _CLOSE:
            depth -= 1
        elif depth == 0 and tt in _CLAUSES and not (
                tt is TokenType.FROM and tokens[i - 1].token_type is TokenType.DISTINCT):
            # (the FROM of `IS [NOT] DISTINCT FROM` is no clause)
            name = _CLAUSES[tt]
            if clause is None:
                if item_start is not None:
                    out.items.append((item_start, item_end))
                    item_start = None
            else:
                out.clauses[clause] = (clause_start, t.start)
            if name in out.clauses or name == clause:
                raise _cannot(f"two {name.upper()} clauses")
            clause, clause_start = name, t.start
            i += 1
            continue
        elif depth == 0 and tt is TokenType.COMMA and clause is None:
            if item_start is None:
                raise _cannot("an empty select item")
            out.items.append((item_start, item_end))
            item_start = None
            i += 1
            continue
        if clause is None:
            if item_start is None:
                item_start = t.start
            item_end = t.end + 1
        i += 1
    if clause is None:
        if item_start is not None:
            out.items.append((item_start, item_end))
    else:
        out.clauses[clause] = (clause_start, out.end)
    return out


@dataclass(slots=True)
class Splice:
    """Edits to a text, applied all at once (spans must not overlap)."""

    text: str
    edits: list[tuple[int, int, str]] = field(default_factory=list)

    def replace(self, start: int, end: int, new: str) -> None:
        self.edits.append((start, end, new))

    def insert(self, at: int, new: str) -> None:
        self.edits.append((at, at, new))

    def result(self) -> str:
        out = self.text
        for start, end, new in sorted(self.edits, key=lambda e: (e[0], e[1]), reverse=True):
            out = out[:start] + new + out[end:]
        return out


def clause_items(text: str, span: tuple[int, int]) -> list[str]:
    """The comma-separated items of a clause (`GROUP BY a, f(b, c)`), as written."""
    tokens = list(_DIALECT.tokenize(text[span[0]:span[1]]))
    items: list[str] = []
    depth = 0
    start: int | None = None
    end = 0
    for t in tokens[1:]:  # after the clause keyword (GROUP BY is one token)
        tt = t.token_type
        if tt in _OPEN:
            depth += 1
        elif tt in _CLOSE:
            depth -= 1
        elif depth == 0 and tt is TokenType.COMMA:
            if start is not None:
                items.append(text[span[0] + start:span[0] + end])
            start = None
            continue
        if start is None:
            start = t.start
        end = t.end + 1
    if start is not None:
        items.append(text[span[0] + start:span[0] + end])
    return items
