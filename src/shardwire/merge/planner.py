"""plan_merge: from a client's SELECT to what every shard runs and how their rows merge.

Pure and deterministic (the proxy caches plans). The statement is parsed once with sqlglot
for its structure; the shard statement is the client's own text, spliced where a rewrite is
needed (helper columns appended, HAVING / ORDER BY / LIMIT replaced), so that column names,
comments and spelling stay the client's.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

from ..router.analyze import fix_comma_params
from ..router.shardmap import ShardMap, TableName
from . import scalar as s
from .errors import MergeRefused
from .sqltext import Layout, Splice, clause_items, layout

logging.getLogger("sqlglot").setLevel(logging.ERROR)

HELPER_PREFIX = "__sw_"

# PostgreSQL's built-in aggregate functions (pg_proc.prokind = 'a', PostgreSQL 15): a call
# that sqlglot does not know as an aggregate is still one when its name is here.
PG_AGGREGATES = frozenset("""
array_agg avg bit_and bit_or bit_xor bool_and bool_or corr count covar_pop covar_samp
cume_dist dense_rank every json_agg json_object_agg jsonb_agg jsonb_object_agg max min mode
percent_rank percentile_cont percentile_disc range_agg range_intersect_agg rank regr_avgx
regr_avgy regr_count regr_intercept regr_r2 regr_slope regr_sxx regr_sxy regr_syy stddev
stddev_pop stddev_samp string_agg sum var_pop var_samp variance xmlagg
""".split())

# Volatile functions: each shard would draw its own values, so an order by them is not one
# the merge can reproduce.
VOLATILE = frozenset("""
random random_normal setseed clock_timestamp timeofday statement_timestamp nextval setval
currval lastval gen_random_uuid uuid_generate_v1 uuid_generate_v1mc uuid_generate_v4
txid_current pg_backend_pid inet_server_addr inet_server_port
""".split())

_CAST_KINDS = {
    exp.DataType.Type.SMALLINT: "int2", exp.DataType.Type.INT: "int4",
    exp.DataType.Type.BIGINT: "int8", exp.DataType.Type.DECIMAL: "numeric",
    exp.DataType.Type.FLOAT: "float4", exp.DataType.Type.DOUBLE: "float8",
}


class Mode(enum.Enum):
    UNION = "union"  # rows as they come (optionally deduplicated)
    SORT = "sort"  # k-way merge of sorted shard results
    AGGREGATE = "aggregate"  # groups re-aggregated, then HAVING, DISTINCT, ORDER BY, LIMIT


class Role(enum.Enum):
    """How one column of the shards' rows merges into a group's value."""

    KEY = "key"  # part of the group key
    FIRST = "first"  # constant within a group: any shard's value
    COUNT = "count"  # partial counts: add
    SUM = "sum"  # partial sums: add (NULLs ignored)
    MIN = "min"
    MAX = "max"
    AND = "and"  # bool_and / every
    OR = "or"  # bool_or


@dataclass(frozen=True, slots=True)
class Param:
    """A bind parameter `$number` whose integer value the merge needs."""

    number: int


LimitValue = int | Param | None


@dataclass(frozen=True, slots=True)
class LimitSpec:
    count: LimitValue  # None: no limit (LIMIT ALL, LIMIT NULL, or none)
    offset: LimitValue
    with_ties: bool = False


@dataclass(frozen=True, slots=True)
class SortKey:
    """One ORDER BY key over a column: visible index, or ~h for helper column h."""

    col: int
    desc: bool
    nulls_first: bool
    collation: str | None  # an explicit COLLATE, lower-case; None: the database's


@dataclass(frozen=True, slots=True)
class ColumnRole:
    col: int
    role: Role
    collation: str | None = None  # min/max of text: an explicit COLLATE in the argument


@dataclass(frozen=True, slots=True)
class OrderTerm:
    node: s.Node
    desc: bool
    nulls_first: bool
    collation: str | None


@dataclass(frozen=True, slots=True)
class Aggregation:
    """Re-aggregation of the shards' partial groups."""

    roles: tuple[ColumnRole, ...]  # every column the merge reads
    group: tuple[int, ...]  # the group key columns (empty: one group)
    outputs: tuple[s.Node, ...]  # one per select item; a `*` item is Ref of its first column
    star: int | None  # the index of a `*` item (its columns are FIRST), if any
    having: s.Node | None
    order: tuple[OrderTerm, ...]
    distinct: bool
    distinct_on: tuple[s.Node, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything about the merge that does not depend on one execution."""

    mode: Mode
    hidden: int  # helper columns appended after the client's select list
    sort: tuple[SortKey, ...] = ()
    distinct: bool = False  # deduplicate whole visible rows
    distinct_on: tuple[int, ...] = ()  # keep the first row per value of these columns
    limit: LimitSpec | None = None
    aggregation: Aggregation | None = None
    reason: str = ""
    groups_on_one_shard: bool = False  # GROUP BY holds the sharding key


def refuse(message: str, hint: str) -> MergeRefused:
    return MergeRefused(message, hint)


# -- sqlglot helpers ----------------------------------------------------------------------


def _unparen(e: exp.Expr) -> exp.Expr:
    while isinstance(e, exp.Paren):
        e = e.this
    return e


_NESTED = (exp.Select, exp.SetOperation, exp.Subquery)


def _level(node: exp.Expr) -> list[exp.Expr]:
    """`node` and its descendants at the same query level (not inside nested queries or
    window specifications)."""
    out: list[exp.Expr] = []
    stack = [node]
    while stack:
        cur = stack.pop()
        out.append(cur)
        for child in cur.iter_expressions():
            if isinstance(child, _NESTED):
                continue
            stack.append(child)
    return out


def _is_aggregate(node: exp.Expr) -> bool:
    if isinstance(node, (exp.AggFunc, exp.WithinGroup)):
        return True
    return isinstance(node, exp.Anonymous) and str(node.name).lower() in PG_AGGREGATES


def _contains_aggregate(node: exp.Expr) -> bool:
    for n in _level(node):
        if isinstance(n, exp.Window):
            continue
        if _is_aggregate(n) and not isinstance(n.parent, exp.Window):
            return True
    return False


def _fold(ident: exp.Expr | str | None) -> str:
    if ident is None:
        return ""
    if isinstance(ident, str):
        return ident.lower()
    if isinstance(ident, exp.Identifier):
        return str(ident.this) if ident.quoted else str(ident.this).lower()
    return str(ident.name).lower()


def _canon(e: exp.Expr) -> str:
    """A spelling-independent form of an expression, for matching ORDER BY and GROUP BY
    expressions with select items (unquoted identifiers fold to lower case)."""
    def fold(node: exp.Expr) -> exp.Expr:
        if isinstance(node, exp.Identifier) and not node.quoted:
            return exp.Identifier(this=str(node.this).lower(), quoted=False)
        return node
    return _unparen(e).copy().transform(fold).sql(dialect="postgres")


def _sql(e: exp.Expr) -> str:
    return e.sql(dialect="postgres")


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _int_literal(e: exp.Expr) -> int | None:
    e = _unparen(e)
    negate = False
    if isinstance(e, exp.Neg):
        negate = True
        e = _unparen(e.this)
    if isinstance(e, exp.Literal) and not e.is_string:
        text = str(e.this)
        if text.isdigit():
            return -int(text) if negate else int(text)
    return None


def _param_number(e: exp.Expr) -> int | None:
    if isinstance(e, exp.Parameter):
        inner = e.this
        if isinstance(inner, exp.Literal) and not inner.is_string and str(inner.this).isdigit():
            return int(inner.this)
    return None


def _has_param(e: exp.Expr) -> bool:
    return any(isinstance(n, (exp.Parameter, exp.Placeholder)) for n in e.walk())


def _output_name(item: exp.Expr) -> tuple[str | None, int]:
    """PostgreSQL's FigureColname: the column name of a select item and its strength
    (2: a real name, 1: a type or CASE name, 0: '?column?')."""
    if isinstance(item, exp.Alias):
        return _fold(item.args.get("alias")), 2
    e = _unparen(item)
    if isinstance(e, exp.Column):
        if isinstance(e.this, exp.Star):
            return None, 0
        return _fold(e.this), 2
    if isinstance(e, exp.Cast):
        name, strength = _output_name(e.this)
        if strength <= 1:
            kind = _CAST_KINDS.get(e.to.this)
            return (kind, 1) if kind else (None, 0)
        return name, strength
    if isinstance(e, exp.Coalesce):
        return "coalesce", 2
    if isinstance(e, exp.Case):
        return "case", 1
    if isinstance(e, exp.Filter):
        return _output_name(e.this)
    if isinstance(e, exp.Anonymous):
        return str(e.name).lower(), 2
    if isinstance(e, exp.Func):
        text = _sql(e)
        cut = text.find("(")
        if cut > 0 and text[:cut].replace("_", "").isalnum():
            return text[:cut].lower(), 2
        return None, 0
    return None, 0


# -- checks that apply to every statement ---------------------------------------------------


class _Tables:
    """Which table references are sharded (not reference copies), CTEs resolved."""

    def __init__(self, tree: exp.Expr, smap: ShardMap) -> None:
        self.smap = smap
        self.ctes: dict[str, exp.Expr] = {}
        for cte in tree.find_all(exp.CTE):
            alias = cte.args.get("alias")
            self.ctes[_fold(alias.this if alias is not None else None)] = cte.this
        self._cte_sharded: dict[str, bool] = {}

    def name(self, table: exp.Table) -> TableName | None:
        ident = table.this
        if not isinstance(ident, exp.Identifier):
            return None
        db = table.args.get("db")
        return TableName(_fold(db) if db is not None else "public", _fold(ident))

    def sharded(self, table: exp.Table) -> bool:
        ident = table.this
        if not isinstance(ident, exp.Identifier):
            return False  # a function in FROM
        name = _fold(ident)
        if table.args.get("db") is None and name in self.ctes:
            if name not in self._cte_sharded:
                self._cte_sharded[name] = True  # a recursive reference: assume the worst
                self._cte_sharded[name] = self.reads_sharded(self.ctes[name])
            return self._cte_sharded[name]
        tn = self.name(table)
        placement = self.smap.table(tn) if tn is not None else None
        return placement is None or not placement.reference

    def reads_sharded(self, node: exp.Expr) -> bool:
        return any(self.sharded(t) for t in node.find_all(exp.Table))


def _check_nested(tree: exp.Select, tables: _Tables) -> None:
    """A nested query over a sharded table runs per shard: right only if it only filters.
    Aggregates, grouping, DISTINCT, LIMIT/OFFSET, windows or set operations in it would be
    computed over one shard's rows instead of all of them."""
    for node in tree.walk():
        if node is tree:
            continue
        if isinstance(node, exp.SetOperation):
            if tables.reads_sharded(node):
                raise refuse("a set operation (UNION, INTERSECT, EXCEPT) over a sharded table "
                             "cannot run per shard",
                             hint="run the parts as separate statements, or use only "
                             "reference tables inside it")
            continue
        if not isinstance(node, exp.Select):
            continue
        what = _nested_reason(node)
        if what and tables.reads_sharded(node):
            raise refuse(
                f"a subquery or CTE with {what} over a sharded table would be computed on "
                "each shard's rows separately, not over all rows",
                hint="compute it in a separate statement and pass the value, or join on the "
                "sharding key and group in the outer query")


def _nested_reason(q: exp.Select) -> str | None:
    if q.args.get("group"):
        return "GROUP BY"
    if q.args.get("having"):
        return "HAVING"
    if q.args.get("distinct"):
        return "DISTINCT"
    if q.args.get("limit") or q.args.get("offset"):
        return "LIMIT/OFFSET"
    for n in _level(q):
        if isinstance(n, exp.Window):
            return "a window function"
        if _is_aggregate(n):
            return f"an aggregate ({_sql(n)})"
    return None


def _check_statement(tree: exp.Expr | None, tables: _Tables | None) -> exp.Select:
    if isinstance(tree, exp.SetOperation):
        raise refuse("a set operation (UNION, INTERSECT, EXCEPT) across shards cannot be "
                     "merged", hint="run each part as its own statement")
    if not isinstance(tree, exp.Select):
        kind = type(tree).__name__.upper() if tree is not None else "empty statement"
        raise refuse(f"only SELECT can be merged across shards, not {kind}",
                     hint="restrict the statement to one shard's key")
    if tree.args.get("into"):
        raise refuse("SELECT INTO across shards is not supported",
                     hint="use CREATE TABLE ... AS on one shard, or INSERT ... SELECT per shard")
    if tree.args.get("locks"):
        raise refuse("SELECT ... FOR UPDATE/SHARE across shards is not supported",
                     hint="lock rows one shard at a time: restrict the statement to one "
                     "sharding key")
    for n in _level(tree):
        if isinstance(n, exp.Window):
            raise refuse("window functions cannot be merged across shards",
                         hint="compute them per sharding key (PARTITION BY the key, with a "
                         "WHERE on one key), or in the application")
    group = tree.args.get("group")
    if group is not None:
        for g in group.expressions:
            if isinstance(g, (exp.Rollup, exp.Cube, exp.GroupingSets, exp.Tuple)):
                raise refuse("GROUPING SETS, ROLLUP and CUBE cannot be merged across shards",
                             hint="run one GROUP BY per grouping set")
        if group.args.get("rollup") or group.args.get("cube") or \
                group.args.get("grouping_sets"):
            raise refuse("GROUPING SETS, ROLLUP and CUBE cannot be merged across shards",
                         hint="run one GROUP BY per grouping set")
    if tables is not None:
        _check_nested(tree, tables)
    return tree


# -- the shard key: what lets groups and DISTINCT stay on one shard ------------------------


class _KeyColumns:
    """Column references that are the sharding key of a sharded table in the statement's
    FROM, on a side of the joins that is never NULL-extended. Rows with equal key values
    are on one shard: groups and DISTINCT rows that include the key never span shards."""

    def __init__(self, select: exp.Select, smap: ShardMap, tables: _Tables) -> None:
        self.sources: dict[str, str] = {}  # alias -> key column, for usable sharded tables
        self.count = 0
        from_ = select.args.get("from_") or select.args.get("from")
        if from_ is None:
            return
        entries: list[tuple[exp.Expr, bool]] = [(from_.this, False)]
        for join in select.args.get("joins") or []:
            side = str(join.args.get("side") or "").upper()
            if side in ("RIGHT", "FULL"):
                entries = [(e, True) for e, _ in entries]
            entries.append((join.this, side in ("LEFT", "FULL")))
        self.count = len(entries)
        for source, nullable in entries:
            if nullable or not isinstance(source, exp.Table):
                continue
            name = tables.name(source)
            if name is None or (source.args.get("db") is None and name.name in tables.ctes):
                continue
            placement = smap.table(name)
            if placement is None or placement.reference or placement.rule is None:
                continue
            alias = source.args.get("alias")
            key = _fold(alias.this) if isinstance(alias, exp.TableAlias) and alias.this \
                else name.name
            self.sources[key] = placement.column.lower()

    def is_key(self, e: exp.Expr) -> bool:
        e = _unparen(e)
        if not isinstance(e, exp.Column) or isinstance(e.this, exp.Star):
            return False
        column = _fold(e.this)
        qualifier = e.args.get("table")
        if qualifier is not None:
            return self.sources.get(_fold(qualifier)) == column
        if self.count == 1 and len(self.sources) == 1:
            return next(iter(self.sources.values())) == column
        return False


# -- the builder -------------------------------------------------------------------------


@dataclass(slots=True)
class _Helper:
    sql: str
    role: Role | None
    collation: str | None = None


@dataclass(slots=True)
class _Builder:
    text: str
    select: exp.Select
    smap: ShardMap
    tables: _Tables
    items: list[exp.Expr] = field(default_factory=list)
    first_star: int | None = None
    stars: int = 0
    helpers: list[_Helper] = field(default_factory=list)
    helper_index: dict[str, int] = field(default_factory=dict)
    params: list[int] = field(default_factory=list)
    original: str = ""  # the client's text, before fix_comma_params
    _layout: Layout | None = None

    def __post_init__(self) -> None:
        self.items = list(self.select.expressions)
        for i, item in enumerate(self.items):
            if isinstance(item, exp.Star) or (
                    isinstance(item, exp.Column) and isinstance(item.this, exp.Star)):
                self.stars += 1
                if self.first_star is None:
                    self.first_star = i

    # -- text

    def layout(self) -> Layout:
        if self._layout is None:
            self._layout = layout(self.text)
            if len(self._layout.items) != len(self.items):
                raise refuse("cannot rewrite the statement for a multi-shard merge: its "
                             "select list could not be located in the text",
                             hint="simplify the select list")
        return self._layout

    # -- columns

    def is_star(self, i: int) -> bool:
        item = self.items[i]
        return isinstance(item, exp.Star) or (
            isinstance(item, exp.Column) and isinstance(item.this, exp.Star))

    def visible(self, i: int) -> int | None:
        """The column index of select item i, when known before the shards answer."""
        if self.first_star is None or i < self.first_star:
            return i
        if i == self.first_star:
            return i  # a star's first column
        return None

    def helper(self, e: exp.Expr, role: Role | None, collation: str | None = None,
               sql: str | None = None) -> int:
        text = sql if sql is not None else _sql(_unparen(e))
        if role in (Role.KEY, Role.FIRST):
            # One column per grouped expression, however it is spelled where it recurs (an
            # ORDER BY repeating a GROUP BY expression gets the GROUP BY's column, written as
            # the GROUP BY has it).
            key = f"group:{_canon(e)}"
        else:
            key = f"{role.value if role else ''}:{text}"
        if key in self.helper_index:
            return ~self.helper_index[key]
        self.helper_index[key] = len(self.helpers)
        self.helpers.append(_Helper(text, role, collation))
        return ~(len(self.helpers) - 1)

    def item_expr(self, i: int) -> exp.Expr:
        item = self.items[i]
        return item.this if isinstance(item, exp.Alias) else item

    def match_item(self, e: exp.Expr) -> int | None:
        """The select item equal to expression e (spelling aside)."""
        target = _canon(e)
        for i in range(len(self.items)):
            if self.is_star(i):
                continue
            if _canon(self.item_expr(i)) == target:
                return i
        return None

    def named_items(self, e: exp.Expr) -> list[int]:
        """Select items whose output name is the bare identifier e."""
        e = _unparen(e)
        if not isinstance(e, exp.Column) or e.args.get("table") is not None or \
                isinstance(e.this, exp.Star):
            return []
        name = _fold(e.this)
        return [i for i, item in enumerate(self.items)
                if not self.is_star(i) and _output_name(item)[0] == name]

    def order_column(self, e: exp.Expr) -> int:
        """The column an ORDER BY / DISTINCT ON expression sorts by: a position, an output
        name, a select item, or else a helper column computing it."""
        e = _unparen(e)
        position = _int_literal(e)
        if position is not None and not isinstance(_unparen(e), exp.Neg):
            return position - 1  # the shards reject positions out of range themselves
        if _param_number(e) is not None:
            raise refuse("ORDER BY a parameter cannot be merged across shards",
                         hint="order by a column or an expression")
        self.check_volatile(e)
        named = self.named_items(e)
        if named:
            col = self.visible(named[0])
            return col if col is not None else self.helper(self.item_expr(named[0]), None)
        found = self.match_item(e)
        if found is not None:
            col = self.visible(found)
            if col is not None:
                return col
        return self.helper(e, None)

    def check_volatile(self, e: exp.Expr) -> None:
        for n in e.walk():
            if isinstance(n, (exp.Rand, exp.Uuid)) or (
                    isinstance(n, exp.Anonymous) and str(n.name).lower() in VOLATILE) or (
                    isinstance(n, exp.Func) and _output_name(n)[0] in VOLATILE):
                raise refuse(f"ORDER BY a volatile function ({_sql(n)}) cannot be merged "
                             "across shards: each shard computes its own values",
                             hint="order by a column, or shuffle the rows in the application")

    # -- LIMIT / OFFSET

    def limit_spec(self) -> LimitSpec | None:
        sel = self.select
        limit = sel.args.get("limit")
        offset = sel.args.get("offset")
        if limit is None and offset is None:
            return None
        with_ties = False
        count: LimitValue = None
        if isinstance(limit, exp.Fetch):
            opts = limit.args.get("limit_options")
            if opts is not None and opts.args.get("percent"):
                raise refuse("FETCH ... PERCENT is not supported",
                             hint="use FETCH FIRST n ROWS ONLY")
            with_ties = bool(opts is not None and opts.args.get("with_ties"))
            c = limit.args.get("count")
            count = self.limit_value(c) if c is not None else 1
        elif isinstance(limit, exp.Limit):
            count = self.limit_value(limit.expression)
        elif limit is not None:
            raise refuse("this LIMIT form cannot be merged", hint="use LIMIT n OFFSET m")
        off: LimitValue = None
        if offset is not None:
            off = self.limit_value(offset.expression)
        if with_ties and not self.select.args.get("order"):
            with_ties = False  # PostgreSQL refuses it; the shards will say so
        return LimitSpec(count, off, with_ties)

    def limit_value(self, e: exp.Expr) -> LimitValue:
        e = _unparen(e)
        if isinstance(e, exp.Null) or (isinstance(e, exp.Var) and str(e.this).upper() == "ALL"):
            return None
        literal = _int_literal(e)
        if literal is not None:
            return literal
        inner = e
        while isinstance(inner, exp.Cast):
            inner = _unparen(inner.this)
        number = _param_number(inner)
        if number is not None:
            if number not in self.params:
                self.params.append(number)
            return Param(number)
        raise refuse(f"LIMIT/OFFSET {_sql(e)} cannot be merged across shards",
                     hint="use an integer literal or a parameter ($1)")

    def limit_text(self, which: str) -> str | None:
        lay = self.layout()
        span = lay.clauses.get(which)
        if span is None:
            return None
        return lay.text[span[0]:span[1]]

    def limit_expr_text(self, e: exp.Expr | None) -> str:
        """The SQL of a LIMIT/OFFSET/FETCH value as the client wrote it (params keep their
        type inference: a parameter alone becomes bigint, as in LIMIT)."""
        assert e is not None
        inner = _unparen(e)
        if _param_number(inner) is not None:
            return f"{_sql(inner)}::bigint"
        return f"({_sql(inner)})::bigint"

    def push_limit(self, splice: Splice, spec: LimitSpec) -> None:
        """Shards return offset + count rows and skip none; the merge skips and stops.
        LIMIT without OFFSET runs on the shards as written."""
        lay = self.layout()
        offset = self.select.args.get("offset")
        if offset is None:
            return
        limit = self.select.args.get("limit")
        spans = [lay.clauses[c] for c in ("limit", "offset", "fetch") if c in lay.clauses]
        keep = ""
        if isinstance(spec.count, int) and isinstance(spec.offset, int):
            if spec.count < 0 or spec.offset < 0:
                return  # PostgreSQL's own error comes from the shards (and from start())
            total = spec.count + spec.offset
            new = "" if total > (1 << 63) - 1 else _limit_clause(str(total), spec.with_ties)
        elif spec.count is None and not isinstance(limit, exp.Fetch):
            new = ""  # OFFSET alone, or LIMIT ALL / NULL: the shards return every row
            if isinstance(spec.offset, Param):
                keep = self.param_keeper([offset.expression])
        else:
            count_e = limit.args.get("count") if isinstance(limit, exp.Fetch) else \
                limit.expression if limit is not None else None
            count_sql = self.limit_expr_text(count_e) if count_e is not None else "1"
            off_sql = self.limit_expr_text(offset.expression)
            # NULL counts mean no limit (LEAST skips NULLs); the sum never overflows bigint.
            total_sql = (f"LEAST(({count_sql})::numeric + COALESCE(({off_sql})::numeric, 0), "
                         "9223372036854775807)")
            new = _limit_clause(total_sql, spec.with_ties)
        text = " ".join(x for x in (new, keep) if x)
        first = min(a for a, _ in spans)
        for a, b in spans:
            splice.replace(a, b, text + " " if a == first and text else "")

    def param_keeper(self, values: list[exp.Expr]) -> str:
        """A clause that changes nothing but keeps parameters referenced (typed bigint, as
        LIMIT and OFFSET type them), so that the statement's parameters keep their types."""
        texts = [self.limit_expr_text(e) for e in values]
        return f"OFFSET 0 * COALESCE({', '.join(texts)}, 0)"

    def drop_limit(self, splice: Splice) -> None:
        """The merge applies LIMIT/OFFSET itself: shards return all rows. Parameters in them
        stay referenced, typed as bigint as in LIMIT, so that the statement's parameter set
        keeps its meaning."""
        lay = self.layout()
        spans = [lay.clauses[c] for c in ("limit", "offset", "fetch") if c in lay.clauses]
        values = []
        for clause in ("limit", "offset"):
            node = self.select.args.get(clause)
            if node is None:
                continue
            e = node.args.get("count") if isinstance(node, exp.Fetch) else node.expression
            if e is not None and _has_param(e):
                values.append(self.limit_expr_text(e))
        keep = ""
        if values:
            keep = f"OFFSET 0 * COALESCE({', '.join(values)}, 0) "
        first = min((a for a, _ in spans), default=None)
        for a, b in spans:
            splice.replace(a, b, keep if a == first else "")

    # -- output

    def append_helpers(self, splice: Splice) -> None:
        if not self.helpers:
            return
        lay = self.layout()
        end = lay.items[-1][1]
        added = "".join(f", {h.sql} AS {HELPER_PREFIX}{i + 1}"
                        for i, h in enumerate(self.helpers))
        splice.insert(end, added)


def _limit_clause(total: str, with_ties: bool) -> str:
    if with_ties:
        return f"FETCH FIRST ({total}) ROWS WITH TIES"
    return f"LIMIT {total}"


def _ordered(o: exp.Ordered) -> tuple[exp.Expr, bool, bool, str | None]:
    e = o.this
    desc = bool(o.args.get("desc"))
    nulls_first = bool(o.args.get("nulls_first"))
    collation = None
    inner = _unparen(e)
    if isinstance(inner, exp.Collate):
        collation = _fold(inner.expression) if isinstance(inner.expression, exp.Identifier) \
            else str(inner.expression.name).lower()
    return e, desc, nulls_first, collation


# -- aggregates -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Agg:
    kind: str  # count sum min max avg and or
    arg: exp.Expr | None  # None for count(*)
    distinct: bool
    filter: exp.Expr | None  # the FILTER's WHERE
    collation: str | None


_AGG_KINDS: dict[type, str] = {
    exp.Count: "count", exp.Sum: "sum", exp.Min: "min", exp.Max: "max", exp.Avg: "avg",
    exp.LogicalAnd: "and", exp.LogicalOr: "or",
}


def _agg(node: exp.Expr) -> _Agg | None:
    """A mergeable aggregate call, or None for any other aggregate."""
    node = _unparen(node)
    filt = None
    if isinstance(node, exp.Filter):
        filt = node.expression
        node = node.this
    kind = _AGG_KINDS.get(type(node))
    if kind is None and isinstance(node, exp.Anonymous):
        kind = {"every": "and", "bool_and": "and", "bool_or": "or"}.get(str(node.name).lower())
        if kind is None:
            return None
        args = node.expressions
        if len(args) != 1:
            return None
        arg: exp.Expr | None = args[0]
    elif kind is None:
        return None
    else:
        if node.args.get("expressions") and kind != "count":
            return None
        arg = node.this
    if any(k not in ("this", "expressions", "big_int") and v
           for k, v in node.args.items()):
        return None  # ORDER BY inside the call, IGNORE NULLS...
    distinct = False
    if isinstance(arg, exp.Distinct):
        if len(arg.expressions) != 1:
            return None
        distinct = True
        arg = arg.expressions[0]
    if isinstance(arg, exp.Star):
        arg = None
    collation = None
    if arg is not None and isinstance(_unparen(arg), exp.Collate):
        c = _unparen(arg).expression
        collation = _fold(c) if isinstance(c, exp.Identifier) else str(c.name).lower()
    return _Agg(kind, arg, distinct, filt, collation)


def _agg_call(kind: str, a: _Agg) -> str:
    """The SQL of a helper aggregate over the same argument, DISTINCT and FILTER."""
    arg: exp.Expr = exp.Star() if a.arg is None else a.arg.copy()
    if a.distinct:
        arg = exp.Distinct(expressions=[arg])
    call: exp.Expr = {"count": exp.Count, "sum": exp.Sum}[kind](this=arg)
    if a.filter is not None:
        call = exp.Filter(this=call, expression=a.filter.copy())
    return _sql(call)


_ROLE_OF = {"count": Role.COUNT, "sum": Role.SUM, "min": Role.MIN, "max": Role.MAX,
            "and": Role.AND, "or": Role.OR}


# -- plan ---------------------------------------------------------------------------------


def build(sql: str, smap: ShardMap) -> tuple[str, tuple[int, ...], Plan]:
    """(shard SQL, parameters the merge needs, merge plan) for one client SELECT."""
    text = fix_comma_params(sql)
    try:
        trees = [t for t in sqlglot.parse(text, dialect="postgres") if t is not None]
    except (ParseError, TokenError) as e:
        raise refuse("cannot parse the statement to merge it across shards: "
                     f"{str(e).splitlines()[0]}",
                     hint="restrict the statement to one shard's key") from None
    if len(trees) != 1:
        raise refuse("a multi-shard merge takes exactly one statement",
                     hint="send the statements one at a time")
    tables = _Tables(trees[0], smap)
    select = _check_statement(trees[0], tables)
    b = _Builder(text, select, smap, tables, original=sql)
    keys = _KeyColumns(select, smap, tables)
    order = select.args.get("order")
    order_exprs = [o.this for o in order.expressions] if order is not None else []
    aggregating = bool(select.args.get("group")) or bool(select.args.get("having")) or any(
        _contains_aggregate(e) for e in [*b.items, *order_exprs])
    group = select.args.get("group")
    group_local = aggregating and group is not None and any(
        keys.is_key(g) or (_int_literal(g) is not None and 0 < (_int_literal(g) or 0) <= len(
            b.items) and keys.is_key(b.item_expr((_int_literal(g) or 1) - 1)))
        for g in group.expressions)
    if aggregating and not group_local:
        return _aggregate_plan(b, keys)
    return _stream_plan(b, keys, group_local)


def _stream_plan(b: _Builder, keys: _KeyColumns, group_local: bool) -> tuple[
        str, tuple[int, ...], Plan]:
    """Rows merge as they are: a union, or a k-way merge when there is an ORDER BY."""
    sel = b.select
    splice = Splice(b.text)
    sort: list[SortKey] = []
    order = sel.args.get("order")
    if order is not None:
        for o in order.expressions:
            e, desc, nulls_first, collation = _ordered(o)
            sort.append(SortKey(b.order_column(e), desc, nulls_first, collation))
    distinct_node = sel.args.get("distinct")
    distinct = False
    distinct_on: tuple[int, ...] = ()
    if distinct_node is not None:
        on = distinct_node.args.get("on")
        if on is not None:
            exprs = on.expressions if isinstance(on, exp.Tuple) else [on]
            if not any(keys.is_key(e) for e in exprs):
                distinct_on = tuple(b.order_column(e) for e in exprs)
        else:
            # Rows with a sharding key in them are distinct across shards already.
            distinct = not any(keys.is_key(b.item_expr(i)) for i in range(len(b.items))
                               if not b.is_star(i))
    limit = b.limit_spec()
    if limit is not None:
        b.push_limit(splice, limit)
    b.append_helpers(splice)
    shard_sql = splice.result() if splice.edits else b.original
    mode = Mode.SORT if sort else Mode.UNION
    reason = "groups contain the sharding key: each group is on one shard" if group_local \
        else ("k-way merge by ORDER BY" if sort else "union of the shards' rows")
    return shard_sql, tuple(b.params), Plan(
        mode, len(b.helpers), tuple(sort), distinct, distinct_on, limit, None, reason,
        groups_on_one_shard=group_local)


def _aggregate_plan(b: _Builder, keys: _KeyColumns) -> tuple[str, tuple[int, ...], Plan]:
    sel = b.select
    splice = Splice(b.text)
    lay = b.layout()
    if b.stars > 1:
        raise refuse("an aggregate query with several * in its select list cannot be merged",
                     hint="name the columns")
    roles: dict[int, ColumnRole] = {}
    group_cols: list[int] = []
    compiler = _Compiler(b, keys, roles)

    # GROUP BY: each key is a select item or a helper column.
    group = sel.args.get("group")
    expressions = group.expressions if group is not None else []
    # As written: a helper column must repeat the GROUP BY expression exactly (sqlglot's
    # spelling of `date_trunc('month', t)` is not the same expression to PostgreSQL).
    span = lay.clauses.get("group")
    written = clause_items(lay.text, span) if span is not None else []
    if len(written) != len(expressions):
        written = []
    for n, g in enumerate(expressions):
        key_col = compiler.group_column(g, written[n] if written else None)
        group_cols.append(key_col)
        roles[key_col] = ColumnRole(key_col, Role.KEY)

    # The select list: merged in place, or computed by the merge.
    outputs: list[s.Node] = []
    for i, item in enumerate(b.items):
        col = b.visible(i)
        if b.is_star(i):
            assert col is not None
            roles.setdefault(col, ColumnRole(col, Role.FIRST))
            outputs.append(s.Ref(col))
            continue
        e = _unparen(b.item_expr(i))
        if col is None:
            raise refuse("select items after * in an aggregate query cannot be merged",
                         hint="put * last, or name the columns")
        if not _contains_aggregate(e):
            roles.setdefault(col, ColumnRole(col, Role.FIRST))
            outputs.append(s.Ref(col))
            continue
        a = _agg(e)
        if a is not None and a.kind != "avg":
            compiler.check_distinct(a, e)
            roles[col] = ColumnRole(col, _ROLE_OF[a.kind], a.collation)
            outputs.append(s.Ref(col))
            continue
        node = compiler.compile(e, allow_params=True)
        outputs.append(node)
        if a is None:
            # The shards must not compute it (a division by a shard's zero count would
            # fail there): keep its type and name, evaluate nothing.
            start, end = lay.items[i]
            splice.replace(start, end, _inert_item(item, e, b.text[start:end]))

    having = sel.args.get("having")
    having_node = None
    if having is not None:
        having_node = compiler.compile(having.this, allow_params=False)
        start, end = lay.clauses["having"]
        splice.replace(start, end, "HAVING TRUE ")

    order_terms: list[OrderTerm] = []
    order = sel.args.get("order")
    if order is not None:
        for o in order.expressions:
            e, desc, nulls_first, collation = _ordered(o)
            node = compiler.order_node(e)
            order_terms.append(OrderTerm(node, desc, nulls_first, collation))
        splice.replace(*lay.clauses["order"], "")

    distinct = False
    distinct_on: tuple[s.Node, ...] = ()
    distinct_node = sel.args.get("distinct")
    if distinct_node is not None:
        on = distinct_node.args.get("on")
        if on is not None:
            exprs = on.expressions if isinstance(on, exp.Tuple) else [on]
            distinct_on = tuple(compiler.order_node(e) for e in exprs)
        else:
            distinct = True
        assert lay.distinct is not None
        splice.replace(*lay.distinct, "")

    limit = b.limit_spec()
    if limit is not None:
        b.drop_limit(splice)

    b.append_helpers(splice)
    for h_index, h in enumerate(b.helpers):
        col = ~h_index
        if h.role is not None and col not in roles:
            roles[col] = ColumnRole(col, h.role, h.collation)
    star = next((i for i in range(len(b.items)) if b.is_star(i)), None)
    aggregation = Aggregation(
        tuple(roles.values()), tuple(group_cols), tuple(outputs), star, having_node,
        tuple(order_terms), distinct, distinct_on)
    shard_sql = splice.result() if splice.edits else b.original
    return shard_sql, tuple(b.params), Plan(
        Mode.AGGREGATE, len(b.helpers), limit=limit, aggregation=aggregation,
        reason="partial aggregates re-aggregated by the proxy")


def _inert_item(item: exp.Expr, e: exp.Expr, original: str) -> str:
    """A select item that keeps its type, type modifier and column name, but computes
    nothing on the shards."""
    name, _ = _output_name(item)
    if name is None:
        name = "?column?"
    inner = e
    if isinstance(item, exp.Alias):
        inner = item.this
    inner_sql = _sql(_unparen(inner))
    top = _unparen(inner)
    if isinstance(top, exp.Cast) and top.to.expressions:
        body = f"CAST(CASE WHEN FALSE THEN {_sql(_unparen(top.this))} END AS {_sql(top.to)})"
    else:
        body = f"CASE WHEN FALSE THEN {inner_sql} END"
    return f"{body} AS {_quote(name)}"


@dataclass(slots=True)
class _Compiler:
    """Turns expressions over aggregates into trees the merge evaluates."""

    b: _Builder
    keys: _KeyColumns
    roles: dict[int, ColumnRole]

    def check_distinct(self, a: _Agg, e: exp.Expr) -> None:
        if a.distinct and a.kind in ("count", "sum", "avg") and not (
                a.arg is not None and self.keys.is_key(a.arg)):
            raise refuse(
                f"{_sql(e)} cannot be merged across shards: one value may be counted on "
                "several shards",
                hint="GROUP BY the sharding key (each group then stays on one shard), or "
                "count distinct values of the sharding key")

    def group_column(self, g: exp.Expr, written: str | None = None) -> int:
        b = self.b
        position = _int_literal(g)
        if position is not None:
            return position - 1
        named = b.named_items(g)
        if named:
            col = b.visible(named[0])
            return col if col is not None else b.helper(b.item_expr(named[0]), Role.KEY)
        i = b.match_item(g)
        if i is not None:
            col = b.visible(i)
            if col is not None:
                return col
        return b.helper(g, Role.KEY, sql=written)

    def aggregate_column(self, e: exp.Expr, a: _Agg) -> int:
        """The column holding a mergeable aggregate: a select item that is that very
        aggregate, or a helper column."""
        b = self.b
        i = b.match_item(e)
        if i is not None:
            col = b.visible(i)
            role = self.roles.get(col) if col is not None else None
            if col is not None and role is not None and role.role is _ROLE_OF[a.kind]:
                return col
        return b.helper(e, _ROLE_OF[a.kind], a.collation)

    def compile(self, e: exp.Expr, allow_params: bool) -> s.Node:
        e = _unparen(e)
        b = self.b
        if isinstance(e, exp.Alias):
            return self.compile(e.this, allow_params)
        if not _contains_aggregate(e):
            const = _constant(e)
            if const is not None:
                return const
            if _has_param(e) and not allow_params:
                raise refuse(
                    f"a parameter in HAVING or in ORDER BY of an aggregate query ({_sql(e)}) "
                    "cannot be evaluated by the merge",
                    hint="write the value as a literal")
            if any(isinstance(n, exp.Select) for n in e.walk()):
                raise refuse("a subquery in HAVING cannot be evaluated after the merge",
                             hint="compute the subquery's value separately")
            i = b.match_item(e)
            if i is not None:
                col = b.visible(i)
                if col is not None and col in self.roles and \
                        self.roles[col].role in (Role.KEY, Role.FIRST):
                    return s.Ref(col)
            return s.Ref(b.helper(e, Role.FIRST))
        a = _agg(e)
        if a is not None:
            self.check_distinct(a, e)
            if a.kind == "avg":
                sum_col = b.helper(e, Role.SUM, sql=_agg_call("sum", a))
                count_col = b.helper(e, Role.COUNT, sql=_agg_call("count", a))
                return s.AvgOf(sum_col, count_col)
            return s.Ref(self.aggregate_column(e, a))
        if _is_aggregate(e):
            raise refuse(
                f"the aggregate {_sql(e)} cannot be merged across shards",
                hint="count, sum, min, max, avg, bool_and, bool_or and every merge exactly; "
                "GROUP BY the sharding key to use other aggregates (each group then stays on "
                "one shard)")
        c = self.compile
        ops = {exp.Add: "+", exp.Sub: "-", exp.Mul: "*", exp.Div: "/", exp.Mod: "%"}
        cmps = {exp.EQ: "=", exp.NEQ: "<>", exp.LT: "<", exp.LTE: "<=", exp.GT: ">",
                exp.GTE: ">="}
        for cls, op in ops.items():
            if type(e) is cls:
                if isinstance(e, exp.Div) and e.args.get("safe"):
                    break
                return s.Arith(op, c(e.this, allow_params), c(e.expression, allow_params))
        for cls, op in cmps.items():
            if type(e) is cls:
                return s.Cmp(op, c(e.this, allow_params), c(e.expression, allow_params))
        if isinstance(e, exp.Neg):
            return s.Neg(c(e.this, allow_params))
        if isinstance(e, exp.And):
            return s.BoolOp("and", (c(e.this, allow_params), c(e.expression, allow_params)))
        if isinstance(e, exp.Or):
            return s.BoolOp("or", (c(e.this, allow_params), c(e.expression, allow_params)))
        if isinstance(e, exp.Not):
            return s.Not(c(e.this, allow_params))
        if isinstance(e, exp.Is) and isinstance(e.expression, exp.Null):
            return s.IsNull(c(e.this, allow_params), bool(e.args.get("negate")))
        if isinstance(e, exp.Between) and not e.args.get("symmetric"):
            x = c(e.this, allow_params)
            return s.BoolOp("and", (s.Cmp(">=", x, c(e.args["low"], allow_params)),
                                    s.Cmp("<=", x, c(e.args["high"], allow_params))))
        if isinstance(e, exp.In) and not e.args.get("query") and not e.args.get("unnest") \
                and e.expressions:
            x = c(e.this, allow_params)
            return s.BoolOp("or", tuple(s.Cmp("=", x, c(v, allow_params))
                                        for v in e.expressions))
        if isinstance(e, exp.Coalesce):
            args = [e.this, *e.expressions]
            return s.Coalesce(tuple(c(a, allow_params) for a in args))
        if isinstance(e, exp.Cast):
            kind = _CAST_KINDS.get(e.to.this)
            if kind is not None:
                precision, scale = None, 0
                params = e.to.expressions
                if params:
                    if kind != "numeric":
                        kind = ""
                    else:
                        precision = int(_unparen(params[0].this).name)
                        scale = int(_unparen(params[1].this).name) if len(params) > 1 else 0
                if kind:
                    return s.Cast(c(e.this, allow_params), kind, precision, scale)
        raise refuse(
            f"cannot evaluate {_sql(e)} after merging the shards' groups",
            hint="HAVING, ORDER BY and select items over aggregates support +, -, *, /, %, "
            "comparisons, AND/OR/NOT, IS [NOT] NULL, BETWEEN, IN (...), COALESCE and numeric "
            "casts; select the aggregates and compute the rest in the application")

    def order_node(self, e: exp.Expr) -> s.Node:
        """An ORDER BY or DISTINCT ON key of an aggregate query."""
        b = self.b
        inner = _unparen(e)
        position = _int_literal(inner)
        if position is not None:
            if not 1 <= position <= len(b.items) or b.visible(position - 1) is None:
                raise refuse(f"ORDER BY position {position} cannot be mapped",
                             hint="order by a column name or an expression")
            i = position - 1
            return self.item_node(i)
        b.check_volatile(inner)
        if isinstance(inner, exp.Collate):
            inner = _unparen(inner.this)
        named = b.named_items(inner)
        if named:
            return self.item_node(named[0])
        found = b.match_item(inner)
        if found is not None and not b.is_star(found) and b.visible(found) is not None:
            return self.item_node(found)
        return self.compile(inner, allow_params=False)

    def item_node(self, i: int) -> s.Node:
        b = self.b
        col = b.visible(i)
        if col is not None and col in self.roles:
            return s.Ref(col)
        return self.compile(b.item_expr(i), allow_params=False)


def _constant(e: exp.Expr) -> s.Const | None:
    e = _unparen(e)
    negate = False
    if isinstance(e, exp.Neg) and isinstance(_unparen(e.this), exp.Literal):
        negate = True
        e = _unparen(e.this)
    if isinstance(e, exp.Null):
        return s.Const("null", None)
    if isinstance(e, exp.Boolean):
        return s.Const("bool", bool(e.this))
    if isinstance(e, exp.Literal):
        text = str(e.this)
        if e.is_string:
            return None if negate else s.Const("unknown", text)
        if text.isdigit():
            v = -int(text) if negate else int(text)
            if -(1 << 31) <= v < (1 << 31):
                return s.Const("int4", v)
            if -(1 << 63) <= v < (1 << 63):
                return s.Const("int8", v)
            from decimal import Decimal
            return s.Const("numeric", Decimal(v))
        from decimal import Decimal, InvalidOperation
        try:
            d = Decimal(text)
        except InvalidOperation:
            return None
        return s.Const("numeric", -d if negate else d)
    return None
