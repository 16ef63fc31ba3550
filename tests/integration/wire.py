"""A raw wire-protocol v3 client for the protocol tests: bytes on a socket, no driver between.

`RawClient` logs in with SCRAM-SHA-256 (or trust), sends whatever bytes a test builds with
the encoders below, and reads replies as (type, payload) pairs. `kinds(replies)` gives the
type letters as one string ("12DCZ"), which keeps assertions about message order readable.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterable, Mapping, Sequence

from shardwire.proxy.protocol import messages as m
from shardwire.proxy.protocol.auth import ScramClient

Message = tuple[bytes, bytes]  # (type byte, payload)

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")

GSSENC_REQUEST = _I32.pack(8) + _I32.pack(m.GSSENC_REQUEST)
SYNC = m.SYNC
FLUSH = m.FLUSH
TERMINATE = m.TERMINATE


class ConnectionClosed(Exception):
    """The peer closed the connection (EOF or reset) before the expected reply."""


class ServerError(Exception):
    """An ErrorResponse where the test expected something else (login refused, say)."""

    def __init__(self, fields: dict[str, str], replies: list[Message]) -> None:
        super().__init__(f"{fields.get('C')}: {fields.get('M')}")
        self.fields = fields
        self.replies = replies

    @property
    def sqlstate(self) -> str | None:
        return self.fields.get("C")

    @property
    def message(self) -> str:
        return self.fields.get("M", "")


# --- encoders ------------------------------------------------------------------------------


def startup(params: Mapping[str, str | bytes], version: int = m.PROTOCOL_V3) -> bytes:
    body = _I32.pack(version) + b"".join(
        m.cstring(k) + m.cstring(v) for k, v in params.items()) + b"\x00"
    return _I32.pack(len(body) + 4) + body


def query(sql: str | bytes) -> bytes:
    return m.query(sql)


def parse(name: str | bytes, sql: str | bytes, types: Sequence[int] = ()) -> bytes:
    body = _b(name) + b"\x00" + _b(sql) + b"\x00" + _I16.pack(len(types))
    body += b"".join(_I32.pack(t) for t in types)
    return m.message(b"P", body)


def bind(portal: str | bytes = b"", statement: str | bytes = b"",
         params: Sequence[bytes | str | None] = (), *,
         param_formats: Sequence[int] | None = None,
         result_formats: Sequence[int] = ()) -> bytes:
    """A Bind; `param_formats` defaults to none (all text); pass a list to disagree with
    the number of parameters on purpose."""
    formats = list(param_formats) if param_formats is not None else []
    body = _b(portal) + b"\x00" + _b(statement) + b"\x00"
    body += _I16.pack(len(formats)) + b"".join(_I16.pack(f) for f in formats)
    body += _I16.pack(len(params))
    for p in params:
        if p is None:
            body += _I32.pack(-1)
        else:
            raw = _b(p)
            body += _I32.pack(len(raw)) + raw
    body += _I16.pack(len(result_formats)) + b"".join(_I16.pack(f) for f in result_formats)
    return m.message(b"B", body)


def describe(kind: str, name: str | bytes = b"") -> bytes:
    """kind 'S' for a statement, 'P' for a portal."""
    return m.message(b"D", kind.encode() + _b(name) + b"\x00")


def execute(portal: str | bytes = b"", max_rows: int = 0) -> bytes:
    return m.message(b"E", _b(portal) + b"\x00" + _I32.pack(max_rows))


def close(kind: str, name: str | bytes = b"") -> bytes:
    return m.message(b"C", kind.encode() + _b(name) + b"\x00")


def _b(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


# --- reading replies -----------------------------------------------------------------------


def kinds(replies: Iterable[Message]) -> str:
    return "".join(k.decode("latin-1") for k, _ in replies)


def errors(replies: Iterable[Message]) -> list[dict[str, str]]:
    return [m.parse_error_fields(p) for k, p in replies if k == b"E"]


def sqlstates(replies: Iterable[Message]) -> list[str]:
    return [e.get("C", "") for e in errors(replies)]


def data_rows(replies: Iterable[Message]) -> list[tuple[str | None, ...]]:
    """The DataRows of the replies, text format decoded."""
    rows = []
    for k, p in replies:
        if k != b"D":
            continue
        (n,) = _I16.unpack_from(p, 0)
        pos = 2
        row: list[str | None] = []
        for _ in range(n):
            (size,) = _I32.unpack_from(p, pos)
            pos += 4
            if size < 0:
                row.append(None)
            else:
                row.append(p[pos:pos + size].decode())
                pos += size
        rows.append(tuple(row))
    return rows


def command_tags(replies: Iterable[Message]) -> list[str]:
    return [p.rstrip(b"\x00").decode() for k, p in replies if k == b"C"]


def ready_status(replies: Sequence[Message]) -> str:
    kind, payload = replies[-1]
    assert kind == b"Z", f"last reply is {kind!r}, not ReadyForQuery"
    return payload.decode()


def column_names(replies: Iterable[Message]) -> list[list[str]]:
    out = []
    for k, p in replies:
        if k != b"T":
            continue
        (n,) = _I16.unpack_from(p, 0)
        pos = 2
        names = []
        for _ in range(n):
            end = p.index(0, pos)
            names.append(p[pos:end].decode())
            pos = end + 1 + 18
        out.append(names)
    return out


def parameter_types(replies: Iterable[Message]) -> list[list[int]]:
    out = []
    for k, p in replies:
        if k == b"t":
            (n,) = _I16.unpack_from(p, 0)
            out.append([_I32.unpack_from(p, 2 + 4 * i)[0] for i in range(n)])
    return out


class RawClient:
    """One socket to a server speaking protocol v3 (the proxy, or PostgreSQL to compare)."""

    def __init__(self, host: str, port: int, *, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.pid: int | None = None
        self.secret: int | None = None
        self.parameters: dict[str, str] = {}

    # -- bytes ----------------------------------------------------------------------------

    def send(self, *chunks: bytes) -> None:
        self.sock.sendall(b"".join(chunks))

    def _fill(self) -> None:
        try:
            data = self.sock.recv(1 << 16)
        except ConnectionResetError as e:
            raise ConnectionClosed("connection reset by peer") from e
        if not data:
            raise ConnectionClosed("EOF")
        self.buf += data

    def read_byte(self) -> bytes:
        """One byte (the answer to SSLRequest or GSSENCRequest)."""
        while not self.buf:
            self._fill()
        b = bytes(self.buf[:1])
        del self.buf[:1]
        return b

    def read_message(self) -> Message:
        while len(self.buf) < 5:
            self._fill()
        kind = bytes(self.buf[:1])
        (length,) = struct.unpack_from("!I", self.buf, 1)
        while len(self.buf) < 1 + length:
            self._fill()
        payload = bytes(self.buf[5:1 + length])
        del self.buf[:1 + length]
        return kind, payload

    def read_until_ready(self) -> list[Message]:
        out = []
        while True:
            msg = self.read_message()
            out.append(msg)
            if msg[0] == b"Z":
                return out

    def read_syncs(self, count: int) -> list[Message]:
        """Replies up to and including the `count`-th ReadyForQuery."""
        out: list[Message] = []
        for _ in range(count):
            out += self.read_until_ready()
        return out

    def read_available(self, wait: float = 0.3) -> list[Message]:
        """Whatever complete messages arrive within `wait` seconds (no ReadyForQuery needed)."""
        out: list[Message] = []
        deadline = time.monotonic() + wait
        old = self.sock.gettimeout()
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.sock.settimeout(left)
                try:
                    out.append(self.read_message())
                except TimeoutError:
                    break
        finally:
            self.sock.settimeout(old)
        return out

    def read_until_ready_or_eof(self, timeout: float = 5.0) -> tuple[list[Message], bool]:
        """Replies up to ReadyForQuery or until the peer closes: (replies, closed).
        TimeoutError if neither happens within `timeout`."""
        out: list[Message] = []
        deadline = time.monotonic() + timeout
        old = self.sock.gettimeout()
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no ReadyForQuery and no close in {timeout}s; got {out}")
                self.sock.settimeout(left)
                try:
                    msg = self.read_message()
                except ConnectionClosed:
                    return out, True
                except TimeoutError:
                    continue
                out.append(msg)
                if msg[0] == b"Z":
                    return out, False
        finally:
            self.sock.settimeout(old)

    def read_to_eof(self, timeout: float = 5.0) -> list[Message]:
        """Messages the peer sends before it closes the connection. TimeoutError if it does
        not close within `timeout`."""
        out: list[Message] = []
        deadline = time.monotonic() + timeout
        old = self.sock.gettimeout()
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"connection still open after {timeout}s; got {out}")
                self.sock.settimeout(left)
                try:
                    out.append(self.read_message())
                except ConnectionClosed:
                    return out
                except TimeoutError:
                    continue
        finally:
            self.sock.settimeout(old)

    # -- login ----------------------------------------------------------------------------

    def login(self, user: str = "app", password: str | None = None, database: str = "app",
              *, version: int = m.PROTOCOL_V3, params: Mapping[str, str | bytes] | None = None,
              pre: bytes = b"") -> list[Message]:
        """Send a StartupMessage (after `pre`, if given) and authenticate. Returns every
        message up to ReadyForQuery; ServerError if the server refuses."""
        startup_params: dict[str, str | bytes] = {"user": user, "database": database}
        startup_params.update(params or {})
        self.send(pre + startup(startup_params, version))
        return self.authenticate(password)

    def authenticate(self, password: str | None) -> list[Message]:
        out: list[Message] = []
        scram: ScramClient | None = None
        while True:
            kind, payload = msg = self.read_message()
            out.append(msg)
            if kind == b"E":
                raise ServerError(m.parse_error_fields(payload), out)
            if kind == b"R":
                (code,) = _I32.unpack_from(payload, 0)
                if code == 10:
                    if password is None:
                        raise AssertionError("the server asks for a password, none given")
                    scram = ScramClient(password)
                    self.send(m.sasl_initial_response("SCRAM-SHA-256", scram.client_first()))
                elif code == 11:
                    assert scram is not None
                    self.send(m.password_message(scram.client_final(payload[4:])))
                elif code == 12:
                    assert scram is not None
                    scram.verify_server_final(payload[4:])
                elif code != 0:
                    raise AssertionError(f"unexpected authentication request {code}")
            elif kind == b"K":
                self.pid, self.secret = struct.unpack_from("!ii", payload, 0)
            elif kind == b"S":
                name, _, rest = payload.partition(b"\x00")
                self.parameters[name.decode()] = rest.partition(b"\x00")[0].decode()
            elif kind == b"Z":
                return out

    # -- statements -----------------------------------------------------------------------

    def query(self, sql: str | bytes) -> list[Message]:
        self.send(m.query(sql))
        return self.read_until_ready()

    def close(self) -> None:
        try:
            self.sock.sendall(m.TERMINATE)
        except OSError:
            pass
        self.sock.close()

    def abort(self) -> None:
        """Vanish: close with a TCP reset, no Terminate."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
