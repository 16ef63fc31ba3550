"""Range splits in the operator's config file (rebalancer/mapfile.py `split_range`), range
and hash moves from `--move` and plan files (apply.py, plan.py)."""

from __future__ import annotations

import datetime

import pytest

from shardwire.config import parse_config
from shardwire.rebalancer.apply import moves_from_args
from shardwire.rebalancer.mapfile import MapFileError, split_range
from shardwire.rebalancer.plan import FORMAT_VERSION, PlanError, plan_from_dict
from shardwire.router.shardmap import KeyType

CONFIG = """\
# Events. Owner: data team.
database: app
auth: {method: trust}
users:
  app: {password: "x"}
shards:
  s1: {primary: "postgresql://u@h1/app"}
  s2: {primary: "postgresql://u@h2/app"}
  s3: {primary: "postgresql://u@h3/app"}
default_shard: s1
catalog: "postgresql://u@h1/catalog"
sharding:
  rules:
    by_id:                        # increasing ids
      kind: range
      column: id
      tables: [events]
      ranges:
        - {to: 1000, shard: s1}   # the old ones
        - from: 1000
          to: 5000
          shard: s2
        - {from: 5000, shard: s3}
    by_day:
      kind: range
      column: day
      type: date
      tables: [visits]
      ranges:
        - {from: 2026-01-01, to: 2026-07-01, shard: s1}
    by_session:
      kind: hash
      column: session_id
      type: uuid
      tables: [sessions]
"""


def ranges(text: str, rule: str = "by_id") -> list[tuple[object, object, str]]:
    smap = parse_config(text).sharding
    return [(r.lower, r.upper, r.shard) for r in smap.rules[rule].ranges]


def test_the_upper_part_moves_and_the_range_ends_at_the_split() -> None:
    out = split_range(CONFIG, "by_id", KeyType.INTEGER, 3000, 5000, 3000, "s3")
    assert ranges(out) == [(None, 1000, "s1"), (1000, 3000, "s2"), (3000, 5000, "s3"),
                           (5000, None, "s3")]
    assert out.startswith("# Events. Owner: data team.\n")
    assert "by_id:                        # increasing ids" in out
    assert "- {to: 1000, shard: s1}   # the old ones" in out
    assert "          to: 3000\n" in out and "        - from: 3000\n" in out  # block style kept


def test_the_lower_part_moves_and_an_open_end_stays_open() -> None:
    out = split_range(CONFIG, "by_id", KeyType.INTEGER, None, 400, 400, "s2")
    assert ranges(out) == [(None, 400, "s2"), (400, 1000, "s1"), (1000, 5000, "s2"),
                           (5000, None, "s3")]
    assert "- {to: 400, shard: s2}" in out and "- {from: 400, to: 1000, shard: s1}" in out
    out = split_range(CONFIG, "by_id", KeyType.INTEGER, 8000, None, 8000, "s1")
    assert ranges(out)[-2:] == [(5000, 8000, "s3"), (8000, None, "s1")]


def test_a_whole_range_changes_its_shard_and_a_done_split_changes_nothing() -> None:
    out = split_range(CONFIG, "by_id", KeyType.INTEGER, 1000, 5000, None, "s1")
    assert ranges(out)[1] == (1000, 5000, "s1") and len(ranges(out)) == 3
    once = split_range(CONFIG, "by_id", KeyType.INTEGER, 3000, 5000, 3000, "s3")
    assert split_range(once, "by_id", KeyType.INTEGER, 3000, 5000, 3000, "s3") == once


def test_dates_are_written_so_that_the_config_reads_them_back() -> None:

    split = datetime.date(2026, 3, 1)
    out = split_range(CONFIG, "by_day", KeyType.DATE, split, datetime.date(2026, 7, 1), split,
                      "s2")
    assert ranges(out, "by_day") == [(datetime.date(2026, 1, 1), split, "s1"),
                                     (split, datetime.date(2026, 7, 1), "s2")]


def test_a_part_in_no_range_is_refused() -> None:
    with pytest.raises(MapFileError, match="no range of sharding.rules.by_day"):
        split_range(CONFIG, "by_day", KeyType.DATE, datetime.date(2027, 1, 1), None,
                    datetime.date(2027, 1, 1), "s2")
    with pytest.raises(MapFileError, match="invalid input for integer key"):
        split_range(CONFIG, "by_day", KeyType.INTEGER, 9, None, 9, "s2")


def test_range_move_arguments() -> None:
    smap = parse_config(CONFIG).sharding
    (upper,) = plan_from_dict(moves_from_args(["by_id:3000..:s3"], smap), smap)
    assert (upper.source, upper.lower, upper.upper, upper.split_at) == ("s2", 3000, 5000, 3000)
    (lower,) = plan_from_dict(moves_from_args(["by_id:..400:s2"], smap), smap)
    assert (lower.source, lower.lower, lower.upper, lower.split_at) == ("s1", None, 400, 400)
    (whole,) = plan_from_dict(moves_from_args(["by_id:1000..:s1"], smap), smap)
    assert (whole.lower, whole.upper, whole.split_at) == (1000, 5000, None)
    with pytest.raises(PlanError, match="POINT"):
        moves_from_args(["by_id:1000:s1"], smap)
    with pytest.raises(PlanError, match="no range of by_day holds"):
        moves_from_args(["by_day:2027-01-01..:s2"], smap)


def test_plan_range_moves_must_split_where_the_part_starts_or_ends() -> None:
    smap = parse_config(CONFIG).sharding

    def move(**item: object) -> None:
        plan_from_dict({"version": FORMAT_VERSION, "moves": [
            {"id": 1, "rule": "by_id", "kind": "range", "from": "s2", "to": "s3", **item}]},
            smap)
    move(range={"from": 3000, "to": 5000}, split_at=3000)
    with pytest.raises(PlanError, match="split_at: the range splits"):
        move(range={"from": 3000, "to": 5000}, split_at=2000)
    with pytest.raises(PlanError, match="split_at: a part of a range"):
        move(range={"from": 3000, "to": 5000}, split_at=None)
    with pytest.raises(PlanError, match="not within a range"):
        move(range={"from": 1000, "to": 6000}, split_at=6000)


def test_hash_moves_are_refused_saying_why_and_what_to_do() -> None:
    smap = parse_config(CONFIG).sharding
    with pytest.raises(PlanError, match="hash rule") as refused:
        plan_from_dict(moves_from_args(
            ["by_session:8c4f0a36-5d0b-4b8e-9a57-2d1f3e0c6b11:s2"], smap), smap)
    assert "lookup rule" in str(refused.value)
