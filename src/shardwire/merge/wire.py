"""RowDescription and DataRow bodies: the only wire messages a merge reads or writes.

Bodies are the message payloads without the type byte and length word; frames are whole
messages, with them. A DataRow stays bytes until a merge needs one of its columns, and then
only that column is sliced out.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_FIELD = struct.Struct("!ihihih")
_NULL = _I32.pack(-1)
_DATA_ROW = struct.Struct("!cI")
FRAME_HEADER = 5  # type byte and length word before a message's body


@dataclass(frozen=True, slots=True)
class Field:
    """One column of a RowDescription."""

    name: str
    table_oid: int = 0
    column_number: int = 0
    type_oid: int = 25
    type_size: int = -1
    type_modifier: int = -1
    format: int = 0  # 0 text, 1 binary

    def with_format(self, fmt: int) -> Field:
        return self if fmt == self.format else replace(self, format=fmt)


def parse_row_description(body: bytes) -> list[Field]:
    (count,) = _I16.unpack_from(body, 0)
    pos = 2
    fields = []
    for _ in range(count):
        end = body.index(b"\x00", pos)
        name = body[pos:end].decode("utf-8", "surrogateescape")
        pos = end + 1
        table, column, oid, size, modifier, fmt = _FIELD.unpack_from(body, pos)
        pos += _FIELD.size
        fields.append(Field(name, table, column, oid, size, modifier, fmt))
    return fields


def encode_row_description(fields: Sequence[Field]) -> bytes:
    parts = [_I16.pack(len(fields))]
    for f in fields:
        parts.append(f.name.encode("utf-8", "surrogateescape") + b"\x00")
        parts.append(_FIELD.pack(f.table_oid, f.column_number, f.type_oid, f.type_size,
                                 f.type_modifier, f.format))
    return b"".join(parts)


def parse_data_row(body: bytes) -> list[bytes | None]:
    (count,) = _I16.unpack_from(body, 0)
    pos = 2
    unpack = _I32.unpack_from
    values: list[bytes | None] = []
    for _ in range(count):
        (size,) = unpack(body, pos)
        pos += 4
        if size < 0:
            values.append(None)
        else:
            values.append(body[pos:pos + size])
            pos += size
    return values


def encode_data_row(values: Sequence[bytes | None]) -> bytes:
    parts = [_I16.pack(len(values))]
    pack = _I32.pack
    for v in values:
        if v is None:
            parts.append(_NULL)
        else:
            parts.append(pack(len(v)))
            parts.append(v)
    return b"".join(parts)


def data_row_frame(body: bytes) -> bytes:
    """The whole DataRow message of a body."""
    return _DATA_ROW.pack(b"D", len(body) + 4) + body
