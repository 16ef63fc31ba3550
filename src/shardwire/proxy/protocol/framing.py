"""Splitting a byte stream into wire-protocol messages, without copying what passes through."""

from __future__ import annotations

import struct

from .errors import PgError

_LEN = struct.Struct("!I").unpack_from

# Message types a client may send after authentication (PostgreSQL's frontend message set).
FRONTEND_TYPES = frozenset(b"QPBEDCSHXdcfF")

# The largest message PostgreSQL accepts from a client before authentication.
MAX_STARTUP_PACKET = 10000


class FrameError(PgError):
    pass


class MessageReader:
    """Frames typed messages (`type byte, int32 length, payload`) out of received bytes.

    `feed` returns complete messages as (type, payload) pairs and keeps any partial tail. A length
    that is impossible or beyond `max_size` raises a fatal 08P01 error: the stream cannot be
    resynchronised after that. A large message arriving in many pieces is collected in linear
    time.
    """

    __slots__ = ("_buf", "_need", "max_size", "allowed")

    def __init__(self, max_size: int, allowed: frozenset[int] | None = None) -> None:
        self._buf = bytearray()
        self._need = 0  # bytes the buffer must hold before a message can be complete
        self.max_size = max_size
        self.allowed = allowed

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held back."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf: bytes | bytearray
        if self._buf:
            self._buf += data
            if len(self._buf) < self._need:
                return []
            buf = self._buf
        else:
            buf = data
        out: list[tuple[int, bytes]] = []
        pos = 0
        n = len(buf)
        allowed = self.allowed
        need = 5
        while n - pos >= 5:
            kind = buf[pos]
            if allowed is not None and kind not in allowed:
                self._buf = bytearray()
                raise FrameError("08P01", f"invalid frontend message type {kind}", fatal=True)
            length = _LEN(buf, pos + 1)[0]
            if length < 4 or length > self.max_size:
                self._buf = bytearray()
                raise FrameError(
                    "08P01", f"invalid message length {length} for message type {chr(kind)!r}",
                    hint=f"messages are limited to {self.max_size} bytes", fatal=True)
            end = pos + 1 + length
            if end > n:
                need = end - pos
                break
            out.append((kind, bytes(buf[pos + 5:end])))
            pos = end
        if pos < n:
            self._buf = bytearray(buf[pos:]) if buf is not self._buf or pos else self._buf
            self._need = need
        else:
            self._buf = bytearray()
            self._need = 0
        return out

    def split_whole(self, data: bytes) -> tuple[list[tuple[int, bytes]], bool]:
        """Like `feed`, and also says whether `data` was exactly the returned messages
        (nothing held back before or after), so the caller may forward `data` itself."""
        whole = not self._buf
        msgs = self.feed(data)
        return msgs, whole and not self._buf


def check_frontend_message(kind: int, body: bytes) -> None:
    """Check the layout of the client messages the proxy reads into (before anything is sent
    or queued), so a malformed one is refused at once with 08P01."""
    try:
        if kind == 0x51:  # Query
            ok = body[-1:] == b"\x00"
        elif kind == 0x50:  # Parse: name, query, int16 count, count * int32
            q = body.index(0, body.index(0) + 1)
            count = int.from_bytes(body[q + 1:q + 3], "big")
            ok = len(body) == q + 3 + 4 * count
        elif kind == 0x42:  # Bind: portal, statement, ...
            ok = body.index(0, body.index(0) + 1) + 2 <= len(body)
        elif kind in (0x44, 0x43):  # Describe, Close
            ok = len(body) >= 2 and body[0] in (0x53, 0x50) and body.index(0) == len(body) - 1
        else:
            ok = True
    except ValueError:
        ok = False
    if not ok:
        raise FrameError("08P01", f"invalid {chr(kind)!r} message format", fatal=True)


def read_startup_packet(buf: bytes) -> tuple[bytes | None, bytes]:
    """An untyped startup-phase packet (int32 length including itself, then body).

    Returns (body or None if incomplete, rest of buffer).
    """
    if len(buf) < 4:
        return None, buf
    length = _LEN(buf, 0)[0]
    if length < 8 or length > MAX_STARTUP_PACKET:
        raise FrameError("08P01", f"invalid length of startup packet ({length})", fatal=True)
    if len(buf) < length:
        return None, buf
    return buf[4:length], buf[length:]
