"""Sharding-key values from SQL literals and Bind parameters (router.values)."""

from __future__ import annotations

import datetime
import struct
import uuid
from decimal import Decimal
from typing import Any

import pytest

from shardwire.router.shardmap import KeyType, canonical_text, hash_key
from shardwire.router.values import (
    KeyValueError,
    decode_param,
    parse_number,
    session_zone,
    to_key,
)

UTC = datetime.UTC
D = datetime.date
DT = datetime.datetime
U = uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")

INT2, INT4, INT8, NUMERIC, TEXT, VARCHAR, BPCHAR, NAME, UNKNOWN = (
    21, 23, 20, 1700, 25, 1043, 1042, 19, 705)
UUID_OID, DATE, TIMESTAMP, TIMESTAMPTZ = 2950, 1082, 1114, 1184


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0,
        second: int = 0) -> DT:
    return DT(year, month, day, hour, minute, second, tzinfo=UTC)


# --- text input ----------------------------------------------------------------------------

@pytest.mark.parametrize("text,value", [
    ("42", 42), ("-42", -42), ("+42", 42), ("  42\t\n", 42), ("0", 0), ("-0", 0),
    ("007", 7), ("1_000_000", 1_000_000), ("0x1F", 31), ("0X_1f", 31), ("-0o17", -15),
    ("0b101", 5), ("9223372036854775807", 2 ** 63 - 1), ("-9223372036854775808", -2 ** 63),
])
def test_integer_text(text: str, value: int) -> None:
    key = to_key(text, KeyType.INTEGER)
    assert key == value and type(key) is int


@pytest.mark.parametrize("text,message", [
    ("abc", 'invalid input for integer key: "abc"'),
    ("4.5", 'invalid input for integer key: "4.5" (not an integer)'),
    ("42.0", 'invalid input for integer key: "42.0" (not an integer)'),
    ("1e3", 'invalid input for integer key: "1e3" (not an integer)'),
    ("", 'invalid input for integer key: ""'),
    ("- 4", 'invalid input for integer key: "- 4"'),
    ("1__0", 'invalid input for integer key: "1__0"'),
    ("_10", 'invalid input for integer key: "_10"'),
    ("١٢", 'invalid input for integer key: "١٢"'),  # Arabic-Indic digits: not PostgreSQL's
    ("9223372036854775808",
     'value out of range for integer key: "9223372036854775808" (integer keys are bigint)'),
])
def test_integer_text_errors(text: str, message: str) -> None:
    with pytest.raises(KeyValueError) as info:
        to_key(text, KeyType.INTEGER)
    assert str(info.value) == message


def test_integer_typed_values() -> None:
    assert to_key(42, KeyType.INTEGER) == 42
    # `intcol = 42.0` compares numerically in PostgreSQL: true for 42.
    key = to_key(Decimal("42.0"), KeyType.INTEGER)
    assert key == 42 and type(key) is int
    assert to_key(Decimal("4.2E+1"), KeyType.INTEGER) == 42
    with pytest.raises(KeyValueError, match=r"4\.5.*has a fraction"):
        to_key(Decimal("4.5"), KeyType.INTEGER)
    with pytest.raises(KeyValueError, match="not a finite number"):
        to_key(Decimal("Infinity"), KeyType.INTEGER)
    with pytest.raises(KeyValueError, match="out of range"):
        to_key(Decimal("1e30"), KeyType.INTEGER)
    with pytest.raises(KeyValueError, match="out of range"):
        to_key(2 ** 63, KeyType.INTEGER)
    with pytest.raises(KeyValueError, match="bool value True cannot be an integer key"):
        to_key(True, KeyType.INTEGER)
    with pytest.raises(KeyValueError, match=r"date value .*\(2026, 1, 1\) cannot be an integer"):
        to_key(D(2026, 1, 1), KeyType.INTEGER)


@pytest.mark.parametrize("text,value", [
    ("1.50", "1.50"), ("-1.5", "-1.5"), (" +.5 ", "0.5"), ("5.", "5"), ("1e3", "1E+3"),
    ("1.5E-3", "0.0015"), ("1_000.000_1", "1000.0001"), ("0x10", "16"),
    ("123456789012345678901234567890.123456789", "123456789012345678901234567890.123456789"),
    ("Infinity", "Infinity"), ("-infinity", "-Infinity"), ("inf", "Infinity"),
    ("+INF", "Infinity"),
])
def test_numeric_text(text: str, value: str) -> None:
    key = to_key(text, KeyType.NUMERIC)
    assert type(key) is Decimal and key == Decimal(value) and str(key) == str(Decimal(value))


def test_numeric_keeps_scale_and_orders_infinities() -> None:
    assert str(to_key("1.50", KeyType.NUMERIC)) == "1.50"
    assert to_key("-inf", KeyType.NUMERIC) < to_key("-1e1000", KeyType.NUMERIC)
    assert to_key("1e1000", KeyType.NUMERIC) < to_key("infinity", KeyType.NUMERIC)
    assert canonical_text(to_key("1.50", KeyType.NUMERIC)) == "1.5"


@pytest.mark.parametrize("text,message", [
    ("NaN", 'invalid input for numeric key: "NaN" (NaN sorts above every number in '
            'PostgreSQL and has no place in a key order)'),
    ("nan", "NaN sorts above"),
    ("1.2.3", 'invalid input for numeric key: "1.2.3"'),
    ("1e", 'invalid input for numeric key: "1e"'),
    ("1e1001", "PostgreSQL accepts exponents up to 1000"),
    ("sNaN", 'invalid input for numeric key: "sNaN"'),
    ("١", 'invalid input for numeric key: "١"'),
])
def test_numeric_text_errors(text: str, message: str) -> None:
    with pytest.raises(KeyValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        to_key(text, KeyType.NUMERIC)


def test_numeric_typed_values() -> None:
    key = to_key(42, KeyType.NUMERIC)
    assert key == Decimal(42) and type(key) is Decimal
    assert to_key(Decimal("1.25"), KeyType.NUMERIC) == Decimal("1.25")
    with pytest.raises(KeyValueError, match="NaN"):
        to_key(Decimal("NaN"), KeyType.NUMERIC)


def test_text_keys() -> None:
    assert to_key(" a'b ", KeyType.TEXT) == " a'b "
    assert to_key("", KeyType.TEXT) == ""
    # What PostgreSQL stores when such a value is assigned to a text column.
    assert to_key(42, KeyType.TEXT) == "42"
    assert to_key(Decimal("1E+5"), KeyType.TEXT) == "100000"
    assert to_key(Decimal("1.50"), KeyType.TEXT) == "1.50"
    assert to_key(Decimal("-0.00"), KeyType.TEXT) == "0.00"
    assert to_key(U, KeyType.TEXT) == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    with pytest.raises(KeyValueError, match="depends on DateStyle"):
        to_key(D(2026, 1, 1), KeyType.TEXT)


@pytest.mark.parametrize("text,value", [
    ("2026-01-31", D(2026, 1, 31)), (" 2026-1-5 ", D(2026, 1, 5)), ("20260131", D(2026, 1, 31)),
    # PostgreSQL: '2026-01-01 10:00'::date is 2026-01-01, and a zone changes nothing.
    ("2026-01-01 10:00", D(2026, 1, 1)), ("2026-01-01T23:59:59.999999", D(2026, 1, 1)),
    ("2026-01-01 23:00-08", D(2026, 1, 1)), ("2026-01-01 Europe/Paris", D(2026, 1, 1)),
    ("2026-01-01 24:00", D(2026, 1, 1)), ("0001-01-01", D(1, 1, 1)),
    ("9999-12-31", D(9999, 12, 31)), ("epoch", D(1970, 1, 1)), ("infinity", D.max),
    ("+Infinity", D.max), ("-infinity", D.min), ("2026-01-01 AD", D(2026, 1, 1)),
])
def test_date_text(text: str, value: D) -> None:
    assert to_key(text, KeyType.DATE) == value


@pytest.mark.parametrize("text,message", [
    ("01/02/2026", 'invalid input for date key: "01/02/2026" (expected ISO 8601, as in '
                   '2026-01-31 or 2026-01-31 10:00:00)'),
    ("January 8, 2026", "expected ISO 8601"),
    ("today", 'invalid input for date key: "today" (depends on the current time; routing '
              'cannot use it)'),
    ("now", "depends on the current time"),
    ("2026-02-30", 'value out of range for date key: "2026-02-30" (no such date; years run '
                   'from 1 to 9999)'),
    ("0000-01-01", "no such date"),
    ("10000-01-01", "no such date"),
    ("2026-01-01 BC", "years run from 1 to 9999"),
    ("2026-01-01 10:60", "no such time of day"),
    ("2026-01-01 24:00:01", "no such time of day"),
    ("2026-01-01-08", "expected ISO 8601"),
])
def test_date_text_errors(text: str, message: str) -> None:
    with pytest.raises(KeyValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        to_key(text, KeyType.DATE)


def test_date_typed_values() -> None:
    assert to_key(D(2026, 1, 1), KeyType.DATE) == D(2026, 1, 1)
    assert to_key(DT(2026, 1, 1), KeyType.DATE) == D(2026, 1, 1)
    # `datecol = ts` compares as timestamps: only midnight matches a date, and a truncated
    # date would route `datecol < '2026-01-01 10:00'::timestamp` wrong.
    with pytest.raises(KeyValueError, match="has a time of day"):
        to_key(DT(2026, 1, 1, 10), KeyType.DATE)
    # An instant is a date in the session's zone.
    assert to_key(utc(2026, 1, 1, 23), KeyType.DATE, timezone="+01") == D(2026, 1, 2)
    with pytest.raises(KeyValueError, match="has a time of day"):
        to_key(utc(2026, 1, 1, 23), KeyType.DATE)
    assert to_key(DT.max, KeyType.DATE) == D.max
    assert to_key(DT.min.replace(tzinfo=UTC), KeyType.DATE) == D.min


@pytest.mark.parametrize("text,value", [
    ("2026-01-01", DT(2026, 1, 1)), ("2026-01-01 10:00", DT(2026, 1, 1, 10)),
    ("2026-01-01T10:00:00.123456", DT(2026, 1, 1, 10, 0, 0, 123456)),
    ("2026-01-01t10:00:05", DT(2026, 1, 1, 10, 0, 5)),
    ("  2026-01-01   10:00:05  ", DT(2026, 1, 1, 10, 0, 5)),
    ("2026-01-01 10:00:00.5", DT(2026, 1, 1, 10, 0, 0, 500000)),
    ("2026-01-01 10:00:00.", DT(2026, 1, 1, 10)),
    # Rounded to microseconds like PostgreSQL: rint(0.1234565 * 1e6) in binary floating point.
    ("2026-01-01 10:00:00.1234567", DT(2026, 1, 1, 10, 0, 0, 123457)),
    ("2026-01-01 10:00:00.9999999", DT(2026, 1, 1, 10, 0, 1)),
    # A zone on a timestamp without time zone is ignored, as PostgreSQL does.
    ("2026-01-01 10:00+02", DT(2026, 1, 1, 10)), ("2026-01-01 10:00:00Z", DT(2026, 1, 1, 10)),
    ("2026-01-01 10:00 America/New_York", DT(2026, 1, 1, 10)),
    ("2026-01-01 10:00 PST", DT(2026, 1, 1, 10)),
    ("2026-01-01 24:00:00", DT(2026, 1, 2)), ("2026-12-31 23:59:60", DT(2027, 1, 1)),
    ("20260101 10:00", DT(2026, 1, 1, 10)), ("epoch", DT(1970, 1, 1)),
    ("infinity", DT.max), ("-infinity", DT.min),
])
def test_timestamp_text(text: str, value: DT) -> None:
    key = to_key(text, KeyType.TIMESTAMP)
    assert key == value and key.tzinfo is None


def test_timestamp_text_errors() -> None:
    with pytest.raises(KeyValueError, match="years run from 1 to 9999"):
        to_key("9999-12-31 24:00", KeyType.TIMESTAMP)
    with pytest.raises(KeyValueError, match="expected ISO 8601"):
        to_key("10:00", KeyType.TIMESTAMP)
    with pytest.raises(KeyValueError, match="expected ISO 8601"):
        to_key("2026-01-01 10:00.5", KeyType.TIMESTAMP)  # PostgreSQL reads mm:ss.f here
    with pytest.raises(KeyValueError, match="depends on the current time"):
        to_key("tomorrow", KeyType.TIMESTAMP)


def test_timestamp_typed_values() -> None:
    assert to_key(DT(2026, 1, 1, 10), KeyType.TIMESTAMP) == DT(2026, 1, 1, 10)
    assert to_key(D(2026, 1, 1), KeyType.TIMESTAMP) == DT(2026, 1, 1)
    # timestamptz to timestamp: the local time in the session's zone.
    assert to_key(utc(2026, 7, 1, 10), KeyType.TIMESTAMP,
                  timezone="Europe/Paris") == DT(2026, 7, 1, 12)
    assert to_key(utc(2026, 7, 1, 10), KeyType.TIMESTAMP) == DT(2026, 7, 1, 10)
    assert to_key(DT.max.replace(tzinfo=UTC), KeyType.TIMESTAMP, timezone="+02") == DT.max


@pytest.mark.parametrize("text,value", [
    ("2026-01-01 10:00+02", utc(2026, 1, 1, 8)), ("2026-01-01 10:00:00-08:00", utc(2026, 1, 1, 18)),
    ("2026-01-01 10:00+0530", utc(2026, 1, 1, 4, 30)),
    ("2026-01-01 10:00+05:30", utc(2026, 1, 1, 4, 30)),  # ISO in a literal: east of UTC
    ("2026-01-01 10:00:00+01:02:03", utc(2026, 1, 1, 8, 57, 57)),
    ("2026-01-01 10:00Z", utc(2026, 1, 1, 10)), ("2026-01-01 10:00 UTC", utc(2026, 1, 1, 10)),
    ("2026-01-01 10:00 gmt", utc(2026, 1, 1, 10)), ("2026-01-01 10:00 zulu", utc(2026, 1, 1, 10)),
    ("2026-07-01 10:00 Europe/Paris", utc(2026, 7, 1, 8)),
    ("2026-01-01 10:00 europe/paris", utc(2026, 1, 1, 9)),
    ("2026-01-01 10:00 Etc/GMT+3", utc(2026, 1, 1, 13)),  # the IANA name keeps POSIX signs
    ("2026-01-01 Asia/Tokyo", utc(2025, 12, 31, 15)),
    ("epoch", utc(1970, 1, 1)), ("infinity", DT.max.replace(tzinfo=UTC)),
    ("-infinity", DT.min.replace(tzinfo=UTC)),
])
def test_timestamptz_text_with_zone(text: str, value: DT) -> None:
    key = to_key(text, KeyType.TIMESTAMPTZ, timezone="America/Los_Angeles")
    assert key == value and key.tzinfo is UTC


def test_timestamptz_text_without_zone_is_in_the_session_zone() -> None:
    assert to_key("2026-01-01 10:00", KeyType.TIMESTAMPTZ) == utc(2026, 1, 1, 10)
    assert to_key("2026-01-01 10:00", KeyType.TIMESTAMPTZ, timezone="+02") == utc(2026, 1, 1, 8)
    assert to_key("2026-07-01 10:00", KeyType.TIMESTAMPTZ,
                  timezone="America/New_York") == utc(2026, 7, 1, 14)
    assert to_key("2026-01-01", KeyType.TIMESTAMPTZ, timezone="Asia/Kolkata") == \
        utc(2025, 12, 31, 18, 30)


@pytest.mark.parametrize("local,zone,instant", [
    # A local time in a DST gap takes the offset before the transition, one in an overlap the
    # offset after it (PostgreSQL's DetermineTimeZoneOffset): the later UTC instant either way.
    ("2026-03-29 02:30", "Europe/Paris", utc(2026, 3, 29, 1, 30)),
    ("2026-10-25 02:30", "Europe/Paris", utc(2026, 10, 25, 1, 30)),
    ("2024-03-10 02:30", "America/New_York", utc(2024, 3, 10, 7, 30)),
    ("2024-11-03 01:30", "America/New_York", utc(2024, 11, 3, 6, 30)),
    ("2024-10-27 02:30", "Europe/Berlin", utc(2024, 10, 27, 1, 30)),
])
def test_timestamptz_dst_gaps_and_overlaps_resolve_like_postgresql(
        local: str, zone: str, instant: DT) -> None:
    assert to_key(local, KeyType.TIMESTAMPTZ, timezone=zone) == instant
    assert to_key(f"{local} {zone}", KeyType.TIMESTAMPTZ) == instant
    assert to_key(DT.fromisoformat(local), KeyType.TIMESTAMPTZ, timezone=zone) == instant


def test_timestamptz_errors() -> None:
    with pytest.raises(KeyValueError) as info:
        to_key("2026-01-01 10:00 PST", KeyType.TIMESTAMPTZ)
    assert str(info.value) == (
        'invalid input for timestamptz key: "2026-01-01 10:00 PST" (time zone "PST" is not '
        'understood: use an offset such as +02:00 or a full name such as America/New_York)')
    with pytest.raises(KeyValueError, match='time zone "CET" is not understood'):
        to_key("2026-07-01 10:00 CET", KeyType.TIMESTAMPTZ)  # abbreviation != IANA CET
    with pytest.raises(KeyValueError, match='time zone "Mars/Olympus" is not understood'):
        to_key("2026-07-01 10:00 Mars/Olympus", KeyType.TIMESTAMPTZ)
    with pytest.raises(KeyValueError, match='time zone "\\+16" is not understood'):
        to_key("2026-07-01 10:00+16", KeyType.TIMESTAMPTZ)
    with pytest.raises(KeyValueError, match="years run from 1 to 9999"):
        to_key("0001-01-01 00:00+01", KeyType.TIMESTAMPTZ)
    with pytest.raises(KeyValueError, match='unknown time zone "Nowhere"'):
        to_key("2026-07-01 10:00", KeyType.TIMESTAMPTZ, timezone="Nowhere")


def test_timestamptz_typed_values() -> None:
    paris = datetime.timezone(datetime.timedelta(hours=2))
    assert to_key(DT(2026, 7, 1, 10, tzinfo=paris), KeyType.TIMESTAMPTZ) == utc(2026, 7, 1, 8)
    assert to_key(DT(2026, 7, 1, 10), KeyType.TIMESTAMPTZ,
                  timezone="Europe/Paris") == utc(2026, 7, 1, 8)
    assert to_key(D(2026, 7, 1), KeyType.TIMESTAMPTZ, timezone="-05") == utc(2026, 7, 1, 5)
    assert to_key(DT.max, KeyType.TIMESTAMPTZ, timezone="+02") == DT.max.replace(tzinfo=UTC)
    assert to_key(DT.min, KeyType.TIMESTAMPTZ, timezone="-02") == DT.min.replace(tzinfo=UTC)


@pytest.mark.parametrize("setting,hours_east", [
    ("UTC", 0), ("utc", 0), ("GMT", 0), ("Etc/UTC", 0),
    # A plain number is hours east (SET TIME ZONE's SQL convention).
    ("+02", 2), ("-7", -7), ("5.5", 5.5), ("2", 2), ("0", 0),
    # POSIX strings, which count hours west: what PostgreSQL reports after SET TIME ZONE -7
    # is '<-07>+07'; and '+05:30' (not a plain number) is POSIX too: UTC-05:30.
    ("<-07>+07", -7), ("<+02>-02", 2), ("UTC+3", -3), ("+05:30", -5.5), ("<+0530>-05:30", 5.5),
    ("Europe/Paris", 2), ("europe/PARIS", 2), ("America/New_York", -4), ("EST5EDT", -4),
    ("Etc/GMT+3", -3),
])
def test_session_zone_reads_settings_like_postgresql(setting: str, hours_east: float) -> None:
    offset = DT(2026, 7, 1, 12, tzinfo=session_zone(setting)).utcoffset()
    assert offset == datetime.timedelta(hours=hours_east)


def test_session_zone_errors() -> None:
    with pytest.raises(KeyValueError) as info:
        session_zone("Mars/Olympus")
    assert str(info.value) == (
        'unknown time zone "Mars/Olympus": expected a zone name such as Europe/Paris, hours '
        'such as +02, or a POSIX zone such as <+02>-02')
    with pytest.raises(KeyValueError, match="out of range"):
        session_zone("+30")
    with pytest.raises(KeyValueError, match="unknown time zone"):
        session_zone("EST5EDT,M3.2.0,M11.1.0")  # DST rules: only through a zone name


@pytest.mark.parametrize("text", [
    "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
    "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}", "a0eebc999c0b4ef8bb6d6bb9bd380a11",
    "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11", "{a0eebc99-9c0b4ef8-bb6d6bb9-bd380a11}",
])
def test_uuid_text(text: str) -> None:
    assert to_key(text, KeyType.UUID) == U


@pytest.mark.parametrize("text", [
    " a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}", "a0eebc9-99c0b-4ef8-bb6d-6bb9bd380a11",
    "a0eebc99--9c0b-4ef8-bb6d-6bb9bd380a11", "urn:uuid:a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11-",
    "g0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
])
def test_uuid_text_errors(text: str) -> None:
    with pytest.raises(KeyValueError, match="invalid input for uuid key: .*expected 32 hex"):
        to_key(text, KeyType.UUID)


def test_uuid_typed_values() -> None:
    assert to_key(U, KeyType.UUID) is U
    with pytest.raises(KeyValueError, match="int value 5 cannot be a uuid key"):
        to_key(5, KeyType.UUID)


@pytest.mark.parametrize("text,value", [
    ("42", 42), ("9223372036854775807", 2 ** 63 - 1),
    ("9223372036854775808", Decimal("9223372036854775808")),
    ("42.0", Decimal("42.0")), ("1e3", Decimal("1E+3")), (".5", Decimal("0.5")),
    ("5.", Decimal("5")), ("0x1F", 31),
])
def test_parse_number_types_literals_like_postgresql(text: str, value: Any) -> None:
    number = parse_number(text)
    assert number == value and type(number) is type(value)


def test_number_literals_route_numerically() -> None:
    assert to_key(parse_number("42.0"), KeyType.INTEGER) == 42
    assert to_key(parse_number("1e2"), KeyType.INTEGER) == 100
    assert to_key(parse_number("42"), KeyType.NUMERIC) == Decimal(42)
    assert to_key(parse_number("42"), KeyType.TEXT) == "42"  # INSERT of 42 into a text column
    with pytest.raises(KeyValueError, match="has a fraction"):
        to_key(parse_number("4.5"), KeyType.INTEGER)


# --- Bind parameters -----------------------------------------------------------------------

def test_null_parameters_are_none() -> None:
    for key_type in KeyType:
        assert decode_param(None, 0, 0, key_type) is None
        assert decode_param(None, 1, INT4, key_type) is None


@pytest.mark.parametrize("data,oid,key_type,value", [
    (b"42", 0, KeyType.INTEGER, 42), (b" 42 ", UNKNOWN, KeyType.INTEGER, 42),
    (b"42", INT4, KeyType.INTEGER, 42), (b"42", INT8, KeyType.NUMERIC, Decimal(42)),
    (b"42", INT2, KeyType.TEXT, "42"), (b"1.50", NUMERIC, KeyType.NUMERIC, Decimal("1.50")),
    (b"42.0", NUMERIC, KeyType.INTEGER, 42), (b"abc", TEXT, KeyType.TEXT, "abc"),
    (b"caf\xc3\xa9", VARCHAR, KeyType.TEXT, "café"), (b"pg", NAME, KeyType.TEXT, "pg"),
    (b"ab  ", BPCHAR, KeyType.TEXT, "ab"),  # char(n) to text drops trailing spaces
    (b"ab  ", TEXT, KeyType.TEXT, "ab  "),
    (b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", UUID_OID, KeyType.UUID, U),
    (b"a0eebc999c0b4ef8bb6d6bb9bd380a11", 0, KeyType.UUID, U),
    (b"2026-01-01", DATE, KeyType.DATE, D(2026, 1, 1)),
    (b"2026-01-01", 0, KeyType.TIMESTAMP, DT(2026, 1, 1)),
    # A date parameter for a timestamp key is midnight, whatever else the text holds.
    (b"2026-01-01 10:00", DATE, KeyType.TIMESTAMP, DT(2026, 1, 1)),
    # Untyped text is read as the key type: the zone of a timestamp is ignored...
    (b"2026-01-01 10:00+02", 0, KeyType.TIMESTAMP, DT(2026, 1, 1, 10)),
    # ...but a timestamptz parameter applies its zone, then converts in the session zone.
    (b"2026-01-01 10:00+02", TIMESTAMPTZ, KeyType.TIMESTAMP, DT(2026, 1, 1, 8)),
    (b"2026-01-01 10:00", TIMESTAMP, KeyType.TIMESTAMPTZ, utc(2026, 1, 1, 10)),
    (b"infinity", TIMESTAMPTZ, KeyType.TIMESTAMP, DT.max),
])
def test_text_parameters(data: bytes, oid: int, key_type: KeyType, value: Any) -> None:
    key = decode_param(data, 0, oid, key_type)
    assert key == value and type(key) is type(value)


def test_text_parameters_use_the_session_zone() -> None:
    assert decode_param(b"2026-01-01 10:00", 0, 0, KeyType.TIMESTAMPTZ,
                        timezone="+02") == utc(2026, 1, 1, 8)
    assert decode_param(b"2026-01-01 10:00+02", 0, TIMESTAMPTZ, KeyType.TIMESTAMP,
                        timezone="Asia/Tokyo") == DT(2026, 1, 1, 17)


def test_text_parameter_errors() -> None:
    with pytest.raises(KeyValueError, match='invalid input for integer key: "4.5"'):
        decode_param(b"4.5", 0, 0, KeyType.INTEGER)
    with pytest.raises(KeyValueError, match="not valid UTF-8"):
        decode_param(b"\xff", 0, TEXT, KeyType.TEXT)
    with pytest.raises(KeyValueError, match="parameters of type OID 701 cannot be integer keys"):
        decode_param(b"42", 0, 701, KeyType.INTEGER)
    with pytest.raises(KeyValueError, match="has a time of day"):
        decode_param(b"2026-01-01 10:00", 0, TIMESTAMP, KeyType.DATE)


@pytest.mark.parametrize("data,oid,key_type,value", [
    (struct.pack("!h", -5), INT2, KeyType.INTEGER, -5),
    (struct.pack("!i", 2 ** 31 - 1), INT4, KeyType.INTEGER, 2 ** 31 - 1),
    (struct.pack("!q", -2 ** 63), INT8, KeyType.INTEGER, -2 ** 63),
    (struct.pack("!i", 42), INT4, KeyType.NUMERIC, Decimal(42)),
    (struct.pack("!i", 42), INT4, KeyType.TEXT, "42"),
    (b"caf\xc3\xa9", TEXT, KeyType.TEXT, "café"), (b"x", VARCHAR, KeyType.TEXT, "x"),
    (b"x", NAME, KeyType.TEXT, "x"), (b"ab   ", BPCHAR, KeyType.TEXT, "ab"),
    (b"42", TEXT, KeyType.INTEGER, 42),
    (U.bytes, UUID_OID, KeyType.UUID, U), (U.bytes, UUID_OID, KeyType.TEXT, str(U)),
    (struct.pack("!i", 0), DATE, KeyType.DATE, D(2000, 1, 1)),
    (struct.pack("!i", 9497), DATE, KeyType.DATE, D(2026, 1, 1)),
    (struct.pack("!i", -730119), DATE, KeyType.DATE, D(1, 1, 1)),
    (struct.pack("!i", 2 ** 31 - 1), DATE, KeyType.DATE, D.max),
    (struct.pack("!i", -2 ** 31), DATE, KeyType.DATE, D.min),
    (struct.pack("!i", 2 ** 31 - 1), DATE, KeyType.TIMESTAMP, DT.max),  # not 9999-12-31 00:00
    (struct.pack("!i", 9497), DATE, KeyType.TIMESTAMP, DT(2026, 1, 1)),
    (struct.pack("!q", 0), TIMESTAMP, KeyType.TIMESTAMP, DT(2000, 1, 1)),
    (struct.pack("!q", 820_576_800_123_456), TIMESTAMP, KeyType.TIMESTAMP,
     DT(2026, 1, 1, 10, 0, 0, 123456)),
    (struct.pack("!q", -1), TIMESTAMP, KeyType.TIMESTAMP, DT(1999, 12, 31, 23, 59, 59, 999999)),
    (struct.pack("!q", 2 ** 63 - 1), TIMESTAMP, KeyType.TIMESTAMP, DT.max),
    (struct.pack("!q", -2 ** 63), TIMESTAMP, KeyType.TIMESTAMP, DT.min),
    (struct.pack("!q", 820_576_800_000_000), TIMESTAMPTZ, KeyType.TIMESTAMPTZ,
     utc(2026, 1, 1, 10)),
    (struct.pack("!q", 2 ** 63 - 1), TIMESTAMPTZ, KeyType.TIMESTAMPTZ,
     DT.max.replace(tzinfo=UTC)),
    (struct.pack("!q", 820_540_800_000_000), TIMESTAMP, KeyType.DATE, D(2026, 1, 1)),
    (struct.pack("!q", 820_576_800_000_000), TIMESTAMP, KeyType.TIMESTAMPTZ,
     utc(2026, 1, 1, 10)),
])
def test_binary_parameters(data: bytes, oid: int, key_type: KeyType, value: Any) -> None:
    key = decode_param(data, 1, oid, key_type)
    assert key == value and type(key) is type(value)


def test_binary_timestamps_convert_in_the_session_zone() -> None:
    ten_utc = struct.pack("!q", 820_576_800_000_000)  # 2026-01-01 10:00 UTC
    assert decode_param(ten_utc, 1, TIMESTAMPTZ, KeyType.TIMESTAMP,
                        timezone="Europe/Paris") == DT(2026, 1, 1, 11)
    assert decode_param(ten_utc, 1, TIMESTAMP, KeyType.TIMESTAMPTZ,
                        timezone="Europe/Paris") == utc(2026, 1, 1, 9)
    midnight_paris = struct.pack("!q", 820_540_800_000_000 - 3_600_000_000)
    assert decode_param(midnight_paris, 1, TIMESTAMPTZ, KeyType.DATE,
                        timezone="Europe/Paris") == D(2026, 1, 1)
    with pytest.raises(KeyValueError, match="has a time of day"):
        decode_param(midnight_paris, 1, TIMESTAMPTZ, KeyType.DATE)


@pytest.mark.parametrize("data,oid,message", [
    (b"\x00\x00\x00", INT4, "a binary int4 parameter must be 4 bytes, not 3"),
    (b"\x00" * 4, INT8, "a binary int8 parameter must be 8 bytes, not 4"),
    (b"\x00" * 3, INT2, "a binary int2 parameter must be 2 bytes, not 3"),
    (b"\x00" * 15, UUID_OID, "a binary uuid parameter must be 16 bytes, not 15"),
    (b"\x00" * 8, DATE, "a binary date parameter must be 4 bytes, not 8"),
    (b"\x00\x00\x00\x2a", 0, "a binary parameter of unspecified type cannot be read: declare "
                             "its type at Parse or send it in text format"),
    # Declared unknown, PostgreSQL resolves it from context exactly like 0.
    (b"\x00\x00\x00\x2a", UNKNOWN, "a binary parameter of unspecified type cannot be read"),
    (b"\x00" * 8, 701, "binary parameters of type OID 701 cannot be integer keys"),
    (b"\xff\xfe", TEXT, "a text parameter is not valid UTF-8"),
    (struct.pack("!i", 3_000_000), DATE, "a binary date parameter is out of range: 3000000 "
                                         "days from 2000-01-01 (years run from 1 to 9999)"),
    (struct.pack("!q", 2 ** 62), TIMESTAMP, "a binary timestamp parameter is out of range"),
])
def test_binary_parameter_errors(data: bytes, oid: int, message: str) -> None:
    with pytest.raises(KeyValueError) as info:
        decode_param(data, 1, oid, KeyType.INTEGER)
    assert str(info.value).startswith(message)


def test_format_codes_other_than_text_and_binary_are_refused() -> None:
    with pytest.raises(KeyValueError, match="invalid parameter format code 2"):
        decode_param(b"42", 2, INT4, KeyType.INTEGER)


# numeric_send: int16 ndigits, int16 weight, uint16 sign, uint16 dscale, base-10000 digits.
def numeric(digits: list[int], weight: int, sign: int, dscale: int) -> bytes:
    return struct.pack(f"!hhHH{len(digits)}H", len(digits), weight, sign, dscale, *digits)


@pytest.mark.parametrize("data,value", [
    (numeric([], 0, 0, 0), "0"),
    (numeric([], 0, 0, 2), "0.00"),
    (numeric([42], 0, 0, 0), "42"),
    (numeric([123, 4500], 0, 0x4000, 4), "-123.4500"),
    (numeric([1], 1, 0, 0), "10000"),  # weight 1: the digit counts ten-thousands
    (numeric([1, 2345], 1, 0, 0), "12345"),
    (numeric([5000], -1, 0, 1), "0.5"),  # negative weight, trailing zeros beyond dscale
    (numeric([12], -2, 0, 8), "0.00000012"),
    (numeric([1, 2345, 6789], 0, 0, 8), "1.23456789"),
    (numeric([1, 2345, 6789], 0, 0, 5), "1.23456"),  # digits beyond dscale are truncated
    (numeric([9999], 5, 0x4000, 0), "-9999" + "0" * 20),
    (numeric([1] + [0] * 2000, 2000, 0, 0), "1" + "0" * 8000),  # beyond int's 4300 digits
    (numeric([], 0, 0xD000, 0), "Infinity"),
    (numeric([], 0, 0xF000, 0), "-Infinity"),
])
def test_binary_numeric(data: bytes, value: str) -> None:
    key = decode_param(data, 1, NUMERIC, KeyType.NUMERIC)
    assert type(key) is Decimal and key == Decimal(value) and str(key) == str(Decimal(value))


def test_binary_numeric_conversions_and_errors() -> None:
    assert decode_param(numeric([42], 0, 0, 1), 1, NUMERIC, KeyType.INTEGER) == 42
    with pytest.raises(KeyValueError, match="has a fraction"):
        decode_param(numeric([4, 5000], 0, 0, 1), 1, NUMERIC, KeyType.INTEGER)
    assert decode_param(numeric([1, 5000], 0, 0, 2), 1, NUMERIC, KeyType.TEXT) == "1.50"
    with pytest.raises(KeyValueError, match="a NaN numeric parameter cannot be a key"):
        decode_param(numeric([], 0, 0xC000, 0), 1, NUMERIC, KeyType.NUMERIC)
    with pytest.raises(KeyValueError, match="invalid sign"):
        decode_param(numeric([1], 0, 0x1234, 0), 1, NUMERIC, KeyType.NUMERIC)
    with pytest.raises(KeyValueError, match="invalid digit"):
        decode_param(numeric([10000], 0, 0, 0), 1, NUMERIC, KeyType.NUMERIC)
    with pytest.raises(KeyValueError, match="length does not match"):
        decode_param(numeric([1, 2], 0, 0, 0)[:-1], 1, NUMERIC, KeyType.NUMERIC)
    with pytest.raises(KeyValueError, match="at least 8 bytes"):
        decode_param(b"\x00\x01", 1, NUMERIC, KeyType.NUMERIC)
    with pytest.raises(KeyValueError, match="invalid scale"):
        decode_param(numeric([1], 0, 0, 0x4000), 1, NUMERIC, KeyType.NUMERIC)


@pytest.mark.parametrize("value", [
    "0", "1", "-1", "0.1", "-0.001", "123.4500", "10000", "9999.9999", "0.00010000",
    "1e-20", "12345678901234567890123456789012345678901234567890.0123456789",
    "-98765.4321e30", "1e-1000", "3.14159265358979323846264338327950288419716939937510",
    "Infinity", "-Infinity", "100000000", "0.000000001", "5E+3",
])
def test_binary_numeric_matches_psycopg(value: str) -> None:
    adapt = pytest.importorskip("psycopg.adapt")
    transformer = adapt.Transformer()
    dumper = transformer.get_dumper(Decimal(value), adapt.PyFormat.BINARY)
    data = bytes(dumper.dump(Decimal(value)))
    key = decode_param(data, 1, dumper.oid, KeyType.NUMERIC)
    assert key == Decimal(value)
    if Decimal(value).is_finite():
        # same value and same scale as PostgreSQL would store (psycopg sends dscale)
        assert key.as_tuple().exponent == min(0, Decimal(value).as_tuple().exponent)


def test_keys_from_text_and_binary_hash_alike() -> None:
    # The same value reaches the same shard however the client sent it.
    pairs = [
        (decode_param(b"42", 0, 0, KeyType.INTEGER),
         decode_param(struct.pack("!q", 42), 1, INT8, KeyType.INTEGER)),
        (decode_param(b"1.50", 0, 0, KeyType.NUMERIC),
         decode_param(numeric([1, 5000], 0, 0, 2), 1, NUMERIC, KeyType.NUMERIC)),
        (decode_param(b"2026-01-01 10:00+00", 0, 0, KeyType.TIMESTAMPTZ),
         decode_param(struct.pack("!q", 820_576_800_000_000), 1, TIMESTAMPTZ,
                      KeyType.TIMESTAMPTZ)),
        (decode_param(str(U).encode(), 0, 0, KeyType.UUID),
         decode_param(U.bytes, 1, UUID_OID, KeyType.UUID)),
    ]
    for text_key, binary_key in pairs:
        assert text_key == binary_key
        assert hash_key(text_key) == hash_key(binary_key)
