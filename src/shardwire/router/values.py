"""Sharding-key values from SQL literals and Bind parameters. Pure: no I/O, no clock.

`to_key` turns a literal's text (or an already-typed Python value) into a key of the rule's
`KeyType`, following PostgreSQL's input rules closely enough for routing; `decode_param` does the
same for a Bind parameter in text or binary format. Anything that cannot be turned into a key
exactly raises `KeyValueError`, whose message says what was refused and why: the router then
refuses the statement or sends it to every shard the rule may use; it never guesses.

Decisions (see each function for details):

- integer keys are bigint-sized Python ints. Text input accepts surrounding whitespace, a sign,
  and PostgreSQL 16's `1_000` / `0x1F` / `0o17` / `0b101` forms; a fraction is refused ('4.5'),
  but a number with a zero fraction (`Decimal('42.0')`, a literal `42.0`) is 42, because
  PostgreSQL compares `intcol = 42.0` numerically.
- numeric keys are Decimals. 'Infinity' and '-Infinity' are `Decimal('Infinity')` and
  `Decimal('-Infinity')` (they order like PostgreSQL's); NaN is refused: PostgreSQL sorts NaN
  above every number, which no Decimal can express, so it has no place in a range rule.
- text keys are the string as written; a `bpchar` parameter loses its trailing spaces, as
  PostgreSQL's char-to-text cast does.
- date, timestamp and timestamptz keys read ISO 8601 (`2026-01-01`, `20260101`,
  `2026-01-01 10:00`, `2026-01-01T10:00:00.123456+02`), 'epoch' and '[+-]infinity'. Other
  PostgreSQL spellings depend on DateStyle or on the clock ('01/02/2026', 'today', 'now') and are
  refused. 'infinity' / '-infinity' are `date.max` / `date.min` for dates, `datetime.max` /
  `datetime.min` for timestamps (with `tzinfo=UTC` for timestamptz). Years run from 1 to 9999.
- A zone suffix is ignored for date and timestamp keys (like PostgreSQL) and applied for
  timestamptz keys; without one, timestamptz text is in the session's TimeZone (`timezone=`).
  Local times in a DST gap or overlap resolve like PostgreSQL's (the later UTC instant).
- A conversion that loses information is refused rather than rounded: a timestamp with a time of
  day for a date key, a fraction for an integer key.
"""

from __future__ import annotations

import datetime
import enum
import functools
import re
import uuid
import zoneinfo
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from shardwire.router.shardmap import KeyType, KeyValue

__all__ = ["KeyValueError", "decode_param", "parse_number", "session_zone", "to_key"]

UTC = datetime.UTC


class KeyValueError(ValueError):
    """A value cannot be turned into a sharding key; the message says which and why."""


class _Infinity(enum.Enum):
    """±infinity from a date/time input, resolved to a sentinel once the key type is known."""

    POS = 1
    NEG = -1


_INT8_MIN = -(2 ** 63)
_INT8_MAX = 2 ** 63 - 1
_INT4_MIN = -(2 ** 31)
_INT4_MAX = 2 ** 31 - 1

# Parameter type OIDs (pg_type.dat).
NAME_OID = 19
INT8_OID = 20
INT2_OID = 21
INT4_OID = 23
TEXT_OID = 25
UNKNOWN_OID = 705
BPCHAR_OID = 1042
VARCHAR_OID = 1043
DATE_OID = 1082
TIMESTAMP_OID = 1114
TIMESTAMPTZ_OID = 1184
NUMERIC_OID = 1700
UUID_OID = 2950

_PG_EPOCH_DATE = datetime.date(2000, 1, 1)
_PG_EPOCH = datetime.datetime(2000, 1, 1)
_PG_EPOCH_UTC = datetime.datetime(2000, 1, 1, tzinfo=UTC)
_DATETIME_MAX_UTC = datetime.datetime.max.replace(tzinfo=UTC)
_DATETIME_MIN_UTC = datetime.datetime.min.replace(tzinfo=UTC)

_KEY_NAMES = {kt: kt.value for kt in KeyType}


def _shown(value: object) -> str:
    text = value if isinstance(value, str) else repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f'"{text}"' if isinstance(value, str) else text


def _invalid(key_type: KeyType, value: object, why: str = "") -> KeyValueError:
    msg = f"invalid input for {_KEY_NAMES[key_type]} key: {_shown(value)}"
    return KeyValueError(f"{msg} ({why})" if why else msg)


def _out_of_range(key_type: KeyType, value: object, why: str) -> KeyValueError:
    return KeyValueError(
        f"value out of range for {_KEY_NAMES[key_type]} key: {_shown(value)} ({why})")


# --- text input ------------------------------------------------------------------------------

# PostgreSQL's isspace() in the C locale; `\s` would also match Unicode spaces.
_SPACE = " \t\n\r\f\v"
_INT = re.compile(
    r"[ \t\n\r\f\v]*([+-]?)(?:0[xX]((?:_?[0-9a-fA-F])+)|0[oO]((?:_?[0-7])+)|0[bB]((?:_?[01])+)"
    r"|(\d(?:_?\d)*))[ \t\n\r\f\v]*", re.ASCII)
_NUMERIC = re.compile(
    r"[ \t\n\r\f\v]*([+-]?)(\d(?:_?\d)*(?:\.(?:\d(?:_?\d)*)?)?|\.\d(?:_?\d)*)"
    r"(?:[eE]([+-]?\d+))?[ \t\n\r\f\v]*", re.ASCII)
_NUMERIC_SPECIAL = {"nan": "NaN", "infinity": "Infinity", "+infinity": "Infinity",
                    "-infinity": "-Infinity", "inf": "Infinity", "+inf": "Infinity",
                    "-inf": "-Infinity"}
# PostgreSQL refuses exponents beyond this (NUMERIC_MAX_PRECISION); it also keeps a hostile
# '1e999999999' from becoming a billion-digit string when the key is hashed.
_MAX_EXPONENT = 1000


def _parse_int(text: str, key_type: KeyType = KeyType.INTEGER) -> int:
    if text.isascii() and text.isdigit():  # the common case: plain digits
        value = int(text)
    else:
        m = _INT.fullmatch(text)
        if m is None:
            why = "not an integer" if _NUMERIC.fullmatch(text) else ""
            raise _invalid(key_type, text, why)
        value = _parse_int_unbounded(m)
    if not _INT8_MIN <= value <= _INT8_MAX:
        raise _out_of_range(key_type, text, "integer keys are bigint")
    return value


def _parse_numeric(text: str, key_type: KeyType = KeyType.NUMERIC) -> Decimal:
    m = _NUMERIC.fullmatch(text)
    if m is None:
        special = _NUMERIC_SPECIAL.get(text.strip(_SPACE).lower())
        if special is None:
            m2 = _INT.fullmatch(text)  # PostgreSQL 16 accepts 0x1F and friends here too
            if m2 is not None:
                return Decimal(_parse_int_unbounded(m2))
            raise _invalid(key_type, text)
        if special == "NaN":
            raise _invalid(key_type, text, "NaN sorts above every number in PostgreSQL and "
                           "has no place in a key order")
        return Decimal(special)
    sign, mantissa, exponent = m.groups()
    if exponent is None:
        return Decimal(sign + mantissa.replace("_", ""))
    if not -_MAX_EXPONENT <= int(exponent) <= _MAX_EXPONENT:
        raise _out_of_range(key_type, text, "PostgreSQL accepts exponents up to 1000")
    return Decimal(f"{sign}{mantissa.replace('_', '')}E{exponent}")


_UUID = re.compile(r"[0-9a-fA-F]{4}(?:-?[0-9a-fA-F]{4}){7}", re.ASCII)


def _parse_uuid(text: str) -> uuid.UUID:
    # PostgreSQL: 32 hex digits, a hyphen allowed after any group of four, optional braces
    # around the whole; no surrounding whitespace.
    body = text[1:-1] if text[:1] == "{" and text[-1:] == "}" else text
    if _UUID.fullmatch(body) is None:
        raise _invalid(KeyType.UUID, text, "expected 32 hex digits, as in "
                       "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
    return uuid.UUID(hex=body.replace("-", ""))


# ISO 8601 dates and timestamps, with an optional zone suffix.
_DATETIME = re.compile(
    r"[ \t\n\r\f\v]*"
    r"(?:(\d{4,})-(\d{1,2})-(\d{1,2})|(\d{4})(\d{2})(\d{2}))"
    r"(?:(?:[Tt]|[ \t\n\r\f\v]+)(\d{1,2}):(\d{1,2})(?::(\d{1,2})(?:\.(\d*))?)?"
    r"(?:[ \t\n\r\f\v]*([+-][0-9:]+|[A-Za-z][A-Za-z0-9_/+-]*))?"
    r"|[ \t\n\r\f\v]+([+-][0-9:]+|[A-Za-z][A-Za-z0-9_/+-]*))?"
    r"[ \t\n\r\f\v]*", re.ASCII)
_CLOCK_WORDS = frozenset({"now", "today", "tomorrow", "yesterday"})


class _Stamp:
    """A parsed date/time text: the calendar date, the time of day in microseconds (None for
    a date alone) and the zone suffix as written (None without one)."""

    __slots__ = ("date", "micros", "zone")

    def __init__(self, date: datetime.date, micros: int | None, zone: str | None) -> None:
        self.date = date
        self.micros = micros
        self.zone = zone

    def local(self, key_type: KeyType, text: str) -> datetime.datetime:
        base = datetime.datetime(self.date.year, self.date.month, self.date.day)
        if not self.micros:
            return base
        try:
            return base + datetime.timedelta(microseconds=self.micros)
        except OverflowError:
            raise _out_of_range(key_type, text, "years run from 1 to 9999") from None


def _parse_stamp(text: str, key_type: KeyType) -> _Stamp | _Infinity:
    m = _DATETIME.fullmatch(text)
    if m is None:
        word = text.strip(_SPACE).lower()
        if word in ("infinity", "+infinity"):
            return _Infinity.POS
        if word == "-infinity":
            return _Infinity.NEG
        if word == "epoch":
            return _Stamp(datetime.date(1970, 1, 1), None, "UTC")
        if word in _CLOCK_WORDS:
            raise _invalid(key_type, text, "depends on the current time; routing cannot use it")
        raise _invalid(key_type, text, "expected ISO 8601, as in 2026-01-31 or "
                       "2026-01-31 10:00:00")
    g = m.groups()
    y, mo, d = (g[0], g[1], g[2]) if g[0] is not None else (g[3], g[4], g[5])
    try:
        date = datetime.date(int(y), int(mo), int(d))
    except ValueError:
        raise _out_of_range(key_type, text, "no such date; years run from 1 to 9999") from None
    micros = None
    if g[6] is not None:
        hour, minute = int(g[6]), int(g[7])
        second = int(g[8]) if g[8] is not None else 0
        # Rounded the way PostgreSQL does: rint(strtod(".ffff") * 1e6).
        frac = round(float("0." + g[9]) * 1_000_000) if g[9] else 0
        # PostgreSQL accepts 24:00:00 (the next midnight) and a leap second :60.
        if minute > 59 or second > 60 or hour > 24 or (hour == 24 and (minute or second or frac)):
            raise _out_of_range(key_type, text, "no such time of day")
        micros = ((hour * 60 + minute) * 60 + second) * 1_000_000 + frac
    zone = g[10] if g[10] is not None else g[11]
    if zone is not None:
        upper = zone.upper()
        if upper == "BC":
            raise _out_of_range(key_type, text, "years run from 1 to 9999")
        if upper == "AD":
            zone = None
    return _Stamp(date, micros, zone)


def _parse_date(text: str) -> datetime.date | _Infinity:
    stamp = _parse_stamp(text, KeyType.DATE)
    if isinstance(stamp, _Infinity):
        return stamp
    return stamp.date  # PostgreSQL's date input drops a time of day and a zone


def _parse_timestamp(text: str) -> datetime.datetime | _Infinity:
    stamp = _parse_stamp(text, KeyType.TIMESTAMP)
    if isinstance(stamp, _Infinity):
        return stamp
    return stamp.local(KeyType.TIMESTAMP, text)  # a zone suffix is ignored, as in PostgreSQL


def _parse_timestamptz(text: str, timezone: str) -> datetime.datetime | _Infinity:
    stamp = _parse_stamp(text, KeyType.TIMESTAMPTZ)
    if isinstance(stamp, _Infinity):
        return stamp
    local = stamp.local(KeyType.TIMESTAMPTZ, text)
    zone = session_zone(timezone) if stamp.zone is None else _suffix_zone(stamp.zone, text)
    return _to_utc(local, zone, KeyType.TIMESTAMPTZ, text)


# --- time zones --------------------------------------------------------------------------------

_HOURS = re.compile(r"[ \t\n\r\f\v]*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_POSIX = re.compile(r"(?:<[^>]*>|[^0-9,+-]*)([+-]?)(\d{1,3})(?::(\d{1,2})(?::(\d{1,2}))?)?",
                    re.ASCII)
_ISO_OFFSET = re.compile(r"([+-])(\d{1,2})(?::?(\d{2})(?::?(\d{2}))?)?", re.ASCII)
_UTC_NAMES = frozenset({"Z", "ZULU", "UTC", "GMT", "UT"})


@functools.lru_cache(maxsize=256)
def session_zone(name: str) -> datetime.tzinfo:
    """The zone a TimeZone setting names, read the way PostgreSQL's `SET TimeZone` reads it.

    - a plain number is hours east of UTC: '+02', '-7', '5.5' (the form PostgreSQL reports
      after `SET TIME ZONE -7` is the POSIX '<-07>+07', read below);
    - a zone name from the IANA database, matched case-insensitively: 'Europe/Paris', 'UTC';
    - otherwise a POSIX TZ string without DST rules, whose offsets count hours WEST of UTC:
      '<+02>-02' is UTC+2, 'UTC+3' is UTC-3, and so is PostgreSQL's reading of '+05:30':
      UTC-05:30, not +05:30 (PostgreSQL's own documented trap; we follow it).
    """
    if _HOURS.fullmatch(name):
        return _fixed(float(name) * 3600, name)
    if name.upper() in ("UTC", "GMT", "Z"):
        return UTC
    zone = _iana_zone(name)
    if zone is not None:
        return zone
    m = _POSIX.fullmatch(name)
    if m is None:
        raise KeyValueError(f'unknown time zone "{name}": expected a zone name such as '
                            f'Europe/Paris, hours such as +02, or a POSIX zone such as <+02>-02')
    sign, hours, minutes, seconds = m.groups()
    west = int(hours) * 3600 + int(minutes or 0) * 60 + int(seconds or 0)
    return _fixed(west if sign == "-" else -west, name)


def _fixed(seconds_east: float, name: str) -> datetime.timezone:
    seconds = int(seconds_east)  # PostgreSQL truncates fractional seconds the same way
    if not -86400 < seconds < 86400:
        raise KeyValueError(f'time zone "{name}" is out of range')
    return datetime.timezone(datetime.timedelta(seconds=seconds)) if seconds else UTC


@functools.cache
def _zone_names() -> dict[str, str]:
    return {key.lower(): key for key in zoneinfo.available_timezones()}


def _iana_zone(name: str) -> datetime.tzinfo | None:
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        pass
    key = _zone_names().get(name.lower())  # PostgreSQL matches zone names case-insensitively
    return zoneinfo.ZoneInfo(key) if key is not None else None


@functools.lru_cache(maxsize=256)
def _suffix_zone_cached(zone: str) -> datetime.tzinfo | None:
    if zone.upper() in _UTC_NAMES:
        return UTC
    m = _ISO_OFFSET.fullmatch(zone)
    if m is not None:  # ISO 8601: positive is east of Greenwich
        sign, hours, minutes, seconds = m.groups()
        east = int(hours) * 3600 + int(minutes or 0) * 60 + int(seconds or 0)
        if east > 15 * 3600 + 59 * 60 + 59 or int(minutes or 0) > 59 or int(seconds or 0) > 59:
            return None
        return _fixed(-east if sign == "-" else east, zone)
    if "/" in zone:
        return _iana_zone(zone)
    return None


def _suffix_zone(zone: str, text: str) -> datetime.tzinfo:
    found = _suffix_zone_cached(zone)
    if found is None:
        # Abbreviations (PST, CET...) come from the server's timezone_abbreviations setting,
        # and some mean something else than the IANA zone of the same name (CET).
        raise _invalid(KeyType.TIMESTAMPTZ, text, f'time zone "{zone}" is not understood: use '
                       f'an offset such as +02:00 or a full name such as America/New_York')
    return found


def _to_utc(local: datetime.datetime, zone: datetime.tzinfo, key_type: KeyType,
            shown: object) -> datetime.datetime:
    """A local time in `zone` as an aware UTC datetime, resolved like PostgreSQL's
    DetermineTimeZoneOffset: in a DST gap it takes the offset before the transition, in an
    overlap the one after, which is the smaller of the two offsets either way."""
    try:
        if isinstance(zone, datetime.timezone):
            offset = zone.utcoffset(None)
        else:
            first = local.replace(tzinfo=zone).utcoffset()
            second = local.replace(tzinfo=zone, fold=1).utcoffset()
            assert first is not None and second is not None
            offset = min(first, second)
        return (local - offset).replace(tzinfo=UTC)
    except OverflowError:
        raise _out_of_range(key_type, shown, "years run from 1 to 9999") from None


def _to_local(instant: datetime.datetime, zone: datetime.tzinfo, key_type: KeyType,
              shown: object) -> datetime.datetime:
    if instant == _DATETIME_MAX_UTC:
        return datetime.datetime.max
    if instant == _DATETIME_MIN_UTC:
        return datetime.datetime.min
    try:
        return instant.astimezone(zone).replace(tzinfo=None)
    except OverflowError:
        raise _out_of_range(key_type, shown, "years run from 1 to 9999") from None


# --- typed values to key types ---------------------------------------------------------------

def _integer(value: Any, timezone: str) -> int:
    if isinstance(value, str):
        return _parse_int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if not _INT8_MIN <= value <= _INT8_MAX:
            raise _out_of_range(KeyType.INTEGER, value, "integer keys are bigint")
        return value
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise _invalid(KeyType.INTEGER, value, "not a finite number")
        if not _INT8_MIN <= value <= _INT8_MAX:
            raise _out_of_range(KeyType.INTEGER, value, "integer keys are bigint")
        if value != value.to_integral_value():
            raise _invalid(KeyType.INTEGER, value, "has a fraction")
        return int(value)
    raise _wrong_type(KeyType.INTEGER, value)


def _numeric(value: Any, timezone: str) -> Decimal:
    if isinstance(value, str):
        return _parse_numeric(value)
    if isinstance(value, Decimal):
        if value.is_nan():
            raise _invalid(KeyType.NUMERIC, value, "NaN sorts above every number in "
                           "PostgreSQL and has no place in a key order")
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return Decimal(value)
    raise _wrong_type(KeyType.NUMERIC, value)


def _numeric_text(value: Decimal) -> str:
    """PostgreSQL's numeric_out: plain notation, the scale kept, no negative zero."""
    if not value.is_finite():
        return "Infinity" if value > 0 else "-Infinity"
    if value.is_zero():
        value = abs(value)
    return format(value, "f")


def _text(value: Any, timezone: str) -> str:
    if isinstance(value, str):
        return value
    # What PostgreSQL stores when such a value is assigned to a text column.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, Decimal):
        return _numeric_text(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    raise _wrong_type(KeyType.TEXT, value, "its text form depends on DateStyle"
                      if isinstance(value, datetime.date | _Infinity) else "")


def _date(value: Any, timezone: str) -> datetime.date:
    if isinstance(value, str):
        value = _parse_date(value)
    if isinstance(value, datetime.datetime):
        if value in (datetime.datetime.max, _DATETIME_MAX_UTC):
            return datetime.date.max
        if value in (datetime.datetime.min, _DATETIME_MIN_UTC):
            return datetime.date.min
        local = value
        if value.tzinfo is not None:
            local = _to_local(value, session_zone(timezone), KeyType.DATE, value)
        if local.time() != datetime.time.min:
            # `datecol = ts` compares as timestamps, so only midnight can match a date;
            # routing a truncated date would be wrong for `datecol < ts`.
            raise _invalid(KeyType.DATE, value, "has a time of day; a date key cannot route "
                           "it exactly")
        return local.date()
    if isinstance(value, datetime.date):
        return value
    if value is _Infinity.POS:
        return datetime.date.max
    if value is _Infinity.NEG:
        return datetime.date.min
    raise _wrong_type(KeyType.DATE, value)


def _timestamp(value: Any, timezone: str) -> datetime.datetime:
    if isinstance(value, str):
        value = _parse_timestamp(value)
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            return value
        # timestamptz to timestamp: the local time in the session's zone, as PostgreSQL does.
        return _to_local(value, session_zone(timezone), KeyType.TIMESTAMP, value)
    if isinstance(value, datetime.date):
        return datetime.datetime(value.year, value.month, value.day)
    if value is _Infinity.POS:
        return datetime.datetime.max
    if value is _Infinity.NEG:
        return datetime.datetime.min
    raise _wrong_type(KeyType.TIMESTAMP, value)


def _timestamptz(value: Any, timezone: str) -> datetime.datetime:
    if isinstance(value, str):
        value = _parse_timestamptz(value, timezone)
    if isinstance(value, datetime.datetime):
        if value.tzinfo is not None:
            if value.tzinfo is UTC:
                return value
            try:
                return value.astimezone(UTC)
            except OverflowError:
                raise _out_of_range(KeyType.TIMESTAMPTZ, value, "years run from 1 to 9999") \
                    from None
        if value == datetime.datetime.max:
            return _DATETIME_MAX_UTC
        if value == datetime.datetime.min:
            return _DATETIME_MIN_UTC
        return _to_utc(value, session_zone(timezone), KeyType.TIMESTAMPTZ, value)
    if isinstance(value, datetime.date):
        local = datetime.datetime(value.year, value.month, value.day)
        return _to_utc(local, session_zone(timezone), KeyType.TIMESTAMPTZ, value)
    if value is _Infinity.POS:
        return _DATETIME_MAX_UTC
    if value is _Infinity.NEG:
        return _DATETIME_MIN_UTC
    raise _wrong_type(KeyType.TIMESTAMPTZ, value)


def _uuid(value: Any, timezone: str) -> uuid.UUID:
    if isinstance(value, str):
        return _parse_uuid(value)
    if isinstance(value, uuid.UUID):
        return value
    raise _wrong_type(KeyType.UUID, value)


def _wrong_type(key_type: KeyType, value: object, why: str = "") -> KeyValueError:
    if isinstance(value, _Infinity):
        value = "infinity" if value is _Infinity.POS else "-infinity"
        return _invalid(key_type, value, why or "infinity is not a value of this key type")
    name = _KEY_NAMES[key_type]
    article = "an" if name[0] == "i" else "a"
    return KeyValueError(f"{type(value).__name__} value {_shown(value)} cannot be {article} "
                         f"{name} key" + (f" ({why})" if why else ""))


_CONVERT: dict[KeyType, Callable[[Any, str], KeyValue]] = {
    KeyType.INTEGER: _integer,
    KeyType.NUMERIC: _numeric,
    KeyType.TEXT: _text,
    KeyType.DATE: _date,
    KeyType.TIMESTAMP: _timestamp,
    KeyType.TIMESTAMPTZ: _timestamptz,
    KeyType.UUID: _uuid,
}


def to_key(value: str | int | Decimal | datetime.date | uuid.UUID, key_type: KeyType, *,
           timezone: str = "UTC") -> KeyValue:
    """A key of `key_type` from a SQL string literal's text or an already-typed Python value.

    A string is read with PostgreSQL's input rules for the key type (see the module docstring):
    `to_key(" 42 ", INTEGER) == 42`, `to_key("2026-01-01 10:00", DATE) == date(2026, 1, 1)`.
    Typed values convert as PostgreSQL would compare them with a column of the key type:
    `Decimal("42.0")` is the integer key 42, a `date` is midnight for timestamp keys, an aware
    datetime is read in the session zone for timestamp and date keys. For number literals
    written without quotes, pass `parse_number(text)`, not the text: `intcol = 42.0` is true for
    42, while `intcol = '42.0'` is an error in PostgreSQL.

    `timezone` is the session's TimeZone setting (as PostgreSQL reports it); it matters for
    timestamptz keys read from text without a zone, and for conversions between timestamp,
    timestamptz and date. Raises KeyValueError when the value cannot be a key exactly.
    """
    return _CONVERT[key_type](value, timezone)


def parse_number(text: str) -> int | Decimal:
    """The value of an unquoted SQL number literal, typed as PostgreSQL types it: an int when
    the literal has no point or exponent and fits in bigint, a Decimal otherwise
    (`42` -> 42, `42.0` -> Decimal('42.0'), `1e3` -> Decimal('1E+3'))."""
    if text.isascii() and text.isdigit():
        value = int(text)
        return value if value <= _INT8_MAX else Decimal(value)
    m = _INT.fullmatch(text)
    if m is not None:
        try:
            return _parse_int(text)
        except KeyValueError:
            return Decimal(_parse_int_unbounded(m))
    return _parse_numeric(text)


def _parse_int_unbounded(m: re.Match[str]) -> int:
    sign, hexa, octal, binary, dec = m.groups()
    if dec is not None:
        value = int(dec.replace("_", ""))
    elif hexa is not None:
        value = int(hexa.replace("_", ""), 16)
    elif octal is not None:
        value = int(octal.replace("_", ""), 8)
    else:
        value = int(binary.replace("_", ""), 2)
    return -value if sign == "-" else value


# --- Bind parameters -------------------------------------------------------------------------

def _binary_int(data: bytes, size: int, name: str) -> int:
    if len(data) != size:
        raise KeyValueError(f"a binary {name} parameter must be {size} bytes, not {len(data)}")
    return int.from_bytes(data, "big", signed=True)


def _binary_int2(data: bytes) -> int:
    return _binary_int(data, 2, "int2")


def _binary_int4(data: bytes) -> int:
    return _binary_int(data, 4, "int4")


def _binary_int8(data: bytes) -> int:
    return _binary_int(data, 8, "int8")


_NUMERIC_POS = 0x0000
_NUMERIC_NEG = 0x4000
_NUMERIC_NAN = 0xC000
_NUMERIC_PINF = 0xD000
_NUMERIC_NINF = 0xF000


def _binary_numeric(data: bytes) -> Decimal:
    """PostgreSQL's numeric_send format: int16 ndigits, int16 weight, uint16 sign, uint16
    dscale, then ndigits base-10000 digits, the first one weighted 10000**weight."""
    if len(data) < 8:
        raise KeyValueError(f"a binary numeric parameter needs at least 8 bytes, not {len(data)}")
    ndigits = int.from_bytes(data[0:2], "big", signed=True)
    weight = int.from_bytes(data[2:4], "big", signed=True)
    sign = int.from_bytes(data[4:6], "big")
    dscale = int.from_bytes(data[6:8], "big")
    if sign == _NUMERIC_NAN:
        raise KeyValueError("a NaN numeric parameter cannot be a key (NaN sorts above every "
                            "number in PostgreSQL and has no place in a key order)")
    if sign == _NUMERIC_PINF:
        return Decimal("Infinity")
    if sign == _NUMERIC_NINF:
        return Decimal("-Infinity")
    if sign not in (_NUMERIC_POS, _NUMERIC_NEG):
        raise KeyValueError(f"invalid sign in a binary numeric parameter: 0x{sign:04x}")
    if ndigits < 0 or len(data) != 8 + 2 * ndigits:
        raise KeyValueError("a binary numeric parameter's length does not match its "
                            "digit count")
    if dscale > 0x3FFF:
        raise KeyValueError(f"invalid scale in a binary numeric parameter: {dscale}")
    digits = [int.from_bytes(data[i:i + 2], "big") for i in range(8, 8 + 2 * ndigits, 2)]
    if any(d > 9999 for d in digits):
        raise KeyValueError("invalid digit in a binary numeric parameter")
    # Build the coefficient as text (int->str is capped at 4300 digits; numeric is not) with
    # exactly dscale decimals; digits beyond dscale are truncated, as numeric_recv does.
    coefficient = "".join([f"{d:04d}" for d in digits])
    exponent = 4 * (weight - ndigits + 1)  # of the last digit's units, in powers of ten
    shift = exponent + dscale
    if shift >= 0:
        coefficient += "0" * shift
    else:
        coefficient = coefficient[:shift]
    return Decimal(f"{'-' if sign == _NUMERIC_NEG else ''}{coefficient or '0'}E-{dscale}")


def _binary_text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyValueError("a text parameter is not valid UTF-8") from None


def _binary_bpchar(data: bytes) -> str:
    return _binary_text(data).rstrip(" ")


def _binary_uuid(data: bytes) -> uuid.UUID:
    if len(data) != 16:
        raise KeyValueError(f"a binary uuid parameter must be 16 bytes, not {len(data)}")
    return uuid.UUID(bytes=data)


def _binary_date(data: bytes) -> datetime.date | _Infinity:
    days = _binary_int(data, 4, "date")
    if days == _INT4_MAX:
        return _Infinity.POS
    if days == _INT4_MIN:
        return _Infinity.NEG
    try:
        return _PG_EPOCH_DATE + datetime.timedelta(days=days)
    except OverflowError:
        raise KeyValueError(f"a binary date parameter is out of range: {days} days from "
                            f"2000-01-01 (years run from 1 to 9999)") from None


def _micros(data: bytes, name: str) -> int | _Infinity:
    micros = _binary_int(data, 8, name)
    if micros == _INT8_MAX:
        return _Infinity.POS
    if micros == _INT8_MIN:
        return _Infinity.NEG
    return micros


def _binary_timestamp(data: bytes) -> datetime.datetime | _Infinity:
    micros = _micros(data, "timestamp")
    if isinstance(micros, _Infinity):
        return micros
    try:
        return _PG_EPOCH + datetime.timedelta(microseconds=micros)
    except OverflowError:
        raise KeyValueError(f"a binary timestamp parameter is out of range: {micros} µs "
                            f"from 2000-01-01 (years run from 1 to 9999)") from None


def _binary_timestamptz(data: bytes) -> datetime.datetime | _Infinity:
    micros = _micros(data, "timestamptz")
    if isinstance(micros, _Infinity):
        return micros
    try:
        return _PG_EPOCH_UTC + datetime.timedelta(microseconds=micros)
    except OverflowError:
        raise KeyValueError(f"a binary timestamptz parameter is out of range: {micros} µs "
                            f"from 2000-01-01 (years run from 1 to 9999)") from None


_BINARY: dict[int, Callable[[bytes], Any]] = {
    INT2_OID: _binary_int2,
    INT4_OID: _binary_int4,
    INT8_OID: _binary_int8,
    NUMERIC_OID: _binary_numeric,
    TEXT_OID: _binary_text,
    VARCHAR_OID: _binary_text,
    NAME_OID: _binary_text,
    BPCHAR_OID: _binary_bpchar,
    UUID_OID: _binary_uuid,
    DATE_OID: _binary_date,
    TIMESTAMP_OID: _binary_timestamp,
    TIMESTAMPTZ_OID: _binary_timestamptz,
}

# Text-format parameters of these types are read with the key type's own input rules: an
# unspecified type takes the key column's type in `col = $1`, and text types hold the text.
_TEXT_AS_KEY = frozenset({0, UNKNOWN_OID, TEXT_OID, VARCHAR_OID, NAME_OID})
# Text-format parameters of these types are read as that type first, then converted, since
# the conversion can differ from reading the text as the key type (a timestamptz parameter
# for a timestamp key applies its zone; a date parameter for a timestamp key is midnight).
_TEXT_AS_TYPE: dict[int, Callable[[str, str], Any]] = {
    INT2_OID: lambda text, tz: _parse_int(text),
    INT4_OID: lambda text, tz: _parse_int(text),
    INT8_OID: lambda text, tz: _parse_int(text),
    NUMERIC_OID: lambda text, tz: _parse_numeric(text),
    BPCHAR_OID: lambda text, tz: text.rstrip(" "),
    UUID_OID: lambda text, tz: _parse_uuid(text),
    DATE_OID: lambda text, tz: _parse_date(text),
    TIMESTAMP_OID: lambda text, tz: _parse_timestamp(text),
    TIMESTAMPTZ_OID: _parse_timestamptz,
}


def decode_param(data: bytes | None, fmt: int, type_oid: int, key_type: KeyType, *,
                 timezone: str = "UTC") -> KeyValue | None:
    """The key a Bind parameter value carries; None for NULL (`data is None`).

    `fmt` is the parameter's format code (0 text, 1 binary). `type_oid` is its type as declared
    at Parse or, when declared 0 or unknown (705), as the server resolved it, if known (its
    ParameterDescription). Text values of an unspecified or textual type are read with the key
    type's input rules; text values of a typed parameter (int2/4/8, numeric, bpchar, uuid, date,
    timestamp, timestamptz) and binary values are read as that type, then converted to the key
    type as PostgreSQL converts them (an int4 for a numeric key is a Decimal, a timestamptz for
    a timestamp key is its local time in `timezone`).

    A binary value of an unspecified type (0, or 705: PostgreSQL resolves a parameter declared
    unknown from its context, exactly like an unspecified one) cannot be read: KeyValueError.
    """
    if data is None:
        return None
    convert = _CONVERT[key_type]
    if fmt == 0:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise KeyValueError("a text parameter is not valid UTF-8") from None
        if type_oid in _TEXT_AS_KEY:
            return convert(text, timezone)
        parse = _TEXT_AS_TYPE.get(type_oid)
        if parse is None:
            raise KeyValueError(f"parameters of type OID {type_oid} cannot be "
                                f"{_KEY_NAMES[key_type]} keys")
        return convert(parse(text, timezone), timezone)
    if fmt == 1:
        decode = _BINARY.get(type_oid)
        if decode is None:
            if type_oid in (0, UNKNOWN_OID):
                raise KeyValueError("a binary parameter of unspecified type cannot be read: "
                                    "declare its type at Parse or send it in text format")
            raise KeyValueError(f"binary parameters of type OID {type_oid} cannot be "
                                f"{_KEY_NAMES[key_type]} keys")
        return convert(decode(data), timezone)
    raise KeyValueError(f"invalid parameter format code {fmt}: expected 0 (text) or 1 (binary)")
