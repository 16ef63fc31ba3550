"""`shardwire rebalance apply` for the other rule kinds: lookup keys (the directory rows in the
catalog change in the flip) and range splits (the map gains a boundary), with the same
invariant as the tenant move (test_rebalance_apply.py): a writer keeps inserting and updating
rows of the moving keys and of others through the proxy during the whole move, and afterwards
every acknowledged write is on the target exactly once and nothing of the moved keys is left
on the source. Also: a move of a hash rule is refused saying why, and a COPY into a fenced
rule's table does not slip past the fence."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from conftest import APP_PASSWORD, MakeProxy, on_shard
from test_rebalance_apply import CATALOG, _cleanup, on_shard_db, rebalance, wait_registered
from writers import KeyWriter

from shardwire.testing import PostgresCluster
from shardwire.testing.proxy import ProxyProcess

ROWS = 200  # rows per key before the move
CONFIG_COMMENT = "# operator's note: keep me\n"


def check_invariant(shards: list[PostgresCluster], table: str, column: str,
                    writers: list[KeyWriter], placed: Callable[[int], str],
                    moved: Callable[[int], bool]) -> None:
    """Every acknowledged write (and every row from before) is on the shard `placed` names,
    exactly once; nothing of the moved keys is on the other shard."""
    by_name = {c.name: c for c in shards[:2]}
    names = {"s1": shards[0].name, "s2": shards[1].name}
    for writer in writers:
        assert not writer.errors, writer.errors[:5]
    keys = sorted({k for w in writers for k in w.moving + w.others})
    for key in keys:
        want = {(key, i): 0 for i in range(ROWS)}
        for writer in writers:
            want.update({k: v for k, v in writer.acked.items() if k[0] == key})
        home = by_name[names[placed(key)]]
        got = {(r[0], r[1]): r[2] for r in on_shard(
            home, f"SELECT {column}, id, v FROM {table} WHERE {column} = %s", [key])}
        counted = on_shard(home, f"SELECT count(*) FROM {table} WHERE {column} = %s", [key])
        assert counted == [(len(got),)]
        bad = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        assert not bad, (f"key {key}: {len(got)} rows on {placed(key)}, {len(want)} "
                         "acknowledged; (row, found, acknowledged): "
                         f"{[(k, got.get(k), want.get(k)) for k in bad[:10]]}")
        other = by_name[names["s2" if placed(key) == "s1" else "s1"]]
        if moved(key):
            assert on_shard(other, f"SELECT count(*) FROM {table} WHERE {column} = %s",
                            [key]) == [(0,)], f"key {key} left on the source"


def nothing_left(shards: list[PostgresCluster]) -> None:
    s1, s2 = shards[0], shards[1]
    assert on_shard(s2, "SELECT count(*) FROM pg_subscription") == [(0,)]
    assert on_shard(s1, "SELECT count(*) FROM pg_replication_slots") == [(0,)]
    assert on_shard(s1, "SELECT count(*) FROM pg_publication") == [(0,)]
    assert on_shard_db(s1, CATALOG, "SELECT state, step FROM shardwire_moves") == [
        ("done", "done")]
    assert on_shard_db(s1, CATALOG, "SELECT count(*) FROM shardwire_fences "
                                    "WHERE released_at IS NULL") == [(0,)]


def route_of(proxy: ProxyProcess, sql: str) -> str:
    with psycopg.connect(proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
        row = conn.execute(f"SHOW ROUTE FOR {sql}").fetchone()
    assert row is not None
    return str(row[1])


def start(make_proxy: MakeProxy, shards: list[PostgresCluster], rule: dict[str, Any],
          rebalance_settings: dict[str, Any] | None = None) -> ProxyProcess:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["shards"] = {name: cfg["shards"][name] for name in ("s1", "s2")}
        cfg["catalog"] = shards[0].dsn(CATALOG)
        cfg["sharding"] = {"rules": {"moving": rule}}
        if rebalance_settings:
            cfg["rebalance"] = rebalance_settings
    proxy = make_proxy(edit, start=False)
    text = proxy.config_path.read_text()
    proxy.config_path.write_text(CONFIG_COMMENT + text.replace(
        "  moving:\n", "  moving:  # keep this comment\n"))
    proxy.start()
    wait_registered(shards)
    return proxy


# -- lookup keys ---------------------------------------------------------------------------

LOOKUP_MOVING = [1, 2]
LOOKUP_OTHERS = [3, 4]  # 3 stays on s1, 4 lives on s2


@pytest.fixture
def lookup_table(shards: list[PostgresCluster]) -> Iterator[str]:
    _cleanup(shards)
    table = f"lk_{uuid.uuid4().hex[:8]}"
    for shard in shards[:2]:
        shard.sql(f"CREATE TABLE {table} (user_id int NOT NULL, id int NOT NULL, "
                  "v int NOT NULL, PRIMARY KEY (user_id, id))", dbname="app")
    home = {1: 0, 2: 0, 3: 0, 4: 1}
    for key, where in home.items():
        shards[where].sql(f"INSERT INTO {table} SELECT {key}, g, 0 FROM generate_series(0, "
                          f"{ROWS - 1}) g", dbname="app")
    shards[0].sql(f"CREATE TABLE directory_{table} (key bigint PRIMARY KEY, shard text NOT "
                  "NULL, created_at timestamptz NOT NULL DEFAULT now())", dbname=CATALOG)
    shards[0].sql(f"INSERT INTO directory_{table} (key, shard) VALUES (1, 's1'), (2, 's1'), "
                  "(3, 's1'), (4, 's2')", dbname=CATALOG)
    yield table
    _cleanup(shards)
    for shard in shards[:2]:
        shard.sql(f"DROP TABLE IF EXISTS {table}", dbname="app")
    shards[0].sql(f"DROP TABLE IF EXISTS directory_{table}", dbname=CATALOG)


def lookup_rule(table: str) -> dict[str, Any]:
    return {"kind": "lookup", "column": "user_id", "type": "integer", "tables": [table],
            "directory": f"directory_{table}", "shards": ["s1", "s2"], "new_keys": "s1"}


def check_lookup_moved(shards: list[PostgresCluster], proxy: ProxyProcess, table: str,
                       writers: list[KeyWriter], before: str) -> None:
    home = {1: "s2", 2: "s2", 3: "s1", 4: "s2"}
    check_invariant(shards, table, "user_id", writers, home.__getitem__,
                    lambda k: k in LOOKUP_MOVING)
    assert dict(on_shard_db(shards[0], CATALOG, f"SELECT key, shard FROM directory_{table}")
                ) == {1: "s2", 2: "s2", 3: "s1", 4: "s2"}
    for key, shard in home.items():
        assert route_of(proxy, f"SELECT * FROM {table} WHERE user_id = {key}") == shard
    with psycopg.connect(proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
        conn.execute(f"INSERT INTO {table} (user_id, id, v) VALUES (1, 99999, 5)")
    assert on_shard(shards[1], f"SELECT v FROM {table} WHERE id = 99999") == [(5,)]
    assert proxy.config_path.read_text() == before  # nothing of a lookup move is in the file
    nothing_left(shards)


def test_lookup_keys_move_online_and_no_acknowledged_write_is_lost_or_doubled(
        make_proxy: MakeProxy, shards: list[PostgresCluster], lookup_table: str) -> None:
    proxy = start(make_proxy, shards, lookup_rule(lookup_table))
    before = proxy.config_path.read_text()
    with KeyWriter(proxy.dsn("app", APP_PASSWORD), lookup_table, "user_id", LOOKUP_MOVING,
                   LOOKUP_OTHERS, first_id=ROWS) as writer:
        # The keys are found in the directory (no `from` given).
        done = rebalance(proxy, "apply", "--move", "moving:1,2:s2")
        assert done.returncode == 0, done.stdout + done.stderr
    assert "1 move(s) done" in done.stdout and "rows verified" in done.stderr, done.stderr
    check_lookup_moved(shards, proxy, lookup_table, [writer], before)
    print(f"lookup move: {done.stdout.strip()}; longest write of a moving key "
          f"{max(writer.moving_latencies()) * 1000:.0f} ms over {len(writer.moving_latencies())}")
    assert max(writer.moving_latencies()) < 5
    again = rebalance(proxy, "apply", "--move", "moving:1,2:s2")
    assert again.returncode == 0 and "already done" in again.stderr, again.stderr


@pytest.mark.parametrize("step", ["fenced", "flipped"])
def test_a_lookup_move_killed_at_a_step_resumes(
        make_proxy: MakeProxy, shards: list[PostgresCluster], lookup_table: str,
        step: str) -> None:
    proxy = start(make_proxy, shards, lookup_rule(lookup_table))
    before = proxy.config_path.read_text()
    with KeyWriter(proxy.dsn("app", APP_PASSWORD), lookup_table, "user_id", LOOKUP_MOVING,
                   LOOKUP_OTHERS, first_id=ROWS) as writer:
        killed = rebalance(proxy, "apply", "--move", "moving:1,2:s2", fault=step)
        assert killed.returncode == -9, killed.stdout + killed.stderr
        again = rebalance(proxy, "apply", "--move", "moving:1,2:s2")
        assert again.returncode == 0, again.stdout + again.stderr
        assert "resuming" in again.stderr
    check_lookup_moved(shards, proxy, lookup_table, [writer], before)


def test_a_lookup_move_of_keys_not_on_the_source_is_refused(
        make_proxy: MakeProxy, shards: list[PostgresCluster], lookup_table: str) -> None:
    proxy = start(make_proxy, shards, lookup_rule(lookup_table))
    mixed = rebalance(proxy, "apply", "--move", "moving:1,4:s2")
    assert mixed.returncode == 1 and "all be on one shard" in mixed.stderr, mixed.stderr
    plan = proxy.config_path.parent / "plan.yaml"
    plan.write_text("version: 1\nmoves:\n- {id: 1, rule: moving, kind: lookup, keys: [1, 4], "
                    "from: s1, to: s2}\n")
    wrong = rebalance(proxy, "apply", "--plan", str(plan))
    assert wrong.returncode == 1, wrong.stderr
    assert "does not put these keys on s1" in wrong.stderr and "Fix:" in wrong.stderr
    assert on_shard(shards[0], "SELECT count(*) FROM pg_publication") == [(0,)]


# -- range splits --------------------------------------------------------------------------

RANGE_MOVING = [600, 700]  # in [500, 1000): the upper half of the first range moves to s2
RANGE_OTHERS = [100, 499, 1500]  # s1, s1, s2


@pytest.fixture
def range_table(shards: list[PostgresCluster]) -> Iterator[str]:
    _cleanup(shards)
    table = f"rg_{uuid.uuid4().hex[:8]}"
    for shard in shards[:2]:
        shard.sql(f"CREATE TABLE {table} (k int NOT NULL, id int NOT NULL, v int NOT NULL, "
                  "PRIMARY KEY (k, id))", dbname="app")
    for key in RANGE_MOVING + RANGE_OTHERS:
        where = 0 if key < 1000 else 1
        shards[where].sql(f"INSERT INTO {table} SELECT {key}, g, 0 FROM generate_series(0, "
                          f"{ROWS - 1}) g", dbname="app")
    # Keys that no writer touches, on both sides of the split point.
    shards[0].sql(f"INSERT INTO {table} SELECT g, -1, 0 FROM generate_series(400, 999) g "
                  "WHERE g NOT IN (499, 600, 700)", dbname="app")
    yield table
    _cleanup(shards)
    for shard in shards[:2]:
        shard.sql(f"DROP TABLE IF EXISTS {table}", dbname="app")


def range_rule(table: str) -> dict[str, Any]:
    return {"kind": "range", "column": "k", "type": "integer", "tables": [table],
            "ranges": [{"to": 1000, "shard": "s1"}, {"from": 1000, "shard": "s2"}]}


def check_range_moved(shards: list[PostgresCluster], proxy: ProxyProcess, table: str,
                      writers: list[KeyWriter]) -> None:
    def placed(k: int) -> str:
        return "s1" if k < 500 else "s2"
    check_invariant(shards, table, "k", writers, placed, lambda k: 500 <= k < 1000)
    s1, s2 = shards[0], shards[1]
    assert on_shard(s1, f"SELECT count(*), min(k), max(k) FROM {table} WHERE id = -1") == [
        (99, 400, 498)]
    assert on_shard(s2, f"SELECT count(*), min(k), max(k) FROM {table} WHERE id = -1") == [
        (498, 500, 999)]
    assert on_shard(s1, f"SELECT count(*) FROM {table} WHERE k >= 500") == [(0,)]
    for key, shard in ((499, "s1"), (500, "s2"), (999, "s2"), (1000, "s2"), (-5, "s1")):
        assert route_of(proxy, f"SELECT * FROM {table} WHERE k = {key}") == shard, key
    text = proxy.config_path.read_text()
    assert text.startswith(CONFIG_COMMENT) and "moving:  # keep this comment" in text, text
    ranges = text[text.index("ranges:"):]
    assert ranges.index("to: 500") < ranges.index("from: 500") < ranges.index("from: 1000")
    nothing_left(shards)


def test_a_range_splits_and_its_upper_half_moves_online(
        make_proxy: MakeProxy, shards: list[PostgresCluster], range_table: str) -> None:
    proxy = start(make_proxy, shards, range_rule(range_table))
    with KeyWriter(proxy.dsn("app", APP_PASSWORD), range_table, "k", RANGE_MOVING,
                   RANGE_OTHERS, first_id=ROWS) as writer:
        done = rebalance(proxy, "apply", "--move", "moving:500..:s2")
        assert done.returncode == 0, done.stdout + done.stderr
    assert "1 move(s) done" in done.stdout and "rows verified" in done.stderr, done.stderr
    check_range_moved(shards, proxy, range_table, [writer])
    print(f"range split: {done.stdout.strip()}; longest write of a moving key "
          f"{max(writer.moving_latencies()) * 1000:.0f} ms over {len(writer.moving_latencies())}")
    assert max(writer.moving_latencies()) < 5
    again = rebalance(proxy, "apply", "--move", "moving:500..:s2")
    assert again.returncode == 0 and "already done" in again.stderr, again.stderr


@pytest.mark.parametrize("step", ["fenced", "flipped"])
def test_a_range_split_killed_at_a_step_resumes(
        make_proxy: MakeProxy, shards: list[PostgresCluster], range_table: str,
        step: str) -> None:
    proxy = start(make_proxy, shards, range_rule(range_table))
    with KeyWriter(proxy.dsn("app", APP_PASSWORD), range_table, "k", RANGE_MOVING,
                   RANGE_OTHERS, first_id=ROWS) as writer:
        killed = rebalance(proxy, "apply", "--move", "moving:500..:s2", fault=step)
        assert killed.returncode == -9, killed.stdout + killed.stderr
        again = rebalance(proxy, "apply", "--move", "moving:500..:s2")
        assert again.returncode == 0, again.stdout + again.stderr
        assert "resuming" in again.stderr
    check_range_moved(shards, proxy, range_table, [writer])


def test_the_lower_half_of_a_range_moves_from_a_plan(
        make_proxy: MakeProxy, shards: list[PostgresCluster], range_table: str) -> None:
    """The plan file's form of a range move: the part below the split point moves."""
    proxy = start(make_proxy, shards, range_rule(range_table))
    plan = proxy.config_path.parent / "plan.yaml"
    plan.write_text("version: 1\nmoves:\n- id: 1\n  rule: moving\n  kind: range\n"
                    "  range: {from: null, to: 500}\n  split_at: 500\n  from: s1\n  to: s2\n")
    done = rebalance(proxy, "apply", "--plan", str(plan))
    assert done.returncode == 0, done.stdout + done.stderr
    s1, s2 = shards[0], shards[1]
    assert on_shard(s2, f"SELECT count(*), min(k), max(k) FROM {range_table} WHERE id = -1"
                    ) == [(99, 400, 498)]
    assert on_shard(s2, f"SELECT count(*) FROM {range_table} WHERE k < 500") == [
        (99 + 2 * ROWS,)]
    assert on_shard(s1, f"SELECT count(*) FROM {range_table} WHERE k < 500") == [(0,)]
    assert on_shard(s1, f"SELECT count(*) FROM {range_table} WHERE k >= 500") == [
        (498 + 2 * ROWS,)]
    for key, shard in ((100, "s2"), (499, "s2"), (500, "s1"), (1000, "s2")):
        assert route_of(proxy, f"SELECT * FROM {range_table} WHERE k = {key}") == shard, key
    nothing_left(shards)


# -- hash rules ------------------------------------------------------------------------------

def test_a_move_of_a_hash_rule_is_refused_saying_why_and_what_to_do(
        make_proxy: MakeProxy, shards: list[PostgresCluster], range_table: str) -> None:
    proxy = start(make_proxy, shards, {"kind": "hash", "column": "k", "type": "integer",
                                       "tables": [range_table]})
    refused = rebalance(proxy, "apply", "--move", "moving:600:s2")
    assert refused.returncode == 1
    assert "hash rule" in refused.stderr and "lookup rule" in refused.stderr, refused.stderr
    assert on_shard_db(shards[0], CATALOG, "SELECT count(*) FROM shardwire_moves") == [(0,)]


# -- COPY under a fence --------------------------------------------------------------------

def test_copy_into_a_fenced_rules_table_waits_for_the_fence(
        make_proxy: MakeProxy, shards: list[PostgresCluster], range_table: str) -> None:
    """COPY into a sharded table goes through only with a shard named (a hint or SET
    shardwire.shard), and then carries keys the proxy does not read: under a fence it waits
    like other writes (and goes on when the fence is released), and fails with 55P03 once it
    waited `fence_timeout`."""
    proxy = start(make_proxy, shards, range_rule(range_table), {"fence_timeout": 4})
    copy = f"/* shard: s1 */ COPY {range_table} (k, id, v) FROM STDIN"
    with psycopg.connect(proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
        with conn.cursor().copy(copy) as cp:  # no fence: served at once
            cp.write_row((650, 5000, 1))
    killed = rebalance(proxy, "apply", "--move", "moving:500..:s2", fault="fenced")
    assert killed.returncode == -9
    with psycopg.connect(proxy.dsn("app", APP_PASSWORD), autocommit=True) as conn:
        started = time.monotonic()
        with pytest.raises(psycopg.errors.LockNotAvailable) as held:
            with conn.cursor().copy(copy) as cp:
                cp.write_row((660, 5001, 1))
        assert 3.9 < time.monotonic() - started < 8
        assert "rebalance" in str(held.value) and held.value.diag.message_hint
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the connection goes on
        # A COPY started under the fence waits, and goes on once the fence is released.
        result: list[Any] = []

        def copy_in() -> None:
            with psycopg.connect(proxy.dsn("app", APP_PASSWORD), autocommit=True) as c2:
                started = time.monotonic()
                try:
                    with c2.cursor().copy(copy) as cp:
                        cp.write_row((670, 5002, 1))
                    result.append(time.monotonic() - started)
                except psycopg.Error as e:
                    result.append(e)
        thread = threading.Thread(target=copy_in)
        thread.start()
        time.sleep(0.3)
        assert on_shard(shards[0], f"SELECT count(*) FROM {range_table} WHERE id = 5002"
                        ) == [(0,)]
        aborted = rebalance(proxy, "abort")
        assert aborted.returncode == 0, aborted.stderr
        thread.join(10)
    assert len(result) == 1 and isinstance(result[0], float), result
    assert on_shard(shards[0], f"SELECT k FROM {range_table} WHERE id >= 5000 ORDER BY id"
                    ) == [(650,), (670,)]
