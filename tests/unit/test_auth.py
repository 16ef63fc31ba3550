"""Password authentication: SCRAM-SHA-256 both ways, verifiers, SASLprep, MD5.

Known answers are computed here from RFC 5802's definitions with hashlib/hmac directly
(including Hi() written out by hand), not through the module under test.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import random

import pytest

from shardwire.proxy.protocol.auth import (
    AuthFailed,
    ScramClient,
    ScramServer,
    ScramVerifier,
    make_scram_verifier,
    md5_password_message,
    parse_scram_verifier,
    saslprep,
)

SALT = bytes(range(16))
CLIENT_NONCE = b"fyko+d2lbbFgONRv9qkxdawL"
SERVER_NONCE = b"3rfcNHYJY1ZVvWVs7j"


# --- an independent implementation of the RFC 5802 arithmetic ------------------------------


def hi(password: bytes, salt: bytes, iterations: int) -> bytes:
    u = hmac.new(password, salt + b"\x00\x00\x00\x01", hashlib.sha256).digest()
    result = u
    for _ in range(iterations - 1):
        u = hmac.new(password, u, hashlib.sha256).digest()
        result = bytes(a ^ b for a, b in zip(result, u, strict=True))
    return result


def h(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def expected_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes, bytes]:
    salted = hi(password.encode(), salt, iterations)
    client_key = h(salted, b"Client Key")
    return client_key, hashlib.sha256(client_key).digest(), h(salted, b"Server Key")


# --- helpers ------------------------------------------------------------------------------


def server_for(password: str, user: str = "") -> ScramServer:
    verifier = parse_scram_verifier(make_scram_verifier(password, salt=SALT, iterations=4096))
    return ScramServer(verifier, nonce=SERVER_NONCE, user=user)


def exchange(client_password: str, server_password: str) -> tuple[ScramClient, ScramServer]:
    """Pipe one full exchange between the two machines, as the proxy's two sides would."""
    client = ScramClient(client_password)
    server = server_for(server_password)
    server_first = server.handle_client_first(client.client_first())
    server_final = server.handle_client_final(client.client_final(server_first))
    client.verify_server_final(server_final)
    return client, server


def after_client_first(client_first: bytes = b"n,,n=,r=" + CLIENT_NONCE) -> ScramServer:
    server = server_for("secret")
    server.handle_client_first(client_first)
    return server


def good_client_final_without_proof() -> str:
    return f"c=biws,r={(CLIENT_NONCE + SERVER_NONCE).decode()}"


# --- round trips --------------------------------------------------------------------------


def test_client_and_server_agree_on_the_right_password() -> None:
    client, server = exchange("correct horse", "correct horse")
    assert client.authenticated
    assert server.authenticated


def test_non_ascii_password_round_trip() -> None:
    client, server = exchange("pâss\u00a0wörd", "pâss wörd")  # NBSP prepped to space
    assert client.authenticated and server.authenticated


def test_wrong_password_is_refused_with_a_client_safe_message() -> None:
    client = ScramClient("wrong")
    server = server_for("secret", user="alice")
    server_first = server.handle_client_first(client.client_first())
    with pytest.raises(AuthFailed) as info:
        server.handle_client_final(client.client_final(server_first))
    assert str(info.value) == 'password authentication failed for user "alice"'
    assert info.value.sqlstate == "28P01"
    assert "secret" not in str(info.value)
    assert not server.authenticated


def test_server_ignores_the_username_in_client_first() -> None:
    server = server_for("secret")
    server_first = server.handle_client_first(b"n,,n=someone-else,r=" + CLIENT_NONCE)
    # The username is still part of AuthMessage, so the proof covers it.
    client_key, stored_key, server_key = expected_keys("secret", SALT, 4096)
    without_proof = good_client_final_without_proof()
    auth = f"n=someone-else,r={CLIENT_NONCE.decode()},{server_first.decode()},{without_proof}"
    proof = bytes(a ^ b for a, b in zip(client_key, h(stored_key, auth.encode()), strict=True))
    final = server.handle_client_final(f"{without_proof},p={b64(proof)}".encode())
    assert final == f"v={b64(h(server_key, auth.encode()))}".encode()
    assert server.authenticated


def test_y_flag_is_accepted() -> None:
    server = after_client_first(b"y,,n=,r=" + CLIENT_NONCE)
    client_key, stored_key, server_key = expected_keys("secret", SALT, 4096)
    without_proof = f"c={b64(b'y,,')},r={(CLIENT_NONCE + SERVER_NONCE).decode()}"
    server_first = f"r={(CLIENT_NONCE + SERVER_NONCE).decode()},s={b64(SALT)},i=4096"
    auth = f"n=,r={CLIENT_NONCE.decode()},{server_first},{without_proof}".encode()
    proof = bytes(a ^ b for a, b in zip(client_key, h(stored_key, auth), strict=True))
    final = server.handle_client_final(f"{without_proof},p={b64(proof)}".encode())
    assert final == f"v={b64(h(server_key, auth))}".encode()
    assert server.authenticated


# --- known answers ------------------------------------------------------------------------


def test_known_answer_computed_independently() -> None:
    password = "pencil"
    client_key, stored_key, server_key = expected_keys(password, SALT, 4096)
    nonce = (CLIENT_NONCE + SERVER_NONCE).decode()
    client_first_bare = f"n=,r={CLIENT_NONCE.decode()}"
    server_first = f"r={nonce},s={b64(SALT)},i=4096"
    without_proof = f"c=biws,r={nonce}"
    auth = f"{client_first_bare},{server_first},{without_proof}".encode()
    proof = bytes(a ^ b for a, b in zip(client_key, h(stored_key, auth), strict=True))
    server_signature = h(server_key, auth)

    assert make_scram_verifier(password, salt=SALT) == (
        f"SCRAM-SHA-256$4096:{b64(SALT)}${b64(stored_key)}:{b64(server_key)}"
    )

    client = ScramClient(password, nonce=CLIENT_NONCE)
    server = server_for(password)
    client_first = client.client_first()
    assert client_first == f"n,,{client_first_bare}".encode()
    assert server.handle_client_first(client_first) == server_first.encode()
    client_final = client.client_final(server_first.encode())
    assert client_final == f"{without_proof},p={b64(proof)}".encode()
    assert server.handle_client_final(client_final) == f"v={b64(server_signature)}".encode()


def test_rfc_7677_example_exchange() -> None:
    # RFC 7677 section 3: user "user", password "pencil".
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    verifier = parse_scram_verifier(make_scram_verifier("pencil", salt=salt, iterations=4096))
    server = ScramServer(verifier, nonce=b"%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0")
    server_first = server.handle_client_first(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO")
    assert server_first == (
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    )
    server_final = server.handle_client_final(
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    assert server_final == b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_md5_known_answer() -> None:
    salt = b"\x01\x02\x03\x04"
    inner = hashlib.md5(b"s3cret" + b"alice").hexdigest().encode()
    expected = b"md5" + hashlib.md5(inner + salt).hexdigest().encode()
    assert md5_password_message("alice", "s3cret", salt) == expected
    assert len(expected) == 35 and b"\x00" not in expected


def test_md5_rejects_a_salt_of_the_wrong_size() -> None:
    with pytest.raises(ValueError):
        md5_password_message("alice", "s3cret", b"\x01\x02\x03")


# --- tampering and malformed messages on the server side ---------------------------------


def test_tampered_nonce_is_refused() -> None:
    client = ScramClient("secret", nonce=CLIENT_NONCE)
    server = server_for("secret")
    server_first = server.handle_client_first(client.client_first())
    final = client.client_final(server_first)
    tampered = final.replace(SERVER_NONCE, SERVER_NONCE[:-1] + b"X")
    with pytest.raises(AuthFailed, match="password authentication failed"):
        server.handle_client_final(tampered)


def test_tampered_proof_is_refused() -> None:
    client = ScramClient("secret", nonce=CLIENT_NONCE)
    server = server_for("secret")
    final = client.client_final(server.handle_client_first(client.client_first()))
    without_proof, _, proof = final.rpartition(b",p=")
    flipped = bytearray(base64.b64decode(proof))
    flipped[0] ^= 1
    with pytest.raises(AuthFailed):
        server.handle_client_final(without_proof + b",p=" + base64.b64encode(bytes(flipped)))


@pytest.mark.parametrize(
    "client_first",
    [
        b"",
        b"n",
        b"n,,",
        b"n,,r=abc",  # username missing
        b"n,,n=",  # nonce missing
        b"n,,n=,r=",  # empty nonce
        b"n,,n=,r=a\x01b",  # unprintable nonce
        b"n,,n=,r=abc,garbage",  # extension without x=
        b"x,,n=,r=abc",  # unknown gs2 flag
        b"p=tls-server-end-point,,n=,r=abc",  # channel binding demanded
        b"n,a=admin,n=,r=abc",  # authorization identity
        b"n,,m=ext,n=,r=abc",  # mandatory extension
        b"\xff\xfe,,n=,r=abc",  # not UTF-8
    ],
)
def test_malformed_client_first_is_refused(client_first: bytes) -> None:
    server = server_for("secret")
    with pytest.raises(AuthFailed):
        server.handle_client_first(client_first)
    assert not server.authenticated


def _final(without_proof: str, proof: str | None = None) -> bytes:
    if proof is None:
        proof = b64(b"\x00" * 32)
    return f"{without_proof},p={proof}".encode()


NONCE = (CLIENT_NONCE + SERVER_NONCE).decode()


@pytest.mark.parametrize(
    "client_final",
    [
        b"",
        b"c=biws",
        f"c=biws,r={NONCE}".encode(),  # proof missing
        f"r={NONCE},p={b64(bytes(32))}".encode(),  # channel binding missing
        _final(f"c=biws,r={NONCE}", proof="not base64!"),
        _final(f"c=biws,r={NONCE}", proof=b64(bytes(31))),  # short proof
        _final(f"c=biws,r={NONCE}", proof=""),
        _final(f"c=bi!s,r={NONCE}"),  # bad base64 channel binding
        _final(f"c=eSws,r={NONCE}"),  # 'y,,' but client-first said 'n'
        _final(f"c={b64(b'p=tls-unique,,')},r={NONCE}"),
        _final(f"c=biws,r={NONCE}") + b",x=trailing",  # proof must come last
        _final("c=biws,r="),
        _final(f"c=biws,r={NONCE}", proof=b64(bytes(32))) + b"\xff",
        _final(f"c=biws,r={NONCE},garbage"),
        b"\xff\xfe\xfd",
    ],
)
def test_malformed_client_final_is_refused(client_final: bytes) -> None:
    server = after_client_first()
    with pytest.raises(AuthFailed):
        server.handle_client_final(client_final)
    assert not server.authenticated


def test_channel_binding_must_match_the_y_header() -> None:
    server = after_client_first(b"y,,n=,r=" + CLIENT_NONCE)
    with pytest.raises(AuthFailed, match="password authentication failed"):
        server.handle_client_final(_final(f"c=biws,r={NONCE}"))


def test_extensions_are_ignored_but_the_proof_still_counts() -> None:
    server = after_client_first(b"n,,n=,r=" + CLIENT_NONCE + b",x=ext")
    with pytest.raises(AuthFailed):
        server.handle_client_final(_final(f"c=biws,r={NONCE},x=ext"))


def test_messages_out_of_order_are_refused() -> None:
    server = server_for("secret")
    with pytest.raises(AuthFailed):
        server.handle_client_final(_final(f"c=biws,r={NONCE}"))
    # A failed exchange stays failed.
    with pytest.raises(AuthFailed):
        server.handle_client_first(b"n,,n=,r=" + CLIENT_NONCE)

    client, server = exchange("secret", "secret")
    with pytest.raises(AuthFailed):
        server.handle_client_first(b"n,,n=,r=" + CLIENT_NONCE)
    with pytest.raises(AuthFailed):
        client.client_first()


def test_random_garbage_only_ever_raises_auth_failed() -> None:
    rng = random.Random(5802)
    client = ScramClient("secret", nonce=CLIENT_NONCE)
    probe = server_for("secret")
    first = client.client_first()
    good_final = client.client_final(probe.handle_client_first(first))
    for _ in range(300):
        for message, is_final in ((first, False), (good_final, True)):
            data = bytearray(message)
            for _ in range(rng.randint(1, 4)):
                op = rng.randrange(3)
                pos = rng.randrange(len(data) + 1)
                if op == 0 and data:
                    del data[min(pos, len(data) - 1)]
                elif op == 1:
                    data.insert(pos, rng.choice(b",=\x00\xff abcnpry"))
                elif data:
                    data[min(pos, len(data) - 1)] = rng.randrange(256)
            server = after_client_first() if is_final else server_for("secret")
            handle = server.handle_client_final if is_final else server.handle_client_first
            try:
                handle(bytes(data))
            except AuthFailed:
                pass


# --- the client side refusing a bad server ------------------------------------------------


@pytest.mark.parametrize(
    "server_first",
    [
        b"",
        b"r=" + CLIENT_NONCE + b",s=" + base64.b64encode(SALT),  # iterations missing
        b"r=" + CLIENT_NONCE + b"xyz,i=4096",  # salt missing
        b"r=" + CLIENT_NONCE + b",s=" + base64.b64encode(SALT) + b",i=4096",  # not extended
        b"r=someone-elses-nonce,s=" + base64.b64encode(SALT) + b",i=4096",
        b"r=" + CLIENT_NONCE + b"xyz,s=***,i=4096",  # bad base64
        b"r=" + CLIENT_NONCE + b"xyz,s=,i=4096",  # empty salt
        b"r=" + CLIENT_NONCE + b"xyz,s=" + base64.b64encode(SALT) + b",i=0",
        b"r=" + CLIENT_NONCE + b"xyz,s=" + base64.b64encode(SALT) + b",i=-1",
        b"r=" + CLIENT_NONCE + b"xyz,s=" + base64.b64encode(SALT) + b",i=" + b"9" * 5000,
        b"m=ext,r=" + CLIENT_NONCE + b"xyz,s=" + base64.b64encode(SALT) + b",i=4096",
    ],
)
def test_client_refuses_a_malformed_server_first(server_first: bytes) -> None:
    client = ScramClient("secret", nonce=CLIENT_NONCE)
    client.client_first()
    with pytest.raises(AuthFailed):
        client.client_final(server_first)


def test_client_refuses_a_server_that_does_not_know_the_password() -> None:
    client = ScramClient("secret")
    impostor = server_for("something else")
    client_final = client.client_final(impostor.handle_client_first(client.client_first()))
    # The impostor cannot verify the proof; pretend it answered anyway.
    with pytest.raises(AuthFailed):
        impostor.handle_client_final(client_final)
    with pytest.raises(AuthFailed, match="password authentication failed"):
        client.verify_server_final(b"v=" + base64.b64encode(bytes(32)))
    assert not client.authenticated


@pytest.mark.parametrize(
    "server_final",
    [b"", b"v=", b"v=!!!", b"x=1", b"e=invalid-proof", b"v=" + base64.b64encode(bytes(31))],
)
def test_client_refuses_a_bad_server_final(server_final: bytes) -> None:
    client = ScramClient("secret")
    server = server_for("secret")
    server.handle_client_final(
        client.client_final(server.handle_client_first(client.client_first()))
    )
    with pytest.raises(AuthFailed) as info:
        client.verify_server_final(server_final)
    if server_final.startswith(b"e="):
        assert "invalid-proof" in info.value.detail


def test_nonce_must_be_printable() -> None:
    with pytest.raises(ValueError):
        ScramClient("secret", nonce=b"has,comma")
    with pytest.raises(ValueError):
        ScramServer(parse_scram_verifier(make_scram_verifier("x")), nonce=b"\x00\x01")


def test_default_nonces_are_random() -> None:
    assert ScramClient("x").client_first() != ScramClient("x").client_first()


# --- verifiers ----------------------------------------------------------------------------


def test_verifier_round_trip() -> None:
    text = make_scram_verifier("secret", salt=SALT, iterations=10000)
    verifier = parse_scram_verifier(text)
    client_key, stored_key, server_key = expected_keys("secret", SALT, 10000)
    assert verifier == ScramVerifier(10000, SALT, stored_key, server_key)
    assert text.startswith(f"SCRAM-SHA-256$10000:{b64(SALT)}$")


def test_verifier_defaults_to_a_random_16_byte_salt() -> None:
    first = parse_scram_verifier(make_scram_verifier("secret"))
    second = parse_scram_verifier(make_scram_verifier("secret"))
    assert len(first.salt) == 16 and first.iterations == 4096
    assert first.salt != second.salt


def test_verifier_repr_hides_the_keys() -> None:
    verifier = parse_scram_verifier(make_scram_verifier("secret", salt=SALT))
    assert b64(verifier.stored_key) not in repr(verifier)
    assert "stored_key" not in repr(verifier)


GOOD = make_scram_verifier("secret", salt=SALT)
KEYS = GOOD.split("$")[2]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "wrong number"),
        ("md5" + "0" * 32, "MD5"),
        (GOOD.replace("SCRAM-SHA-256", "SCRAM-SHA-1"), "unsupported mechanism"),
        (GOOD + "$extra", "wrong number"),
        (f"SCRAM-SHA-256$4096${KEYS}", "missing ':'"),
        (f"SCRAM-SHA-256$abc:{b64(SALT)}${KEYS}", "iteration count"),
        (f"SCRAM-SHA-256$0:{b64(SALT)}${KEYS}", "iteration count"),
        (f"SCRAM-SHA-256$-5:{b64(SALT)}${KEYS}", "iteration count"),
        (f"SCRAM-SHA-256$4096:***${KEYS}", "salt"),
        (f"SCRAM-SHA-256$4096:${KEYS}", "salt"),
        (f"SCRAM-SHA-256$4096:{b64(SALT)}${KEYS.replace(':', '')}", "missing ':'"),
        (f"SCRAM-SHA-256$4096:{b64(SALT)}$abc=:{KEYS.split(':')[1]}", "StoredKey"),
        (f"SCRAM-SHA-256$4096:{b64(SALT)}${KEYS.split(':')[0]}:{b64(bytes(16))}", "ServerKey"),
    ],
)
def test_verifier_parse_errors_say_what_is_wrong(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_scram_verifier(text)


def test_make_verifier_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        make_scram_verifier("secret", iterations=0)
    with pytest.raises(ValueError):
        make_scram_verifier("secret", salt=b"")


# --- SASLprep -----------------------------------------------------------------------------


@pytest.mark.parametrize("password", ["", "secret", "Tr0ub4dor&3", "with space", "\x07bell"])
def test_saslprep_of_ascii_is_identity(password: str) -> None:
    assert saslprep(password) == password


@pytest.mark.parametrize(
    ("password", "prepared"),
    [
        ("pass\u00a0word", "pass word"),  # non-ASCII space to SPACE
        ("I\u00adX", "IX"),  # soft hyphen mapped to nothing (RFC 4013 example)
        ("\u00aa", "a"),  # NFKC (RFC 4013 example)
        ("\u2168", "IX"),  # NFKC (RFC 4013 example)
        ("caf\u0065\u0301", "caf\u00e9"),  # NFKC composes
    ],
)
def test_saslprep_maps_and_normalizes(password: str, prepared: str) -> None:
    assert saslprep(password) == prepared


@pytest.mark.parametrize(
    "password",
    [
        "\u00e9\u0007",  # control character
        "\u0627\u0031",  # right-to-left text not ending right-to-left
        "\u0627a\u0627",  # mixed bidi
        "\u00e9\U000e0001",  # tagging character
        "\u00e9\u0221",  # unassigned in Unicode 3.2
        "\u00ad",  # nothing left after mapping
    ],
)
def test_saslprep_falls_back_to_the_raw_password(password: str) -> None:
    assert saslprep(password) == password


def test_prepped_and_raw_spellings_authenticate_alike() -> None:
    client, server = exchange("I\u00adX", "IX")
    assert client.authenticated and server.authenticated
