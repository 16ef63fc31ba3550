"""The client login state machine, fed bytes as a client would send them."""

from __future__ import annotations

import struct

import pytest

from shardwire.config.model import AuthMethod, User
from shardwire.proxy.protocol import auth, frontend
from shardwire.proxy.protocol import messages as m
from shardwire.proxy.protocol.framing import MessageReader

USERS = {
    "app": User("app", scram_verifier=auth.make_scram_verifier("pw")),
    "ops": User("ops", scram_verifier=auth.make_scram_verifier("ops"), admin=True),
}


def handshake(method: AuthMethod = AuthMethod.SCRAM_SHA_256, tls: bool = False
              ) -> frontend.Handshake:
    return frontend.Handshake(users=USERS, auth_method=method, database="app",
                              admin_database="shardwire", tls_available=tls,
                              fake_salt_key=b"k" * 32)


def sent(actions: list[frontend.Action]) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, frontend.Send))


def login(hs: frontend.Handshake, user: str, password: str, database: str = "app"
          ) -> list[frontend.Action]:
    actions = hs.feed(m.startup_message({"user": user, "database": database,
                                         "application_name": "t"}))
    assert sent(actions) == m.auth_sasl(["SCRAM-SHA-256"])
    client = auth.ScramClient(password)
    actions = hs.feed(m.sasl_initial_response("SCRAM-SHA-256", client.client_first()))
    [(kind, body)] = MessageReader(1 << 20).feed(sent(actions))
    server_first = body[4:]
    return hs.feed(m.password_message(client.client_final(server_first)))


def error_of(actions: list[frontend.Action]) -> frontend.Reject:
    rejects = [a for a in actions if isinstance(a, frontend.Reject)]
    assert rejects, actions
    return rejects[0]


def test_scram_login_succeeds() -> None:
    actions = login(handshake(), "app", "pw")
    done = [a for a in actions if isinstance(a, frontend.Authenticated)]
    assert done == [frontend.Authenticated("app", "app", {"application_name": "t"}, False)]
    assert sent(actions).endswith(m.AUTH_OK)


def test_wrong_password_and_unknown_user_fail_alike() -> None:
    wrong = error_of(login(handshake(), "app", "nope")).error
    unknown = error_of(login(handshake(), "mallory", "nope")).error
    assert wrong.sqlstate == unknown.sqlstate == "28P01"
    assert wrong.message == 'password authentication failed for user "app"'
    assert wrong.fatal


def test_unknown_users_get_a_stable_fake_salt() -> None:
    def salt_for(user: str) -> bytes:
        hs = handshake()
        hs.feed(m.startup_message({"user": user}))
        client = auth.ScramClient("x")
        reply = sent(hs.feed(m.sasl_initial_response("SCRAM-SHA-256", client.client_first())))
        return dict(p.split(b"=", 1) for p in reply[9:].split(b","))[b"s"]
    assert salt_for("ghost") == salt_for("ghost")


def test_trust_needs_a_configured_user() -> None:
    ok = handshake(AuthMethod.TRUST).feed(m.startup_message({"user": "app"}))
    assert any(isinstance(a, frontend.Authenticated) for a in ok)
    refused = handshake(AuthMethod.TRUST).feed(m.startup_message({"user": "ghost"}))
    assert sent(refused) == m.auth_sasl(["SCRAM-SHA-256"])


def test_admin_database_is_for_admins_only() -> None:
    assert error_of(login(handshake(), "app", "pw", "shardwire")).error.sqlstate == "42501"
    ok = login(handshake(), "ops", "ops", "shardwire")
    assert [a for a in ok if isinstance(a, frontend.Authenticated)][0].admin


def test_unknown_database_is_3d000() -> None:
    err = error_of(login(handshake(), "app", "pw", "other")).error
    assert err.sqlstate == "3D000" and '"other"' in err.message


def test_ssl_request_without_tls_answers_n_and_continues() -> None:
    hs = handshake()
    assert sent(hs.feed(m.ssl_request())) == b"N"
    assert sent(hs.feed(m.startup_message({"user": "app"}))).startswith(b"R")


def test_ssl_request_with_tls_starts_tls() -> None:
    actions = handshake(tls=True).feed(m.ssl_request())
    assert actions == [frontend.Send(b"S"), frontend.StartTls()]


def test_gssenc_request_answers_n() -> None:
    assert sent(handshake().feed(struct.pack("!ii", 8, m.GSSENC_REQUEST))) == b"N"


def test_cancel_request() -> None:
    assert handshake().feed(m.cancel_request(7, 99)) == [frontend.CancelQuery(7, 99)]


def test_newer_minor_version_is_negotiated_down() -> None:
    body = struct.pack("!i", (3 << 16) | 2) + b"user\0app\0_pq_.x\0y\0\0"
    actions = handshake().feed(struct.pack("!i", len(body) + 4) + body)
    [(kind, payload), (auth_kind, _)] = MessageReader(1 << 20).feed(sent(actions))
    assert kind == ord("v")
    assert struct.unpack_from("!ii", payload) == (3 << 16, 1)
    assert payload[8:] == b"_pq_.x\0"


@pytest.mark.parametrize("packet", [
    b"GET / HTTP/1.1\r\n\r\n",
    struct.pack("!i", 0x7FFFFFFF) + b"xxxx",
    struct.pack("!ii", 8, (2 << 16)),
    struct.pack("!ii", 12, 3 << 16) + b"user",
])
def test_garbage_before_startup_is_a_protocol_error(packet: bytes) -> None:
    err = error_of(handshake().feed(packet)).error
    assert err.sqlstate in ("08P01", "0A000") and err.fatal


def test_options_become_settings() -> None:
    actions = handshake(AuthMethod.TRUST).feed(m.startup_message(
        {"user": "app", "options": "-c search_path=a,b --statement-timeout=5s"}))
    done = [a for a in actions if isinstance(a, frontend.Authenticated)][0]
    assert done.settings == {"search_path": "a,b", "statement_timeout": "5s"}


def test_replication_connections_are_refused() -> None:
    err = error_of(handshake().feed(m.startup_message({"user": "app",
                                                       "replication": "database"}))).error
    assert err.sqlstate == "0A000"
