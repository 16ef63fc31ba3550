"""float4 and float8 text output exactly as PostgreSQL 12+ prints them.

With extra_float_digits > 0 (the default is 1) PostgreSQL prints the shortest decimal that
reads back as the same value (Ryu), in fixed notation when the decimal exponent is in
[-4, 15) for float8 ([-4, 6) for float4) and as `d.ddde+XX` otherwise. With
extra_float_digits <= 0 it prints `%.*g` with DBL_DIG (FLT_DIG) + extra_float_digits digits.
"""

from __future__ import annotations

import math
import struct
from fractions import Fraction

from .errors import MergeError

_F32 = struct.Struct("<f")
_U32 = struct.Struct("<I")
DBL_DIG = 15
FLT_DIG = 6


def overflow() -> MergeError:
    return MergeError("22003", "value out of range: overflow")


def underflow() -> MergeError:
    return MergeError("22003", "value out of range: underflow")


def to_float4(v: float) -> float:
    """Round a double to the nearest float4, as C's (float) conversion does."""
    if math.isnan(v) or math.isinf(v):
        return v
    try:
        return float(_F32.unpack(_F32.pack(v))[0])
    except OverflowError:
        raise overflow() from None


def parse(raw: bytes) -> float:
    """float4/float8 text ('1.5', 'NaN', 'Infinity', '-Infinity', '1e+100')."""
    return float(raw)


def _special(v: float) -> str | None:
    if v != v:
        return "NaN"
    if v == math.inf:
        return "Infinity"
    if v == -math.inf:
        return "-Infinity"
    return None


def _layout(negative: bool, digits: str, exp10: int, fixed_below: int) -> str:
    """Lay out digits d1.d2d3... x 10**exp10 as Ryu does in PostgreSQL's d2s.c/f2s.c."""
    sign = "-" if negative else ""
    if -4 <= exp10 < fixed_below:
        if exp10 >= 0:
            whole = digits[:exp10 + 1].ljust(exp10 + 1, "0")
            frac = digits[exp10 + 1:]
            return sign + whole + ("." + frac if frac else "")
        return sign + "0." + "0" * (-exp10 - 1) + digits
    mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return f"{sign}{mantissa}e{'-' if exp10 < 0 else '+'}{abs(exp10):02d}"


def _shortest_float8(v: float) -> tuple[bool, str, int]:
    """Sign, significant digits and decimal exponent of the shortest round-trip form."""
    r = repr(v)
    negative = r.startswith("-")
    if negative:
        r = r[1:]
    mant, _, exp_part = r.partition("e")
    exp = int(exp_part) if exp_part else 0
    whole, _, frac = mant.partition(".")
    digits = (whole + frac).lstrip("0")
    if not digits:
        return negative, "0", 0
    # Position of the first significant digit relative to the decimal point.
    lead_zeros = len(whole + frac) - len((whole + frac).lstrip("0"))
    exp10 = exp + len(whole) - 1 - lead_zeros
    return negative, digits.rstrip("0"), exp10


def float8_text(v: float, extra_float_digits: int = 1) -> str:
    special = _special(v)
    if special is not None:
        return special
    if extra_float_digits > 0:
        negative, digits, exp10 = _shortest_float8(v)
        a = abs(v)
        if a != 0 and not _small_int(a, False):
            # Python's repr may pick a decimal on the interval's end; PostgreSQL never does.
            low, high = _interval(a, False)
            value = Fraction(int(digits)) * Fraction(10) ** (exp10 - len(digits) + 1)
            if not low < value < high:
                digits, exp10 = _search_shortest(a, False)
        return _layout(negative, digits, exp10, DBL_DIG)
    return f"{v:.{max(1, DBL_DIG + extra_float_digits)}g}"


_F64 = struct.Struct("<d")
_U64 = struct.Struct("<Q")


def _interval(v: float, single: bool) -> tuple[Fraction, Fraction]:
    """The open interval of reals that read back as `v` (> 0). PostgreSQL's Ryu is built
    without STRICTLY_SHORTEST: it never picks a decimal on the interval's ends."""
    fmt, ufmt = (_F32, _U32) if single else (_F64, _U64)
    bits = ufmt.unpack(fmt.pack(v))[0]
    exact = Fraction(v)
    up = fmt.unpack(ufmt.pack(bits + 1))[0]
    high = (exact + Fraction(up)) / 2
    if bits == 0:
        return -high, high
    down = fmt.unpack(ufmt.pack(bits - 1))[0]
    return (exact + Fraction(down)) / 2, high


def _search_shortest(a: float, single: bool) -> tuple[str, int]:
    """Digits and decimal exponent of the shortest decimal strictly inside `a`'s interval,
    the closest to `a` among those (a > 0, finite)."""
    low, high = _interval(a, single)
    exact = Fraction(a)
    for precision in range(1, 18):
        nearest = f"{a:.{precision - 1}e}"
        mant, _, e = nearest.partition("e")
        exp10 = int(e)
        units = int(mant.replace(".", ""))
        best: tuple[Fraction, int, int] | None = None
        for cand in (units - 1, units, units + 1):
            if cand <= 0:
                continue
            c_units, c_exp = cand, exp10
            if len(str(c_units)) > precision:  # 9.99 + 1 unit = 10.0: one digit more
                continue
            if len(str(c_units)) < precision:  # 1.00 - 1 unit = 0.999: one exponent lower
                c_units = c_units * 10 + 9
                c_exp -= 1
                if len(str(c_units)) != precision:
                    continue
            value = Fraction(c_units) * Fraction(10) ** (c_exp - precision + 1)
            if not low < value < high:
                continue
            distance = abs(value - exact)
            if best is None or distance < best[0] or (distance == best[0] and c_units % 2 == 0):
                best = (distance, c_units, c_exp)
        if best is not None:
            return str(best[1]).rstrip("0"), best[2]
    raise AssertionError(f"no shortest form for {a!r}")


def _small_int(a: float, single: bool) -> bool:
    """Ryu's fast path: an integer below 2**24 (2**53) prints all its digits."""
    return a.is_integer() and a < (2 ** 24 if single else 2 ** 53)


def _shortest_float4(v: float) -> tuple[bool, str, int]:
    negative = math.copysign(1.0, v) < 0
    a = abs(v)
    if a == 0:
        return negative, "0", 0
    if _small_int(a, True):
        digits = str(int(a))
        return negative, digits.rstrip("0"), len(digits) - 1
    digits, exp10 = _search_shortest(a, True)
    return negative, digits, exp10


def float4_text(v: float, extra_float_digits: int = 1) -> str:
    special = _special(v)
    if special is not None:
        return special
    if extra_float_digits > 0:
        negative, digits, exp10 = _shortest_float4(v)
        return _layout(negative, digits, exp10, FLT_DIG)
    return f"{v:.{max(1, FLT_DIG + extra_float_digits)}g}"
