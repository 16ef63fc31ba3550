"""Splitting a byte stream into wire-protocol messages, without copying what passes through."""

from __future__ import annotations

import struct

from .errors import PgError

_LEN = struct.Struct("!I").unpack_from
_HEAD = struct.Struct("!BI").unpack_from  # type byte, length

# Message types a client may send after authentication (PostgreSQL's frontend message set).
FRONTEND_TYPES = frozenset(b"QPBEDCSHXdcfF")

# The largest message PostgreSQL accepts from a client before authentication.
MAX_STARTUP_PACKET = 10000


class FrameError(PgError):
    pass


class MessageReader:
    """Frames typed messages (`type byte, int32 length, payload`) out of received bytes.

    `feed` returns complete messages as (type, payload) pairs and keeps any partial tail;
    `frames` returns them whole (type byte and length word included), for a caller that
    forwards most of what it reads. A length that is impossible or beyond `max_size` raises
    a fatal 08P01 error: the stream cannot be resynchronised after that. A large message
    arriving in many pieces is collected in linear time.
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
        buf = self._join(data)
        out: list[tuple[int, bytes]] = []
        if buf is None:
            return out
        append = out.append
        allowed = self.allowed
        max_size = self.max_size
        pos = 0
        n = len(buf)
        while n - pos >= 5:
            kind, length = _HEAD(buf, pos)
            if allowed is not None and kind not in allowed:
                raise self._bad_type(kind)
            if length < 4 or length > max_size:
                raise self._bad_length(kind, length)
            end = pos + 1 + length
            if end > n:
                break
            append((kind, buf[pos + 5:end]))
            pos = end
        self._keep(buf, pos)
        return out

    def frames(self, data: bytes) -> list[bytes]:
        """Like `feed`, each message whole: `frame[0]` is its type, `frame[5:]` its payload,
        and the frame itself what to forward."""
        buf = self._join(data)
        out: list[bytes] = []
        if buf is None:
            return out
        append = out.append
        allowed = self.allowed
        max_size = self.max_size
        pos = 0
        n = len(buf)
        while n - pos >= 5:
            kind, length = _HEAD(buf, pos)
            if allowed is not None and kind not in allowed:
                raise self._bad_type(kind)
            if length < 4 or length > max_size:
                raise self._bad_length(kind, length)
            end = pos + 1 + length
            if end > n:
                break
            append(buf[pos:end])
            pos = end
        self._keep(buf, pos)
        return out

    def split_whole(self, data: bytes) -> tuple[list[tuple[int, bytes]], bool]:
        """Like `feed`, and also says whether `data` was exactly the returned messages
        (nothing held back before or after), so the caller may forward `data` itself."""
        whole = not self._buf
        msgs = self.feed(data)
        return msgs, whole and not self._buf

    def _join(self, data: bytes) -> bytes | None:
        """What to split: `data`, after the tail held back if there is one (joined into
        bytes once, so that every message is sliced out with a single copy); None while
        the message held back is still incomplete."""
        if type(data) is not bytes:
            data = bytes(data)  # slices must be bytes, whatever the caller had
        held = self._buf
        if not held:
            return data
        if len(held) + len(data) < self._need:
            held += data
            return None
        self._buf = bytearray()
        return b"".join((held, data))

    def _keep(self, buf: bytes, pos: int) -> None:
        """Hold back the incomplete tail `buf[pos:]`."""
        n = len(buf)
        if pos == n:
            self._need = 0
            return
        self._buf = bytearray(buf[pos:])
        # Until the header is there, 5 bytes; then the whole message.
        self._need = 1 + _HEAD(buf, pos)[1] if n - pos >= 5 else 5

    def _bad_type(self, kind: int) -> FrameError:
        self._buf = bytearray()
        return FrameError("08P01", f"invalid frontend message type {kind}", fatal=True)

    def _bad_length(self, kind: int, length: int) -> FrameError:
        self._buf = bytearray()
        return FrameError(
            "08P01", f"invalid message length {length} for message type {chr(kind)!r}",
            hint=f"messages are limited to {self.max_size} bytes", fatal=True)


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
