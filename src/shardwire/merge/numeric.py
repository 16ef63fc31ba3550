"""PostgreSQL's numeric arithmetic where a merge computes numeric values itself.

Values are `decimal.Decimal`, exact: additions and multiplications run in a context with the
largest precision, so nothing is rounded. Division follows numeric.c: `select_div_scale`
picks the result's display scale and the quotient is rounded half away from zero at that
scale, so `avg` prints exactly as PostgreSQL prints it.
"""

from __future__ import annotations

import decimal
import struct
from decimal import Decimal

from .errors import MergeError, division_by_zero

# Exact arithmetic: no rounding, no traps (Infinity - Infinity is NaN, as in PostgreSQL).
EXACT = decimal.Context(prec=decimal.MAX_PREC, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN,
                        traps=[])

NUMERIC_MIN_SIG_DIGITS = 16
NUMERIC_MIN_DISPLAY_SCALE = 0
NUMERIC_MAX_DISPLAY_SCALE = 1000
DEC_DIGITS = 4

NAN = Decimal("NaN")
ZERO = Decimal(0)

_HEADER = struct.Struct("!hhHh")
_NUMERIC_POS = 0x0000
_NUMERIC_NEG = 0x4000
_NUMERIC_NAN = 0xC000
_NUMERIC_PINF = 0xD000
_NUMERIC_NINF = 0xF000


def parse(raw: bytes | str) -> Decimal:
    """A numeric value as PostgreSQL prints it ('1.50', 'NaN', 'Infinity', '-Infinity')."""
    return Decimal(raw.decode() if isinstance(raw, bytes) else raw)


def dscale(d: Decimal) -> int:
    """The display scale: digits after the decimal point."""
    exp = d.as_tuple().exponent
    return -exp if isinstance(exp, int) and exp < 0 else 0


def text(d: Decimal) -> str:
    """numeric_out: plain notation with the value's display scale; no negative zero."""
    if d.is_nan():
        return "NaN"
    if d.is_infinite():
        return "-Infinity" if d < 0 else "Infinity"
    if d.is_zero():
        d = d.copy_abs()
    return format(d, "f")


def add(a: Decimal, b: Decimal) -> Decimal:
    return EXACT.add(a, b)


def _weight_and_first_digit(d: Decimal) -> tuple[int, int]:
    """The weight of the first non-zero base-10000 digit and that digit (0, 0 for zero)."""
    if d.is_zero():
        return 0, 0
    t = d.as_tuple()
    coefficient = int("".join(map(str, t.digits)))
    exp = int(t.exponent)
    adjusted = len(t.digits) - 1 + exp  # 10**adjusted <= |d| < 10**(adjusted + 1)
    weight = adjusted // DEC_DIGITS
    shift = exp - weight * DEC_DIGITS
    first = coefficient * 10 ** shift if shift >= 0 else coefficient // 10 ** -shift
    return weight, first


def select_div_scale(a: Decimal, b: Decimal) -> int:
    """numeric.c's select_div_scale: at least 16 significant digits, and no fewer decimals
    than either input shows."""
    weight1, first1 = _weight_and_first_digit(a)
    weight2, first2 = _weight_and_first_digit(b)
    qweight = weight1 - weight2
    if first1 <= first2:
        qweight -= 1
    rscale = NUMERIC_MIN_SIG_DIGITS - qweight * DEC_DIGITS
    rscale = max(rscale, dscale(a), dscale(b), NUMERIC_MIN_DISPLAY_SCALE)
    return min(rscale, NUMERIC_MAX_DISPLAY_SCALE)


def round_half_away(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded to an integer, halves away from zero."""
    negative = (numerator < 0) != (denominator < 0)
    q, r = divmod(abs(numerator), abs(denominator))
    if 2 * r >= abs(denominator):
        q += 1
    return -q if negative else q


def _fraction(d: Decimal) -> tuple[int, int]:
    """d as coefficient * 10**exponent."""
    t = d.as_tuple()
    c = int("".join(map(str, t.digits)))
    return (-c if t.sign else c), int(t.exponent)


def from_scaled(value: int, scale: int) -> Decimal:
    """value * 10**-scale, keeping `scale` digits after the point."""
    return Decimal((0 if value >= 0 else 1, tuple(int(ch) for ch in str(abs(value))), -scale))


def div(a: Decimal, b: Decimal) -> Decimal:
    """numeric_div, including NaN and the infinities."""
    if a.is_nan() or b.is_nan():
        return NAN
    if a.is_infinite():
        if b.is_infinite():
            return NAN
        if b.is_zero():
            raise division_by_zero()
        return a if b > 0 else -a
    if b.is_infinite():
        return ZERO
    if b.is_zero():
        raise division_by_zero()
    rscale = select_div_scale(a, b)
    ca, ea = _fraction(a)
    cb, eb = _fraction(b)
    # a / b * 10**rscale = ca * 10**(ea + rscale) / (cb * 10**eb)
    shift = ea + rscale - eb
    if shift >= 0:
        q = round_half_away(ca * 10 ** shift, cb)
    else:
        q = round_half_away(ca, cb * 10 ** -shift)
    return from_scaled(q, rscale)


def mod(a: Decimal, b: Decimal) -> Decimal:
    """numeric_mod: the remainder takes the dividend's sign."""
    if a.is_nan() or b.is_nan():
        return NAN
    if a.is_infinite():
        if b.is_zero():
            raise division_by_zero()
        return NAN
    if b.is_zero():
        raise division_by_zero()
    if b.is_infinite():
        return a
    return EXACT.remainder(a, b)


def round_to_scale(d: Decimal, scale: int) -> Decimal:
    """Round to `scale` decimals, halves away from zero (numeric's round and typmod)."""
    if not d.is_finite():
        return d
    return d.quantize(Decimal(1).scaleb(-scale), rounding=decimal.ROUND_HALF_UP, context=EXACT)


def apply_typmod(d: Decimal, precision: int, scale: int) -> Decimal:
    """numeric(precision, scale): round, then refuse what does not fit."""
    if d.is_nan():
        return d
    if d.is_infinite():
        raise MergeError("22003", "numeric field overflow",
                         None)
    rounded = round_to_scale(d, scale)
    if not rounded.is_zero() and rounded.adjusted() >= precision - scale:
        raise MergeError("22003", "numeric field overflow")
    return rounded


def to_int(d: Decimal) -> int:
    """numeric to integer: round halves away from zero (the range is the caller's)."""
    if not d.is_finite():
        raise MergeError("22003", "cannot convert NaN to integer" if d.is_nan()
                         else "cannot convert infinity to integer")
    return int(d.to_integral_value(rounding=decimal.ROUND_HALF_UP, context=EXACT))


def binary(d: Decimal) -> bytes:
    """numeric_send: ndigits, weight, sign, dscale, then base-10000 digits."""
    if d.is_nan():
        return _HEADER.pack(0, 0, _NUMERIC_NAN, 0)
    if d.is_infinite():
        return _HEADER.pack(0, 0, _NUMERIC_NINF if d < 0 else _NUMERIC_PINF, 0)
    scale = dscale(d)
    c, e = _fraction(d)
    negative = c < 0
    c = abs(c)
    if c == 0:
        return _HEADER.pack(0, 0, _NUMERIC_POS, scale)
    groups_after_point = -(-scale // DEC_DIGITS)
    n = c * 10 ** (e + groups_after_point * DEC_DIGITS)
    digits: list[int] = []
    while n:
        n, g = divmod(n, 10000)
        digits.append(g)
    digits.reverse()
    weight = len(digits) - 1 - groups_after_point
    while digits and digits[-1] == 0:
        digits.pop()
    head = _HEADER.pack(len(digits), weight, _NUMERIC_NEG if negative else _NUMERIC_POS, scale)
    return head + struct.pack(f"!{len(digits)}h", *digits)
