"""Shared helpers for the merge engine's unit tests (no server: rows are built here)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from shardwire.merge import Field, MergePlan, encode_data_row, parse_data_row, plan_merge
from shardwire.router.shardmap import KeyType, Rule, RuleKind, ShardMap, TableName

RULE = Rule("customers", RuleKind.HASH, KeyType.INTEGER, "customer_id",
            {TableName("public", "orders"): "customer_id",
             TableName("public", "items"): "customer_id"}, ("s1", "s2", "s3"))
SMAP = ShardMap(("s1", "s2", "s3"), "s1", {"customers": RULE},
                frozenset({TableName("public", "countries")}))


@pytest.fixture
def smap() -> ShardMap:
    return SMAP


def plan(sql: str) -> MergePlan:
    return plan_merge(sql, SMAP)


def field(name: str, oid: int) -> Field:
    return Field(name, 0, 0, oid)


Row = Sequence[str | bytes | None]


def body(row: Row) -> bytes:
    return encode_data_row([v.encode() if isinstance(v, str) else v for v in row])


def run(sql: str, fields: list[Field], shards: Sequence[Sequence[Row]], *,
        params: dict[int, int | None] | None = None, formats: Sequence[int] = (),
        collation: str = "C", batch: int = 2) -> tuple[list[Field], list[list[str | None]]]:
    """Plan `sql`, feed each shard's rows in small batches, round robin; return the client's
    fields and rows (text values decoded to str)."""
    p = plan(sql)
    m = p.start(params or {}, formats, collation, shards=len(shards))
    client = m.columns(fields)
    out: list[bytes] = []
    cursors = [0] * len(shards)
    live = list(range(len(shards)))
    while live:
        for i in list(live):
            chunk = shards[i][cursors[i]:cursors[i] + batch]
            cursors[i] += batch
            if chunk:
                m.feed(i, [body(r) for r in chunk])
            if cursors[i] >= len(shards[i]):
                m.finish(i)
                live.remove(i)
            out += m.take()
    out += m.take()
    rows = [[None if v is None else v.decode() if not formats else v  # type: ignore[misc]
             for v in parse_data_row(b)] for b in out]
    assert m.rows == len(out)
    return client, rows  # type: ignore[return-value]
