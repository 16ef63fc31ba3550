"""Which statements may run on a replica, and which replica (proxy/replicas.py); no server."""

from __future__ import annotations

import pytest

from shardwire.config.load import parse_dsn
from shardwire.config.model import PoolSettings, ReadTarget
from shardwire.proxy.pool import Pool
from shardwire.proxy.replicas import ReplicaSet, parse_target_setting, plain_read


@pytest.mark.parametrize("sql", [
    "select 1",
    "SELECT * FROM orders WHERE tenant_id = $1",
    "select count(*), max(total) from orders where tenant_id in (1, 2) group by status",
    "select inet_server_port(), pg_is_in_recovery(), now()",
    "  select coalesce(sum(x), 0) from t ;  ",
    "select * from (select * from t) s join u on (s.id = u.id) where exists (select 1)",
])
def test_plain_reads(sql: str) -> None:
    assert plain_read(sql.encode())


@pytest.mark.parametrize("sql", [
    "insert into t values (1)",
    "update t set x = 1",
    "with d as (delete from t returning *) select * from d",  # a data-modifying CTE
    "select * from t for update",
    "select * from t for no key update",
    "select * from t for share",
    "select * from t for key share",
    "select * into t2 from t",
    "select nextval('s')",
    "select setval('s', 1)",
    "select pg_advisory_lock(1)",
    "select set_config('a.b', '1', false)",
    "select txid_current()",
    "select my_function(1)",
    "select public.f(1)",
    'select "Quoted"(1)',
    "select 1; delete from t",
    "explain analyze delete from t",
    "selectx from t",
])
def test_anything_else_goes_to_the_primary(sql: str) -> None:
    assert not plain_read(sql.encode())


def test_target_statements() -> None:
    found = parse_target_setting(b"SET shardwire.target TO 'Primary';")
    assert found is not None and (found.verb, found.value, found.local) == ("set", "primary",
                                                                           False)
    found = parse_target_setting(b"set local shardwire.target = any")
    assert found is not None and found.local
    found = parse_target_setting(b"RESET shardwire.target")
    assert found is not None and (found.verb, found.value) == ("reset", "")
    assert parse_target_setting(b"set shardwire.shard = 's1'") is None


def _pool(role: str, port: int, *, lag: float | None = 0.0, up: bool = True,
          in_recovery: bool = True) -> Pool:
    pool = Pool("s1", role, parse_dsn(f"postgresql://u@h:{port}/d"), PoolSettings())
    pool.checked = True
    pool.up = up
    pool.lag = lag
    pool.in_recovery = in_recovery if role == "replica" else False
    return pool


def test_replicas_are_taken_in_turn_and_unfit_ones_skipped() -> None:
    primary = _pool("primary", 1)
    fit = [_pool("replica", 2), _pool("replica", 3)]
    unfit = [_pool("replica", 4, lag=30.0), _pool("replica", 5, up=False),
             _pool("replica", 6, in_recovery=False), _pool("replica", 7, lag=None)]
    never_checked = _pool("replica", 8)
    never_checked.checked = False
    replica_set = ReplicaSet("s1", primary, [*fit, *unfit, never_checked])
    chosen = [replica_set.for_read(ReadTarget.REPLICA, 10).address.port for _ in range(6)]
    assert sorted(set(chosen)) == [2, 3]
    assert chosen[0] != chosen[1]  # in turn
    either = {replica_set.for_read(ReadTarget.ANY, 10).address.port for _ in range(6)}
    assert either == {1, 2, 3}


def test_the_least_busy_replica_wins() -> None:
    busy, quiet = _pool("replica", 2), _pool("replica", 3)
    busy.active.add(object())  # type: ignore[arg-type]
    replica_set = ReplicaSet("s1", _pool("primary", 1), [busy, quiet])
    assert {replica_set.for_read(ReadTarget.REPLICA, 10).address.port for _ in range(4)} == {3}


def test_with_no_fit_replica_reads_go_to_the_primary() -> None:
    primary = _pool("primary", 1)
    replica_set = ReplicaSet("s1", primary, [_pool("replica", 2, lag=11.0)])
    assert replica_set.for_read(ReadTarget.REPLICA, 10) is primary
