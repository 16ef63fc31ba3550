"""Room on the target (rebalance.max_shard_bytes): the planner proposes no move whose target's
database size plus the bytes it copies would exceed the capacity, and says so when no shard
has room."""

from __future__ import annotations

import datetime

import pytest
import yaml
from test_rebalance_plan import MAP, tenant

from shardwire.config import parse_config
from shardwire.config.load import ConfigError
from shardwire.config.settings import config_rows
from shardwire.rebalancer.plan import (
    KeyState,
    ShardState,
    plan_moves,
    plan_to_dict,
    with_copy,
    without_room,
)
from shardwire.router.shardmap import ShardMap

MB = 1_000_000


@pytest.fixture(scope="module")
def smap() -> ShardMap:
    return parse_config(MAP).sharding


def sized(database: dict[str, int | None], **loads: float) -> list[ShardState]:
    return [ShardState(name, load, database_bytes=database[name]) for name, load in loads.items()]


def test_the_coolest_shard_without_room_is_passed_over(smap: ShardMap) -> None:
    keys = [tenant(1, "s1", 20, rows=3000)]  # 150 kB
    loads = dict(s1=40, s2=2, s3=0)  # limit 2 x 14: either of s2 and s3 may take it
    # Without a capacity, the coolest shard (s3) takes it.
    [move] = plan_moves(sized({"s1": 0, "s2": 0, "s3": 0}, **loads), keys, smap,
                        threshold=2).moves
    assert move.target == "s3"
    # s3 holds 9.9 MB of 10: the move's 150 kB would not fit; s2 (5 MB) has room.
    plan = plan_moves(sized({"s1": 8 * MB, "s2": 5 * MB, "s3": 9_900_000}, **loads), keys,
                      smap, threshold=2, capacity=10 * MB)
    [move] = plan.moves
    assert move.target == "s2" and move.bytes == 150_000
    assert plan.after["s2"].database_bytes == 5 * MB + 150_000
    assert plan.after["s1"].database_bytes == 8 * MB  # deleted rows' space is not given back
    assert plan.warnings == () and without_room(plan) == []


def test_no_target_with_room_is_said_with_the_sizes(smap: ShardMap) -> None:
    keys = [tenant(1, "s1", 20, rows=3000)]
    plan = plan_moves(sized({"s1": 8 * MB, "s2": 9_900_000, "s3": 9_950_000}, s1=40, s2=2,
                            s3=0), keys, smap, threshold=2, capacity=10 * MB)
    assert plan.moves == ()
    [warning] = plan.warnings
    assert warning.startswith("s1 stays above the limit") and "no target has room" in warning
    assert "rebalance.max_shard_bytes = 10000000" in warning
    assert "by_tenant tenant 1 (150000 bytes)" in warning
    assert "s2 holds 9900000" in warning and "s3 holds 9950000" in warning
    assert "raise rebalance.max_shard_bytes" in warning


def test_a_shard_of_unknown_size_is_no_target_under_a_capacity(smap: ShardMap) -> None:
    keys = [tenant(1, "s1", 30, rows=3000)]
    plan = plan_moves(sized({"s1": MB, "s2": None, "s3": None}, s1=60, s2=25, s3=10), keys,
                      smap, threshold=1.3, capacity=10 * MB)
    assert plan.moves == () and "s3 holds an unknown size" in plan.warnings[0]


def test_earlier_moves_use_up_the_room(smap: ShardMap) -> None:
    # Three tenants of 150 kB each must leave s1; s2 and s3 have room for one each.
    keys = [tenant(k, "s1", 15, rows=3000) for k in (1, 2, 3)]
    plan = plan_moves(sized({"s1": 0, "s2": 9_800_000, "s3": 9_800_000}, s1=80, s2=10, s3=10),
                      keys, smap, threshold=1.2, capacity=10 * MB)
    assert sorted(m.target for m in plan.moves) == ["s2", "s3"]
    assert all(s.database_bytes is not None and s.database_bytes <= 10 * MB
               for s in plan.after.values())
    assert any("no target has room" in w for w in plan.warnings)


def test_a_range_part_measured_too_big_is_planned_again(smap: ShardMap) -> None:
    day = datetime.date
    keys = [KeyState("by_time", day(2026, 3, d), "s1", 12, rows=1, bytes=100)
            for d in (1, 2, 3)]
    shards = sized({"s1": MB, "s2": 5 * MB, "s3": 9 * MB}, s1=60, s2=20, s3=10)
    plan = plan_moves(shards, keys, smap, threshold=1.2, capacity=10 * MB)
    [move] = plan.moves
    assert move.target == "s3" and not move.measured  # 300 bytes, from the hot keys alone
    # Measured on the shard, the part is 2 MB: it no longer fits on s3.
    measured = with_copy(plan, 0, 20_000, 2 * MB)
    assert without_room(measured) == [0]
    parts = {(move.rule, move.lower, move.upper): (20_000, 2 * MB)}
    again = plan_moves(shards, keys, smap, threshold=1.2, capacity=10 * MB, part_sizes=parts)
    assert all(m.target != "s3" or m.bytes + 9 * MB <= 10 * MB for m in again.moves)
    assert without_room(again) == []


def test_the_plan_file_shows_the_capacity_and_database_sizes(smap: ShardMap) -> None:
    plan = plan_moves(sized({"s1": 8 * MB, "s2": 5 * MB, "s3": 9_900_000}, s1=40, s2=2,
                            s3=0), [tenant(1, "s1", 20, rows=3000)], smap, threshold=2,
                      capacity=10 * MB)
    data = yaml.safe_load(yaml.safe_dump(plan_to_dict(plan), sort_keys=False))
    assert data["max_shard_bytes"] == 10 * MB
    assert data["shards"]["s2"]["database_bytes"] == 5 * MB
    assert data["shards"]["s2"]["database_bytes_after"] == 5 * MB + 150_000
    no_capacity = plan_to_dict(plan_moves(sized({"s1": None, "s2": None, "s3": None}, s1=60,
                                                s2=25, s3=10), [], smap))
    assert "max_shard_bytes" not in no_capacity
    assert "database_bytes" not in no_capacity["shards"]["s1"]


def test_max_shard_bytes_is_validated_and_shown() -> None:
    config = parse_config(MAP + "rebalance: {max_shard_bytes: 500_000_000_000}\n")
    assert config.rebalance.max_shard_bytes == 500_000_000_000
    assert ("rebalance.max_shard_bytes", "500000000000", "0", "yes") in config_rows(config)
    assert parse_config(MAP).rebalance.max_shard_bytes == 0
    for bad, says in (("-1", "must be at least 0"), ("10GB", "expected an integer"),
                      ("1.5", "expected an integer")):
        with pytest.raises(ConfigError, match=f"rebalance.max_shard_bytes: {says}"):
            parse_config(MAP + f"rebalance: {{max_shard_bytes: {bad}}}\n")
