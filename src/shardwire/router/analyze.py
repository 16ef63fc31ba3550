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

    @property
    def sharded(self) -> bool:
        return self.rule is not None


_HINT = re.compile(rb"/\*\s*shard\s*:\s*([A-Za-z_][A-Za-z0-9_]*)\s*\*/")
# sqlglot's tokenizer reads `,$2` as the start of a dollar-quoted string: add a space, outside
# quotes (SQLGLOT.md).
_COMMA_PARAM = re.compile(
    rb"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\$(\w*)\$.*?\$\1\$|,(\$\d)", re.S)

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
    if ",$" not in sql:
        return sql
    raw = sql.encode()
    fixed = _COMMA_PARAM.sub(lambda mt: b", " + mt.group(2) if mt.group(2) else mt.group(0),
                             raw)
    return fixed.decode()


def analyze(sql: bytes, smap: ShardMap) -> Analysis:
    """Analyse one statement (no top-level `;` inside)."""
    hint = None
    if b"/*" in sql:
        found = _HINT.search(sql)
        if found:
            hint = found.group(1).decode()
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
    if first in ("set", "reset", "show") and len(words) > 1 and words[1] == "shardwire":
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


def _named_tables(sql: bytes, smap: ShardMap) -> list[str]:
    text = sql.decode("utf-8", "replace").lower()
    out = []
    for rule in smap.rules.values():
        for table in rule.tables:
            if table.name.lower() in text:
                out.append(str(table))
    for table in smap.reference:
        if table.name.lower() in text:
            out.append(str(table))
    return out


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
    try:
        tree = sqlglot.parse_one(sql.decode("utf-8", "replace"), read="postgres")
    except (ParseError, TokenError, ValueError, RecursionError):
        tree = None
    if tree is None or isinstance(tree, exp.Command):
        named = _named_tables(sql, smap)
        if not named:
            return _replace(base, kind=kind, reason=f"{base.words[0].upper()} of unsharded "
                            "objects: the default shard")
        return _replace(base, kind=kind, refusal=Refusal(
            "0A000", f"Shardwire cannot analyse this {base.words[0].upper()} statement, and it "
            f"names the sharded or reference table {named[0]}",
            hint="run it on each shard directly, or with a /* shard: name */ comment"))
    walker = _Walker(smap, _replace(base, kind=kind))
    for table in tree.find_all(exp.Table):
        name = walker.table_name(table)
        if name is not None:
            walker.add_table(name, writes=kind is not Kind.MAINTENANCE)
    return walker.result(f"{base.words[0].upper()} of its tables")


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
    kind = result.kind if analyse else Kind.READ
    return _replace(result, kind=kind, words=base.words, hint_shard=base.hint_shard)


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
                                              dialect="postgres"))
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
    aliases: dict[str, _Ref | None] = field(default_factory=dict)  # None: not sharded
    refs: list[_Ref] = field(default_factory=list)


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
        self.new_key: Slot | None = None
        self.ctes: set[str] = set()

    # -- results --

    def result(self, reason: str) -> Analysis:
        if len(self.rules) > 1 and self.refusal is None:
            names = sorted(self.rules)
            self.refusal = Refusal(
                "0A000", f"the statement uses tables of two sharding rules ({names[0]} and "
                f"{names[1]}), whose rows live on different shards",
                hint="query them separately, or put the tables under one rule so that they "
                "are co-located")
        classes: dict[int, tuple[list[TableName], Cond]] = {}
        for ref in self.refs:
            root = ref.root()
            tables, cond = classes.get(id(root), ([], UNKNOWN))
            tables.append(ref.table)
            classes[id(root)] = (tables, conjoin(cond, ref.cond))
        rule = next(iter(self.rules.values())) if len(self.rules) == 1 else None
        return Analysis(
            kind=self.kind, rule=rule,
            classes=tuple(KeyClass(tuple(t), c) for t, c in classes.values()),
            unsharded=tuple(dict.fromkeys(self.unsharded)),
            reference=tuple(dict.fromkeys(self.reference)),
            writes=tuple(dict.fromkeys(self.writes)), insert_keys=self.insert_keys,
            new_key=self.new_key, refusal=self.refusal, hint_shard=self.base.hint_shard,
            reason=reason, words=self.base.words)

    def refuse(self, message: str, hint: str) -> None:
        if self.refusal is None:
            self.refusal = Refusal("0A000", message, hint)

    # -- tables --

    def table_name(self, table: exp.Table) -> TableName | None:
        ident = table.this
        if not isinstance(ident, exp.Identifier):
            return None  # a function in FROM
        name = _fold(ident)
        db = table.args.get("db")
        if db is None:
            if name in self.ctes:
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
            ref = _Ref(name, placement.column)
            self.refs.append(ref)
            if scope is not None:
                scope.refs.append(ref)
        if scope is not None:
            scope.aliases[alias or name.name] = ref
        return ref

    # -- statements --

    def statement(self, tree: exp.Expr) -> Analysis:
        self._ctes(tree)
        if isinstance(tree, exp.Insert):
            self.kind = Kind.WRITE
            self._insert(tree)
            return self.result("INSERT")
        if isinstance(tree, exp.Update):
            self.kind = Kind.WRITE
            self._update(tree)
            return self.result("UPDATE")
        if isinstance(tree, exp.Delete):
            self.kind = Kind.WRITE
            self._delete(tree)
            return self.result("DELETE")
        if isinstance(tree, exp.Merge):
            self.kind = Kind.WRITE
            for table in tree.find_all(exp.Table):
                name = self.table_name(table)
                if name is not None:
                    self.add_table(name, writes=True)
            if self.refs:
                self.refuse("MERGE into or from a sharded table is not supported",
                            "use INSERT ... ON CONFLICT or UPDATE with the key")
            return self.result("MERGE")
        if isinstance(tree, exp.Query):
            self._query(tree, None)
            return self.result("SELECT")
        # Anything else sqlglot parsed (rare): route by the tables it names, as a write.
        self.kind = Kind.WRITE
        for table in tree.find_all(exp.Table):
            name = self.table_name(table)
            if name is not None:
                self.add_table(name, writes=True)
        return self.result(type(tree).__name__.upper())

    def _ctes(self, tree: exp.Expr) -> None:
        for cte in tree.find_all(exp.CTE):
            self.ctes.add(_fold(cte.args["alias"].this))
        for cte in list(tree.find_all(exp.CTE)):
            body = cte.this
            if isinstance(body, (exp.Insert, exp.Update, exp.Delete)):
                self.kind = Kind.WRITE
                {exp.Insert: self._insert, exp.Update: self._update,
                 exp.Delete: self._delete}[type(body)](body)  # type: ignore[operator]
            elif isinstance(body, exp.Query):
                self._query(body, None)

    def _query(self, node: exp.Expr, parent: _Scope | None) -> _Scope | None:
        if isinstance(node, exp.SetOperation):
            self._query(node.this, parent)
            self._query(node.expression, parent)
            return None
        if isinstance(node, exp.Subquery):
            return self._query(node.this, parent)
        if not isinstance(node, exp.Select):
            for sub in node.find_all(exp.Select):
                self._query(sub, parent)
            return None
        if node.args.get("locks"):
            self.kind = Kind.WRITE if self.kind is Kind.READ else self.kind
        scope = _Scope(parent)
        from_ = node.args.get("from_") or node.args.get("from")
        sources = [from_.this] if from_ is not None else []
        joins = node.args.get("joins") or []
        sources += [j.this for j in joins]
        for source in sources:
            self._source(source, scope)
        for join in joins:
            if join.args.get("on") is not None:
                self._conditions(join.args["on"], scope)
            using = join.args.get("using")
            if using:
                self._using(join, using, scope)
        where = node.args.get("where")
        if where is not None:
            self._conditions(where.this, scope)
        self._subqueries(node, scope)
        return scope

    def _source(self, source: exp.Expr, scope: _Scope) -> None:
        if isinstance(source, exp.Table):
            name = self.table_name(source)
            if name is None:
                if isinstance(source.this, exp.Identifier):  # a CTE
                    scope.aliases[source.alias_or_name.lower()] = None
                return
            self.add_table(name, scope=scope, alias=_alias(source) or name.name)
        elif isinstance(source, exp.Subquery):
            self._query(source.this, scope)
            if source.alias:
                scope.aliases[source.alias.lower()] = None
        elif isinstance(source, exp.Lateral):
            for sub in source.find_all(exp.Select):
                self._query(sub, scope)
        # VALUES lists, functions: nothing sharded.

    def _subqueries(self, node: exp.Select, scope: _Scope) -> None:
        """Subqueries in the select list, WHERE, HAVING... (FROM ones are done already)."""
        for join in node.args.get("joins") or []:
            if join.args.get("on") is not None:
                for sub in _direct_selects(join.args["on"]):
                    self._query(sub, scope)
        for key in ("expressions", "where", "having", "group", "order"):
            value = node.args.get(key)
            items = value if isinstance(value, list) else [value] if value is not None else []
            for item in items:
                for sub in _direct_selects(item):
                    self._query(sub, scope)

    def _using(self, join: exp.Join, using: list[exp.Expr], scope: _Scope) -> None:
        # JOIN ... USING (key): the joined table's key equals the left side's.
        right = _alias(join.this) if isinstance(join.this, exp.Table) else None
        for col in using:
            colname = col.name.lower()
            refs = [r for r in scope.refs if r.key == colname]
            if right is not None and len(refs) >= 2:
                for other in refs[1:]:
                    _union(refs[0], other)

    # -- conditions --

    def _conditions(self, expr: exp.Expr, scope: _Scope) -> None:
        for conjunct in _conjuncts(expr):
            if isinstance(conjunct, exp.EQ):
                left = self._key_ref(conjunct.this, scope)
                right = self._key_ref(conjunct.expression, scope)
                if left is not None and right is not None:
                    _union(left, right)
                    continue
            for ref in scope.refs:
                cond = self._restriction(conjunct, ref, scope)
                if not isinstance(cond, Unknown):
                    ref.cond = conjoin(ref.cond, cond)

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
            if len(matches) == 1:
                return matches[0]
            if matches:
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
                if self._key_ref(col, scope) is ref:
                    slot = _slot(other)
                    if slot is not None:
                        return Eq(slot)
            return UNKNOWN
        if isinstance(expr, exp.In):
            if self._key_ref(expr.this, scope) is ref and not expr.args.get("query") and (
                    not expr.args.get("unnest")):
                slots = [_slot(e) for e in expr.expressions]
                if slots and all(s is not None for s in slots):
                    return In(tuple(s for s in slots if s is not None))
            return UNKNOWN
        if isinstance(expr, exp.Between):
            if self._key_ref(expr.this, scope) is ref and not expr.args.get("symmetric"):
                low, high = _slot(expr.args["low"]), _slot(expr.args["high"])
                if low is not None and high is not None:
                    return Interval(low, True, high, True)
            return UNKNOWN
        if isinstance(expr, (exp.GT, exp.GTE, exp.LT, exp.LTE)):
            if self._key_ref(expr.this, scope) is ref:
                col_left, other = True, expr.expression
            elif self._key_ref(expr.expression, scope) is ref:
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

    # -- writes --

    def _target(self, node: exp.Expr, scope: _Scope) -> _Ref | None:
        table = node
        if isinstance(table, exp.Schema):
            table = table.this
        if not isinstance(table, exp.Table):
            return None
        name = self.table_name(table)
        if name is None:
            return None
        return self.add_table(name, writes=True, scope=scope,
                              alias=_alias(table) or name.name)

    def _insert(self, node: exp.Insert) -> None:
        scope = _Scope(None)
        target = self._target(node.this, scope)
        columns = [_fold(c) if isinstance(c, exp.Identifier) else c.name.lower()
                   for c in (node.this.expressions if isinstance(node.this, exp.Schema)
                             else [])]
        source = node.expression
        conflict = node.args.get("conflict")
        if conflict is not None and target is not None:
            for assignment in conflict.args.get("expressions") or []:
                if isinstance(assignment, exp.EQ) and isinstance(assignment.this, exp.Column) \
                        and assignment.this.name.lower() == target.key:
                    self.refuse(f"INSERT ... ON CONFLICT DO UPDATE may not change the "
                                f"sharding key {target.key} of {target.table}",
                                "delete the row and insert it with the new key")
        if target is None:
            if source is not None:
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
            inner = self._query(source, None)
            select = source
            while isinstance(select, exp.Subquery):
                select = select.this
            if inner is not None and isinstance(select, exp.Select) and \
                    position < len(select.expressions):
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

    def _update(self, node: exp.Update) -> None:
        scope = _Scope(None)
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
            if target is not None and isinstance(assignment, exp.EQ) and \
                    isinstance(assignment.this, exp.Column) and \
                    assignment.this.name.lower() == target.key:
                slot = _slot(assignment.expression)
                if slot is None:
                    self.refuse(f"UPDATE may not set the sharding key {target.key} of "
                                f"{target.table} to a computed value",
                                "delete the row and insert it with the new key")
                self.new_key = slot
            for sub in _direct_selects(assignment):
                self._query(sub, scope)
        if where is not None:
            for sub in _direct_selects(where):
                self._query(sub, scope)

    def _delete(self, node: exp.Delete) -> None:
        scope = _Scope(None)
        self._target(node.this, scope)
        for using in node.args.get("using") or []:
            self._source(using, scope)
        where = node.args.get("where")
        if where is not None:
            self._conditions(where.this, scope)
            for sub in _direct_selects(where):
                self._query(sub, scope)


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
    """A literal or a parameter, possibly cast; None for anything computed."""
    cast = None
    while isinstance(expr, (exp.Cast, exp.Paren)):
        if isinstance(expr, exp.Cast):
            cast = cast or expr.to.sql("postgres").lower()
        expr = expr.this
    if isinstance(expr, exp.Neg):
        inner = expr.this
        if isinstance(inner, exp.Literal) and not inner.is_string:
            return Slot(literal="-" + str(inner.this), cast=cast)
        return None
    if isinstance(expr, exp.Literal):
        return Slot(literal=str(expr.this), cast=cast)
    if isinstance(expr, exp.Parameter):
        inner = expr.this
        if isinstance(inner, exp.Literal) and not inner.is_string:
            return Slot(param=int(inner.this), cast=cast)
    if isinstance(expr, exp.Placeholder):
        return None
    return None
