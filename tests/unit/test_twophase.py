"""Two-phase commit ids, recovery reports and the admin console's later answers (no server)."""

from __future__ import annotations

import asyncio
import datetime
import doctest
import re
import struct
from typing import Any

import pytest

from shardwire.proxy import twophase
from shardwire.proxy.admin import AdminSession
from shardwire.proxy.protocol import messages as m
from shardwire.proxy.protocol.errors import PgError
from shardwire.proxy.twophase import (
    GID_PREFIX,
    InDoubt,
    PreparedTransaction,
    RecoveryReport,
    Survey,
    make_gid,
    new_instance_id,
    parse_gid,
)

# --- gids ---------------------------------------------------------------------------------


def test_doctests() -> None:
    assert doctest.testmod(twophase).failed == 0


@pytest.mark.parametrize("number", [0, 1, 42, 10**20 - 1])
def test_gid_round_trip(number: int) -> None:
    instance = new_instance_id()
    gid = make_gid(instance, number)
    assert gid.startswith(GID_PREFIX + ":")
    assert parse_gid(gid) == (instance, number)


def test_gid_is_short_and_plain() -> None:
    gid = make_gid("a" * 64, 10**20 - 1)  # the longest there is
    assert len(gid.encode()) <= 199  # PostgreSQL: shorter than GIDSIZE (200)
    assert re.fullmatch(r"[A-Za-z0-9:_-]+", gid)


def test_instance_ids_are_unique_and_fit() -> None:
    ids = {new_instance_id() for _ in range(1000)}
    assert len(ids) == 1000
    for instance in ids:
        assert parse_gid(make_gid(instance, 1)) == (instance, 1)
        assert len(instance) <= 16


@pytest.mark.parametrize("instance, number", [
    ("", 1), ("a:b", 1), ("a b", 1), ("é", 1), ("x'y", 1), ("a" * 65, 1), ("a", -1),
    ("a", 10**20),
])
def test_make_gid_refuses_what_could_not_be_parsed_back(instance: str, number: int) -> None:
    with pytest.raises(ValueError):
        make_gid(instance, number)


@pytest.mark.parametrize("gid", [
    "other:abc:1",  # another prefix
    "shardwire2:abc:1",  # a prefix that merely starts like ours
    "Shardwire:abc:1",
    "shardwire:abc",  # no number
    "shardwire:abc:",
    "shardwire::1",  # no instance
    "shardwire:abc:01",  # not how we write numbers
    "shardwire:abc:1:2",
    "shardwire:abc:-1",
    "shardwire:a b:1",
    "shardwire:abc:1 ",
    "shardwire:abc:1\n",
    " shardwire:abc:1",
    "shardwire:abc:x",
    "",
])
def test_parse_gid_refuses_gids_not_ours(gid: str) -> None:
    assert parse_gid(gid) is None


# --- reports ------------------------------------------------------------------------------

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def tx(shard: str, number: int, age: float = 100.0) -> PreparedTransaction:
    return PreparedTransaction(shard, make_gid("i", number), NOW, age)


def test_report_settled_only_when_nothing_is_left() -> None:
    assert RecoveryReport().settled
    done = RecoveryReport(committed=[tx("s1", 1)], rolled_back=[tx("s2", 2)],
                          elsewhere=[tx("s3", 3)], forgotten=["x"])
    assert done.settled and done.in_doubt == 0
    assert RecoveryReport(left_young=[tx("s1", 1, 1.0)]).in_doubt == 1
    assert RecoveryReport(failed=[(tx("s1", 1), "boom")]).in_doubt == 1
    assert RecoveryReport(unreachable=[("s1", "down")]).in_doubt == 1
    # A dry run changed nothing: what it would do is still in doubt.
    dry = RecoveryReport(committed=[tx("s1", 1)], rolled_back=[tx("s2", 2)], dry_run=True)
    assert dry.in_doubt == 2 and not dry.settled


def test_no_catalog_means_no_decision_log() -> None:
    log = twophase.DecisionLog(None)
    assert not log.available

    async def scenario() -> None:
        await log.forget(["shardwire:i:1"])  # nothing to forget: no error
        with pytest.raises(PgError) as err:
            await log.record_commit("shardwire:i:1", ["s1", "s2"])
        assert err.value.sqlstate == "F0000"
        with pytest.raises(ValueError):
            await log.record_commit("not ours", ["s1"])
        await log.close()

    asyncio.run(scenario())


def test_outcome_unknown_is_a_pg_error() -> None:
    err = twophase.CommitOutcomeUnknown("08007", "x")
    assert isinstance(err, PgError) and err.sqlstate == "08007"


# --- the admin console's later answers ----------------------------------------------------


class Client:
    """What AdminSession needs of a ClientConnection: it collects the bytes written."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.pid, self.secret = 7, 11

    def write(self, data: bytes) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True

    def fatal(self, err: PgError) -> None:
        self.closed = True


class SlowRecovery:
    """Answers survey() and resolve() only when told to."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.resolved: list[tuple[str, bool]] = []

    async def survey(self) -> Survey:
        await self.go.wait()
        return Survey([InDoubt("s2", "shardwire:i:9", NOW, 75.9, "commit")],
                      [("s3", "cannot connect")])

    async def resolve(self, gid: str, *, commit: bool) -> list[str]:
        await self.go.wait()
        self.resolved.append((gid, commit))
        return ["s1", "s2"]


class Proxy:
    def __init__(self, recovery: Any) -> None:
        if recovery is not None:
            self.recovery = recovery
        self.clients: set[Any] = set()


def messages(data: bytes) -> list[tuple[str, bytes]]:
    out, i = [], 0
    while i < len(data):
        kind = chr(data[i])
        (length,) = struct.unpack("!I", data[i + 1:i + 5])
        out.append((kind, data[i + 5:i + 1 + length]))
        i += 1 + length
    return out


def rows(data: bytes) -> list[list[str | None]]:
    result = []
    for kind, body in messages(data):
        if kind != "D":
            continue
        (count,) = struct.unpack("!h", body[:2])
        values, i = [], 2
        for _ in range(count):
            (n,) = struct.unpack("!i", body[i:i + 4])
            i += 4
            values.append(None if n < 0 else body[i:i + n].decode())
            i += max(n, 0)
        result.append(values)
    return result


def shape(data: bytes) -> str:
    return "".join(kind for kind, _ in messages(data))


def test_later_answers_keep_the_order_of_requests() -> None:
    async def scenario() -> None:
        recovery = SlowRecovery()
        client = Client()
        session = AdminSession(Proxy(recovery), client)  # type: ignore[arg-type]
        # Three queries in one packet: the first must be answered later.
        session.feed(m.query("SHOW IN_DOUBT") + m.query("SHOW VERSION")
                     + m.query("RESOLVE IN_DOUBT 'shardwire:i:9' ROLLBACK; SHOW VERSION"))
        await asyncio.sleep(0.01)
        assert client.out == b""  # the version must not overtake the in-doubt list
        recovery.go.set()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if shape(bytes(client.out)).count("Z") == 3:
                break
        out = bytes(client.out)
        # in doubt: a warning about s3, the row, the tag; then the version; then resolve + version
        assert shape(out) == "NTDCZ" + "TDCZ" + "TDDCTDCZ"
        got = rows(out)
        assert got[0] == ["s2", "shardwire:i:9", "2026-01-01 00:00:00+0000", "75", "commit"]
        assert str(got[1][0]).startswith("Shardwire")
        assert got[2:4] == [["s1", "shardwire:i:9", "rolled back"],
                            ["s2", "shardwire:i:9", "rolled back"]]
        assert recovery.resolved == [("shardwire:i:9", False)]
        assert b"RESOLVE 2\x00" in out

    asyncio.run(scenario())


def test_without_recovery_the_console_says_so_and_goes_on() -> None:
    async def scenario() -> None:
        client = Client()
        session = AdminSession(Proxy(None), client)  # type: ignore[arg-type]
        session.feed(m.query("SHOW IN_DOUBT") + m.query("SHOW VERSION"))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if shape(bytes(client.out)).count("Z") == 2:
                break
        out = bytes(client.out)
        assert shape(out) == "EZ" + "TDCZ"
        assert b"C0A000\x00" in out and b"shardwire recover" in out

    asyncio.run(scenario())


@pytest.mark.parametrize("sql", [
    "RESOLVE IN_DOUBT shardwire:i:9 COMMIT",  # not quoted
    "RESOLVE IN_DOUBT 'shardwire:i:9'",  # no verb
    "RESOLVE IN_DOUBT 'shardwire:i:9' MAYBE",
    "RESOLVE 'shardwire:i:9' COMMIT",
])
def test_resolve_syntax_errors(sql: str) -> None:
    async def scenario() -> None:
        recovery = SlowRecovery()
        recovery.go.set()
        client = Client()
        AdminSession(Proxy(recovery), client).feed(m.query(sql))  # type: ignore[arg-type]
        for _ in range(100):
            await asyncio.sleep(0.01)
            if b"Z" in client.out:
                break
        assert shape(bytes(client.out)) == "EZ"
        assert b"C42601\x00" in client.out
        assert recovery.resolved == []

    asyncio.run(scenario())


def test_show_help_lists_the_two_phase_commands() -> None:
    client = Client()
    session = AdminSession(Proxy(None), client)  # type: ignore[arg-type]
    commands = [r[0] for r in rows(session.run(b"SHOW HELP"))]
    assert "SHOW IN_DOUBT" in commands
    assert "RESOLVE IN_DOUBT '<gid>' COMMIT" in commands
    assert "RESOLVE IN_DOUBT '<gid>' ROLLBACK" in commands
