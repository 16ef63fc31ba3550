"""What a merge knows about PostgreSQL types, by type OID: how to order values, when two
values are equal, how to read a value for re-aggregation, and how to send it in binary.

Shards always send text. Text output is read as PostgreSQL prints it with the settings the
executor keeps on every shard connection: DateStyle ISO, bytea_output hex, the same TimeZone
and extra_float_digits on all shards.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

from . import numeric
from .errors import MergeRefused

BOOL = 16
BYTEA = 17
CHAR = 18
NAME = 19
INT8 = 20
INT2 = 21
INT4 = 23
TEXT = 25
OID = 26
JSON = 114
FLOAT4 = 700
FLOAT8 = 701
UNKNOWN = 705
MONEY = 790
BPCHAR = 1042
VARCHAR = 1043
DATE = 1082
TIME = 1083
TIMESTAMP = 1114
TIMESTAMPTZ = 1184
INTERVAL = 1186
TIMETZ = 1266
NUMERIC = 1700
UUID = 2950
JSONB = 3802

NAMES: dict[int, str] = {
    BOOL: "boolean", BYTEA: "bytea", CHAR: '"char"', NAME: "name", INT8: "bigint",
    INT2: "smallint", INT4: "integer", TEXT: "text", OID: "oid", JSON: "json", 142: "xml",
    FLOAT4: "real", FLOAT8: "double precision", UNKNOWN: "unknown", MONEY: "money",
    BPCHAR: "character", VARCHAR: "character varying", DATE: "date",
    TIME: "time without time zone", TIMESTAMP: "timestamp without time zone",
    TIMESTAMPTZ: "timestamp with time zone", INTERVAL: "interval",
    TIMETZ: "time with time zone", NUMERIC: "numeric", UUID: "uuid", JSONB: "jsonb",
    1000: "boolean[]", 1005: "smallint[]", 1007: "integer[]", 1016: "bigint[]",
    1009: "text[]", 1015: "character varying[]", 1003: "name[]", 2951: "uuid[]",
    1182: "date[]", 1021: "real[]", 1022: "double precision[]", 1231: "numeric[]",
    1115: "timestamp without time zone[]", 1185: "timestamp with time zone[]",
}


def type_name(oid: int) -> str:
    return NAMES.get(oid, f"type with OID {oid}")


# Types whose order depends on a collation; `name` always sorts as "C".
COLLATABLE = frozenset({TEXT, VARCHAR, BPCHAR, UNKNOWN})
C_COLLATIONS = frozenset({"c", "posix", "c.utf8", "c.utf-8"})


def is_c_collation(collation: str) -> bool:
    """Collations under which text sorts by its UTF-8 bytes (strcmp order)."""
    return collation.lower() in C_COLLATIONS


# -- NaN, which PostgreSQL sorts above every other value (and equal to itself) -------------


class _NaN:
    """numeric and float NaN: above every number, equal only to itself."""

    __slots__ = ()

    def __lt__(self, other: object) -> bool:
        if other is NULLS_LAST or other is NULLS_FIRST:
            return NotImplemented
        return False

    def __le__(self, other: object) -> bool:
        if other is NULLS_LAST or other is NULLS_FIRST:
            return NotImplemented
        return other is self

    def __gt__(self, other: object) -> bool:
        if other is NULLS_LAST or other is NULLS_FIRST:
            return NotImplemented
        return other is not self

    def __ge__(self, other: object) -> bool:
        if other is NULLS_LAST or other is NULLS_FIRST:
            return NotImplemented
        return True

    def __eq__(self, other: object) -> bool:
        return other is self

    def __hash__(self) -> int:
        return 0x4E614E

    def __neg__(self) -> _NegNaN:
        return NEG_NAN

    def __repr__(self) -> str:
        return "NaN"


class _NegNaN:
    """A NaN in a descending key: below every number."""

    __slots__ = ()

    def __lt__(self, other: object) -> bool:
        if other is NULLS_LAST or other is NULLS_FIRST:
            return NotImplemented
        return other is not self

    def __le__(self, other: object) -> bool:
        if other is NULLS_LAST or other is NULLS_FIRST:
            return NotImplemented
        return True

    def __gt__(self, other: object) -> bool:
        if other is NULLS_LAST or other is NULLS_FIRST:
            return NotImplemented
        return False

    def __ge__(self, other: object) -> bool:
        if other is NULLS_LAST or other is NULLS_FIRST:
            return NotImplemented
        return other is self

    def __eq__(self, other: object) -> bool:
        return other is self

    def __hash__(self) -> int:
        return 0x2D4E614E

    def __neg__(self) -> _NaN:
        return NAN

    def __repr__(self) -> str:
        return "-NaN"


NAN = _NaN()
NEG_NAN = _NegNaN()


# -- NULL in a sort key --------------------------------------------------------------------


class _NullsLast:
    """A NULL where NULLs sort after every value (NaN included), equal only to itself.
    Equality and hashing are object identity: no Python-level __eq__ slows the comparison
    of ordinary keys."""

    __slots__ = ()

    def __lt__(self, other: object) -> bool:
        return False

    def __le__(self, other: object) -> bool:
        return other is self

    def __gt__(self, other: object) -> bool:
        return other is not self

    def __ge__(self, other: object) -> bool:
        return True

    def __repr__(self) -> str:
        return "NULL(last)"


class _NullsFirst:
    """A NULL where NULLs sort before every value, equal only to itself."""

    __slots__ = ()

    def __lt__(self, other: object) -> bool:
        return other is not self

    def __le__(self, other: object) -> bool:
        return True

    def __gt__(self, other: object) -> bool:
        return False

    def __ge__(self, other: object) -> bool:
        return other is self

    def __repr__(self) -> str:
        return "NULL(first)"


NULLS_LAST = _NullsLast()
NULLS_FIRST = _NullsFirst()


# -- reading text values ----------------------------------------------------------------

POSTGRES_EPOCH_JDATE = 2451545  # date2j(2000, 1, 1)
USECS_PER_DAY = 86_400_000_000
DATE_END = 0x7FFFFFFF  # date 'infinity' in binary
DATE_BEGIN = -0x80000000
TS_END = 0x7FFFFFFFFFFFFFFF
TS_BEGIN = -0x8000000000000000


def date2j(year: int, month: int, day: int) -> int:
    """PostgreSQL's date2j (Julian day of a proleptic Gregorian date; year 0 is 1 BC)."""
    if month > 2:
        month += 1
        year += 4800
    else:
        month += 13
        year += 4799
    century = year // 100
    julian = year * 365 - 32167
    julian += year // 4 - century + century // 4
    julian += 7834 * month // 256 + day
    return julian


# Dates and zone offsets already read, by their text: a column's timestamps share few of
# them, and date2j costs more than the rest of a timestamp. Bounded; a pure memo.
_DAYS: dict[bytes, int] = {}
_ZONES: dict[bytes, int] = {}
_MEMO_SIZE = 50_000
_FRACTION_SCALE = (1, 100_000, 10_000, 1_000, 100, 10, 1)
# ord("0") times the weights of the digits in "HH:MM:SS" (as seconds)
_DIGIT_ZEROS = 48 * (36000 + 3600 + 600 + 60 + 10 + 1)


def _remember(memo: dict[bytes, int], text: bytes, value: int) -> None:
    if len(memo) >= _MEMO_SIZE:
        memo.clear()
    memo[text] = value


def _is_iso_date(text: bytes) -> bool:
    """'YYYY-MM-DD', four digits of year: what the fast path reads."""
    return (len(text) == 10 and text[4] == 45 and text[7] == 45  # "-"
            and (text[:4] + text[5:7] + text[8:]).isdigit())


def _bad_datetime(raw: bytes, what: str) -> MergeRefused:
    return MergeRefused(
        f"cannot read the {what} value {raw.decode('utf-8', 'replace')!r} returned by a shard",
        hint="multi-shard results compare dates and times printed with DateStyle ISO: "
        "SET DateStyle = ISO")


def date_days(raw: bytes) -> int:
    """Days since 2000-01-01 of a date in DateStyle ISO ('2020-01-31', '0044-03-15 BC')."""
    known = _DAYS.get(raw)
    if known is not None:
        return known
    if raw == b"infinity":
        return DATE_END
    if raw == b"-infinity":
        return DATE_BEGIN
    try:
        bc = raw.endswith(b" BC")
        body = raw[:-3] if bc else raw
        y, m, d = body.split(b"-")
        year = int(y)
        if bc:
            year = 1 - year
        days = date2j(year, int(m), int(d)) - POSTGRES_EPOCH_JDATE
        if not bc and _is_iso_date(raw):
            _remember(_DAYS, raw, days)
        return days
    except ValueError:
        raise _bad_datetime(raw, "date") from None


def _time_micros(t: bytes) -> int:
    h, m, s = t.split(b":")
    sec, _, frac = s.partition(b".")
    micros = ((int(h) * 60 + int(m)) * 60 + int(sec)) * 1_000_000
    if frac:
        micros += int(frac.ljust(6, b"0")[:6])
    return micros


def _zone_seconds(z: bytes) -> int:
    """'+05', '-03:30', '+05:53:28' -> seconds east of UTC."""
    sign = -1 if z[:1] == b"-" else 1
    parts = z[1:].split(b":")
    seconds = int(parts[0]) * 3600
    if len(parts) > 1:
        seconds += int(parts[1]) * 60
    if len(parts) > 2:
        seconds += int(parts[2])
    return sign * seconds


def _timestamp_fast(raw: bytes, with_zone: bool) -> int | None:
    """`timestamp_micros` for 'YYYY-MM-DD HH:MM:SS[.f][zone]' (AD) whose date and zone were
    read before; None for anything else. May raise ValueError or IndexError on odd text.

    A date found in _DAYS is an ISO date of four-digit year, so the text is DateStyle ISO,
    where " HH:MM:SS" always follows."""
    if raw[-1] == 67:  # " BC"
        return None
    days = _DAYS.get(raw[:10])
    if days is None or raw[10] != 32:
        return None
    seconds = (raw[11] * 36000 + raw[12] * 3600 + raw[14] * 600 + raw[15] * 60
               + raw[17] * 10 + raw[18] - _DIGIT_ZEROS)
    if with_zone:
        offset = _ZONES.get(raw[19:])
        if offset is not None:  # no fraction
            return days * USECS_PER_DAY + (seconds - offset) * 1_000_000
        end = raw.find(b"+", 20)
        if end < 0:
            end = raw.find(b"-", 20)
        offset = _ZONES.get(raw[end:]) if end > 0 else None
        if offset is None:
            return None
    else:
        end = len(raw)
        if end == 19:
            return days * USECS_PER_DAY + seconds * 1_000_000
        offset = 0
    fraction = raw[20:end]
    if raw[19] != 46 or not 0 < len(fraction) <= 6 or not fraction.isdigit():  # "."
        return None
    return (days * USECS_PER_DAY + (seconds - offset) * 1_000_000
            + int(fraction) * _FRACTION_SCALE[len(fraction)])


def timestamp_micros(raw: bytes, with_zone: bool = False) -> int:
    """Microseconds since 2000-01-01 00:00 (UTC for timestamptz) of a timestamp printed in
    DateStyle ISO ('2020-01-31 12:00:00.5', '... +02', '... BC')."""
    try:
        fast = _timestamp_fast(raw, with_zone)
    except (ValueError, IndexError):
        fast = None
    if fast is not None:
        return fast
    if raw == b"infinity":
        return TS_END
    if raw == b"-infinity":
        return TS_BEGIN
    try:
        bc = raw.endswith(b" BC")
        body = raw[:-3] if bc else raw
        date_part, _, time_part = body.partition(b" ")
        y, m, d = date_part.split(b"-")
        year = int(y)
        if bc:
            year = 1 - year
        days = date2j(year, int(m), int(d)) - POSTGRES_EPOCH_JDATE
        offset = 0
        if with_zone:
            cut = max(time_part.rfind(b"+"), time_part.rfind(b"-"))
            if cut <= 0:
                raise ValueError
            zone = time_part[cut:]
            offset = _zone_seconds(zone)
            if not bc:
                _remember(_ZONES, zone, offset)
            time_part = time_part[:cut]
        micros = days * USECS_PER_DAY + _time_micros(time_part) - offset * 1_000_000
        if not bc and _is_iso_date(date_part):
            _remember(_DAYS, date_part, days)
        return micros
    except ValueError:
        raise _bad_datetime(raw, "timestamp") from None


def time_micros(raw: bytes) -> int:
    try:
        return _time_micros(raw)
    except ValueError:
        raise _bad_datetime(raw, "time") from None


def float_key(raw: bytes) -> Any:
    v = float(raw)
    return NAN if v != v else v


def numeric_key(raw: bytes) -> Any:
    d = Decimal(raw.decode())
    return NAN if d.is_nan() else d


def _bpchar_key(raw: bytes) -> bytes:
    return raw.rstrip(b" ")


def _bool_key(raw: bytes) -> bool:
    return raw == b"t"


def _bytea_key(raw: bytes) -> bytes:
    if not raw.startswith(b"\\x"):
        raise MergeRefused("a shard returned bytea in escape format",
                           hint="multi-shard results compare bytea printed as hex: "
                           "SET bytea_output = hex")
    return raw


def _timestamp_key(raw: bytes) -> int:
    try:
        fast = _timestamp_fast(raw, False)
    except (ValueError, IndexError):
        fast = None
    return fast if fast is not None else timestamp_micros(raw)


def _timestamptz_key(raw: bytes) -> int:
    try:
        fast = _timestamp_fast(raw, True)
    except (ValueError, IndexError):
        fast = None
    return fast if fast is not None else timestamp_micros(raw, True)


def _identity(raw: bytes) -> bytes:
    return raw


# Ascending sort key of a value's text, for types whose order the merge can reproduce.
# Text types sort by their bytes: only right under the C collation (the caller checks).
SORT_KEY: dict[int, Callable[[bytes], Any]] = {
    INT2: int, INT4: int, INT8: int, OID: int,
    FLOAT4: float_key, FLOAT8: float_key, NUMERIC: numeric_key,
    BOOL: _bool_key,
    TEXT: _identity, VARCHAR: _identity, UNKNOWN: _identity, NAME: _identity,
    BPCHAR: _bpchar_key,
    DATE: date_days, TIMESTAMP: _timestamp_key, TIMESTAMPTZ: _timestamptz_key,
    TIME: time_micros, UUID: _identity, BYTEA: _bytea_key,
}

# Types whose text output is canonical (equal values print the same text): equality by
# bytes. Arrays of such element types too (array equality also compares bounds, which the
# text shows).
_CANONICAL_TEXT = frozenset({
    CHAR, 1000, 1005, 1007, 1016, 1009, 1015, 1003, 2951, 1182, 1115,
})

# A key whose equality is PostgreSQL's equality, for DISTINCT and GROUP BY.
EQUALITY_KEY: dict[int, Callable[[bytes], Any]] = {
    **SORT_KEY, **{oid: _identity for oid in _CANONICAL_TEXT},
}


_INVERT = bytes(255 - i for i in range(256))


def descending(key: Callable[[bytes], Any], oid: int) -> Callable[[bytes], Any]:
    """The same order reversed. Numbers are negated; bytes are inverted and end with 0xFF,
    so that a longer string sorts before its prefix (no text value holds a zero byte)."""
    if key is _identity or key is _bpchar_key or key is _bytea_key:
        def inverted(raw: bytes) -> bytes:
            return key(raw).translate(_INVERT) + b"\xff"
        return inverted
    if key is _bool_key:
        return lambda raw: raw != b"t"
    if key is int:
        return lambda raw: -int(raw)
    return lambda raw: -key(raw)


# -- typed values for re-aggregation and HAVING --------------------------------------------

def read_int(raw: bytes) -> int:
    return int(raw)


def read_float(raw: bytes) -> float:
    return float(raw)


def read_numeric(raw: bytes) -> Decimal:
    try:
        return Decimal(raw.decode())
    except InvalidOperation:
        raise MergeRefused(f"cannot read the numeric value {raw!r} returned by a shard") \
            from None


def read_bool(raw: bytes) -> bool:
    return raw == b"t"


# -- binary output ------------------------------------------------------------------------

_H = struct.Struct("!h")
_I = struct.Struct("!i")
_UI = struct.Struct("!I")
_Q = struct.Struct("!q")
_F = struct.Struct("!f")
_D = struct.Struct("!d")


def _b_bool(raw: bytes) -> bytes:
    return b"\x01" if raw == b"t" else b"\x00"


def _b_int2(raw: bytes) -> bytes:
    return _H.pack(int(raw))


def _b_int4(raw: bytes) -> bytes:
    return _I.pack(int(raw))


def _b_int8(raw: bytes) -> bytes:
    return _Q.pack(int(raw))


def _b_oid(raw: bytes) -> bytes:
    return _UI.pack(int(raw))


def _b_float4(raw: bytes) -> bytes:
    return _F.pack(float(raw))


def _b_float8(raw: bytes) -> bytes:
    return _D.pack(float(raw))


def _b_numeric(raw: bytes) -> bytes:
    return numeric.binary(read_numeric(raw))


def _b_jsonb(raw: bytes) -> bytes:
    return b"\x01" + raw


def _b_date(raw: bytes) -> bytes:
    return _I.pack(date_days(raw))


def _b_timestamp(raw: bytes) -> bytes:
    return _Q.pack(timestamp_micros(raw))


def _b_timestamptz(raw: bytes) -> bytes:
    return _Q.pack(timestamp_micros(raw, True))


def _b_time(raw: bytes) -> bytes:
    return _Q.pack(time_micros(raw))


def _b_uuid(raw: bytes) -> bytes:
    return uuid.UUID(raw.decode()).bytes


def _b_bytea(raw: bytes) -> bytes:
    return bytes.fromhex(_bytea_key(raw)[2:].decode())


# Text value -> binary value, for the types a client may ask in binary.
TO_BINARY: dict[int, Callable[[bytes], bytes]] = {
    BOOL: _b_bool, INT2: _b_int2, INT4: _b_int4, INT8: _b_int8, OID: _b_oid,
    FLOAT4: _b_float4, FLOAT8: _b_float8, NUMERIC: _b_numeric,
    TEXT: _identity, VARCHAR: _identity, BPCHAR: _identity, NAME: _identity,
    UNKNOWN: _identity, JSON: _identity, JSONB: _b_jsonb, CHAR: _identity,
    DATE: _b_date, TIMESTAMP: _b_timestamp, TIMESTAMPTZ: _b_timestamptz, TIME: _b_time,
    UUID: _b_uuid, BYTEA: _b_bytea,
}

FLOAT_TYPES = frozenset({FLOAT4, FLOAT8})


def read_bool_or_none(raw: bytes | None) -> bool | None:
    return None if raw is None else raw == b"t"
