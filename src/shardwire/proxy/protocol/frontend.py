"""The client side of a connection up to authentication: a sans-IO state machine.

`Handshake.feed(bytes)` returns actions for the server module to carry out. It handles
SSLRequest, GSSENCRequest, CancelRequest, the StartupMessage (with protocol version
negotiation) and authentication (trust or SCRAM-SHA-256).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from ...config.model import AuthMethod, User
from . import auth
from . import messages as m
from .errors import PgError
from .framing import FrameError, MessageReader, read_startup_packet

_I32 = struct.Struct("!i")

# Startup parameters that are about the connection, not session settings to replay.
CONNECTION_PARAMETERS = frozenset({"user", "database", "replication", "options"})


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes


@dataclass(frozen=True, slots=True)
class StartTls:
    """Answer 'S' was queued; wrap the socket in TLS before reading further."""


@dataclass(frozen=True, slots=True)
class CancelQuery:
    pid: int
    secret: int


@dataclass(frozen=True, slots=True)
class Authenticated:
    user: str
    database: str
    settings: dict[str, str]  # session settings from the startup packet, names lower-cased
    admin: bool


@dataclass(frozen=True, slots=True)
class Reject:
    """Send the error and close the connection."""

    error: PgError


Action = Send | StartTls | CancelQuery | Authenticated | Reject


class Phase(enum.Enum):
    STARTUP = "startup"
    SASL_INITIAL = "sasl initial"
    SASL_CONTINUE = "sasl continue"
    DONE = "done"


class Handshake:
    def __init__(self, *, users: Mapping[str, User], auth_method: AuthMethod,
                 database: str, admin_database: str, tls_available: bool,
                 fake_salt_key: bytes = b"") -> None:
        self.users = users
        self.auth_method = auth_method
        self.database = database
        self.admin_database = admin_database
        self.tls_available = tls_available
        self.fake_salt_key = fake_salt_key
        self.phase = Phase.STARTUP
        self.tls_done = False
        self._buf = b""
        self._reader = MessageReader(max_size=10000, allowed=frozenset(b"p"))
        self._scram: auth.ScramServer | None = None
        self._user = ""
        self._db = ""
        self._settings: dict[str, str] = {}
        self._admin = False
        self._known_user = False

    def feed(self, data: bytes) -> list[Action]:
        try:
            if self.phase is Phase.STARTUP:
                return self._feed_startup(data)
            out: list[Action] = []
            for kind, body in self._reader.feed(data):
                out.extend(self._auth_message(kind, body))
                if self.phase is Phase.DONE:
                    break
            return out
        except FrameError as e:
            return [Reject(e)]
        except PgError as e:
            return [Reject(PgError(e.sqlstate, e.message, e.hint, e.detail, fatal=True))]

    def _feed_startup(self, data: bytes) -> list[Action]:
        self._buf += data
        out: list[Action] = []
        while self.phase is Phase.STARTUP:
            body, self._buf = read_startup_packet(self._buf)
            if body is None:
                return out
            code = _I32.unpack_from(body, 0)[0]
            if code == m.SSL_REQUEST:
                if self.tls_done:
                    raise PgError("08P01", "SSLRequest after TLS was established", fatal=True)
                if self._buf:
                    # Bytes after an SSLRequest before the TLS handshake would bypass it.
                    raise PgError("08P01", "received unencrypted data after SSL request",
                                  fatal=True)
                if self.tls_available:
                    self.tls_done = True
                    return out + [Send(b"S"), StartTls()]
                out.append(Send(b"N"))
            elif code == m.GSSENC_REQUEST:
                out.append(Send(b"N"))
            elif code == m.CANCEL_REQUEST:
                if len(body) != 12:
                    raise PgError("08P01", "invalid length of cancel request", fatal=True)
                pid, secret = struct.unpack_from("!ii", body, 4)
                return [CancelQuery(pid, secret)]
            elif code >> 16 == 3:
                out.extend(self._startup(code, body[4:]))
            else:
                raise PgError(
                    "0A000", f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
                    "server supports 3.0 to 3.0", fatal=True)
        # Messages that followed the startup packet in the same read.
        rest, self._buf = self._buf, b""
        if rest and self.phase is not Phase.DONE:
            out.extend(self.feed(rest))
        elif rest:
            raise PgError("08P01", "unexpected data before authentication completed",
                          fatal=True)
        return out

    def _startup(self, code: int, payload: bytes) -> list[Action]:
        params = m.parse_startup_params(payload)
        out: list[Action] = []
        unknown_options = [k for k in params if k.startswith("_pq_.")]
        if code & 0xFFFF or unknown_options:
            # Ask for 3.0 without the protocol options, as PostgreSQL does.
            body = _I32.pack(3 << 16) + _I32.pack(len(unknown_options)) + b"".join(
                m.cstring(o) for o in unknown_options)
            out.append(Send(m.message(b"v", body)))
        user = params.get("user", "")
        if not user:
            raise PgError("28000", "no PostgreSQL user name specified in startup packet",
                          fatal=True)
        if "replication" in params and params["replication"].lower() not in ("false", "off",
                                                                              "no", "0"):
            raise PgError("0A000", "replication connections are not supported by Shardwire",
                          hint="connect to a shard directly for replication", fatal=True)
        db = params.get("database") or user
        self._user, self._db = user, db
        self._settings = {k.lower(): _clean_value(k.lower(), v) for k, v in params.items()
                          if k not in CONNECTION_PARAMETERS and not k.startswith("_pq_.")}
        self._settings.update(_parse_options(params.get("options", "")))
        cfg = self.users.get(user)
        self._known_user = cfg is not None
        self._admin = bool(cfg and cfg.admin)
        if self.auth_method is AuthMethod.TRUST and cfg is not None:
            return out + self._finish()
        if cfg is None or cfg.scram_verifier is None:
            # Run the exchange anyway, as PostgreSQL does, so a client cannot tell which
            # user names exist: the salt depends only on the name and a per-process secret.
            digest = hmac.new(self.fake_salt_key, user.encode(), hashlib.sha256).digest()
            verifier = auth.parse_scram_verifier(auth.make_scram_verifier(
                os.urandom(16).hex(), salt=digest[:16]))
        else:
            verifier = auth.parse_scram_verifier(cfg.scram_verifier)
        self._scram = auth.ScramServer(verifier)
        self.phase = Phase.SASL_INITIAL
        out.append(Send(m.auth_sasl(["SCRAM-SHA-256"])))
        return out

    def _auth_message(self, kind: int, body: bytes) -> list[Action]:
        assert self._scram is not None
        try:
            if self.phase is Phase.SASL_INITIAL:
                mech_end = body.index(0)
                mechanism = body[:mech_end].decode("ascii", "replace")
                if mechanism != "SCRAM-SHA-256":
                    raise PgError("28000", "client selected an invalid SASL authentication "
                                  f"mechanism {mechanism!r}", fatal=True)
                (length,) = _I32.unpack_from(body, mech_end + 1)
                data = body[mech_end + 5:]
                if length != len(data):
                    raise PgError("08P01", "malformed SASLInitialResponse message", fatal=True)
                reply = self._scram.handle_client_first(data)
                self.phase = Phase.SASL_CONTINUE
                return [Send(m.auth_sasl_continue(reply))]
            if self.phase is Phase.SASL_CONTINUE:
                reply = self._scram.handle_client_final(body)
                if not self._known_user:
                    raise auth.AuthFailed(self._user)
                return [Send(m.auth_sasl_final(reply))] + self._finish()
        except (ValueError, struct.error) as e:
            raise PgError("08P01", "malformed SASL message", fatal=True) from e
        except auth.AuthFailed as e:
            raise PgError("28P01", f'password authentication failed for user "{self._user}"',
                          fatal=True) from e
        raise PgError("08P01", "unexpected message during authentication", fatal=True)

    def _finish(self) -> list[Action]:
        if self._db == self.admin_database:
            if not self._admin:
                raise PgError("42501", f'user "{self._user}" is not an admin of Shardwire',
                              hint="admin users are marked `admin: true` in the config",
                              fatal=True)
        elif self._db != self.database:
            raise PgError("3D000", f'database "{self._db}" does not exist',
                          hint=f'this Shardwire serves the database "{self.database}"',
                          fatal=True)
        self.phase = Phase.DONE
        return [Send(m.AUTH_OK),
                Authenticated(self._user, self._db, self._settings, self._admin)]


def _clean_value(name: str, value: str) -> str:
    """PostgreSQL replaces non-ASCII bytes of application_name with '?' (as version 15 does);
    other values that are not valid UTF-8 are kept byte for byte (and the server judges them)."""
    if name == "application_name" and not value.isascii():
        raw = value.encode("utf-8", "surrogateescape")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return "".join(chr(b) if b < 128 else "?" for b in raw)
    return value


def _parse_options(options: str) -> dict[str, str]:
    """`-c name=value` and `--name=value` settings from the startup `options` parameter."""
    out: dict[str, str] = {}
    words = _split_options(options)
    i = 0
    while i < len(words):
        w = words[i]
        if w == "-c" and i + 1 < len(words):
            w = words[i + 1]
            i += 1
        elif w.startswith("-c"):
            w = w[2:]
        elif w.startswith("--"):
            w = w[2:]
        else:
            raise PgError("0A000", f"unsupported startup option {w!r}",
                          hint="only -c name=value settings are supported in options",
                          fatal=True)
        name, eq, value = w.partition("=")
        if not eq:
            raise PgError("22023", f"invalid startup option {w!r}", fatal=True)
        out[name.replace("-", "_").lower()] = value
        i += 1
    return out


def _split_options(options: str) -> list[str]:
    """Split on unescaped whitespace; a backslash escapes the next character (libpq's rule)."""
    words: list[str] = []
    cur: list[str] = []
    escape = False
    for ch in options:
        if escape:
            cur.append(ch)
            escape = False
        elif ch == "\\":
            escape = True
        elif ch.isspace():
            if cur:
                words.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
    if cur:
        words.append("".join(cur))
    return words
