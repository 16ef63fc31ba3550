"""What one statement touches: its tables, their rule, and what it says about the rule's key.

`analyze` runs once per statement text (the result is cached); `route` then only evaluates
the key conditions found here against literal and parameter values. Pure: no I/O.

The analysis is conservative. A predicate it does not understand restricts nothing, so the
statement goes to more shards (or is refused), never to too few.
"""

from __future__ import annotations

import enum
import logging
import re
from dataclasses import dataclass, field

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

from . import classify
from .plan import Refusal
from .shardmap import Rule, ShardMap, TableName

# sqlglot warns on the logger for statements it falls back on; routing decides by itself.
logging.getLogger("sqlglot").setLevel(logging.ERROR)


class Kind(enum.Enum):
    READ = "read"
    WRITE = "write"  # INSERT, UPDATE, DELETE, MERGE, data-modifying CTEs
    DDL = "ddl"  # CREATE, ALTER, DROP, TRUNCATE, ...
    MAINTENANCE = "maintenance"  # VACUUM, ANALYZE, REINDEX, CLUSTER: every shard, no 2PC
    SESSION = "session"  # SET, SHOW, RESET, DISCARD, LISTEN...: wherever the session runs
    TRANSACTION = "transaction"  # BEGIN, COMMIT, ROLLBACK, SAVEPOINT...


# -- key conditions --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Slot:
    """A value in the statement: a literal written in it, or a parameter `$n` (parameters
    above `fingerprint.LITERAL_BASE` stand for literals taken out of a simple query)."""

    param: int = 0
    literal: str | None = None
    cast: str | None = None  # a cast applied to it (`'42'::int`), lower-case type name
    string: bool = False  # the literal was quoted ('42'), not a number (42)
    negate: bool = False  # written with a minus sign before it
    null: bool = False  # the literal NULL


@dataclass(frozen=True, slots=True)
class Eq:
    slot: Slot


@dataclass(frozen=True, slots=True)
class In:
    slots: tuple[Slot, ...]


@dataclass(frozen=True, slots=True)
class Interval:
    low: Slot | None
    low_inclusive: bool
    high: Slot | None
    high_inclusive: bool


@dataclass(frozen=True, slots=True)
class And:
    parts: tuple[Cond, ...]


@dataclass(frozen=True, slots=True)
class Or:
    parts: tuple[Cond, ...]


@dataclass(frozen=True, slots=True)
class Unknown:
    """No restriction on the key."""


UNKNOWN = Unknown()
Cond = Eq | In | Interval | And | Or | Unknown


def conjoin(a: Cond, b: Cond) -> Cond:
    if isinstance(a, Unknown):
        return b
    if isinstance(b, Unknown):
        return a
    parts = (a.parts if isinstance(a, And) else (a,)) + (b.parts if isinstance(b, And) else (b,))
    return And(parts)


# -- the analysis ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyClass:
    """Sharded table references whose keys are equal in every row the statement uses (joined
    on the key), and the condition the statement puts on that key."""

    tables: tuple[TableName, ...]
    condition: Cond
    inserted: bool = False  # holds the INSERT's target: its keys are the inserted rows'


@dataclass(frozen=True, slots=True)
class Analysis:
    kind: Kind
    rule: Rule | None = None  # the one rule of the sharded tables touched, if any
    classes: tuple[KeyClass, ...] = ()
    unsharded: tuple[TableName, ...] = ()  # tables on the default shard only
    reference: tuple[TableName, ...] = ()
    writes: tuple[TableName, ...] = ()  # tables the statement changes
    insert_keys: tuple[Slot | None, ...] | None = None  # INSERT VALUES: each row's key
    new_key: Slot | None = None  # UPDATE ... SET key = value
    refusal: Refusal | None = None
    hint_shard: str | None = None  # from a /* shard: name */ comment
    reason: str = ""
    words: tuple[str, ...] = ()  # leading keywords, lower-case
    set_shardwire: tuple[str, str, bool] | None = None  # SET shardwire.x = v (name, value, local)
    explain_only: bool = False  # EXPLAIN without ANALYZE: any one shard of the plan shows it

    @property
    def sharded(self) -> bool:
        return self.rule is not None


_HINT = re.compile(rb"^/\*\s*shard\s*:\s*([A-Za-z_][A-Za-z0-9_]*)\s*\*/$")
# Quoted strings, quoted identifiers, dollar quotes and comments: what a scan for hints,
# parameters or names must step over (group 2: a comment).
_SKIP = rb"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\$(\w*)\$.*?\$\1\$|(/\*.*?\*/|--[^\n]*)"
_COMMENTS = re.compile(_SKIP, re.S)
# sqlglot's tokenizer reads `,$2` (or `($2`) as the start of a dollar-quoted string: add a
# space before such parameters, outside quotes (SQLGLOT.md).
_GLUED_PARAM = re.compile(_SKIP + rb"|(?<=[,(])(\$\d)", re.S)
_NAME = rb"(?:\"(?:[^\"]|\"\")+\"|[A-Za-z_][\w$]*)"
_NAMES = re.compile(rb"'(?:[^']|'')*'|\$(\w*)\$.*?\$\1\$|(/\*.*?\*/|--[^\n]*)|("
                    + _NAME + rb"(?:\s*\.\s*" + _NAME + rb")?)", re.S)

_SESSION_WORDS = frozenset({
    "set", "show", "reset", "discard", "listen", "unlisten", "notify", "deallocate", "load",
    "fetch", "close", "move", "execute", "checkpoint"})
_TRANSACTION_WORDS = frozenset({
    "begin", "start", "commit", "end", "rollback", "abort", "savepoint", "release"})
_MAINTENANCE_WORDS = frozenset({"vacuum", "analyze", "analyse", "reindex", "cluster"})
_DDL_WORDS = frozenset({
    "create", "alter", "drop", "truncate", "comment", "grant", "revoke", "refresh",
    "security", "import"})


def fix_comma_params(sql: str) -> str:
    if ",$" not in sql and "($" not in sql:
        return sql
    raw = sql.encode()
    fixed = _GLUED_PARAM.sub(lambda mt: b" " + mt.group(3) if mt.group(3) else mt.group(0),
                             raw)
    return fixed.decode()


def shard_hint(sql: bytes) -> str | None:
    """The shard named by a `/* shard: name */` comment (not by the same text in a string)."""
    for mt in _COMMENTS.finditer(sql):
        comment = mt.group(2)
        if comment is not None:
            found = _HINT.match(comment)
            if found:
                return found.group(1).decode()
    return None


def analyze(sql: bytes, smap: ShardMap) -> Analysis:
    """Analyse one statement (no top-level `;` inside)."""
    hint = None
    if b"/*" in sql:
        hint = shard_hint(sql)
        if hint is not None:
            if hint not in smap.shards:
                return Analysis(Kind.READ, refusal=Refusal(
                    "22023", f'the shard hint names an unknown shard "{hint}"',
                    hint="known shards: " + ", ".join(smap.shards)), hint_shard=hint)
    words = tuple(classify.leading_words(sql, 4))
    first = words[0] if words else ""
    base = Analysis(Kind.READ, hint_shard=hint, words=words)
    if first in _TRANSACTION_WORDS:
        return _replace(base, kind=Kind.TRANSACTION, reason="transaction control")
    if first == "prepare" and len(words) > 1 and words[1] == "transaction":
        return _replace(base, kind=Kind.TRANSACTION, reason="transaction control")
    if first in ("set", "reset", "show") and "shardwire" in words[1:3] and (
            words[1] == "shardwire" or words[1] in ("local", "session")):
        return _shardwire_setting(base, sql, words)
    if first in _SESSION_WORDS:
        return _replace(base, kind=Kind.SESSION, reason=f"{first.upper()} is session-level")
    if first in _MAINTENANCE_WORDS:
        return _tables_statement(base, sql, smap, Kind.MAINTENANCE)
    if first == "prepare":
        return _prepare(base, sql, smap)
    if first in ("explain",):
        return _explain(base, sql, smap)
    if first == "copy":
        return _copy(base, sql, smap)
    if first in ("do", "call"):
        return _replace(base, kind=Kind.WRITE, reason=f"{first.upper()} runs on one shard")
    if first == "declare":
        return _declare(base, sql, smap)
    if first == "lock":
        return _tables_statement(base, sql, smap, Kind.WRITE)
    if first in _DDL_WORDS:
        return _tables_statement(base, sql, smap, Kind.DDL)
    if not smap.sharded:
        return _replace(base, reason="no shard map: the default shard")
    try:
        tree = sqlglot.parse_one(fix_comma_params(sql.decode("utf-8", "replace")),
                                 read="postgres")
    except (ParseError, TokenError, ValueError, RecursionError):
        return _unparsed(base, sql, smap)
    if isinstance(tree, exp.Command):
        return _unparsed(base, sql, smap)
    return _Walker(smap, base).statement(tree)


def _replace(a: Analysis, **changes: object) -> Analysis:
    values = {name: getattr(a, name) for name in Analysis.__slots__}
    values.update(changes)
    return Analysis(**values)  # type: ignore[arg-type]


def _unparsed(base: Analysis, sql: bytes, smap: ShardMap) -> Analysis:
    """A statement sqlglot cannot parse: fine if it names no sharded or reference table (it
    goes where an unsharded statement goes), refused otherwise."""
    named = _named_tables(sql, smap)
    if not named:
        return _replace(base, kind=Kind.WRITE, reason="no sharded table named")
    return _replace(base, refusal=Refusal(
        "0A000", "Shardwire cannot analyse this statement, and it names the sharded or "
        f"reference table {named[0]}",
        hint="use a /* shard: name */ comment or SET shardwire.shard to run it on one shard"))


def _named_tables(sql: bytes, smap: ShardMap, *, placed: bool = True) -> list[TableName]:
    """Names in the text (outside quotes and comments) that are sharded or reference tables;
    with `placed=False`, every name that could be a table."""
    out: list[TableName] = []
    for mt in _NAMES.finditer(sql):
        text = mt.group(3)
        if text is None:
            continue
        parts = [p.strip() for p in _split_dotted(text)]
        folded = [p[1:-1].replace(b'""', b'"').decode("utf-8", "replace") if p.startswith(b'"')
                  else p.decode("utf-8", "replace").lower() for p in parts]
        name = TableName(*folded) if len(folded) == 2 else TableName("public", folded[0])
        if not placed or smap.table(name) is not None:
            out.append(name)
    return out


def _split_dotted(text: bytes) -> list[bytes]:
    if text.startswith(b'"'):
        end = text.index(b'"', 1)
        while text[end + 1:end + 2] == b'"':
            end = text.index(b'"', end + 2)
        head, rest = text[:end + 1], text[end + 1:]
    else:
        head, _, rest = text.partition(b".")
        rest = b"." + rest if rest else b""
    rest = rest.strip()
    return [head, rest[1:].strip()] if rest.startswith(b".") else [head]


def _shardwire_setting(base: Analysis, sql: bytes, words: tuple[str, ...]) -> Analysis:
    text = sql.decode("utf-8", "replace").strip().rstrip(";")
    m = re.match(r"(?is)\s*(set|reset|show)\s+(local\s+|session\s+)?shardwire\s*\.\s*(\w+)"
                 r"\s*(?:(?:=|to)\s*(.*))?$", text)
    if not m:
        return _replace(base, kind=Kind.SESSION, refusal=Refusal(
            "42601", "invalid shardwire setting statement",
            hint="SET shardwire.shard = 'name', SET shardwire.key = 'value', "
            "RESET shardwire.shard"))
    verb, scope, name, value = m.group(1).lower(), (m.group(2) or "").strip().lower(), \
        m.group(3).lower(), (m.group(4) or "").strip()
    if name not in ("shard", "key"):
        return _replace(base, kind=Kind.SESSION, refusal=Refusal(
            "42704", f'unrecognized configuration parameter "shardwire.{name}"',
            hint="the shardwire settings are shardwire.shard and shardwire.key"))
    if value.startswith("'") and value.endswith("'") and len(value) >= 2:
        value = value[1:-1].replace("''", "'")
    if verb == "reset" or value.lower() == "default":
        value = ""
    return _replace(base, kind=Kind.SESSION, reason=f"{verb.upper()} shardwire.{name}",
                    set_shardwire=(name if verb != "show" else "show:" + name, value,
                                   scope == "local"))


def _tables_statement(base: Analysis, sql: bytes, smap: ShardMap, kind: Kind) -> Analysis:
    """DDL, maintenance and LOCK: they go to every shard that has one of their tables."""
    verb = base.words[0].upper()
    if kind is Kind.MAINTENANCE or verb == "LOCK":
        # Their grammar is simple (names after options); sqlglot does not parse most of them.
        walker = _Walker(smap, _replace(base, kind=kind))
        for name in _named_tables(sql, smap, placed=False):
            if smap.table(name) is not None:
                walker.add_table(name, writes=verb == "LOCK")
        walker.kind = kind if walker.refs or walker.reference else Kind.WRITE
        return walker.result(f"{verb} of its tables")
    try:
        tree = sqlglot.parse_one(sql.decode("utf-8", "replace"), read="postgres")
    except (ParseError, TokenError, ValueError, RecursionError):
        tree = None
    if tree is None or isinstance(tree, exp.Command):
        named = _named_tables(sql, smap)
        if not named:
            return _replace(base, kind=kind, reason=f"{verb} of unsharded objects: the default "
                            "shard")
        return _replace(base, kind=kind, refusal=Refusal(
            "0A000", f"Shardwire cannot analyse this {verb} statement, and it names the "
            f"sharded or reference table {named[0]}",
            hint="run it on each shard directly, or with a /* shard: name */ comment"))
    query = tree.args.get("expression") if isinstance(tree, exp.Create) else None
    if isinstance(query, exp.Query):
        # CREATE TABLE ... AS SELECT: a new unsharded table filled from the query.
        walker = _Walker(smap, _replace(base, kind=Kind.WRITE))
        target = tree.this.this if isinstance(tree.this, exp.Schema) else tree.this
        if isinstance(target, exp.Table):
            created = walker.table_name(target, None)
            if created is not None:
                walker.add_table(created, writes=True)
        walker.statement(query)
        walker.kind = Kind.WRITE
        return walker.result("CREATE TABLE AS")
    walker = _Walker(smap, _replace(base, kind=kind))
    for table in tree.find_all(exp.Table):
        found = walker.table_name(table, None)
        if found is not None:
            walker.add_table(found, writes=True)
    return walker.result(f"{verb} of its tables")


def _prepare(base: Analysis, sql: bytes, smap: ShardMap) -> Analysis:
    named = _named_tables(sql, smap)
    if named:
        return _replace(base, kind=Kind.SESSION, refusal=Refusal(
            "0A000", "SQL PREPARE of a statement on a sharded or reference table "
            f"({named[0]}) is not supported: its shard is known only at EXECUTE",
            hint="use protocol-level prepared statements (your driver's prepare), which "
            "Shardwire routes at each execution"))
    return _replace(base, kind=Kind.SESSION, reason="PREPARE of unsharded statements")


def _explain(base: Analysis, sql: bytes, smap: ShardMap) -> Analysis:
    inner = re.sub(rb"(?is)^\s*explain\s*(\((?:[^()]|\([^()]*\))*\)\s*|"
                   rb"(?:analy[sz]e\s+|verbose\s+)*)", b"", sql, count=1)
    result = analyze(inner, smap)
    analyse = re.match(rb"(?is)^\s*explain\s*(\([^)]*analy[sz]e|analy[sz]e)", sql) is not None
    if analyse:
        return _replace(result, words=base.words, hint_shard=base.hint_shard)
    return _replace(result, kind=Kind.READ, words=base.words, hint_shard=base.hint_shard,
                    explain_only=True)


def _copy(base: Analysis, sql: bytes, smap: ShardMap) -> Analysis:
    m = re.match(rb"(?is)^\s*copy\s*\((.*)\)\s*to\b", sql)
    if m:
        result = analyze(m.group(1), smap)
        return _replace(result, words=base.words, hint_shard=base.hint_shard)
    m = re.match(rb"(?is)^\s*copy\s+((?:\"(?:[^\"]|\"\")*\"|[\w$]+)(?:\s*\.\s*(?:\"(?:[^\"]|"
                 rb"\"\")*\"|[\w$]+))?)(.*)$", sql)
    if not m:
        return _replace(base, kind=Kind.WRITE, refusal=Refusal(
            "42601", "cannot read the table name of this COPY statement"))
    from_stdin = re.search(rb"(?is)\bfrom\b", m.group(2)) is not None
    walker = _Walker(smap, _replace(base, kind=Kind.WRITE if from_stdin else Kind.READ))
    try:
        name = walker.table_name(exp.to_table(m.group(1).decode("utf-8", "replace"),
                                              dialect="postgres"), None)
    except (ParseError, TokenError, ValueError):
        name = None
    if name is None:
        return _replace(base, refusal=Refusal("42601", "cannot read the table name of this "
                                              "COPY statement"))
    placement = smap.table(name)
    if placement is not None and placement.rule is not None:
        verb = "into" if from_stdin else "out of"
        return _replace(base, kind=walker.base.kind, refusal=Refusal(
            "0A000", f"COPY {verb} the sharded table {name} is not supported yet",
            hint="COPY a query that names one key, e.g. COPY (SELECT ... WHERE key = 1) TO "
            "STDOUT, or load each shard directly" if not from_stdin else
            "load each shard directly, or INSERT through Shardwire"))
    walker.add_table(name, writes=from_stdin)
    return walker.result("COPY")


def _declare(base: Analysis, sql: bytes, smap: ShardMap) -> Analysis:
    m = re.search(rb"(?is)\bfor\s+((?:select|with|values|table)\b.*)$", sql)
    if not m:
        return _replace(base, kind=Kind.SESSION, reason="DECLARE")
    result = analyze(m.group(1), smap)
    return _replace(result, words=base.words, hint_shard=base.hint_shard)


# -- walking a parsed statement --------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Ref:
    """One reference to a sharded table (a table may be referenced several times)."""

    table: TableName
    key: str
    depth: int  # how deep in subqueries: conditions deeper than a class's top do not narrow it
    cond: Cond = UNKNOWN
    parent: _Ref | None = None  # union-find over key equalities

    def root(self) -> _Ref:
        r = self
        while r.parent is not None:
            r = r.parent
        return r


@dataclass(slots=True)
class _Scope:
    parent: _Scope | None
    depth: int = 0
    aliases: dict[str, _Ref | None] = field(default_factory=dict)  # None: not sharded
    refs: list[_Ref] = field(default_factory=list)
    ctes: set[str] = field(default_factory=set)  # WITH names visible here

    def child(self) -> _Scope:
        return _Scope(self, self.depth + 1)

    def is_cte(self, name: str) -> bool:
        s: _Scope | None = self
        while s is not None:
            if name in s.ctes:
                return True
            s = s.parent
        return False


class _Walker:
    def __init__(self, smap: ShardMap, base: Analysis) -> None:
        self.smap = smap
        self.base = base
        self.refs: list[_Ref] = []
        self.rules: dict[str, Rule] = {}
        self.unsharded: list[TableName] = []
        self.reference: list[TableName] = []
        self.writes: list[TableName] = []
        self.kind = base.kind
        self.refusal: Refusal | None = None
        self.insert_keys: tuple[Slot | None, ...] | None = None
        self.insert_target: _Ref | None = None
        self.new_key: Slot | None = None
        self.done: set[int] = set()  # subqueries already walked (semi-joins)

    # -- results --

    def result(self, reason: str) -> Analysis:
        if len(self.rules) > 1 and self.refusal is None:
            names = sorted(self.rules)
            self.refusal = Refusal(
                "0A000", f"the statement uses tables of two sharding rules ({names[0]} and "
                f"{names[1]}), whose rows live on different shards",
                hint="query them separately, or put the tables under one rule so that they "
                "are co-located")
        members: dict[int, list[_Ref]] = {}
        for ref in self.refs:
            members.setdefault(id(ref.root()), []).append(ref)
        classes = []
        for refs in members.values():
            # Only the conditions at the class's top level narrow its rows: a condition inside
            # a subquery (NOT EXISTS, a select-list subquery...) filters the subquery's rows,
            # not the rows the statement returns or changes.
            top = min(r.depth for r in refs)
            cond: Cond = UNKNOWN
            for r in refs:
                if r.depth == top:
                    cond = conjoin(cond, r.cond)
            inserted = self.insert_target is not None and self.insert_target in refs
            classes.append(KeyClass(tuple(r.table for r in refs), cond, inserted))
        rule = next(iter(self.rules.values())) if len(self.rules) == 1 else None
        return Analysis(
            kind=self.kind, rule=rule, classes=tuple(classes),
            unsharded=tuple(dict.fromkeys(self.unsharded)),
            reference=tuple(dict.fromkeys(self.reference)),
            writes=tuple(dict.fromkeys(self.writes)), insert_keys=self.insert_keys,
            new_key=self.new_key, refusal=self.refusal, hint_shard=self.base.hint_shard,
            reason=reason, words=self.base.words)

    def refuse(self, message: str, hint: str) -> None:
        if self.refusal is None:
            self.refusal = Refusal("0A000", message, hint)

    # -- tables --

    def table_name(self, table: exp.Table, scope: _Scope | None) -> TableName | None:
        ident = table.this
        if not isinstance(ident, exp.Identifier):
            return None  # a function in FROM
        name = _fold(ident)
        db = table.args.get("db")
        if db is None:
            if scope is not None and scope.is_cte(name):
                return None
            return TableName("public", name)
        schema = _fold(db) if isinstance(db, exp.Identifier) else str(db.name).lower()
        return TableName(schema, name)

    def add_table(self, name: TableName, *, writes: bool = False,
                  scope: _Scope | None = None, alias: str | None = None) -> _Ref | None:
        if writes:
            self.writes.append(name)
        placement = self.smap.table(name)
        ref = None
        if placement is None:
            self.unsharded.append(name)
        elif placement.reference:
            self.reference.append(name)
        else:
            assert placement.rule is not None
            self.rules[placement.rule.name] = placement.rule
            ref = _Ref(name, placement.column, scope.depth if scope is not None else 0)
            self.refs.append(ref)
            if scope is not None:
                scope.refs.append(ref)
        if scope is not None:
            scope.aliases[alias or name.name] = ref
        return ref

    # -- statements --

    def statement(self, tree: exp.Expr) -> Analysis:
        scope = _Scope(None)
        if not isinstance(tree, exp.Query):
            self._with(tree, scope)
        if isinstance(tree, exp.Insert):
            self.kind = Kind.WRITE
            self._insert(tree, scope)
            return self.result("INSERT")
        if isinstance(tree, exp.Update):
            self.kind = Kind.WRITE
            self._update(tree, scope)
            return self.result("UPDATE")
        if isinstance(tree, exp.Delete):
            self.kind = Kind.WRITE
            self._delete(tree, scope)
            return self.result("DELETE")
        if isinstance(tree, exp.Merge):
            self.kind = Kind.WRITE
            for table in tree.find_all(exp.Table):
                name = self.table_name(table, scope)
                if name is not None:
                    self.add_table(name, writes=True)
            if self.refs:
                self.refuse("MERGE into or from a sharded table is not supported",
                            "use INSERT ... ON CONFLICT or UPDATE with the key")
            return self.result("MERGE")
        if isinstance(tree, exp.Select) and tree.args.get("into") is not None:
            # SELECT ... INTO: a new unsharded table filled from the query.
            self.kind = Kind.WRITE
            into = tree.args["into"].this
            if isinstance(into, exp.Table):
                name = self.table_name(into, None)
                if name is not None:
                    self.add_table(name, writes=True)
            self._query(tree, scope, same_scope=True)
            return self.result("SELECT INTO")
        if isinstance(tree, exp.Query):
            self._query(tree, scope, same_scope=True)
            return self.result("SELECT")
        if isinstance(tree, exp.Values):
            for sub in _direct_selects(tree):
                self._query(sub, scope)
            return self.result("VALUES")
        # Anything else sqlglot parsed (rare): route by the tables it names, as a write.
        self.kind = Kind.WRITE
        for table in tree.find_all(exp.Table):
            name = self.table_name(table, scope)
            if name is not None:
                self.add_table(name, writes=True)
        return self.result(type(tree).__name__.upper())

    def _with(self, node: exp.Expr, scope: _Scope) -> None:
        """The WITH clause of `node`: each CTE body sees the names defined before it (and
        itself, if RECURSIVE); the statement sees them all."""
        with_ = node.args.get("with_") or node.args.get("with")
        if not isinstance(with_, exp.With):
            return
        recursive = bool(with_.args.get("recursive"))
        for cte in with_.expressions:
            name = _fold(cte.args["alias"].this)
            if recursive:
                scope.ctes.add(name)
            body = cte.this
            inner = scope.child()
            if isinstance(body, (exp.Insert, exp.Update, exp.Delete)):
                # Its rows are changed whatever the statement selects: it counts as a write at
                # the statement's own level.
                self.kind = Kind.WRITE
                level = _Scope(scope, scope.depth)
                if isinstance(body, exp.Insert):
                    if self.insert_target is not None:
                        self.refuse("a statement with two INSERTs into sharded tables is not "
                                    "supported", "run the INSERTs as statements of their own")
                    self._insert(body, level)
                elif isinstance(body, exp.Update):
                    self._update(body, level)
                else:
                    self._delete(body, level)
            elif isinstance(body, exp.Query):
                self._query(body, inner, same_scope=True)
            scope.ctes.add(name)

    def _query(self, node: exp.Expr, scope: _Scope, *, same_scope: bool = False,
               semi: bool = False) -> _Scope | None:
        """A query in `scope`'s context: its own scope is a child of `scope`, unless
        `same_scope` (the statement's top level, or a CTE body). A `semi` subquery (EXISTS
        or IN in a conjunct of WHERE) filters the outer rows: its conditions count at the
        outer level. Returns the query's scope when it is a plain SELECT."""
        if isinstance(node, exp.Subquery):
            return self._query(node.this, scope, same_scope=same_scope, semi=semi)
        self.done.add(id(node))
        own = scope if same_scope else (_Scope(scope, scope.depth) if semi else scope.child())
        self._with(node, own)
        if isinstance(node, exp.SetOperation):
            self._query(node.this, own)
            self._query(node.expression, own)
            return None
        if not isinstance(node, exp.Select):
            for sub in _direct_selects(node):
                self._query(sub, own)
            return None
        if node.args.get("locks"):
            self.kind = Kind.WRITE if self.kind is Kind.READ else self.kind
        from_ = node.args.get("from_") or node.args.get("from")
        sources = [from_.this] if from_ is not None else []
        joins = node.args.get("joins") or []
        sources += [j.this for j in joins]
        for source in sources:
            self._source(source, own)
        for join in joins:
            inner = not join.side or join.side.upper() not in ("LEFT", "RIGHT", "FULL")
            if join.args.get("on") is not None:
                self._conditions(join.args["on"], own, restrict=inner)
            using = join.args.get("using")
            if using:
                self._using(using, own)
        where = node.args.get("where")
        if where is not None:
            self._conditions(where.this, own)
        self._subqueries(node, own)
        return own

    def _source(self, source: exp.Expr, scope: _Scope) -> None:
        if isinstance(source, exp.Table):
            name = self.table_name(source, scope)
            if name is None:
                if isinstance(source.this, exp.Identifier):  # a CTE
                    scope.aliases[_alias(source) or _fold(source.this)] = None
                return
            self.add_table(name, scope=scope, alias=_alias(source) or name.name)
        elif isinstance(source, exp.Subquery):
            self._query(source.this, scope)
            alias = _alias(source)
            if alias:
                scope.aliases[alias] = None
        elif isinstance(source, exp.Lateral):
            for sub in source.find_all(exp.Select):
                self._query(sub, scope)
        # VALUES lists, functions: nothing sharded.

    def _subqueries(self, node: exp.Expr, scope: _Scope,
                    keys: tuple[str, ...] = ("expressions", "where", "having", "group", "order",
                                             "qualify")) -> None:
        """Subqueries in the select list, WHERE, HAVING, ON... (FROM ones are done already)."""
        for join in node.args.get("joins") or []:
            if join.args.get("on") is not None:
                for sub in _direct_selects(join.args["on"]):
                    self._query(sub, scope)
        for key in keys:
            value = node.args.get(key)
            items = value if isinstance(value, list) else [value] if value is not None else []
            for item in items:
                for sub in _direct_selects(item):
                    if id(sub) not in self.done:
                        self._query(sub, scope)

    def _using(self, using: list[exp.Expr], scope: _Scope) -> None:
        # JOIN ... USING (key): the joined tables' keys are equal.
        for col in using:
            colname = _fold(col.this) if isinstance(col, exp.Column) and isinstance(
                col.this, exp.Identifier) else _fold(col)
            refs = [r for r in scope.refs if r.key == colname]
            for other in refs[1:]:
                _union(refs[0], other)

    # -- conditions --

    def _conditions(self, expr: exp.Expr, scope: _Scope, *, restrict: bool = True) -> None:
        """Key equalities of `expr` join tables; with `restrict`, its key conditions narrow
        the tables of this scope (not in the ON clause of an outer join, which filters
        nothing)."""
        for conjunct in _conjuncts(expr):
            if isinstance(conjunct, exp.EQ):
                left = self._key_ref(conjunct.this, scope)
                right = self._key_ref(conjunct.expression, scope)
                if left is not None and right is not None:
                    _union(left, right)
                    continue
            if not restrict:
                continue
            if isinstance(conjunct, exp.Exists):
                self._query(conjunct.this, scope, semi=True)
                continue
            if isinstance(conjunct, exp.In) and conjunct.args.get("query") is not None:
                self._semi_in(conjunct, scope)
                continue
            for ref in scope.refs:
                cond = self._restriction(conjunct, ref, scope)
                if not isinstance(cond, Unknown):
                    ref.cond = conjoin(ref.cond, cond)

    def _semi_in(self, node: exp.In, scope: _Scope) -> None:
        """`key IN (SELECT key FROM ...)`: the outer rows' keys are among the subquery's."""
        query = node.args["query"]
        inner = self._query(query, scope, semi=True)
        select = query.this if isinstance(query, exp.Subquery) else query
        left = self._key_ref(node.this, scope)
        if inner is None or left is None or not isinstance(select, exp.Select) or len(
                select.expressions) != 1:
            return
        item = select.expressions[0]
        if isinstance(item, exp.Alias):
            item = item.this
        right = self._key_ref(item, inner)
        if right is not None:
            _union(left, right)

    def _key_ref(self, expr: exp.Expr, scope: _Scope) -> _Ref | None:
        """The sharded table reference whose key column `expr` is, if it is one."""
        while isinstance(expr, exp.Paren):
            expr = expr.this
        if not isinstance(expr, exp.Column) or not isinstance(expr.this, exp.Identifier):
            return None
        column = _fold(expr.this)
        qualifier = expr.args.get("table")
        s: _Scope | None = scope
        if qualifier is not None:
            alias = _fold(qualifier) if isinstance(qualifier, exp.Identifier) else \
                str(qualifier).lower()
            while s is not None:
                if alias in s.aliases:
                    ref = s.aliases[alias]
                    return ref if ref is not None and ref.key == column else None
                s = s.parent
            return None
        # Unqualified: the innermost scope with a sharded table keyed on that column.
        while s is not None:
            matches = [r for r in s.refs if r.key == column]
            if matches:
                root = matches[0].root()
                if all(r.root() is root for r in matches):
                    return matches[0]  # one table, or tables joined USING the key
                return None  # ambiguous: PostgreSQL refuses it anyway
            if any(ref is None for ref in s.aliases.values()):
                return None  # an unsharded source here might have the column
            s = s.parent
        return None

    def _restriction(self, expr: exp.Expr, ref: _Ref, scope: _Scope) -> Cond:
        """What `expr`, if true, says about `ref`'s key."""
        while isinstance(expr, exp.Paren):
            expr = expr.this
        if isinstance(expr, exp.And):
            return conjoin(self._restriction(expr.this, ref, scope),
                           self._restriction(expr.expression, ref, scope))
        if isinstance(expr, exp.Or):
            left = self._restriction(expr.this, ref, scope)
            right = self._restriction(expr.expression, ref, scope)
            if isinstance(left, Unknown) or isinstance(right, Unknown):
                return UNKNOWN
            return Or((left, right))
        if isinstance(expr, exp.EQ):
            for col, other in ((expr.this, expr.expression), (expr.expression, expr.this)):
                if self._is_key_of(col, ref, scope):
                    slot = _slot(other)
                    if slot is not None:
                        return Eq(slot)
            return UNKNOWN
        if isinstance(expr, exp.In):
            if self._is_key_of(expr.this, ref, scope) and not expr.args.get("query") and (
                    not expr.args.get("unnest")):
                slots = [_slot(e) for e in expr.expressions]
                if slots and all(s is not None for s in slots):
                    return In(tuple(s for s in slots if s is not None))
            return UNKNOWN
        if isinstance(expr, exp.Between):
            if self._is_key_of(expr.this, ref, scope) and not expr.args.get("symmetric"):
                low, high = _slot(expr.args["low"]), _slot(expr.args["high"])
                if low is not None and high is not None:
                    return Interval(low, True, high, True)
            return UNKNOWN
        if isinstance(expr, (exp.GT, exp.GTE, exp.LT, exp.LTE)):
            if self._is_key_of(expr.this, ref, scope):
                col_left, other = True, expr.expression
            elif self._is_key_of(expr.expression, ref, scope):
                col_left, other = False, expr.this
            else:
                return UNKNOWN
            slot = _slot(other)
            if slot is None:
                return UNKNOWN
            # key > v, or v < key: a lower bound.
            greater = isinstance(expr, (exp.GT, exp.GTE)) == col_left
            inclusive = isinstance(expr, (exp.GTE, exp.LTE))
            if greater:
                return Interval(slot, inclusive, None, False)
            return Interval(None, False, slot, inclusive)
        return UNKNOWN

    def _is_key_of(self, expr: exp.Expr, ref: _Ref, scope: _Scope) -> bool:
        found = self._key_ref(expr, scope)
        return found is not None and (found is ref or (
            found.root() is ref.root() and found in scope.refs and ref in scope.refs))

    # -- writes --

    def _target(self, node: exp.Expr, scope: _Scope) -> _Ref | None:
        table = node
        if isinstance(table, exp.Schema):
            table = table.this
        if not isinstance(table, exp.Table):
            return None
        name = self.table_name(table, scope)
        if name is None:
            return None
        return self.add_table(name, writes=True, scope=scope,
                              alias=_alias(table) or name.name)

    def _assigns_key(self, assignment: exp.Expr, target: _Ref) -> tuple[bool, Slot | None]:
        """Whether an assignment (`key = v`, `(a, key) = (v, w)`) sets the key, and the new
        value when it is a literal or parameter."""
        if not isinstance(assignment, exp.EQ):
            return False, None
        left, right = assignment.this, assignment.expression
        if isinstance(left, exp.Column) and isinstance(left.this, exp.Identifier):
            if _fold(left.this) == target.key:
                return True, _slot(right)
            return False, None
        if isinstance(left, (exp.Tuple, exp.Paren)):
            columns = left.expressions if isinstance(left, exp.Tuple) else [left.this]
            for i, col in enumerate(columns):
                if isinstance(col, exp.Column) and isinstance(col.this, exp.Identifier) and (
                        _fold(col.this) == target.key):
                    values = right.expressions if isinstance(right, exp.Tuple) else []
                    return True, _slot(values[i]) if i < len(values) else None
        return False, None

    def _insert(self, node: exp.Insert, scope: _Scope) -> None:
        target = self._target(node.this, scope)
        if target is not None:
            self.insert_target = target
        columns = [_fold(c) if isinstance(c, exp.Identifier) else c.name.lower()
                   for c in (node.this.expressions if isinstance(node.this, exp.Schema)
                             else [])]
        source = node.expression
        # Subqueries anywhere but the source (VALUES items, RETURNING, ON CONFLICT).
        for key in ("returning", "conflict"):
            value = node.args.get(key)
            if value is not None:
                for sub in _direct_selects(value):
                    self._query(sub, scope)
        if isinstance(source, exp.Values):
            for sub in _direct_selects(source):
                self._query(sub, scope)
        conflict = node.args.get("conflict")
        if conflict is not None and target is not None:
            for assignment in conflict.args.get("expressions") or []:
                if self._assigns_key(assignment, target)[0]:
                    self.refuse(f"INSERT ... ON CONFLICT DO UPDATE may not change the "
                                f"sharding key {target.key} of {target.table}",
                                "delete the row and insert it with the new key")
        if target is None:
            if isinstance(source, exp.Query):
                self._query(source, scope)
            return
        if not columns:
            self.refuse(f"INSERT into the sharded table {target.table} needs a column list",
                        f"name the columns, including the key column {target.key}")
            return
        if target.key not in columns:
            self.refuse(f"INSERT into the sharded table {target.table} must give the key "
                        f"column {target.key}", f"add {target.key} to the column list")
            return
        position = columns.index(target.key)
        if isinstance(source, exp.Values):
            keys: list[Slot | None] = []
            for row in source.expressions:
                values = row.expressions if isinstance(row, exp.Tuple) else [row]
                keys.append(_slot(values[position]) if position < len(values) else None)
            self.insert_keys = tuple(keys)
            return
        if isinstance(source, exp.Query):
            select = source
            while isinstance(select, exp.Subquery):
                select = select.this
            # The selected rows are the inserted rows: their conditions count at this level.
            inner = _Scope(scope, scope.depth)
            self._query(select, inner, same_scope=True)
            if isinstance(select, exp.Select) and position < len(select.expressions):
                item = select.expressions[position]
                if isinstance(item, exp.Alias):
                    item = item.this
                ref = self._key_ref(item, inner)
                if ref is not None:
                    _union(target, ref)
                    return
            self.refuse(f"INSERT ... SELECT into the sharded table {target.table} must take "
                        f"the key column {target.key} from the key of a table of the same rule",
                        "select the rows per key, or insert them with VALUES")
            return
        self.refuse(f"this form of INSERT into the sharded table {target.table} is not "
                    "supported", "use INSERT ... VALUES with the key column")

    def _update(self, node: exp.Update, scope: _Scope) -> None:
        target = self._target(node.this, scope)
        from_ = node.args.get("from_") or node.args.get("from")
        if from_ is not None:
            self._source(from_.this, scope)
        for join in node.args.get("joins") or []:
            self._source(join.this, scope)
            if join.args.get("on") is not None:
                self._conditions(join.args["on"], scope)
        where = node.args.get("where")
        if where is not None:
            self._conditions(where.this, scope)
        for assignment in node.expressions:
            if target is not None:
                sets_key, slot = self._assigns_key(assignment, target)
                if sets_key:
                    if slot is None:
                        self.refuse(f"UPDATE may not set the sharding key {target.key} of "
                                    f"{target.table} to a computed value",
                                    "delete the row and insert it with the new key")
                    self.new_key = slot
            for sub in _direct_selects(assignment):
                self._query(sub, scope)
        self._subqueries(node, scope, ("where", "returning"))

    def _delete(self, node: exp.Delete, scope: _Scope) -> None:
        self._target(node.this, scope)
        for using in node.args.get("using") or []:
            self._source(using, scope)
        where = node.args.get("where")
        if where is not None:
            self._conditions(where.this, scope)
        self._subqueries(node, scope, ("where", "returning"))


def _union(a: _Ref, b: _Ref) -> None:
    ra, rb = a.root(), b.root()
    if ra is not rb:
        rb.parent = ra


def _fold(ident: exp.Expr) -> str:
    """PostgreSQL's identifier rule: unquoted names fold to lower case."""
    if isinstance(ident, exp.Identifier):
        return str(ident.this) if ident.quoted else str(ident.this).lower()
    return str(ident.name).lower()


def _alias(table: exp.Expr) -> str | None:
    alias = table.args.get("alias")
    if isinstance(alias, exp.TableAlias) and isinstance(alias.this, exp.Identifier):
        return _fold(alias.this)
    return None


def _conjuncts(expr: exp.Expr) -> list[exp.Expr]:
    while isinstance(expr, exp.Paren):
        expr = expr.this
    if isinstance(expr, exp.And):
        return _conjuncts(expr.this) + _conjuncts(expr.expression)
    return [expr]


def _direct_selects(node: exp.Expr) -> list[exp.Select]:
    """Selects inside `node` that are not nested in another select inside it."""
    out: list[exp.Select] = []
    stack = [node]
    while stack:
        cur = stack.pop()
        if isinstance(cur, exp.Select) and cur is not node:
            out.append(cur)
            continue
        for child in cur.iter_expressions():
            stack.append(child)
    return out


def _slot(expr: exp.Expr) -> Slot | None:
    """A literal or a parameter, possibly cast or negated; None for anything computed."""
    cast = None
    negate = False
    while True:
        if isinstance(expr, exp.Paren):
            expr = expr.this
        elif isinstance(expr, exp.Cast):
            if cast is None:  # the outermost cast decides the value compared
                cast = expr.to.sql("postgres").lower()
            elif negate:
                return None  # -(x::a)::b: too clever to follow
            expr = expr.this
        elif isinstance(expr, exp.Neg) and not negate:
            if cast is not None:
                return None  # (-x)::t: cast applies after the minus; keep it simple
            negate = True
            expr = expr.this
        else:
            break
    if isinstance(expr, exp.Null):
        return Slot(null=True, cast=cast)
    if isinstance(expr, exp.Literal):
        if negate and expr.is_string:
            return None
        return Slot(literal=str(expr.this), cast=cast, string=bool(expr.is_string),
                    negate=negate)
    if isinstance(expr, exp.RawString) and not negate:
        # $$...$$ (or $tag$...$tag$): the text as written, no escapes. E'' and U&'' strings
        # are not read (their escapes are not worth trusting to the parser): no key, so the
        # statement goes to every shard its rule may use, which is exact, only slower.
        return Slot(literal=str(expr.this), cast=cast, string=True)
    if isinstance(expr, exp.Parameter):
        inner = expr.this
        if isinstance(inner, exp.Literal) and not inner.is_string:
            return Slot(param=int(inner.this), cast=cast, negate=negate)
    return None
