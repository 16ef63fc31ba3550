"""PostgreSQL password authentication, both sides of the proxy, without I/O.

`ScramServer` authenticates a client against a stored SCRAM-SHA-256 verifier; `ScramClient`
authenticates the proxy to a PostgreSQL server; `md5_password_message` answers a server's
AuthenticationMD5Password. Each takes and returns the SASL payloads only: framing them into
SASLInitialResponse / SASLResponse / AuthenticationSASLContinue / AuthenticationSASLFinal is
the caller's job.

SCRAM follows RFC 5802 with SHA-256 (RFC 7677) and PostgreSQL's choices: no channel binding
(only the 'SCRAM-SHA-256' mechanism), no authorization identity, the username in the
client-first-message is ignored (the startup packet's user counts), and passwords are
SASLprepped but used raw when SASLprep refuses them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from dataclasses import dataclass, field
from enum import Enum, auto

__all__ = [
    "MECHANISM",
    "AuthFailed",
    "ScramClient",
    "ScramServer",
    "ScramVerifier",
    "make_scram_verifier",
    "md5_password_message",
    "parse_scram_verifier",
    "saslprep",
]

MECHANISM = "SCRAM-SHA-256"

_KEY_LEN = 32  # SHA-256 digest size: StoredKey, ServerKey, ClientProof, ServerSignature
_DEFAULT_SALT_LEN = 16  # what PostgreSQL uses for new verifiers
_RAW_NONCE_LEN = 18  # PostgreSQL's random nonce length before base64
_MAX_ITERATIONS = 2**31 - 1  # PostgreSQL keeps the count in an int


def _parse_iterations(text: str) -> int | None:
    """A positive iteration count that PostgreSQL could store, else None."""
    if not (text.isascii() and text.isdigit()) or len(text) > 10:
        return None
    value = int(text)
    return value if 1 <= value <= _MAX_ITERATIONS else None


class AuthFailed(Exception):
    """Authentication was refused.

    ``str(exc)`` is PostgreSQL's message and is safe to send to the client with `sqlstate`;
    `detail` says what actually went wrong and belongs in the proxy's log only, since
    telling a client *why* would help someone guessing passwords.
    """

    sqlstate = "28P01"  # invalid_password

    def __init__(self, user: str, detail: str = "") -> None:
        super().__init__(f'password authentication failed for user "{user}"')
        self.user = user
        self.detail = detail


@dataclass(frozen=True, slots=True)
class ScramVerifier:
    """A parsed SCRAM-SHA-256 secret, as stored in pg_authid.rolpassword."""

    iterations: int
    salt: bytes
    # Either key lets its holder impersonate one side, so keep them out of logs.
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.iterations <= _MAX_ITERATIONS:
            raise ValueError(f"iteration count must be 1..{_MAX_ITERATIONS}, got {self.iterations}")
        if not self.salt:
            raise ValueError("salt is empty")
        if len(self.stored_key) != _KEY_LEN or len(self.server_key) != _KEY_LEN:
            raise ValueError(f"StoredKey and ServerKey must be {_KEY_LEN} bytes each")


# --- SASLprep (RFC 4013) ----------------------------------------------------------------

_PROHIBITED = (
    stringprep.in_table_c12,  # non-ASCII space
    stringprep.in_table_c21_c22,  # control characters
    stringprep.in_table_c3,  # private use
    stringprep.in_table_c4,  # non-character code points
    stringprep.in_table_c5,  # surrogates
    stringprep.in_table_c6,  # inappropriate for plain text
    stringprep.in_table_c7,  # inappropriate for canonical representation
    stringprep.in_table_c8,  # change display properties / deprecated
    stringprep.in_table_c9,  # tagging characters
    stringprep.in_table_a1,  # unassigned in Unicode 3.2 (stored strings refuse them)
)


def _saslprep_strict(text: str) -> str:
    # 1. Map: non-ASCII spaces to SPACE, "commonly mapped to nothing" removed.
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch for ch in text if not stringprep.in_table_b1(ch)
    )
    if not mapped:
        raise ValueError("nothing left after mapping")
    # 2. Normalize with the Unicode version stringprep's tables are built on.
    normalized = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)
    # 3. Prohibit.
    for ch in normalized:
        if any(in_table(ch) for in_table in _PROHIBITED):
            raise ValueError(f"prohibited character U+{ord(ch):04X}")
    # 4. Bidirectional text (RFC 3454 section 6).
    if any(stringprep.in_table_d1(ch) for ch in normalized):
        if any(stringprep.in_table_d2(ch) for ch in normalized):
            raise ValueError("mixes right-to-left and left-to-right characters")
        if not (stringprep.in_table_d1(normalized[0]) and stringprep.in_table_d1(normalized[-1])):
            raise ValueError("right-to-left text must start and end with a right-to-left character")
    return normalized


def saslprep(password: str) -> str:
    """Prepare a password with SASLprep (RFC 4013), falling back to it unchanged.

    PostgreSQL does the same on both ends, so a password SASLprep refuses (control
    characters, unassigned code points, bad bidi) still works, compared as raw bytes.

    >>> saslprep("I\\u00adX")
    'IX'
    >>> saslprep("pass\\u00a0word")
    'pass word'
    """
    if password.isascii():
        return password  # nothing to map or normalize; PostgreSQL skips ASCII too
    try:
        return _saslprep_strict(password)
    except ValueError:
        return password


def _password_bytes(password: str) -> bytes:
    # surrogateescape gives back the original bytes of a password that came from a
    # non-UTF-8 source (os.environ, argv), which PostgreSQL would also hash as raw bytes.
    try:
        return saslprep(password).encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise ValueError(f"password cannot be encoded as UTF-8: {exc.reason}") from exc


# --- SCRAM arithmetic (RFC 5802 section 3) ----------------------------------------------


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _salted_password(password: bytes, salt: bytes, iterations: int) -> bytes:
    # Hi() of RFC 5802 is PBKDF2 with HMAC and one output block.
    return hashlib.pbkdf2_hmac("sha256", password, salt, iterations)


def _client_key(salted: bytes) -> bytes:
    return _hmac(salted, b"Client Key")


def _server_key(salted: bytes) -> bytes:
    return _hmac(salted, b"Server Key")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- verifiers ----------------------------------------------------------------------------


def make_scram_verifier(password: str, *, salt: bytes | None = None, iterations: int = 4096) -> str:
    """Build a verifier in PostgreSQL's rolpassword format.

    ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>``, usable in
    ``ALTER ROLE ... PASSWORD '<verifier>'``. The salt is 16 random bytes unless given.
    """
    if not 1 <= iterations <= _MAX_ITERATIONS:
        raise ValueError(f"iteration count must be 1..{_MAX_ITERATIONS}, got {iterations}")
    if salt is None:
        salt = secrets.token_bytes(_DEFAULT_SALT_LEN)
    elif not salt:
        raise ValueError("salt is empty")
    salted = _salted_password(_password_bytes(password), salt, iterations)
    stored_key = hashlib.sha256(_client_key(salted)).digest()
    server_key = _server_key(salted)
    return f"{MECHANISM}${iterations}:{_b64(salt)}${_b64(stored_key)}:{_b64(server_key)}"


def _b64decode_field(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{what} is not valid base64") from exc


def parse_scram_verifier(text: str) -> ScramVerifier:
    """Parse ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>``.

    Raises ValueError saying which part is wrong.
    """
    expected = f"expected {MECHANISM}$<iterations>:<salt>$<StoredKey>:<ServerKey>"
    if text.startswith("md5") and "$" not in text:
        raise ValueError(f"this is an MD5 password hash, not a SCRAM verifier; {expected}")
    parts = text.split("$")
    if len(parts) != 3:
        raise ValueError(f"wrong number of '$'-separated parts; {expected}")
    mechanism, iter_salt, keys = parts
    if mechanism != MECHANISM:
        raise ValueError(f"unsupported mechanism {mechanism!r}; {expected}")
    iter_text, colon, salt_text = iter_salt.partition(":")
    if not colon:
        raise ValueError(f"missing ':' between iteration count and salt; {expected}")
    iterations = _parse_iterations(iter_text)
    if iterations is None:
        raise ValueError(
            f"iteration count {iter_text[:12]!r} is not a number in 1..{_MAX_ITERATIONS}"
        )
    salt = _b64decode_field(salt_text, "salt")
    if not salt:
        raise ValueError("salt is empty")
    stored_text, colon, server_text = keys.partition(":")
    if not colon:
        raise ValueError(f"missing ':' between StoredKey and ServerKey; {expected}")
    stored_key = _b64decode_field(stored_text, "StoredKey")
    server_key = _b64decode_field(server_text, "ServerKey")
    for name, key in (("StoredKey", stored_key), ("ServerKey", server_key)):
        if len(key) != _KEY_LEN:
            raise ValueError(f"{name} is {len(key)} bytes, expected {_KEY_LEN}")
    return ScramVerifier(iterations, salt, stored_key, server_key)


# --- SCRAM message parsing ------------------------------------------------------------------


def _is_printable(text: str) -> bool:
    # RFC 5802 "printable": %x21-2B / %x2D-7E, i.e. visible ASCII except ','.
    return bool(text) and all("\x21" <= ch <= "\x7e" and ch != "," for ch in text)


def _make_nonce(nonce: bytes | None) -> str:
    if nonce is None:
        return _b64(secrets.token_bytes(_RAW_NONCE_LEN))
    text = nonce.decode("ascii", "replace")
    if not _is_printable(text):
        raise ValueError("nonce must be non-empty printable ASCII without ','")
    return text


class _Reader:
    """Reads the ','-separated ``x=value`` attributes of one SCRAM message.

    Every malformation becomes AuthFailed, so a hostile peer can only ever cause a
    refusal. (No attribute value may contain ',': saslnames escape it as '=2C'.)
    """

    def __init__(self, parts: list[str], user: str, message: str) -> None:
        self._parts = parts
        self._pos = 0
        self._user = user
        self._message = message

    def fail(self, detail: str) -> AuthFailed:
        return AuthFailed(self._user, f"malformed SCRAM {self._message}: {detail}")

    def peek(self, name: str) -> bool:
        return self._pos < len(self._parts) and self._parts[self._pos].startswith(name + "=")

    def take(self, name: str) -> str:
        if self._pos >= len(self._parts):
            raise self.fail(f"attribute {name!r} expected, message ended")
        part = self._parts[self._pos]
        if not part.startswith(name + "="):
            raise self.fail(f"attribute {name!r} expected, got {part[:2]!r}")
        self._pos += 1
        return part[2:]

    def take_base64(self, name: str, what: str) -> bytes:
        value = self.take(name)
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise self.fail(f"{what} is not valid base64") from None

    def take_nonce(self) -> str:
        nonce = self.take("r")
        if not _is_printable(nonce):
            raise self.fail("nonce is empty or not printable ASCII")
        return nonce

    def skip_extensions(self, *, keep_last: int = 0) -> None:
        # Optional extensions are ignored; only their shape is checked.
        while self._pos < len(self._parts) - keep_last:
            part = self._parts[self._pos]
            if len(part) < 2 or not (part[0].isascii() and part[0].isalpha()) or part[1] != "=":
                raise self.fail(f"unexpected text {part[:10]!r}")
            self._pos += 1

    def end(self) -> None:
        if self._pos != len(self._parts):
            raise self.fail("unexpected text after the last attribute")


def _decode(data: bytes) -> str:
    # surrogateescape so that undecodable bytes (e.g. in an ignored username) survive
    # exactly into AuthMessage, which is hashed as bytes.
    return data.decode("utf-8", "surrogateescape")


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


# --- server side ----------------------------------------------------------------------------


class _ServerState(Enum):
    AWAIT_CLIENT_FIRST = auto()
    AWAIT_CLIENT_FINAL = auto()
    DONE = auto()
    FAILED = auto()


class ScramServer:
    """The proxy authenticating a client with SCRAM-SHA-256.

    Mechanism 'SCRAM-SHA-256' only: a client demanding channel binding ('p=' gs2 flag) is
    refused; 'n' and 'y' (client could bind but we did not offer it) are accepted. The
    username in client-first is ignored, as PostgreSQL does: the startup packet's user is
    the one being authenticated, and `user` only names it in AuthFailed's message.

    `nonce` is the server's part of the nonce as printable ASCII; by default 18 random
    bytes in base64, like PostgreSQL. Any failure leaves the exchange failed for good.
    """

    def __init__(
        self, verifier: ScramVerifier, *, nonce: bytes | None = None, user: str = ""
    ) -> None:
        self._verifier = verifier
        self._server_nonce = _make_nonce(nonce)
        self._user = user
        self._state = _ServerState.AWAIT_CLIENT_FIRST
        self._gs2_header = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""

    @property
    def authenticated(self) -> bool:
        """True once a client-final-message carried a valid proof."""
        return self._state is _ServerState.DONE

    def handle_client_first(self, data: bytes) -> bytes:
        """Take the client-first-message (SASLInitialResponse data), return server-first."""
        self._expect(_ServerState.AWAIT_CLIENT_FIRST, "client-first-message")
        try:
            reply = self._client_first(_decode(data))
        except AuthFailed:
            self._state = _ServerState.FAILED
            raise
        self._state = _ServerState.AWAIT_CLIENT_FINAL
        return reply

    def handle_client_final(self, data: bytes) -> bytes:
        """Check the client-final-message's proof; return server-final (``v=...``)."""
        self._expect(_ServerState.AWAIT_CLIENT_FINAL, "client-final-message")
        try:
            reply = self._client_final(_decode(data))
        except AuthFailed:
            self._state = _ServerState.FAILED
            raise
        self._state = _ServerState.DONE
        return reply

    def _expect(self, state: _ServerState, message: str) -> None:
        if self._state is not state:
            # A client that repeats or reorders SASL messages gets refused, not a crash.
            self._state = _ServerState.FAILED
            raise AuthFailed(self._user, f"unexpected SCRAM {message}")

    def _client_first(self, text: str) -> bytes:
        parts = text.split(",")
        reader = _Reader(parts[2:], self._user, "client-first-message")
        if len(parts) < 3:
            raise reader.fail("no gs2 header")
        flag, authzid = parts[0], parts[1]
        if flag.startswith("p="):
            raise AuthFailed(self._user, "client requires channel binding, which was not offered")
        if flag not in ("n", "y"):
            raise reader.fail(f"gs2 channel binding flag {flag[:10]!r} is not 'n', 'y' or 'p='")
        if authzid:
            raise AuthFailed(self._user, "client sent an authorization identity (unsupported)")
        if reader.peek("m"):
            raise AuthFailed(self._user, "client requires an unsupported SCRAM extension")
        reader.take("n")  # ignored: the startup packet's user is the one authenticated
        client_nonce = reader.take_nonce()
        reader.skip_extensions()
        reader.end()

        self._gs2_header = f"{flag},{authzid},"
        self._client_first_bare = ",".join(parts[2:])
        self._nonce = client_nonce + self._server_nonce
        v = self._verifier
        self._server_first = f"r={self._nonce},s={_b64(v.salt)},i={v.iterations}"
        return _encode(self._server_first)

    def _client_final(self, text: str) -> bytes:
        parts = text.split(",")
        reader = _Reader(parts, self._user, "client-final-message")
        binding = reader.take_base64("c", "channel binding")
        if binding != _encode(self._gs2_header):
            raise AuthFailed(self._user, "channel binding does not match the gs2 header")
        nonce = reader.take_nonce()
        if not hmac.compare_digest(_encode(nonce), _encode(self._nonce)):
            raise AuthFailed(self._user, "nonce does not match the one sent")
        reader.skip_extensions(keep_last=1)
        proof = reader.take_base64("p", "proof")
        reader.end()
        if len(proof) != _KEY_LEN:
            raise reader.fail(f"proof is {len(proof)} bytes, expected {_KEY_LEN}")

        without_proof = ",".join(parts[:-1])
        auth_message = _encode(f"{self._client_first_bare},{self._server_first},{without_proof}")
        v = self._verifier
        client_key = _xor(proof, _hmac(v.stored_key, auth_message))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), v.stored_key):
            raise AuthFailed(self._user, "wrong password (client proof does not verify)")
        return _encode(f"v={_b64(_hmac(v.server_key, auth_message))}")


# --- client side ----------------------------------------------------------------------------


class _ClientState(Enum):
    START = auto()
    AWAIT_SERVER_FIRST = auto()
    AWAIT_SERVER_FINAL = auto()
    DONE = auto()
    FAILED = auto()


class ScramClient:
    """The proxy authenticating to a PostgreSQL server with SCRAM-SHA-256.

    Sends an empty username (the server uses the startup packet's) and the 'n' flag (no
    channel binding), like libpq without TLS binding. `nonce` is the client nonce as
    printable ASCII; by default 18 random bytes in base64. `user` only names the role in
    AuthFailed's message. ValueError if the password cannot be encoded.
    """

    _GS2_HEADER = "n,,"

    def __init__(self, password: str, *, nonce: bytes | None = None, user: str = "") -> None:
        self._password = _password_bytes(password)
        self._nonce = _make_nonce(nonce)
        self._user = user
        self._state = _ClientState.START
        self._client_first_bare = f"n=,r={self._nonce}"
        self._server_signature = b""

    @property
    def authenticated(self) -> bool:
        """True once the server proved it knows the password too."""
        return self._state is _ClientState.DONE

    def client_first(self) -> bytes:
        """The client-first-message, for SASLInitialResponse."""
        self._expect(_ClientState.START, "client-first-message")
        self._state = _ClientState.AWAIT_SERVER_FIRST
        return _encode(self._GS2_HEADER + self._client_first_bare)

    def client_final(self, server_first: bytes) -> bytes:
        """Answer AuthenticationSASLContinue's server-first-message with client-final."""
        self._expect(_ClientState.AWAIT_SERVER_FIRST, "server-first-message")
        try:
            reply = self._client_final(_decode(server_first))
        except AuthFailed:
            self._state = _ClientState.FAILED
            raise
        self._state = _ClientState.AWAIT_SERVER_FINAL
        return reply

    def verify_server_final(self, server_final: bytes) -> None:
        """Check AuthenticationSASLFinal's server-final-message; AuthFailed if wrong."""
        self._expect(_ClientState.AWAIT_SERVER_FINAL, "server-final-message")
        try:
            self._verify_server_final(_decode(server_final))
        except AuthFailed:
            self._state = _ClientState.FAILED
            raise
        self._state = _ClientState.DONE

    def _expect(self, state: _ClientState, message: str) -> None:
        if self._state is not state:
            self._state = _ClientState.FAILED
            raise AuthFailed(self._user, f"unexpected SCRAM {message}")

    def _client_final(self, server_first: str) -> bytes:
        reader = _Reader(server_first.split(","), self._user, "server-first-message")
        if reader.peek("m"):
            raise AuthFailed(self._user, "server requires an unsupported SCRAM extension")
        nonce = reader.take_nonce()
        salt = reader.take_base64("s", "salt")
        iter_text = reader.take("i")
        reader.skip_extensions()
        reader.end()
        # The server must extend our nonce, not replace it, or it could replay an old exchange.
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise AuthFailed(self._user, "server nonce does not extend the client nonce")
        if not salt:
            raise reader.fail("salt is empty")
        iterations = _parse_iterations(iter_text)
        if iterations is None:
            raise reader.fail(f"iteration count {iter_text[:12]!r} is not a positive number")

        salted = _salted_password(self._password, salt, iterations)
        client_key = _client_key(salted)
        without_proof = f"c={_b64(_encode(self._GS2_HEADER))},r={nonce}"
        auth_message = _encode(f"{self._client_first_bare},{server_first},{without_proof}")
        stored_key = hashlib.sha256(client_key).digest()
        proof = _xor(client_key, _hmac(stored_key, auth_message))
        self._server_signature = _hmac(_server_key(salted), auth_message)
        return _encode(f"{without_proof},p={_b64(proof)}")

    def _verify_server_final(self, server_final: str) -> None:
        reader = _Reader(server_final.split(","), self._user, "server-final-message")
        if reader.peek("e"):
            raise AuthFailed(self._user, f"server refused: {reader.take('e')[:100]}")
        signature = reader.take_base64("v", "server signature")
        reader.skip_extensions()
        reader.end()
        if not hmac.compare_digest(signature, self._server_signature):
            raise AuthFailed(
                self._user, "server signature does not match (server does not know the password)"
            )


# --- MD5 ----------------------------------------------------------------------------------


def md5_password_message(user: str, password: str, salt: bytes) -> bytes:
    """The PasswordMessage body answering AuthenticationMD5Password, without the NUL.

    ``"md5" + md5(md5(password + user).hexdigest() + salt).hexdigest()``.
    """
    if len(salt) != 4:
        raise ValueError(f"MD5 salt must be 4 bytes, got {len(salt)}")
    # usedforsecurity=False keeps this working on FIPS builds, where PostgreSQL's MD5
    # scheme is the server's choice, not ours.
    inner = hashlib.md5(_encode(password) + _encode(user), usedforsecurity=False).hexdigest()
    outer = hashlib.md5(inner.encode("ascii") + salt, usedforsecurity=False).hexdigest()
    return b"md5" + outer.encode("ascii")
