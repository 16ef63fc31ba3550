"""Value formatting and arithmetic, checked against PostgreSQL 15's own output."""

from __future__ import annotations

import struct
from decimal import Decimal

import pytest

from shardwire.merge import floats, numeric, pgtypes
from shardwire.merge.errors import MergeError


@pytest.mark.parametrize(("a", "b", "text"), [
    # avg() = numeric_div(sum, count): select_div_scale picks the scale.
    ("3", "2", "1.5000000000000000"),
    ("3.75", "2", "1.8750000000000000"),
    ("5", "4", "1.2500000000000000"),
    ("4.50", "3", "1.5000000000000000"),
    ("1e-20", "1", "0.0000000000000000000100000000000000000000"),
    ("123456789", "1", "123456789.000000000000"),
    ("1", "3", "0.33333333333333333333"),
    ("10", "3", "3.3333333333333333"),
    ("100000", "3", "33333.333333333333"),
    ("0.0001", "3", "0.000033333333333333333333"),
    ("2", "3", "0.66666666666666666667"),
    ("9999", "3", "3333.0000000000000000"),
    ("10000", "3", "3333.3333333333333333"),
    ("0.00012", "7", "0.000017142857142857142857"),
    ("10000000000000000000000000001", "2", "5000000000000000000000000001"),
    ("-7", "2", "-3.5000000000000000"),
    ("0", "5", "0.00000000000000000000"),
])
def test_numeric_division_matches_postgres(a: str, b: str, text: str) -> None:
    assert numeric.text(numeric.div(Decimal(a), Decimal(b))) == text


def test_numeric_special_values() -> None:
    assert numeric.text(numeric.div(Decimal("NaN"), Decimal(2))) == "NaN"
    assert numeric.text(numeric.div(Decimal("Infinity"), Decimal(-2))) == "-Infinity"
    assert numeric.text(numeric.div(Decimal(1), Decimal("Infinity"))) == "0"
    assert numeric.text(numeric.add(Decimal("Infinity"), Decimal("-Infinity"))) == "NaN"
    assert numeric.text(numeric.add(Decimal("-1.50"), Decimal("1.5"))) == "0.00"
    with pytest.raises(MergeError) as e:
        numeric.div(Decimal(1), Decimal(0))
    assert e.value.sqlstate == "22012"


@pytest.mark.parametrize(("value", "ndigits", "weight", "sign", "dscale", "digits"), [
    ("0", 0, 0, 0, 0, []),
    ("0.00", 0, 0, 0, 2, []),
    ("1", 1, 0, 0, 0, [1]),
    ("12345.678", 3, 1, 0, 3, [1, 2345, 6780]),
    ("-0.0001", 1, -1, 0x4000, 4, [1]),
    ("10000", 1, 1, 0, 0, [1]),
])
def test_numeric_binary(value: str, ndigits: int, weight: int, sign: int, dscale: int,
                        digits: list[int]) -> None:
    raw = numeric.binary(Decimal(value))
    assert struct.unpack_from("!hhHh", raw) == (ndigits, weight, sign, dscale)
    assert list(struct.unpack_from(f"!{ndigits}h", raw, 8)) == digits


@pytest.mark.parametrize(("value", "text"), [
    (1e15, "1e+15"), (1e14, "100000000000000"), (123456789012345678.0, "1.2345678901234568e+17"),
    (0.0001, "0.0001"), (0.00001, "1e-05"), (1.5e-7, "1.5e-07"), (1e100, "1e+100"),
    (1.2345e-300, "1.2345e-300"), (-0.0, "-0"), (float("nan"), "NaN"),
    (float("-inf"), "-Infinity"), (float("inf"), "Infinity"), (100.0, "100"),
    (1e16, "1e+16"), (123456789012345.6, "123456789012345.6"), (0.1 + 0.2, "0.30000000000000004"),
])
def test_float8_text(value: float, text: str) -> None:
    assert floats.float8_text(value) == text


@pytest.mark.parametrize(("value", "text"), [
    (1e6, "1e+06"), (1e5, "100000"), (123456.0, "123456"), (1234567.0, "1.234567e+06"),
    (12345678.0, "1.2345678e+07"), (0.0001, "0.0001"), (0.00001, "1e-05"), (3.4e38, "3.4e+38"),
    (1.5, "1.5"), (0.1, "0.1"),
    # PostgreSQL's Ryu never picks a decimal on the rounding interval's ends.
    (54422552.0, "5.4422552e+07"), (2263439872.0, "2.2634399e+09"),
])
def test_float4_text(value: float, text: str) -> None:
    assert floats.float4_text(floats.to_float4(value)) == text


def test_float_text_with_extra_float_digits_zero() -> None:
    assert floats.float8_text(0.1 + 0.2, 0) == "0.3"
    assert floats.float4_text(floats.to_float4(0.1), 0) == "0.1"


@pytest.mark.parametrize(("text", "days"), [
    (b"2000-01-01", 0), (b"2000-01-02", 1), (b"1999-12-31", -1),
    (b"0001-01-01 BC", pgtypes.date2j(0, 1, 1) - pgtypes.POSTGRES_EPOCH_JDATE),
    (b"infinity", pgtypes.DATE_END), (b"-infinity", pgtypes.DATE_BEGIN),
])
def test_date_days(text: bytes, days: int) -> None:
    assert pgtypes.date_days(text) == days


def test_timestamptz_compares_instants() -> None:
    a = pgtypes.timestamp_micros(b"2021-06-01 12:30:00.5+02", True)
    b = pgtypes.timestamp_micros(b"2021-06-01 10:30:00.5+00", True)
    c = pgtypes.timestamp_micros(b"2021-06-01 05:00:00.5-05:30", True)
    assert a == b == c
    assert pgtypes.timestamp_micros(b"0044-03-15 10:00:00+00 BC", True) < \
        pgtypes.timestamp_micros(b"0001-01-01 00:00:00+00", True)


def test_sort_keys() -> None:
    key = pgtypes.SORT_KEY[pgtypes.FLOAT8]
    values = [b"NaN", b"Infinity", b"-Infinity", b"1.5", b"-0", b"0"]
    ordered = sorted(values, key=key)
    assert ordered[0] == b"-Infinity" and ordered[-1] == b"NaN" and ordered[-2] == b"Infinity"
    assert key(b"-0") == key(b"0")
    desc = pgtypes.descending(key, pgtypes.FLOAT8)
    assert sorted(values, key=desc)[0] == b"NaN"
    text = pgtypes.descending(pgtypes.SORT_KEY[pgtypes.TEXT], pgtypes.TEXT)
    assert sorted([b"a", b"ab", b"b", b""], key=text) == [b"b", b"ab", b"a", b""]
    bpchar = pgtypes.SORT_KEY[pgtypes.BPCHAR]
    assert bpchar(b"a   ") == bpchar(b"a")
    assert pgtypes.SORT_KEY[pgtypes.NUMERIC](b"1.0") == pgtypes.SORT_KEY[pgtypes.NUMERIC](b"1.00")
