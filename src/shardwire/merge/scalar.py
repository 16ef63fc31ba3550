"""Expressions a merge evaluates itself, after re-aggregation: HAVING, select items that
compute on aggregates (`sum(x) * 2`), ORDER BY keys over aggregates, and `avg`.

A tree is built at plan time from the statement (no types known yet); `bind` types it once
the shards' RowDescription gives every column's type, following PostgreSQL's rules for the
few operators supported (integer widening, numeric and float promotion, integer division,
three-valued logic), and returns a function of one merged group.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from . import floats, numeric
from . import pgtypes as t
from .errors import MergeError, MergeRefused, division_by_zero, overflow

# -- trees --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ref:
    """A column of the shards' result (visible index, or ~h for helper h), merged."""

    col: int


@dataclass(frozen=True, slots=True)
class Const:
    kind: str  # int4, int8, numeric, bool, unknown (a quoted literal), null
    value: Any


@dataclass(frozen=True, slots=True)
class AvgOf:
    sum: int
    count: int


@dataclass(frozen=True, slots=True)
class Arith:
    op: str  # + - * / %
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class Neg:
    arg: Node


@dataclass(frozen=True, slots=True)
class Cmp:
    op: str  # = <> < <= > >=
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class BoolOp:
    op: str  # and, or
    args: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Not:
    arg: Node


@dataclass(frozen=True, slots=True)
class IsNull:
    arg: Node
    negated: bool


@dataclass(frozen=True, slots=True)
class Cast:
    arg: Node
    kind: str  # int2 int4 int8 numeric float4 float8
    precision: int | None = None  # numeric(precision, scale)
    scale: int = 0


@dataclass(frozen=True, slots=True)
class Coalesce:
    args: tuple[Node, ...]


Node = Ref | Const | AvgOf | Arith | Neg | Cmp | BoolOp | Not | IsNull | Cast | Coalesce


def refs(node: Node) -> set[int]:
    """The columns a tree reads."""
    match node:
        case Ref(col=col):
            return {col}
        case AvgOf(sum=s, count=c):
            return {s, c}
        case Arith(left=a, right=b) | Cmp(left=a, right=b):
            return refs(a) | refs(b)
        case Neg(arg=a) | Not(arg=a) | IsNull(arg=a) | Cast(arg=a):
            return refs(a)
        case BoolOp(args=args) | Coalesce(args=args):
            out: set[int] = set()
            for a in args:
                out |= refs(a)
            return out
    return set()


# -- kinds --------------------------------------------------------------------------------

INTS = ("int2", "int4", "int8")
_RANK = {"int2": 0, "int4": 1, "int8": 2, "numeric": 3, "float4": 4, "float8": 5}
NUMBERS = frozenset(_RANK)
_RANGE = {"int2": (-(1 << 15), (1 << 15) - 1), "int4": (-(1 << 31), (1 << 31) - 1),
          "int8": (-(1 << 63), (1 << 63) - 1)}
_INT_NAME = {"int2": "smallint", "int4": "integer", "int8": "bigint"}

KIND_OF_OID = {
    t.INT2: "int2", t.INT4: "int4", t.INT8: "int8", t.NUMERIC: "numeric",
    t.FLOAT4: "float4", t.FLOAT8: "float8", t.BOOL: "bool",
    t.TEXT: "text", t.VARCHAR: "text", t.BPCHAR: "text", t.NAME: "text", t.UNKNOWN: "text",
}
OIDS_OF_KIND = {
    "int2": {t.INT2}, "int4": {t.INT4}, "int8": {t.INT8}, "numeric": {t.NUMERIC},
    "float4": {t.FLOAT4}, "float8": {t.FLOAT8}, "bool": {t.BOOL},
    "text": {t.TEXT, t.VARCHAR, t.BPCHAR, t.NAME, t.UNKNOWN},
}
_KIND_NAME = {"int2": "smallint", "int4": "integer", "int8": "bigint", "numeric": "numeric",
              "float4": "real", "float8": "double precision", "bool": "boolean",
              "text": "text", "unknown": "unknown", "null": "unknown"}


def kind_of_oid(oid: int) -> str:
    """The evaluator's kind for a column type: 'other:<oid>' for types it only compares."""
    return KIND_OF_OID.get(oid, f"other:{oid}")


def kind_name(kind: str) -> str:
    if kind.startswith("other:"):
        return t.type_name(int(kind[6:]))
    return _KIND_NAME.get(kind, kind)


def _promote(a: str, b: str) -> str:
    """The result kind of an arithmetic operator on two number kinds (PostgreSQL picks
    int2 < int4 < int8 < numeric, and float8 as soon as a float meets a non-float4)."""
    if a == "float8" or b == "float8":
        return "float8"
    if a == "float4" or b == "float4":
        return "float4" if a == b else "float8"
    return a if _RANK[a] >= _RANK[b] else b


def _refuse_expr(what: str) -> MergeRefused:
    return MergeRefused(
        f"cannot evaluate {what} after merging the shards' groups",
        hint="HAVING, ORDER BY and select items over aggregates support +, -, *, /, %, "
        "comparisons, AND/OR/NOT, IS [NOT] NULL, BETWEEN, IN (...), COALESCE and numeric casts")


# -- values -------------------------------------------------------------------------------

Getter = Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class Bound:
    kind: str
    fn: Getter


class Columns:
    """What `bind` needs to know about the merged columns: implemented by the engine."""

    def kind(self, col: int) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def getter(self, col: int) -> Getter:  # pragma: no cover - interface
        raise NotImplementedError

    def text_collation_is_c(self) -> bool:  # pragma: no cover - interface
        raise NotImplementedError


def _const(value: Any) -> Getter:
    return lambda group: value


def _parse_unknown(text: str, kind: str) -> Any:
    """A quoted literal read as `kind`, as PostgreSQL's input functions read it."""
    s = text.strip()
    try:
        if kind in INTS:
            v = int(s)
            lo, hi = _RANGE[kind]
            if not lo <= v <= hi:
                raise MergeError("22003", f'value "{text}" is out of range for type '
                                 f"{_INT_NAME[kind]}")
            return v
        if kind == "numeric":
            return Decimal(s)
        if kind in ("float4", "float8"):
            f = float(s)
            return floats.to_float4(f) if kind == "float4" else f
        if kind == "bool":
            low = s.lower()
            if low in ("t", "true", "y", "yes", "on", "1"):
                return True
            if low in ("f", "false", "n", "no", "off", "0"):
                return False
            raise ValueError
        if kind == "text":
            return text.encode()
    except (ValueError, InvalidOperation):
        raise MergeError("22P02", f"invalid input syntax for type {kind_name(kind)}: "
                         f'"{text}"') from None
    raise _refuse_expr(f"a quoted literal compared with a {kind_name(kind)} value")


def _to_kind(value: Any, src: str, dst: str) -> Any:
    """Widen a number to another number kind (for operators and comparisons)."""
    if value is None or src == dst:
        return value
    if dst == "numeric":
        return Decimal(value)
    if dst == "float8":
        return float(value)
    if dst == "float4":
        return floats.to_float4(float(value))
    return value  # int to a wider int


def _check_int(v: int, kind: str) -> int:
    lo, hi = _RANGE[kind]
    if not lo <= v <= hi:
        raise overflow(_INT_NAME[kind])
    return v


def _int_div(a: int, b: int) -> int:
    if b == 0:
        raise division_by_zero()
    q = abs(a) // abs(b)
    return -q if (a < 0) != (b < 0) else q


def _int_mod(a: int, b: int) -> int:
    if b == 0:
        raise division_by_zero()
    return a - b * _int_div(a, b)


def _float_check(result: float, a: float, b: float, kind: str, zero_ok: bool) -> float:
    if math.isinf(result) and not (math.isinf(a) or math.isinf(b)):
        raise floats.overflow()
    if result == 0.0 and not zero_ok:
        raise floats.underflow()
    if kind == "float4":
        r = floats.to_float4(result)
        if math.isinf(r) and not math.isinf(result):
            raise floats.overflow()
        if r == 0.0 and result != 0.0:
            raise floats.underflow()
        return r
    return result


def _arith(op: str, kind: str, a: Any, b: Any) -> Any:
    if kind in INTS:
        if op == "+":
            return _check_int(a + b, kind)
        if op == "-":
            return _check_int(a - b, kind)
        if op == "*":
            return _check_int(a * b, kind)
        if op == "/":
            return _check_int(_int_div(a, b), kind)
        return _int_mod(a, b)
    if kind == "numeric":
        ctx = numeric.EXACT
        if op == "+":
            return ctx.add(a, b)
        if op == "-":
            return ctx.subtract(a, b)
        if op == "*":
            return ctx.multiply(a, b)
        if op == "/":
            return numeric.div(a, b)
        return numeric.mod(a, b)
    # float4, float8
    if op == "+":
        return _float_check(a + b, a, b, kind, True)
    if op == "-":
        return _float_check(a - b, a, b, kind, True)
    if op == "*":
        return _float_check(a * b, a, b, kind, a == 0.0 or b == 0.0)
    if b == 0.0:
        raise division_by_zero()
    return _float_check(a / b, a, b, kind, a == 0.0)


def _cmp_key(value: Any) -> Any:
    """NaN above every number and equal to itself, as PostgreSQL compares."""
    if isinstance(value, float):
        return t.NAN if value != value else value
    if isinstance(value, Decimal) and value.is_nan():
        return t.NAN
    return value


_CMP: dict[str, Callable[[Any, Any], bool]] = {
    "=": lambda a, b: a == b, "<>": lambda a, b: a != b, "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
}


def _cast_value(v: Any, src: str, dst: str, precision: int | None, scale: int) -> Any:
    if v is None:
        return None
    if dst in INTS:
        if src in INTS:
            return _check_int(v, dst)
        if src == "numeric":
            return _check_int(numeric.to_int(v), dst)
        if math.isnan(v) or math.isinf(v):
            raise overflow(_INT_NAME[dst])
        return _check_int(int(round(v)), dst)  # rint: halves to even
    if dst == "numeric":
        if src in INTS:
            d = Decimal(v)
        elif src == "numeric":
            d = v
        elif v != v:
            d = numeric.NAN
        elif math.isinf(v):
            d = Decimal(v)
        else:
            # float8_numeric and float4_numeric print DBL_DIG (FLT_DIG) digits first.
            digits = floats.DBL_DIG if src == "float8" else floats.FLT_DIG
            d = Decimal(f"{v:.{digits}g}")
        return numeric.apply_typmod(d, precision, scale) if precision is not None else d
    # float4, float8
    f = float(v)
    return floats.to_float4(f) if dst == "float4" else f


def bind(node: Node, cols: Columns) -> Bound:
    """Type a tree against the shards' column types; the function evaluates one group."""
    match node:
        case Ref(col=col):
            return Bound(cols.kind(col), cols.getter(col))
        case Const(kind=kind, value=value):
            return Bound(kind, _const(value))
        case AvgOf(sum=s, count=c):
            return _bind_avg(cols, s, c)
        case Neg(arg=arg):
            b = bind(arg, cols)
            if b.kind not in NUMBERS:
                raise _refuse_expr(f"unary minus on {kind_name(b.kind)}")
            f, kind = b.fn, b.kind

            def neg(group: Any) -> Any:
                v = f(group)
                if v is None:
                    return None
                if kind in INTS:
                    return _check_int(-v, kind)
                return numeric.EXACT.minus(v) if kind == "numeric" else -v
            return Bound(kind, neg)
        case Arith(op=op, left=left, right=right):
            return _bind_arith(op, bind(left, cols), bind(right, cols))
        case Cmp(op=op, left=left, right=right):
            return _bind_cmp(op, bind(left, cols), bind(right, cols), cols)
        case BoolOp(op=op, args=args):
            parts = [_as_bool(bind(a, cols)) for a in args]
            fns = [p.fn for p in parts]
            if op == "and":
                def conj(group: Any) -> Any:
                    result: bool | None = True
                    for fn in fns:
                        v = fn(group)
                        if v is False:
                            return False
                        if v is None:
                            result = None
                    return result
                return Bound("bool", conj)

            def disj(group: Any) -> Any:
                result: bool | None = False
                for fn in fns:
                    v = fn(group)
                    if v is True:
                        return True
                    if v is None:
                        result = None
                return result
            return Bound("bool", disj)
        case Not(arg=arg):
            fn = _as_bool(bind(arg, cols)).fn
            return Bound("bool", lambda g: None if (v := fn(g)) is None else not v)
        case IsNull(arg=arg, negated=negated):
            fn = bind(arg, cols).fn
            if negated:
                return Bound("bool", lambda g: fn(g) is not None)
            return Bound("bool", lambda g: fn(g) is None)
        case Cast(arg=arg, kind=dst, precision=precision, scale=scale):
            b = bind(arg, cols)
            src = b.kind
            if src in ("unknown", "null"):
                if src == "null":
                    return Bound(dst, _const(None))
                value = _parse_unknown(b.fn(None), dst if dst in NUMBERS else "text")
                src = dst if dst in NUMBERS else "text"
                b = Bound(src, _const(value))
            if src not in NUMBERS:
                raise _refuse_expr(f"a cast from {kind_name(src)} to {kind_name(dst)}")
            inner = b.fn
            return Bound(dst, lambda g: _cast_value(inner(g), src, dst, precision, scale))
        case Coalesce(args=args):
            bound = [bind(a, cols) for a in args]
            kinds = {b.kind for b in bound} - {"null", "unknown"}
            if not kinds:
                raise _refuse_expr("COALESCE of literals only")
            if kinds <= NUMBERS:
                kind = _promote_all(kinds)
            elif len(kinds) == 1:
                kind = kinds.pop()
            else:
                raise _refuse_expr("COALESCE of values of different types")
            fns = [_coerce(b, kind).fn for b in bound]

            def coalesce(group: Any) -> Any:
                for fn in fns:
                    v = fn(group)
                    if v is not None:
                        return v
                return None
            return Bound(kind, coalesce)
    raise _refuse_expr(repr(node))


def _promote_all(kinds: set[str]) -> str:
    out = ""
    for k in sorted(kinds, key=lambda k: _RANK[k]):
        out = k if not out else _promote(out, k)
    return out


def _coerce(b: Bound, kind: str) -> Bound:
    """`b` as a value of `kind`: quoted literals are read, numbers widened."""
    if b.kind == kind:
        return b
    if b.kind == "null":
        return Bound(kind, _const(None))
    if b.kind == "unknown":
        return Bound(kind, _const(_parse_unknown(b.fn(None), kind)))
    if b.kind in NUMBERS and kind in NUMBERS and _RANK[b.kind] <= _RANK[kind]:
        fn, src = b.fn, b.kind
        return Bound(kind, lambda g: _to_kind(fn(g), src, kind))
    raise _refuse_expr(f"a {kind_name(b.kind)} value used as {kind_name(kind)}")


def _as_bool(b: Bound) -> Bound:
    if b.kind == "bool":
        return b
    if b.kind in ("unknown", "null"):
        return _coerce(b, "bool")
    raise MergeError("42804", f"argument of AND/OR/NOT must be type boolean, not type "
                     f"{kind_name(b.kind)}")


def _bind_arith(op: str, a: Bound, b: Bound) -> Bound:
    if a.kind in ("unknown", "null") and b.kind in NUMBERS:
        a = _coerce(a, b.kind)
    if b.kind in ("unknown", "null") and a.kind in NUMBERS:
        b = _coerce(b, a.kind)
    if a.kind not in NUMBERS or b.kind not in NUMBERS:
        raise _refuse_expr(f"{kind_name(a.kind)} {op} {kind_name(b.kind)}")
    kind = _promote(a.kind, b.kind)
    if op == "%" and kind in ("float4", "float8"):
        raise MergeError("42883", "operator does not exist: double precision % double "
                         "precision")
    fa, fb = _coerce(a, kind).fn, _coerce(b, kind).fn

    def arith(group: Any) -> Any:
        x = fa(group)
        if x is None:
            return None
        y = fb(group)
        if y is None:
            return None
        return _arith(op, kind, x, y)
    return Bound(kind, arith)


def _bind_cmp(op: str, a: Bound, b: Bound, cols: Columns) -> Bound:
    if a.kind in ("unknown", "null") and b.kind not in ("unknown", "null"):
        a = _coerce(a, b.kind)
    elif b.kind in ("unknown", "null") and a.kind not in ("unknown", "null"):
        b = _coerce(b, a.kind)
    if a.kind in NUMBERS and b.kind in NUMBERS:
        kind = a.kind if a.kind == b.kind else (
            "float8" if "float" in a.kind + b.kind else _promote(a.kind, b.kind))
        a, b = _coerce(a, kind), _coerce(b, kind)
    elif a.kind != b.kind:
        raise _refuse_expr(f"a comparison of {kind_name(a.kind)} with {kind_name(b.kind)}")
    elif a.kind == "text" and not cols.text_collation_is_c():
        raise MergeRefused(
            "cannot compare text after merging the shards' groups under a non-C collation",
            hint='compare with an explicit COLLATE "C", or filter on the text in WHERE')
    elif a.kind in ("unknown", "null"):
        raise _refuse_expr("a comparison of two literals")
    compare = _CMP[op]
    fa, fb = a.fn, b.fn

    def cmp(group: Any) -> Any:
        x = fa(group)
        if x is None:
            return None
        y = fb(group)
        if y is None:
            return None
        return compare(_cmp_key(x), _cmp_key(y))
    return Bound("bool", cmp)


def _bind_avg(cols: Columns, s: int, c: int) -> Bound:
    sum_kind = cols.kind(s)
    fs, fc = cols.getter(s), cols.getter(c)
    if sum_kind in ("int8", "numeric"):
        def avg_numeric(group: Any) -> Any:
            n = fc(group)
            if not n:
                return None
            return numeric.div(Decimal(fs(group)), Decimal(n))
        return Bound("numeric", avg_numeric)
    if sum_kind == "float8":
        def avg_float(group: Any) -> Any:
            n = fc(group)
            if not n:
                return None
            total = fs(group)
            return _float_check(total / n, total, float(n), "float8", total == 0.0)
        return Bound("float8", avg_float)
    if sum_kind == "float4":
        raise MergeRefused(
            "cannot merge avg() of a real (float4) column across shards exactly",
            hint="average it as double precision: avg(x::float8) gives the same result")
    raise MergeRefused(f"cannot merge avg() of {kind_name(sum_kind)} values across shards",
                       hint="avg() merges for integer, numeric and double precision values")


# -- output -------------------------------------------------------------------------------


def text_encoder(kind: str, oid: int, extra_float_digits: int) -> Callable[[Any], bytes]:
    """Encode a computed value as PostgreSQL's text output for the column's type."""
    if oid not in OIDS_OF_KIND.get(kind, ()):
        raise MergeRefused(
            f"the proxy computes {kind_name(kind)} for a column PostgreSQL types as "
            f"{t.type_name(oid)}",
            hint="cast the expression so that its type is explicit, or select the "
            "aggregates themselves")
    if kind in INTS:
        return lambda v: str(v).encode()
    if kind == "numeric":
        return lambda v: numeric.text(v).encode()
    if kind == "float8":
        return lambda v: floats.float8_text(v, extra_float_digits).encode()
    if kind == "float4":
        return lambda v: floats.float4_text(v, extra_float_digits).encode()
    if kind == "bool":
        return lambda v: b"t" if v else b"f"
    return lambda v: v  # text: bytes already


_PACK = {"int2": "!h", "int4": "!i", "int8": "!q", "float4": "!f", "float8": "!d"}


def binary_encoder(kind: str, oid: int) -> Callable[[Any], bytes]:
    import struct

    if oid not in OIDS_OF_KIND.get(kind, ()):
        raise MergeRefused(
            f"the proxy computes {kind_name(kind)} for a column PostgreSQL types as "
            f"{t.type_name(oid)}")
    if kind in _PACK:
        packer = struct.Struct(_PACK[kind]).pack
        return lambda v: packer(v)
    if kind == "numeric":
        return numeric.binary
    if kind == "bool":
        return lambda v: b"\x01" if v else b"\x00"
    return lambda v: v


def order_key(kind: str, desc: bool) -> Callable[[Any], Any]:
    """A sort key of a computed value (not None) for ascending or descending order."""
    if kind in NUMBERS or kind == "bool":
        if desc:
            return lambda v: -_cmp_key(v) if not isinstance(v, bool) else not v
        return _cmp_key
    if kind == "text" or kind.startswith("other:"):
        if desc:
            def inverted(v: Any) -> Any:
                if isinstance(v, bytes):
                    return v.translate(_INVERT) + b"\xff"
                return -v
            return inverted
        return lambda v: v
    raise _refuse_expr(f"ORDER BY a {kind_name(kind)} value")


_INVERT = bytes(255 - i for i in range(256))
