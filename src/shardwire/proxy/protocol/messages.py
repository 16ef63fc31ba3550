"""Encoding and decoding of the PostgreSQL v3 wire messages the proxy itself produces or reads.

Messages that only pass through are never decoded: see `framing`. Everything here is pure.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

from .errors import PgError

PROTOCOL_V3 = 196608  # 3.0
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102

_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_I16 = struct.Struct("!h")
_HDR = struct.Struct("!cI")

# Type OIDs used in result sets the proxy builds itself (admin console).
TEXT_OID = 25
INT8_OID = 20
INT4_OID = 23
BOOL_OID = 16
FLOAT8_OID = 701


def message(kind: bytes, payload: bytes = b"") -> bytes:
    """Frame one message: type byte, int32 length (counting itself), payload."""
    return _HDR.pack(kind, len(payload) + 4) + payload


def cstring(s: str | bytes) -> bytes:
    # surrogateescape: startup values that were not UTF-8 go back out byte for byte.
    return (s.encode("utf-8", "surrogateescape") if isinstance(s, str) else s) + b"\x00"


# --- backend (server -> client) messages -------------------------------------------------

AUTH_OK = message(b"R", _I32.pack(0))
PARSE_COMPLETE = message(b"1")
BIND_COMPLETE = message(b"2")
CLOSE_COMPLETE = message(b"3")
NO_DATA = message(b"n")
EMPTY_QUERY = message(b"I")


def auth_sasl(mechanisms: Iterable[str]) -> bytes:
    return message(b"R", _I32.pack(10) + b"".join(cstring(m) for m in mechanisms) + b"\x00")


def auth_sasl_continue(data: bytes) -> bytes:
    return message(b"R", _I32.pack(11) + data)


def auth_sasl_final(data: bytes) -> bytes:
    return message(b"R", _I32.pack(12) + data)


def parameter_status(name: str | bytes, value: str | bytes) -> bytes:
    return message(b"S", cstring(name) + cstring(value))


def backend_key_data(pid: int, secret: int) -> bytes:
    return message(b"K", _I32.pack(pid) + _I32.pack(secret))


def ready_for_query(status: bytes) -> bytes:
    return message(b"Z", status)


def error_response(err: PgError) -> bytes:
    return _notice_or_error(b"E", err.severity, err.sqlstate, err.message, err.hint, err.detail)


def notice_response(message_text: str, *, sqlstate: str = "00000", hint: str | None = None,
                    severity: str = "NOTICE") -> bytes:
    return _notice_or_error(b"N", severity, sqlstate, message_text, hint, None)


def _notice_or_error(kind: bytes, severity: str, sqlstate: str, text: str,
                     hint: str | None, detail: str | None) -> bytes:
    fields = [b"S" + cstring(severity), b"V" + cstring(severity), b"C" + cstring(sqlstate),
              b"M" + cstring(text)]
    if detail:
        fields.append(b"D" + cstring(detail))
    if hint:
        fields.append(b"H" + cstring(hint))
    return message(kind, b"".join(fields) + b"\x00")


def row_description(columns: Sequence[tuple[str, int]]) -> bytes:
    """Columns as (name, type oid), text format, no table attribution."""
    parts = [struct.pack("!h", len(columns))]
    for name, oid in columns:
        size = 8 if oid in (INT8_OID, FLOAT8_OID) else 4 if oid == INT4_OID else -1
        parts.append(cstring(name) + struct.pack("!ihihih", 0, 0, oid, size, -1, 0))
    return message(b"T", b"".join(parts))


def data_row(values: Sequence[object]) -> bytes:
    parts = [struct.pack("!h", len(values))]
    for v in values:
        if v is None:
            parts.append(_I32.pack(-1))
        else:
            if isinstance(v, bool):
                raw = b"t" if v else b"f"
            else:
                raw = str(v).encode()
            parts.append(_I32.pack(len(raw)) + raw)
    return message(b"D", b"".join(parts))


def command_complete(tag: str) -> bytes:
    return message(b"C", cstring(tag))


def parse_error_fields(payload: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse payload, keyed by their one-letter codes."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(payload) and payload[pos] != 0:
        code = chr(payload[pos])
        end = payload.index(0, pos + 1)
        fields[code] = payload[pos + 1:end].decode("utf-8", "replace")
        pos = end + 1
    return fields


# --- frontend (client -> server) messages ------------------------------------------------


def startup_message(params: dict[str, str]) -> bytes:
    body = _I32.pack(PROTOCOL_V3) + b"".join(
        cstring(k) + cstring(v) for k, v in params.items()) + b"\x00"
    return _I32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return _I32.pack(8) + _I32.pack(SSL_REQUEST)


def cancel_request(pid: int, secret: int) -> bytes:
    return _I32.pack(16) + _I32.pack(CANCEL_REQUEST) + _I32.pack(pid) + _I32.pack(secret)


def query(sql: str | bytes) -> bytes:
    return message(b"Q", cstring(sql))


def password_message(data: bytes) -> bytes:
    return message(b"p", data)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", cstring(mechanism) + _I32.pack(len(data)) + data)


TERMINATE = message(b"X")
SYNC = message(b"S")
FLUSH = message(b"H")


def parse_message(name: bytes, sql: bytes, param_types: bytes = b"\x00\x00") -> bytes:
    """A Parse message; `param_types` is the raw int16 count followed by the OIDs."""
    return message(b"P", name + b"\x00" + sql + b"\x00" + param_types)


def close_statement(name: bytes) -> bytes:
    return message(b"C", b"S" + name + b"\x00")


def parse_startup_params(payload: bytes) -> dict[str, str]:
    """The key/value pairs of a StartupMessage body (after the protocol version).

    Raises PgError(08P01) on a malformed body.
    """
    params: dict[str, str] = {}
    pos = 0
    n = len(payload)
    try:
        while pos < n and payload[pos] != 0:
            kend = payload.index(0, pos)
            vend = payload.index(0, kend + 1)
            key = payload[pos:kend].decode("utf-8", "surrogateescape")
            params[key] = payload[kend + 1:vend].decode("utf-8", "surrogateescape")
            pos = vend + 1
    except ValueError as e:
        raise PgError("08P01", "invalid startup packet layout: expected terminator as last byte",
                      fatal=True) from e
    if pos >= n:
        raise PgError("08P01", "invalid startup packet layout: expected terminator as last byte",
                      fatal=True)
    return params


I32 = _I32
U32 = _U32
I16 = _I16
