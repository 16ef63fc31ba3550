"""The merge engine for reads that run on several shards ("scatter-gather").

`plan_merge(sql, smap)` decides what every shard runs and how their rows merge so that the
client gets exactly what one PostgreSQL server holding all the rows would return, or refuses
with SQLSTATE 0A000 and a hint. `MergePlan.start(...)` begins one execution: a `Merge` that
takes the shards' DataRow bodies and hands back the client's. Pure: no I/O, no clock.

See docs/scatter-gather.md for what is supported and why the rest is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..router.shardmap import ShardMap
from . import engine
from .engine import Merge
from .errors import MergeError, MergeRefused
from .planner import HELPER_PREFIX, Mode, Plan, build
from .wire import (
    Field,
    encode_data_row,
    encode_row_description,
    parse_data_row,
    parse_row_description,
)

__all__ = [
    "HELPER_PREFIX",
    "Field",
    "Merge",
    "MergeError",
    "MergePlan",
    "MergeRefused",
    "Mode",
    "encode_data_row",
    "encode_row_description",
    "parse_data_row",
    "parse_row_description",
    "plan_merge",
]


@dataclass(frozen=True, slots=True)
class MergePlan:
    """What every shard runs and how their rows merge. Immutable: cache it per statement."""

    shard_sql: str  # the client's text when nothing needed rewriting
    params_needed: tuple[int, ...]  # $n whose integer values start() needs (LIMIT/OFFSET)
    plan: Plan

    @property
    def mode(self) -> Mode:
        return self.plan.mode

    def start(self, params: Mapping[int, int | None], client_formats: Sequence[int],
              collation: str = "C", *, shards: int, extra_float_digits: int = 1) -> Merge:
        """Begin one execution.

        params: the integer values of `params_needed` (None for NULL), decoded by the
        executor from the Bind message. client_formats: the Bind's result-format codes as
        sent. collation: the database's lc_collate. shards: how many shards run shard_sql
        (feed/finish take 0..shards-1). extra_float_digits: the session's setting (floats the
        merge computes print as PostgreSQL would with it).

        Raises MergeError for invalid LIMIT/OFFSET values (2201W, 2201X), as PostgreSQL
        would, before any shard runs the statement."""
        return engine.start(self.plan, params, client_formats, collation, shards,
                            extra_float_digits)


def plan_merge(sql: str, smap: ShardMap) -> MergePlan:
    """Plan the merge of one SELECT across shards; raises MergeRefused (0A000) for what
    cannot be merged exactly. Deterministic and pure."""
    shard_sql, params, plan = build(sql, smap)
    return MergePlan(shard_sql, params, plan)
