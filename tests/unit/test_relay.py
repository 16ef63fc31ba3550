"""The pooling relay without sockets: client messages in, server bytes out, and back."""

from __future__ import annotations

import struct

import pytest

from shardwire.proxy.protocol import messages as m
from shardwire.proxy.protocol.framing import MessageReader
from shardwire.proxy.protocol.relay import (
    BackendProtocolError,
    ClientStatements,
    ServerLink,
    statement_name,
)


def msg(kind: str, payload: bytes = b"") -> bytes:
    return m.message(kind.encode(), payload)


def parse(name: bytes, sql: bytes) -> tuple[int, bytes]:
    return ord("P"), name + b"\0" + sql + b"\0\0\0"


def bind(stmt: bytes, portal: bytes = b"") -> tuple[int, bytes]:
    return ord("B"), portal + b"\0" + stmt + b"\0" + b"\0\0\0\0\0\0"


def execute() -> tuple[int, bytes]:
    return ord("E"), b"\0\0\0\0\0"


SYNC = (ord("S"), b"")


def frames(data: bytes) -> list[tuple[str, bytes]]:
    return [(chr(k), b) for k, b in MessageReader(1 << 30).feed(bytes(data))]


def ready(status: bytes = b"I") -> bytes:
    return m.ready_for_query(status)


ROW = m.row_description([("x", m.INT4_OID)]) + m.data_row([1]) + m.command_complete("SELECT 1")


def test_simple_query_passes_through_untouched() -> None:
    link, client = ServerLink(), ClientStatements()
    q = m.query("select 1")
    sent = client.rewrite([(ord("Q"), b"select 1\0")], link, q)
    assert sent is q
    assert link.busy
    reply = ROW + ready()
    assert link.feed(reply) == reply
    assert link.idle


@pytest.mark.parametrize("cut", range(1, len(ROW + ready())))
def test_replies_split_anywhere_come_out_whole(cut: int) -> None:
    link, client = ServerLink(), ClientStatements()
    client.rewrite([(ord("Q"), b"select 1\0")], link, None)
    reply = ROW + ready(b"T")
    out = bytes(link.feed(reply[:cut])) + bytes(link.feed(reply[cut:]))
    assert out == reply
    assert link.status == b"T" and not link.busy and not link.idle


def test_transaction_status_tracks_ready_for_query() -> None:
    link, client = ServerLink(), ClientStatements()
    client.rewrite([(ord("Q"), b"begin\0")], link, None)
    link.feed(m.command_complete("BEGIN") + ready(b"T"))
    assert not link.idle and link.status == b"T"
    client.rewrite([(ord("Q"), b"select x\0")], link, None)
    link.feed(msg("E", b"SERROR\0C42703\0Mno\0\0") + ready(b"E"))
    assert link.status == b"E"
    client.rewrite([(ord("Q"), b"rollback\0")], link, None)
    link.feed(m.command_complete("ROLLBACK") + ready(b"I"))
    assert link.idle


def test_a_quiet_sync_of_the_proxys_own_is_not_a_client_unit_due() -> None:
    """asyncpg prepares with Parse, Describe and Flush; the proxy closes that batch with a
    Sync of its own. Until its ReadyForQuery comes the connection is busy, but no reply to a
    Sync of the client's is due: the transaction state is the one before (a pipeline may go
    on to another shard). A client's own Sync is due until answered."""
    link, client = ServerLink(), ClientStatements()
    client.rewrite([parse(b"", b"select 1"), (ord("D"), b"S\0")], link, None)
    link.end_batch_quietly()
    assert link.busy and not link.client_units_due
    client.rewrite([bind(b""), execute(), SYNC], link, None)
    assert link.client_units_due
    link.feed(msg("1") + msg("n") + ready())  # the quiet unit: its ReadyForQuery is dropped
    assert link.client_units_due
    link.feed(msg("2") + m.command_complete("SELECT 1") + ready())
    assert not link.busy and not link.client_units_due


def test_named_statement_is_renamed_and_prepared_on_a_new_server() -> None:
    client = ClientStatements()
    first = ServerLink()
    sql = b"select $1::int"
    server_name = statement_name(sql + b"\0\0\0")
    sent = frames(client.rewrite([parse(b"a", sql), SYNC], first, None))
    assert sent[0] == ("P", server_name + b"\0" + sql + b"\0\0\0")
    first.feed(m.PARSE_COMPLETE + ready())
    assert server_name in first.prepared

    # Another server connection has never seen it: Parse goes first, its reply is dropped.
    second = ServerLink()
    sent = frames(client.rewrite([bind(b"a"), execute(), SYNC], second, None))
    assert [k for k, _ in sent] == ["P", "B", "E", "S"]
    assert sent[1][1].split(b"\0")[1] == server_name
    reply = m.PARSE_COMPLETE + m.BIND_COMPLETE + m.data_row([7]) + m.command_complete(
        "SELECT 1") + ready()
    out = frames(second.feed(reply))
    assert [k for k, _ in out] == ["2", "D", "C", "Z"]
    assert second.idle

    # Now it has it: nothing injected.
    sent = frames(client.rewrite([bind(b"a"), execute(), SYNC], second, None))
    assert [k for k, _ in sent] == ["B", "E", "S"]


def test_injected_parse_skipped_by_an_error_is_forgotten() -> None:
    client = ClientStatements()
    client.rewrite([parse(b"a", b"select 1"), SYNC], ServerLink(), None)
    link = ServerLink()
    # A failing unnamed Parse before the Bind: the server skips the injected Parse too.
    client.rewrite([parse(b"", b"selec"), bind(b"a"), SYNC], link, None)
    out = frames(link.feed(msg("E", b"SERROR\0C42601\0Msyntax\0\0") + ready()))
    assert [k for k, _ in out] == ["E", "Z"]
    assert not link.prepared
    sent = frames(client.rewrite([bind(b"a"), SYNC], link, None))
    assert [k for k, _ in sent] == ["P", "B", "S"]


def test_parse_of_a_statement_the_server_has_is_acknowledged_in_order() -> None:
    link = ServerLink()
    alice, bob = ClientStatements(), ClientStatements()
    alice.rewrite([parse(b"s", b"select 1"), SYNC], link, None)
    link.feed(m.PARSE_COMPLETE + ready())
    sent = frames(bob.rewrite([parse(b"q", b"select 1"), bind(b"q"), SYNC], link, None))
    assert [k for k, _ in sent] == ["P", "C", "B", "S"]
    assert sent[0][1].startswith(b"sw_ack\0")
    out = frames(link.feed(m.PARSE_COMPLETE + m.CLOSE_COMPLETE + m.BIND_COMPLETE + ready()))
    assert [k for k, _ in out] == ["1", "2", "Z"]


def test_close_keeps_the_shared_server_statement() -> None:
    link, client = ServerLink(), ClientStatements()
    client.rewrite([parse(b"a", b"select 1"), SYNC], link, None)
    link.feed(m.PARSE_COMPLETE + ready())
    sent = frames(client.rewrite([(ord("C"), b"Sa\0"), SYNC], link, None))
    assert sent[0] == ("C", b"Ssw_closed\0")
    out = frames(link.feed(m.CLOSE_COMPLETE + ready()))
    assert [k for k, _ in out] == ["3", "Z"]
    assert len(link.prepared) == 1 and not client.statements
    # Binding the closed name goes to the server unchanged: it says it does not exist.
    sent = frames(client.rewrite([bind(b"a"), SYNC], link, None))
    assert sent[0][1].split(b"\0")[1] == b"a"


def test_eviction_close_reply_is_dropped() -> None:
    link, client = ServerLink(max_prepared=1), ClientStatements()
    client.rewrite([parse(b"a", b"select 1"), SYNC], link, None)
    link.feed(m.PARSE_COMPLETE + ready())
    sent = frames(client.rewrite([parse(b"b", b"select 2"), SYNC], link, None))
    assert [k for k, _ in sent] == ["C", "P", "S"]
    out = frames(link.feed(m.CLOSE_COMPLETE + m.PARSE_COMPLETE + ready()))
    assert [k for k, _ in out] == ["1", "Z"]
    assert list(link.prepared) == [statement_name(b"select 2\0\0\0")]


def test_settings_query_replies_are_dropped() -> None:
    link = ServerLink()
    q = link.settings_query({"application_name": "x", "timezone": "UTC"})
    assert q is not None and b"SET \"application_name\" TO 'x'" in q
    reply = (m.command_complete("SET") + m.parameter_status("application_name", "x")
             + m.command_complete("SET") + ready())
    assert link.feed(reply) == b""
    assert link.idle and not link.param_updates
    assert link.reported["application_name"] == "x"
    assert link.settings_query({"application_name": "x", "timezone": "UTC"}) is None
    q = link.settings_query({"timezone": "UTC"})
    assert q is not None and b'RESET "application_name"' in q


def test_client_set_of_a_reported_parameter_is_noted() -> None:
    link, client = ServerLink(), ClientStatements()
    client.rewrite([(ord("Q"), b"set timezone = 'Asia/Tokyo'\0")], link, None)
    reply = m.command_complete("SET") + m.parameter_status("TimeZone", "Asia/Tokyo") + ready()
    assert link.feed(reply) == reply
    assert link.param_updates == [("timezone", "Asia/Tokyo")]
    assert link.settings["timezone"] == "Asia/Tokyo"


def test_copy_in_does_not_leave_the_server_busy() -> None:
    link, client = ServerLink(), ClientStatements()
    client.rewrite([(ord("Q"), b"copy t from stdin\0")], link, None)
    link.feed(msg("G", b"\0\0\0"))
    client.rewrite([(ord("d"), b"1\n"), (ord("c"), b"")], link, None)
    link.feed(m.command_complete("COPY 1") + ready())
    assert link.idle


def test_extended_batch_without_sync_keeps_the_server() -> None:
    link, client = ServerLink(), ClientStatements()
    client.rewrite([parse(b"", b"select 1"), (ord("H"), b"")], link, None)
    link.feed(m.PARSE_COMPLETE)
    assert link.busy
    client.rewrite([SYNC], link, None)
    link.feed(ready())
    assert link.idle


def test_pipelined_units_release_only_after_the_last() -> None:
    link, client = ServerLink(), ClientStatements()
    client.rewrite([(ord("Q"), b"select 1\0"), (ord("Q"), b"select 2\0")], link, None)
    link.feed(ROW + ready())
    assert link.busy
    link.feed(ROW + ready())
    assert link.idle


def test_large_rows_stream_through_in_pieces() -> None:
    link, client = ServerLink(), ClientStatements()
    client.rewrite([(ord("Q"), b"select big\0")], link, None)
    big = m.data_row(["x" * 100_000])
    reply = big + m.command_complete("SELECT 1") + ready()
    out = b"".join(bytes(link.feed(reply[i:i + 4096])) for i in range(0, len(reply), 4096))
    assert out == reply and link.idle


def test_garbage_from_the_server_is_an_error() -> None:
    link = ServerLink()
    with pytest.raises(BackendProtocolError):
        link.feed(b"Z" + struct.pack("!I", 2) + b"I")
    with pytest.raises(BackendProtocolError):
        ServerLink().feed(ready())  # nobody asked
