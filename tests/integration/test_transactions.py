"""Transactions across shards, end to end: session transactions that join shards lazily,
savepoints, the aborted state, statements that write on several shards, and two-phase commit
(checked on each shard's own connection: rows, and no prepared transaction left behind)."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from conftest import APP_PASSWORD, PROXY_ENV, assert_nothing_left_behind, base_config, on_shard

from shardwire.testing import PostgresCluster
from shardwire.testing.proxy import ProxyProcess

SUFFIX = uuid.uuid4().hex[:8]
ACCOUNTS = f"tx_accounts_{SUFFIX}"
RATES = f"tx_rates_{SUFFIX}"  # a reference table
TRANSFERS = f"tx_transfers_{SUFFIX}"  # each transfer, on the shard of its source account
TENANT_SHARD = {1: 0, 2: 1, 3: 2}  # tenant -> index of its shard cluster


def shard_map() -> dict[str, Any]:
    return {
        "rules": {"tx_by_tenant": {"kind": "tenant", "column": "tenant_id", "type": "integer",
                                   "tables": [ACCOUNTS, TRANSFERS],
                                   "tenants": {1: "s1", 2: "s2", 3: "s3"},
                                   "default": "s1"}},
        "reference": [RATES],
    }


def start_proxy(shards: list[PostgresCluster], workdir: Any, *, recovery_min_age: float = 60,
                **env: str) -> ProxyProcess:
    cfg = base_config(shards)
    cfg["sharding"] = shard_map()
    cfg["transactions"] = {"recovery_min_age": recovery_min_age, "recovery_interval": 1}
    return ProxyProcess(cfg, workdir, env={**PROXY_ENV, **env}).start()


@pytest.fixture(scope="module")
def tables(shards: list[PostgresCluster]) -> Iterator[None]:
    for cluster in shards:
        on_shard(cluster, f"create table {ACCOUNTS} (id int primary key, tenant_id int, "
                          "balance int not null check (balance >= 0))")
        on_shard(cluster, f"create table {RATES} (code text primary key, rate numeric)")
        on_shard(cluster, f"create table {TRANSFERS} (id text primary key, tenant_id int, "
                          "src int, dst int, amount int)")
    yield
    for cluster in shards:
        on_shard(cluster, f"drop table if exists {ACCOUNTS}, {RATES}, {TRANSFERS}")


@pytest.fixture
def fresh(tables: None, shards: list[PostgresCluster]) -> None:
    for tenant, index in TENANT_SHARD.items():
        cluster = shards[index]
        on_shard(cluster, f"delete from {ACCOUNTS}")
        on_shard(cluster, f"delete from {RATES}")
        on_shard(cluster, f"delete from {TRANSFERS}")
        on_shard(cluster, f"insert into {ACCOUNTS} values (%s, %s, 100), (%s, %s, 100)",
                 [tenant * 10, tenant, tenant * 10 + 1, tenant])


@pytest.fixture(scope="module")
def tx_proxy(shards: list[PostgresCluster], tables: None,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    proc = start_proxy(shards, tmp_path_factory.mktemp("tx-proxy"))
    yield proc
    proc.stop()


def balances(shards: list[PostgresCluster]) -> dict[int, int]:
    out: dict[int, int] = {}
    for cluster in shards:
        out.update(dict(on_shard(cluster, f"select id, balance from {ACCOUNTS}")))
    return out


def prepared_left(shards: list[PostgresCluster]) -> list[Any]:
    return [row for c in shards for row in on_shard(
        c, "select gid from pg_prepared_xacts where gid like 'shardwire%'")]


def test_a_transaction_joins_shards_and_commits_on_all(
        tx_proxy: ProxyProcess, shards: list[PostgresCluster], fresh: None) -> None:
    with psycopg.connect(tx_proxy.dsn("app", APP_PASSWORD)) as conn:
        conn.execute(f"update {ACCOUNTS} set balance = balance - 30 where tenant_id = 1 "
                     "and id = 10")
        conn.execute(f"update {ACCOUNTS} set balance = balance + 30 where tenant_id = 2 "
                     "and id = 20")
        assert conn.execute(f"select balance from {ACCOUNTS} where tenant_id = 1 and id = 10"
                            ).fetchone() == (70,)
        # before COMMIT, nothing is visible from outside
        assert balances(shards)[20] == 100
        conn.commit()
    assert balances(shards) == {10: 70, 11: 100, 20: 130, 21: 100, 30: 100, 31: 100}
    assert prepared_left(shards) == []
    assert_nothing_left_behind(tx_proxy, shards)


@pytest.mark.parametrize("failing", [0, 1], ids=["the default shard", "another shard"])
def test_a_check_that_fails_at_commit_rolls_back_every_shard(
        failing: int, tx_proxy: ProxyProcess, shards: list[PostgresCluster],
        fresh: None) -> None:
    """A deferred constraint that fails at COMMIT on one shard: on the default shard (s1,
    whose COMMIT records the decision when there is no catalog) or on a prepared one. Either
    way nothing is committed anywhere and the client is told."""
    cluster = shards[failing]
    on_shard(cluster, f"create function {ACCOUNTS}_nonneg() returns trigger language plpgsql "
             "as $$ begin if new.balance = 77 then raise exception 'unlucky balance' using "
             "errcode = '23514'; end if; return null; end $$")
    on_shard(cluster, f"create constraint trigger nonneg after update on {ACCOUNTS} "
             "deferrable initially deferred for each row "
             f"execute function {ACCOUNTS}_nonneg()")
    try:
        with psycopg.connect(tx_proxy.dsn("app", APP_PASSWORD)) as conn:
            conn.execute(f"update {ACCOUNTS} set balance = 77 where tenant_id = 1 and id = 10")
            conn.execute(f"update {ACCOUNTS} set balance = 77 where tenant_id = 2 and id = 20")
            with pytest.raises(psycopg.errors.TransactionRollback) as info:
                conn.commit()
            assert info.value.sqlstate == "40000"
            assert "unlucky balance" in str(info.value)
            assert f"s{failing + 1}" in str(info.value)
        assert balances(shards) == {10: 100, 11: 100, 20: 100, 21: 100, 30: 100, 31: 100}
        assert prepared_left(shards) == []
        assert_nothing_left_behind(tx_proxy, shards)
    finally:
        on_shard(cluster, f"drop trigger nonneg on {ACCOUNTS}")
        on_shard(cluster, f"drop function {ACCOUNTS}_nonneg()")


def test_rollback_and_the_aborted_state(tx_proxy: ProxyProcess,
                                        shards: list[PostgresCluster], fresh: None) -> None:
    with psycopg.connect(tx_proxy.dsn("app", APP_PASSWORD)) as conn:
        conn.execute(f"update {ACCOUNTS} set balance = 0 where tenant_id = 1")
        conn.execute(f"update {ACCOUNTS} set balance = 0 where tenant_id = 2")
        conn.rollback()
        assert balances(shards)[10] == 100 and balances(shards)[20] == 100
        conn.execute(f"update {ACCOUNTS} set balance = 50 where tenant_id = 1")
        with pytest.raises(psycopg.errors.CheckViolation):  # on s3, which joins now
            conn.execute(f"update {ACCOUNTS} set balance = -1 where tenant_id = 3")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute(f"select 1 from {ACCOUNTS} where tenant_id = 2")
        conn.commit()  # PostgreSQL answers COMMIT in a failed transaction with ROLLBACK
    assert balances(shards) == {i: 100 for i in (10, 11, 20, 21, 30, 31)}
    assert prepared_left(shards) == []
    assert_nothing_left_behind(tx_proxy, shards)


def test_savepoints_reach_shards_that_join_later(
        tx_proxy: ProxyProcess, shards: list[PostgresCluster], fresh: None) -> None:
    with psycopg.connect(tx_proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
        conn.execute("begin")
        conn.execute(f"update {ACCOUNTS} set balance = 1 where tenant_id = 1")
        conn.execute("savepoint a")
        conn.execute(f"update {ACCOUNTS} set balance = 2 where tenant_id = 2")  # joins now
        conn.execute(f"update {ACCOUNTS} set balance = 2 where tenant_id = 1")
        conn.execute("rollback to savepoint a")
        conn.execute("savepoint b")
        conn.execute(f"update {ACCOUNTS} set balance = 3 where tenant_id = 3")  # joins now
        conn.execute("release savepoint b")
        conn.execute("commit")
    assert balances(shards) == {10: 1, 11: 1, 20: 100, 21: 100, 30: 3, 31: 3}
    assert prepared_left(shards) == []


def test_statements_without_a_key_write_every_shard_atomically(
        tx_proxy: ProxyProcess, shards: list[PostgresCluster], fresh: None) -> None:
    with psycopg.connect(tx_proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
        cur = conn.execute(f"update {ACCOUNTS} set balance = balance + 1")
        assert cur.rowcount == 6
        cur = conn.execute(f"insert into {RATES} values ('eur', 1.0), ('usd', 0.9) "
                           "returning code")
        assert sorted(cur.fetchall()) == [("eur",), ("usd",)] and cur.rowcount == 2
        # 121 breaks the check constraint on one shard only: no shard changes
        on_shard(shards[2], f"update {ACCOUNTS} set balance = 0 where id = 31")
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(f"update {ACCOUNTS} set balance = balance - 1")
        # inside a transaction too
        conn.execute("begin")
        conn.execute(f"update {ACCOUNTS} set balance = balance * 2 where balance > 0")
        conn.execute(f"delete from {RATES} where code = 'usd'")
        conn.execute("commit")
    assert balances(shards) == {10: 202, 11: 202, 20: 202, 21: 202, 30: 202, 31: 0}
    for cluster in shards:
        assert on_shard(cluster, f"select code from {RATES}") == [("eur",)]
    assert prepared_left(shards) == []
    assert_nothing_left_behind(tx_proxy, shards)


@pytest.mark.parametrize("point,committed", [
    ("after_prepare", False), ("after_decision", True), ("mid_commit", True)])
def test_a_crash_during_two_phase_commit_is_finished_by_recovery(
        point: str, committed: bool, shards: list[PostgresCluster], fresh: None,
        tmp_path: Any) -> None:
    crashing = start_proxy(shards, tmp_path / "crash", SHARDWIRE_FAULT=point)
    try:
        with pytest.raises(psycopg.OperationalError):
            with psycopg.connect(crashing.dsn("app", APP_PASSWORD)) as conn:
                conn.execute(f"update {ACCOUNTS} set balance = 0 where tenant_id = 1")
                conn.execute(f"update {ACCOUNTS} set balance = 0 where tenant_id = 2")
                conn.commit()
        assert crashing.proc is not None and crashing.proc.wait(10) != 0
    finally:
        crashing.kill()
    assert prepared_left(shards), "the crash should leave prepared transactions"
    # A proxy starting up finishes them (undecided ones once older than the safety margin).
    restarted = start_proxy(shards, tmp_path / "restart", recovery_min_age=0)
    try:
        deadline = time.monotonic() + 15
        while prepared_left(shards) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert prepared_left(shards) == []
        expected = 0 if committed else 100
        got = balances(shards)
        assert (got[10], got[11], got[20], got[21]) == (expected,) * 4
    finally:
        restarted.stop()


def test_bank_transfers_keep_the_total(tx_proxy: ProxyProcess,
                                       shards: list[PostgresCluster], fresh: None) -> None:
    """Concurrent transfers between accounts of different shards: every acknowledged transfer
    applied once, the total unchanged, nothing left prepared."""
    dsn = tx_proxy.dsn("app", APP_PASSWORD)
    ids = [10, 11, 20, 21, 30, 31]
    tenant = {i: i // 10 for i in ids}
    before = sum(balances(shards).values())
    done: list[int] = []
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        with psycopg.connect(dsn) as conn:
            for _ in range(40):
                a, b = rng.sample(ids, 2)
                amount = rng.randint(1, 30)
                try:
                    conn.execute(f"update {ACCOUNTS} set balance = balance - %s where "
                                 "tenant_id = %s and id = %s", [amount, tenant[a], a])
                    conn.execute(f"update {ACCOUNTS} set balance = balance + %s where "
                                 "tenant_id = %s and id = %s", [amount, tenant[b], b])
                    conn.commit()
                    done.append(amount)
                except (psycopg.errors.CheckViolation, psycopg.errors.SerializationFailure,
                        psycopg.errors.DeadlockDetected, psycopg.errors.TransactionRollback):
                    conn.rollback()
                except psycopg.Error as e:
                    errors.append(repr(e))
                    conn.rollback()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert len(done) > 20
    assert sum(balances(shards).values()) == before
    assert prepared_left(shards) == []
    assert_nothing_left_behind(tx_proxy, shards)


def test_a_shard_lost_before_prepare_rolls_back_everywhere(
        shards: list[PostgresCluster], tables: None, tmp_path: Any) -> None:
    """A shard stopped before its PREPARE (killed between the statements and COMMIT): the
    client gets an error, no shard commits, and once the shard is back nothing is left."""
    victim = PostgresCluster(tmp_path / "pg", name="victim")
    victim.init()
    victim.start()
    try:
        victim.create_database("app")
        on_shard(victim, f"create table {ACCOUNTS} (id int primary key, tenant_id int, "
                         "balance int not null)")
        on_shard(victim, f"insert into {ACCOUNTS} values (20, 2, 100)")
        on_shard(shards[0], f"delete from {ACCOUNTS}")
        on_shard(shards[0], f"insert into {ACCOUNTS} values (10, 1, 100)")
        cfg = base_config(shards)
        cfg["shards"]["s2"]["primary"] = victim.dsn("app")
        cfg["sharding"] = shard_map()
        proxy = ProxyProcess(cfg, tmp_path / "proxy", env=PROXY_ENV).start()
        try:
            with psycopg.connect(proxy.dsn("app", APP_PASSWORD)) as conn:
                conn.execute(f"update {ACCOUNTS} set balance = 0 where tenant_id = 1")
                conn.execute(f"update {ACCOUNTS} set balance = 0 where tenant_id = 2")
                victim.kill()
                with pytest.raises(psycopg.Error) as info:
                    conn.commit()
                assert info.value.sqlstate is None or info.value.sqlstate[:2] in (
                    "40", "08", "57"), info.value
            victim.start()
            assert on_shard(shards[0], f"select balance from {ACCOUNTS}") == [(100,)]
            assert on_shard(victim, f"select balance from {ACCOUNTS}") == [(100,)]
            assert prepared_left([shards[0], victim]) == []
            with psycopg.connect(proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
                assert conn.execute(f"select count(*) from {ACCOUNTS} where tenant_id = 2"
                                    ).fetchone() == (1,)
        finally:
            proxy.stop()
    finally:
        victim.stop(mode="immediate")


def test_the_catalog_unreachable_at_decision_time_aborts_cleanly(
        shards: list[PostgresCluster], fresh: None, tmp_path: Any) -> None:
    cfg = base_config(shards)
    cfg["sharding"] = shard_map()
    cfg["catalog"] = "postgresql://postgres@127.0.0.1:1/nowhere"
    cfg["transactions"] = {"decision_timeout": 1}
    proxy = ProxyProcess(cfg, tmp_path / "proxy", env=PROXY_ENV).start()
    try:
        with psycopg.connect(proxy.dsn("app", APP_PASSWORD)) as conn:
            conn.execute(f"update {ACCOUNTS} set balance = 0 where tenant_id = 1")
            conn.execute(f"update {ACCOUNTS} set balance = 0 where tenant_id = 2")
            started = time.monotonic()
            with pytest.raises(psycopg.errors.TransactionRollback) as info:
                conn.commit()
            assert time.monotonic() - started < 5
            assert "decision" in str(info.value)
            # the session goes on
            assert conn.execute(f"select balance from {ACCOUNTS} where tenant_id = 1 "
                                "and id = 10").fetchone() == (100,)
            conn.rollback()
        assert balances(shards) == {i: 100 for i in (10, 11, 20, 21, 30, 31)}
        assert prepared_left(shards) == []
    finally:
        proxy.stop()


def test_a_client_gone_mid_transaction_leaves_nothing(
        tx_proxy: ProxyProcess, shards: list[PostgresCluster], fresh: None) -> None:
    conn = psycopg.connect(tx_proxy.dsn("app", APP_PASSWORD))
    conn.execute(f"update {ACCOUNTS} set balance = 0 where tenant_id = 1")
    conn.execute(f"update {ACCOUNTS} set balance = 0 where tenant_id = 3")
    conn.pgconn.finish()  # the socket closes without a word
    assert_nothing_left_behind(tx_proxy, shards)
    assert balances(shards) == {i: 100 for i in (10, 11, 20, 21, 30, 31)}
    # the rows are not locked any more
    with psycopg.connect(tx_proxy.dsn("app", APP_PASSWORD), autocommit=True) as other:
        other.execute("set statement_timeout = '2s'")
        assert other.execute(f"update {ACCOUNTS} set balance = 1").rowcount == 6


def test_bank_transfers_survive_proxy_crashes(shards: list[PostgresCluster], fresh: None,
                                              tmp_path: Any) -> None:
    """Transfers between accounts of different shards while the proxy is killed (SIGKILL) at
    random moments and started again: every acknowledged transfer is applied exactly once,
    every account's balance is what the recorded transfers say, the total is unchanged, and
    recovery leaves no prepared transaction."""
    ids = [10, 11, 20, 21, 30, 31]
    acknowledged: set[str] = set()
    rng = random.Random(5)
    for round_ in range(3):
        proxy = start_proxy(shards, tmp_path / f"proxy{round_}", recovery_min_age=0)
        dsn = proxy.dsn("app", APP_PASSWORD)
        stop = threading.Event()

        def worker(seed: int, dsn: str = dsn, stop: threading.Event = stop) -> None:
            wrng = random.Random(seed)
            try:
                conn = psycopg.connect(dsn)
            except psycopg.Error:
                return
            with conn:
                while not stop.is_set():
                    a, b = wrng.sample(ids, 2)
                    amount = wrng.randint(1, 5)
                    transfer = uuid.uuid4().hex
                    try:
                        conn.execute(f"update {ACCOUNTS} set balance = balance - %s where "
                                     "tenant_id = %s and id = %s", [amount, a // 10, a])
                        conn.execute(f"update {ACCOUNTS} set balance = balance + %s where "
                                     "tenant_id = %s and id = %s", [amount, b // 10, b])
                        conn.execute(f"insert into {TRANSFERS} (id, tenant_id, src, dst, "
                                     "amount) values (%s, %s, %s, %s, %s)",
                                     [transfer, a // 10, a, b, amount])
                        conn.commit()
                        acknowledged.add(transfer)
                    except psycopg.OperationalError:
                        return  # the proxy is gone
                    except psycopg.Error:
                        try:
                            conn.rollback()
                        except psycopg.Error:
                            return

        threads = [threading.Thread(target=worker, args=(round_ * 10 + i,)) for i in range(3)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(1.0, 2.5))
        proxy.kill()
        stop.set()
        for t in threads:
            t.join(10)
    # One more start: recovery finishes what the last crash left.
    final = start_proxy(shards, tmp_path / "final", recovery_min_age=0)
    try:
        deadline = time.monotonic() + 15
        while prepared_left(shards) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert prepared_left(shards) == []
    finally:
        final.stop()
    recorded = [row for c in shards for row in on_shard(
        c, f"select id, src, dst, amount from {TRANSFERS}")]
    assert len(acknowledged) > 5
    ids_recorded = [r[0] for r in recorded]
    assert len(ids_recorded) == len(set(ids_recorded))
    assert acknowledged <= set(ids_recorded)  # every acknowledged transfer, once
    expected = {i: 100 for i in ids}
    for _, src, dst, amount in recorded:
        expected[src] -= amount
        expected[dst] += amount
    assert balances(shards) == expected
    assert sum(balances(shards).values()) == 600


def test_commit_and_savepoints_through_the_extended_protocol(
        tx_proxy: ProxyProcess, shards: list[PostgresCluster], fresh: None) -> None:
    """JDBC sends COMMIT and SAVEPOINT as Parse/Bind/Execute: every shard gets them too."""
    with psycopg.connect(tx_proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
        conn.execute("begin")
        conn.execute(f"update {ACCOUNTS} set balance = 7 where tenant_id = %s", [1])
        conn.execute(f"update {ACCOUNTS} set balance = 7 where tenant_id = %s", [2])
        conn.execute("savepoint s1", prepare=True)
        conn.execute(f"update {ACCOUNTS} set balance = 8 where tenant_id = %s", [3])
        conn.execute("rollback to savepoint s1", prepare=True)
        conn.execute("commit", prepare=True)
        assert conn.execute(f"select balance from {ACCOUNTS} where tenant_id = %s and id = %s",
                            [2, 20]).fetchone() == (7,)
    assert balances(shards) == {10: 7, 11: 7, 20: 7, 21: 7, 30: 100, 31: 100}
    assert prepared_left(shards) == []
    assert_nothing_left_behind(tx_proxy, shards)


def test_the_clients_own_two_phase_commands_are_refused_on_several_shards(
        tx_proxy: ProxyProcess, shards: list[PostgresCluster], fresh: None) -> None:
    with psycopg.connect(tx_proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
        conn.execute("begin")
        conn.execute(f"update {ACCOUNTS} set balance = 1 where tenant_id = 1")
        conn.execute(f"update {ACCOUNTS} set balance = 1 where tenant_id = 2")
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute("prepare transaction 'mine'")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute(f"select 1 from {ACCOUNTS} where tenant_id = 2")
        conn.execute("rollback")
    assert balances(shards) == {i: 100 for i in (10, 11, 20, 21, 30, 31)}
    assert on_shard(shards[0], "select count(*) from pg_prepared_xacts") == [(0,)]


def test_a_prepared_begin_waits_for_the_first_statement(
        tx_proxy: ProxyProcess, shards: list[PostgresCluster], fresh: None) -> None:
    """A BEGIN sent as Bind/Execute (pgbench -M prepared, JDBC) is answered by the proxy and
    goes with the first statement, so a transaction on s2 does not also begin on s1 — also when
    the first statement comes in the same batch (a pipeline)."""
    update = f"update {ACCOUNTS} set balance = %s where tenant_id = %s"
    with psycopg.connect(tx_proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
        # prepared first (as pgbench does on first use): a Parse inside a transaction not yet
        # on any shard begins it on the default shard
        for sql, params in (("begin", None), (update, [100, 2]), ("commit", None)):
            conn.execute(sql, params, prepare=True)
        conn.execute("begin", prepare=True)
        conn.execute(update, [1, 2], prepare=True)
        busy = [c.name for c in shards if on_shard(
            c, "select count(*) from pg_stat_activity where state like 'idle in transaction%%' "
               "and datname = current_database()")[0][0]]
        assert busy == ["shard2"]
        conn.execute("commit", prepare=True)
        with conn.pipeline():
            conn.execute("begin", prepare=True)
            conn.execute(update, [2, 3], prepare=True)
            conn.execute("commit", prepare=True)
    assert balances(shards) == {10: 100, 11: 100, 20: 1, 21: 1, 30: 2, 31: 2}
    assert_nothing_left_behind(tx_proxy, shards)
