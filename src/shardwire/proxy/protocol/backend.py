"""Logging in to a PostgreSQL server: a sans-IO state machine for the proxy's server side.

Trust, cleartext, md5 and SCRAM-SHA-256 authentication. The I/O layer sends what `start` and
`feed` return and stops feeding once `ready` is true; leftover bytes after ReadyForQuery are
returned by `feed` in `rest` (a server sends none before the first query, but be exact).
"""

from __future__ import annotations

import struct

from . import auth
from . import messages as m
from .errors import PgError
from .framing import MessageReader

_I32 = struct.Struct("!i")


class BackendLoginError(PgError):
    pass


class BackendHandshake:
    def __init__(self, *, user: str, database: str, password: str | None,
                 settings: dict[str, str] | None = None) -> None:
        self.user = user
        self.database = database
        self.password = password
        self.settings = dict(settings or {})
        self.parameters: dict[str, str] = {}  # ParameterStatus as reported (original case)
        self.pid = 0
        self.secret = 0
        self.ready = False
        self._reader = MessageReader(max_size=1 << 20)
        self._scram: auth.ScramClient | None = None

    def start(self) -> bytes:
        params = {"user": self.user, "database": self.database}
        params.update(self.settings)
        return m.startup_message(params)

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        """Returns (bytes to send to the server, bytes that arrived after ReadyForQuery)."""
        out: list[bytes] = []
        msgs = self._reader.feed(data)
        for i, (kind, body) in enumerate(msgs):
            if kind == 0x52:  # R
                out.append(self._auth(body))
            elif kind == 0x53:  # S
                name, _, rest = body.partition(b"\x00")
                self.parameters[name.decode()] = rest.partition(b"\x00")[0].decode()
            elif kind == 0x4B:  # K
                self.pid, self.secret = struct.unpack_from("!ii", body, 0)
            elif kind == 0x45:  # E
                f = m.parse_error_fields(body)
                raise BackendLoginError(f.get("C", "08006"), f.get("M", "login failed"),
                                        hint=f.get("H"), detail=f.get("D"))
            elif kind == 0x5A:  # Z
                self.ready = True
                rest = b"".join(m.message(bytes((k,)), b) for k, b in msgs[i + 1:])
                return b"".join(out), rest
            elif kind in (0x4E, 0x76):  # NoticeResponse, NegotiateProtocolVersion
                continue
            else:
                raise BackendLoginError("08P01", f"unexpected message {chr(kind)!r} at login")
        return b"".join(out), b""

    def _auth(self, body: bytes) -> bytes:
        code = _I32.unpack_from(body, 0)[0]
        if code == 0:
            return b""
        if code in (3, 5, 10) and self.password is None:
            raise BackendLoginError(
                "28P01", f'the server asks a password for user "{self.user}" and the '
                "config has none", hint="put the password in the shard's connection string")
        assert self.password is not None or code in (11, 12)
        if code == 3:
            return m.password_message(m.cstring(self.password or ""))
        if code == 5:
            return m.password_message(
                m.cstring(auth.md5_password_message(self.user, self.password or "",
                                                    body[4:8])))
        if code == 10:
            mechanisms = body[4:].split(b"\x00")
            if b"SCRAM-SHA-256" not in mechanisms:
                raise BackendLoginError("28000", "the server offers no SASL mechanism Shardwire "
                                        f"supports: {mechanisms!r}")
            self._scram = auth.ScramClient(self.password or "")
            return m.sasl_initial_response("SCRAM-SHA-256", self._scram.client_first())
        if code == 11 and self._scram is not None:
            return m.password_message(self._scram.client_final(body[4:]))
        if code == 12 and self._scram is not None:
            try:
                self._scram.verify_server_final(body[4:])
            except auth.AuthFailed as e:
                raise BackendLoginError("28000", "the server's SCRAM signature is wrong") from e
            return b""
        raise BackendLoginError("28000", f"unsupported authentication request {code}")
