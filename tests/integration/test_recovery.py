"""Two-phase commit recovery against real shards: prepared transactions made directly on the
shards (BEGIN; INSERT; PREPARE TRANSACTION), decisions in a real catalog database, and
`Recovery`, `shardwire recover` and the admin console finishing them.

Every test uses gids of its own instance and checks, on each shard, which rows landed and
that none of its prepared transactions is left (TESTING idea 4).
"""

from __future__ import annotations

import asyncio
import dataclasses
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import yaml
from conftest import ADMIN_PASSWORD, DATABASE, MakeProxy

from shardwire.cli import main as cli
from shardwire.config.model import Config, ServerAddress, Shard
from shardwire.proxy.admin import AdminSession
from shardwire.proxy.protocol import messages as m
from shardwire.proxy.protocol.errors import PgError
from shardwire.proxy.twophase import (
    TABLE,
    CommitOutcomeUnknown,
    DecisionLog,
    Recovery,
    check_shards,
    decision_address,
    make_gid,
    new_instance_id,
)
from shardwire.testing import HOST, PostgresCluster, free_port

CATALOG = "sw_twophase_catalog"
FOREIGN = ["other_app:tx:1", "shardwire:not-ours"]  # never ours: must never be touched


def address(cluster: PostgresCluster, database: str = DATABASE) -> ServerAddress:
    return ServerAddress(HOST, cluster.port, database, "postgres",
                         dsn=cluster.dsn(database))


def dead_address() -> ServerAddress:
    return ServerAddress(HOST, free_port(), DATABASE, "postgres")


def make_config(shards: list[PostgresCluster], *, extra: dict[str, ServerAddress] | None = None,
                catalog: bool = True) -> Config:
    servers = {f"s{i + 1}": address(c) for i, c in enumerate(shards)} | (extra or {})
    return Config(database=DATABASE,
                  shards={name: Shard(name, a) for name, a in servers.items()},
                  default_shard="s1", users={},
                  catalog=address(shards[0], CATALOG) if catalog else None)


@dataclass
class Rig:
    """The shards, a table on each, and this test's own gids."""

    shards: list[PostgresCluster]
    table: str
    instance: str = field(default_factory=new_instance_id)
    numbers: Iterator[int] = field(default_factory=lambda: iter(range(1, 10**6)))
    foreign: list[tuple[PostgresCluster, str]] = field(default_factory=list)

    @property
    def config(self) -> Config:
        return make_config(self.shards)

    def gid(self) -> str:
        return make_gid(self.instance, next(self.numbers))

    def prepare(self, shard: int, gid: str, value: int) -> None:
        """A transaction on shard `shard` (1-based) that inserts `value`, left prepared."""
        with psycopg.connect(self.shards[shard - 1].dsn(DATABASE), autocommit=True) as conn:
            conn.execute("BEGIN")
            conn.execute(f"INSERT INTO {self.table} (v) VALUES (%s)", (value,))
            conn.execute(f"PREPARE TRANSACTION '{gid}'")

    def prepare_foreign(self, shard: int, gid: str, value: int) -> None:
        self.prepare(shard, gid, value)
        self.foreign.append((self.shards[shard - 1], gid))

    def rows(self, shard: int) -> set[int]:
        out = self.shards[shard - 1].sql(f"SELECT v FROM {self.table}", dbname=DATABASE)
        return {int(v) for v in out.split()}

    def prepared(self, shard: int) -> set[str]:
        out = self.shards[shard - 1].sql(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()",
            dbname=DATABASE)
        return set(out.split("\n")) if out else set()

    def ours(self, shard: int) -> set[str]:
        return {g for g in self.prepared(shard) if g.startswith(f"shardwire:{self.instance}:")}


_catalog: list[PostgresCluster] = []  # for decisions()


@pytest.fixture(scope="module")
def catalog(shards: list[PostgresCluster]) -> Iterator[PostgresCluster]:
    shards[0].create_database(CATALOG)
    _catalog[:] = [shards[0]]
    yield shards[0]
    shards[0].sql(f"DROP TABLE IF EXISTS {TABLE}", dbname=CATALOG)


@pytest.fixture
def rig(shards: list[PostgresCluster], catalog: PostgresCluster,
        request: pytest.FixtureRequest) -> Iterator[Rig]:
    table = f"tp_{uuid.uuid4().hex[:8]}"
    for shard in shards:
        shard.sql(f"CREATE TABLE {table} (v int)", dbname=DATABASE)
    rig = Rig(shards, table)
    failed_before = request.session.testsfailed
    yield rig
    # Leftovers hold locks on the table: finish them, then say whether there were any.
    left = {}
    for i, shard in enumerate(shards, 1):
        ours = rig.ours(i)
        foreign = {g for c, g in rig.foreign if c is shard} & rig.prepared(i)
        for gid in ours | foreign:
            shard.sql(f"ROLLBACK PREPARED '{gid}'", dbname=DATABASE)
        if ours:
            left[shard.name] = sorted(ours)
        shard.sql(f"DROP TABLE {table}", dbname=DATABASE)
    # (A test that failed has said so already; its leftovers are no news.)
    if request.session.testsfailed == failed_before:
        assert not left, f"prepared transactions left behind: {left}"


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


async def recover(config: Config, *, min_age: float, dry_run: bool = False) -> Any:
    log = DecisionLog(config.catalog)
    try:
        return await Recovery(config, log).run_once(min_age=min_age, dry_run=dry_run)
    finally:
        await log.close()


async def record(config: Config, gid: str, participants: list[str]) -> None:
    log = DecisionLog(config.catalog)
    try:
        await log.record_commit(gid, participants)
    finally:
        await log.close()


def decisions(gids: list[str]) -> dict[str, str]:
    """The decisions in the catalog for these gids, read directly."""
    with psycopg.connect(f"host={HOST} port={_catalog[0].port} dbname={CATALOG} "
                         "user=postgres", autocommit=True) as conn:
        return dict(conn.execute(f"SELECT gid, decision FROM {TABLE} WHERE gid = ANY(%s)",
                                 (gids,)).fetchall())


def of(items: Any, rig: Rig) -> set[tuple[str, str]]:
    """(shard, gid) of a report's list, this test's gids only."""
    return {(t.shard, t.gid) for t in items if t.gid.startswith(f"shardwire:{rig.instance}:")}


# --- recovery -----------------------------------------------------------------------------


def test_commits_decided_rolls_back_old_undecided_leaves_young(rig: Rig) -> None:
    decided, undecided, young = rig.gid(), rig.gid(), rig.gid()
    rig.prepare(1, decided, 11)
    rig.prepare(2, decided, 12)
    rig.prepare(2, undecided, 22)
    rig.prepare(3, undecided, 23)
    rig.prepare_foreign(1, FOREIGN[0], 91)
    rig.prepare_foreign(3, FOREIGN[1], 93)
    run(record(rig.config, decided, ["s1", "s2"]))
    time.sleep(1.2)
    rig.prepare(1, young, 31)

    report = run(recover(rig.config, min_age=1.0))

    assert of(report.committed, rig) == {("s1", decided), ("s2", decided)}
    assert of(report.rolled_back, rig) == {("s2", undecided), ("s3", undecided)}
    assert of(report.left_young, rig) == {("s1", young)}
    assert not report.failed and not report.unreachable and report.catalog_error is None
    assert rig.rows(1) == {11} and rig.rows(2) == {12} and rig.rows(3) == set()
    assert rig.ours(1) == {young} and rig.ours(2) == set() and rig.ours(3) == set()
    # The foreign ones are untouched, under our prefix or not.
    assert FOREIGN[0] in rig.prepared(1) and FOREIGN[1] in rig.prepared(3)
    # The commit decision is gone (no shard needs it); the rollback is kept as a fence.
    assert decided in report.forgotten
    assert decisions([decided, undecided]) == {undecided: "rollback"}

    # Once old enough, the young one goes too; the foreign ones still stay.
    report = run(recover(rig.config, min_age=0))
    assert of(report.rolled_back, rig) == {("s1", young)}
    assert rig.rows(1) == {11} and rig.ours(1) == set()
    assert FOREIGN[0] in rig.prepared(1) and FOREIGN[1] in rig.prepared(3)


def test_dry_run_changes_nothing(rig: Rig) -> None:
    decided, undecided = rig.gid(), rig.gid()
    rig.prepare(1, decided, 1)
    rig.prepare(2, undecided, 2)
    run(record(rig.config, decided, ["s1"]))

    report = run(recover(rig.config, min_age=0, dry_run=True))

    assert of(report.committed, rig) == {("s1", decided)}
    assert of(report.rolled_back, rig) == {("s2", undecided)}
    assert not report.settled and not report.forgotten
    assert rig.ours(1) == {decided} and rig.ours(2) == {undecided}
    assert rig.rows(1) == set() and rig.rows(2) == set()
    assert decisions([decided, undecided]) == {decided: "commit"}  # no fence written
    run(recover(rig.config, min_age=0))
    assert rig.rows(1) == {1} and rig.rows(2) == set()


def test_a_commit_cannot_be_recorded_after_recovery_rolled_back(rig: Rig) -> None:
    """A proxy slower than min_age between PREPARE and its decision: recovery's rollback
    decision stands, and the proxy's record_commit fails, so it rolls back too."""
    gid = rig.gid()
    rig.prepare(1, gid, 1)
    report = run(recover(rig.config, min_age=0))
    assert of(report.rolled_back, rig) == {("s1", gid)}
    with pytest.raises(PgError) as err:
        run(record(rig.config, gid, ["s1", "s2"]))
    assert err.value.sqlstate == "40000"
    assert not isinstance(err.value, CommitOutcomeUnknown)
    assert decisions([gid]) == {gid: "rollback"}


def test_record_commit_is_durable_and_idempotent(rig: Rig) -> None:
    gid = rig.gid()

    async def scenario() -> None:
        log = DecisionLog(rig.config.catalog)
        try:
            await log.record_commit(gid, ["s1", "s2"])
            await log.record_commit(gid, ["s1", "s2"])  # again: still committed, no error
            assert await log.committed([gid, rig.gid()]) == {gid}
            async with log._pool.acquire() as conn:  # noqa: SLF001 - what the decision used
                assert await conn.fetchval("SHOW synchronous_commit") == "on"
            await asyncio.gather(log.forget([gid]), log.forget([gid]))
            assert await log.committed([gid]) == set()
        finally:
            await log.close()

    run(scenario())


def test_shard_unreachable_is_reported_not_fatal(rig: Rig) -> None:
    config = make_config(rig.shards, extra={"s4": dead_address()})
    decided = rig.gid()
    rig.prepare(1, decided, 1)
    run(record(config, decided, ["s1", "s4"]))

    report = run(recover(config, min_age=0))

    assert [s for s, _ in report.unreachable] == ["s4"]
    assert "cannot connect" in report.unreachable[0][1]
    assert of(report.committed, rig) == {("s1", decided)}
    assert rig.rows(1) == {1}
    # s4 may still hold it: the decision must stay.
    assert decided not in report.forgotten and decisions([decided]) == {decided: "commit"}
    assert not report.settled
    # A participant missing from the config may hold it too: the decision still stays.
    report = run(recover(rig.config, min_age=0))
    assert decided not in report.forgotten and decisions([decided]) == {decided: "commit"}


def test_catalog_unreachable_decides_nothing(rig: Rig) -> None:
    gid = rig.gid()
    rig.prepare(2, gid, 2)
    config = dataclasses.replace(rig.config, catalog=dead_address())
    started = time.monotonic()
    report = run(recover(config, min_age=0))
    assert time.monotonic() - started < 15
    assert report.catalog_error and "decision log" in report.catalog_error
    assert of((t for t, _ in report.failed), rig) == {("s2", gid)}
    assert not report.rolled_back and not report.committed and not report.settled
    assert rig.ours(2) == {gid}
    run(recover(rig.config, min_age=0))
    assert rig.ours(2) == set() and rig.rows(2) == set()


def test_without_a_decision_log_nothing_is_decided(rig: Rig) -> None:
    """Presuming "rollback" without the decisions could undo committed transactions."""
    gid = rig.gid()
    rig.prepare(3, gid, 3)
    config = make_config(rig.shards, catalog=False)
    log = DecisionLog(None)
    report = run(Recovery(config, log).run_once(min_age=0))
    assert not report.rolled_back and not report.committed and not report.settled
    assert of((t for t, _ in report.failed), rig) == {("s3", gid)}
    assert report.catalog_error and "no decision log" in report.catalog_error
    assert rig.ours(3) == {gid}
    run(recover(rig.config, min_age=0))
    assert rig.ours(3) == set() and rig.rows(3) == set()


def test_two_recoveries_at_once(rig: Rig) -> None:
    committed: list[str] = []
    rolled_back: list[str] = []
    for n in range(12):
        gid = rig.gid()
        for shard in (1 + n % 3, 1 + (n + 1) % 3):
            rig.prepare(shard, gid, n * 10 + shard)
        (committed if n % 2 == 0 else rolled_back).append(gid)
    for gid in committed:
        run(record(rig.config, gid, ["s1", "s2", "s3"]))

    async def both() -> list[Any]:
        return list(await asyncio.gather(recover(rig.config, min_age=0),
                                         recover(rig.config, min_age=0)))

    reports = run(both())
    for report in reports:
        assert not report.failed and not report.unreachable and report.catalog_error is None
    done = set().union(*(of(r.committed, rig) | of(r.elsewhere, rig) for r in reports))
    assert {g for _, g in done} >= set(committed)
    for i in range(1, 4):
        assert rig.ours(i) == set()
    expected: dict[int, set[int]] = {1: set(), 2: set(), 3: set()}
    for n in range(0, 12, 2):
        for shard in (1 + n % 3, 1 + (n + 1) % 3):
            expected[shard].add(n * 10 + shard)
    assert {i: rig.rows(i) for i in (1, 2, 3)} == expected
    assert set(decisions(committed + rolled_back).values()) <= {"rollback"}


# --- the decision log when the catalog misbehaves -----------------------------------------


def test_record_commit_fails_fast_when_the_catalog_is_down(rig: Rig) -> None:
    async def scenario() -> float:
        log = DecisionLog(dead_address(), timeout=1.0)
        started = time.monotonic()
        try:
            with pytest.raises(PgError) as err:
                await log.record_commit(rig.gid(), ["s1", "s2"])
        finally:
            await log.close()
        assert err.value.sqlstate == "08006"
        assert not isinstance(err.value, CommitOutcomeUnknown)
        return time.monotonic() - started

    assert run(scenario()) < 3


def test_record_commit_does_not_hang_on_a_silent_catalog(rig: Rig) -> None:
    """A catalog that accepts connections and never answers."""
    async def scenario() -> float:
        silent = await asyncio.start_server(lambda r, w: None, HOST, 0)
        port = silent.sockets[0].getsockname()[1]
        log = DecisionLog(ServerAddress(HOST, port, CATALOG, "postgres"), timeout=1.0)
        started = time.monotonic()
        try:
            with pytest.raises(PgError) as err:
                await log.record_commit(rig.gid(), ["s1", "s2"])
        finally:
            await log.close()
            silent.close()
        assert err.value.sqlstate == "08006"
        return time.monotonic() - started

    assert run(scenario()) < 3


@pytest.mark.parametrize("other, at, expected", [
    # The decision's first write waits on another session's uncommitted row for the gid; the
    # second ask either learns how that one ended or cannot tell.
    ("commit", 3.0, "committed"),
    ("rollback", 3.0, "40000"),
    (None, 3.0, "committed"),  # the other session rolls back: ours is the decision
    ("commit", None, "08007"),  # nothing ends in time: unknown, leave it to recovery
])
def test_record_commit_settles_an_unsure_write(rig: Rig, other: str | None, at: float | None,
                                               expected: str) -> None:
    gid = rig.gid()
    catalog = rig.config.catalog
    assert catalog is not None

    async def scenario() -> str:
        log = DecisionLog(catalog, timeout=2.0)
        await log.decisions(["x"])  # creates the table
        blocker = await asyncpg.connect(host=HOST, port=catalog.port, user="postgres",
                                        database=CATALOG)
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute(f"INSERT INTO {TABLE} (gid, decision, participants) "
                              "VALUES ($1, $2, '{s1}')", gid, other or "commit")
        started = time.monotonic()
        attempt = asyncio.ensure_future(log.record_commit(gid, ["s1", "s2"]))
        try:
            if at is not None:
                await asyncio.sleep(at)
                await (tx.commit() if other is not None else tx.rollback())
            try:
                await attempt
                outcome = "committed"
            except PgError as e:
                outcome = e.sqlstate
                assert isinstance(e, CommitOutcomeUnknown) == (e.sqlstate == "08007")
            assert time.monotonic() - started < 2 * 2.0 + 1.5
            return outcome
        finally:
            if at is None:
                await tx.rollback()
            await blocker.close()
            await log.close()

    assert run(scenario()) == expected
    if expected == "committed":
        assert decisions([gid]) == {gid: "commit"}


# --- shard settings -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def no_prepared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresCluster]:
    """A shard server where two-phase commit is off (max_prepared_transactions = 0)."""
    cluster = PostgresCluster(tmp_path_factory.mktemp("noprep") / "noprep",
                              settings={"max_prepared_transactions": "0"}, name="noprep")
    cluster.init()
    cluster.start()
    cluster.create_database(DATABASE)
    yield cluster
    cluster.stop()


def test_check_shards_names_the_shard_the_value_and_the_fix(
        shards: list[PostgresCluster], no_prepared: PostgresCluster) -> None:
    assert run(check_shards(make_config(shards))) == []
    config = make_config(shards, extra={"s4": address(no_prepared), "s5": dead_address()})
    problems = run(check_shards(config))
    assert len(problems) == 2
    bad = next(p for p in problems if "s4" in p)
    assert "max_prepared_transactions = 0" in bad
    assert "postgresql.conf" in bad and "max_connections (200)" in bad and "restart" in bad
    assert "s5" in next(p for p in problems if p is not bad)
    report = run(recover(make_config(shards, extra={"s4": address(no_prepared)}), min_age=60))
    assert [p for p in report.problems if "s4" in p] == [bad]


# --- shardwire recover --------------------------------------------------------------------


def write_config(rig: Rig, path: Path, *, catalog: bool = True, **extra_shards: str) -> str:
    cfg: dict[str, Any] = {
        "database": DATABASE,
        "auth": {"method": "trust"},
        "users": {"app": {}},
        "shards": {f"s{i + 1}": {"primary": c.dsn(DATABASE)} for i, c in enumerate(rig.shards)}
        | {name: {"primary": dsn} for name, dsn in extra_shards.items()},
        "default_shard": "s1",
    }
    if catalog:
        cfg["catalog"] = rig.shards[0].dsn(CATALOG)
    file = path / "shardwire.yaml"
    file.write_text(yaml.safe_dump(cfg))
    return str(file)


def test_cli_recover(rig: Rig, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(rig, tmp_path)
    decided, undecided = rig.gid(), rig.gid()
    rig.prepare(1, decided, 1)
    rig.prepare(3, decided, 3)
    rig.prepare(2, undecided, 2)
    rig.prepare_foreign(2, FOREIGN[0], 9)
    run(record(rig.config, decided, ["s1", "s3"]))

    assert cli(["recover", "--config", config, "--min-age", "0", "--dry-run"]) == 1
    out = capsys.readouterr().out
    assert f"s1: would commit {decided}" in out and f"s3: would commit {decided}" in out
    assert f"s2: would roll back {undecided}" in out
    assert "(dry run)" in out and FOREIGN[0] not in out
    assert rig.ours(1) == {decided} and rig.ours(2) == {undecided}

    # Young (the default min age is 60 s): the undecided one is left, so exit 1.
    assert cli(["recover", "--config", config]) == 1
    out = capsys.readouterr().out
    assert f"s1: committed {decided}" in out and f"s3: committed {decided}" in out
    assert f"s2: left alone (no decision, younger than 60s): {undecided}" in out
    assert rig.rows(1) == {1} and rig.rows(3) == {3} and rig.ours(2) == {undecided}

    assert cli(["recover", "--config", config, "--min-age", "0"]) == 0
    out = capsys.readouterr().out
    assert f"s2: rolled back {undecided}" in out
    assert "summary: 0 committed, 1 rolled back, 0 left in doubt" in out
    assert rig.rows(2) == set() and rig.ours(2) == set()
    assert FOREIGN[0] in rig.prepared(2)


def test_cli_recover_without_a_catalog_reads_the_default_shard(
        rig: Rig, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without `catalog:` the proxy keeps its decisions in the default shard's database:
    `shardwire recover` must read them there, not presume that nothing was committed."""
    config = write_config(rig, tmp_path, catalog=False)
    where = decision_address(make_config(rig.shards, catalog=False))
    assert (where.port, where.database) == (rig.shards[0].port, DATABASE)
    decided = rig.gid()
    rig.prepare(2, decided, 2)
    rig.prepare(3, decided, 3)

    async def decide() -> None:
        log = DecisionLog(where)
        try:
            await log.record_commit(decided, ["s2", "s3"])
        finally:
            await log.close()

    run(decide())
    # (The table stays: proxies of other tests may keep their decisions in it.)
    assert cli(["recover", "--config", config, "--min-age", "0"]) == 0
    out = capsys.readouterr().out
    assert f"s2: committed {decided}" in out and f"s3: committed {decided}" in out
    assert rig.rows(2) == {2} and rig.rows(3) == {3}
    assert rig.shards[0].sql(f"SELECT count(*) FROM {TABLE} WHERE gid = '{decided}'",
                             dbname=DATABASE) == "0"


def test_cli_recover_reports_unreachable_shards_and_bad_configs(
        rig: Rig, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(rig, tmp_path, s4=f"postgresql://postgres@{HOST}:{free_port()}/app")
    assert cli(["recover", "--config", config, "--min-age", "0"]) == 1
    captured = capsys.readouterr()
    assert "s4: unreachable: cannot connect" in captured.err
    assert "1 shard(s) not looked at" in captured.out
    (tmp_path / "bad.yaml").write_text("database: app\n")
    assert cli(["recover", "--config", str(tmp_path / "bad.yaml")]) == 1
    assert "problem" in capsys.readouterr().err


# --- the admin console --------------------------------------------------------------------


class Client:
    """The part of a client connection AdminSession writes to."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.pid, self.secret = 1, 2

    def write(self, data: bytes) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True

    def fatal(self, err: PgError) -> None:
        self.closed = True


class ProxyWithRecovery:
    """The attributes of the proxy the console uses for two-phase commit."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.decision_log = DecisionLog(config.catalog)
        self.recovery = Recovery(config, self.decision_log, "admin-test")


def replies(data: bytes) -> list[tuple[str, Any]]:
    """(kind, decoded) per message: rows as lists, errors as (sqlstate, message)."""
    out: list[tuple[str, Any]] = []
    i = 0
    while i < len(data):
        kind = chr(data[i])
        (length,) = struct.unpack("!I", data[i + 1:i + 5])
        body = data[i + 5:i + 1 + length]
        i += 1 + length
        if kind == "D":
            (count,) = struct.unpack("!h", body[:2])
            values, j = [], 2
            for _ in range(count):
                (n,) = struct.unpack("!i", body[j:j + 4])
                j += 4
                values.append(None if n < 0 else body[j:j + n].decode())
                j += max(n, 0)
            out.append(("D", values))
        elif kind in "EN":
            fields = m.parse_error_fields(body)
            out.append((kind, (fields.get("C"), fields.get("M"))))
        elif kind == "C":
            out.append(("C", body[:-1].decode()))
        else:
            out.append((kind, None))
    return out


async def console(proxy: ProxyWithRecovery, sql: str) -> list[tuple[str, Any]]:
    client = Client()
    AdminSession(proxy, client).feed(m.query(sql))  # type: ignore[arg-type]
    for _ in range(600):
        if b"Z\x00\x00\x00\x05I" in client.out:
            break
        await asyncio.sleep(0.05)
    return replies(bytes(client.out))


def test_admin_show_and_resolve_in_doubt(rig: Rig) -> None:
    decided, undecided, other = rig.gid(), rig.gid(), rig.gid()
    rig.prepare(1, decided, 1)
    rig.prepare(2, decided, 2)
    rig.prepare(2, undecided, 20)
    rig.prepare(3, undecided, 30)
    rig.prepare(3, other, 300)
    rig.prepare_foreign(1, FOREIGN[0], 9)
    run(record(rig.config, decided, ["s1", "s2"]))

    async def scenario() -> None:
        proxy = ProxyWithRecovery(rig.config)
        try:
            shown = await console(proxy, "SHOW IN_DOUBT")
            assert shown[-2:] == [("C", f"SHOW {sum(1 for k, _ in shown if k == 'D')}"),
                                  ("Z", None)]
            rows = {(r[0], r[1]): r for k, r in shown if k == "D"}
            assert {(s, g) for s, g in rows if g.startswith(f"shardwire:{rig.instance}")} == {
                ("s1", decided), ("s2", decided), ("s2", undecided), ("s3", undecided),
                ("s3", other)}
            assert rows[("s1", decided)][4] == "commit"
            assert rows[("s3", undecided)][4] == "none"
            assert int(rows[("s1", decided)][3]) >= 0
            assert not any(g == FOREIGN[0] for _, g in rows)

            # By hand: commit the undecided one; roll back is refused for a committed one.
            got = await console(proxy, f"RESOLVE IN_DOUBT '{undecided}' COMMIT")
            assert [r for k, r in got if k == "D"] == [["s2", undecided, "committed"],
                                                      ["s3", undecided, "committed"]]
            assert ("C", "RESOLVE 2") in got
            got = await console(proxy, f"resolve in_doubt '{decided}' rollback")
            assert got[0][0] == "E" and got[0][1][0] == "55000"
            assert rig.ours(1) == {decided}  # untouched
            got = await console(proxy, f"RESOLVE IN_DOUBT '{decided}' COMMIT; SHOW VERSION")
            assert [r for k, r in got if k == "D"][:2] == [["s1", decided, "committed"],
                                                          ["s2", decided, "committed"]]
            assert got[-2][0] == "C" and got[-2][1] == "SHOW 1"
            got = await console(proxy, f"RESOLVE IN_DOUBT '{other}' ROLLBACK")
            assert [r for k, r in got if k == "D"] == [["s3", other, "rolled back"]]
            # Not ours, and gone.
            got = await console(proxy, f"RESOLVE IN_DOUBT '{FOREIGN[0]}' COMMIT")
            assert got[0] == ("E", ("22023", got[0][1][1]))
            got = await console(proxy, f"RESOLVE IN_DOUBT '{other}' ROLLBACK")
            assert got[0][0] == "E" and got[0][1][0] == "42704"
        finally:
            await proxy.decision_log.close()

    run(scenario())
    assert rig.rows(1) == {1} and rig.rows(2) == {2, 20} and rig.rows(3) == {30}
    assert FOREIGN[0] in rig.prepared(1)
    assert decisions([decided, undecided]) == {}  # committed everywhere: forgotten


def test_admin_console_through_the_proxy(rig: Rig, make_proxy: MakeProxy) -> None:
    """Once the proxy has `recovery`, SHOW IN_DOUBT works from psql through the console."""
    gid = rig.gid()
    rig.prepare(2, gid, 5)

    def edit(cfg: dict[str, Any]) -> None:
        cfg["catalog"] = rig.shards[0].dsn(CATALOG)

    proxy = make_proxy(edit)
    with psycopg.connect(proxy.dsn("admin", ADMIN_PASSWORD, database="shardwire"),
                         autocommit=True) as conn:
        try:
            rows = conn.execute("SHOW IN_DOUBT").fetchall()
        except psycopg.errors.FeatureNotSupported as e:
            if "no two-phase commit recovery" in str(e):
                pytest.skip("server.py does not give the proxy `recovery` yet")
            raise
        assert ("s2", gid) in {(r[0], r[1]) for r in rows}
        done = conn.execute(f"RESOLVE IN_DOUBT '{gid}' ROLLBACK").fetchall()
        assert done == [("s2", gid, "rolled back")]
        assert conn.execute("SHOW VERSION").fetchone() is not None
    assert rig.ours(2) == set() and rig.rows(2) == set()
