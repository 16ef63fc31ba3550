"""The routing lanes (proxy/routing.py `_Lane`): once a statement shape is known to route by
an integer key alone, its later executions skip the analysis. Property: every plan a lane
gives is the plan a fresh router (no lanes yet) gives for the same statement and values."""

from __future__ import annotations

import random
import struct

from shardwire.config.load import parse_config
from shardwire.proxy.routing import BindValues, StatementRouter
from shardwire.router.plan import describe
from shardwire.router.route import RouteContext

CONFIG = """
auth: {method: trust}
database: app
users: {app: {}}
shards:
  s1: {primary: "postgresql://postgres@127.0.0.1:5432/app"}
  s2: {primary: "postgresql://postgres@127.0.0.1:5433/app"}
  s3: {primary: "postgresql://postgres@127.0.0.1:5434/app"}
default_shard: s1
sharding:
  rules:
    by_aid:
      kind: range
      column: aid
      tables: [accounts]
      ranges:
        - {to: 1000, shard: s1}
        - {from: 1000, to: 2000, shard: s2}
        - {from: 3000, shard: s3}
    by_tenant:
      kind: hash
      column: tenant_id
      type: integer
      tables: [orders]
      shards: [s1, s2, s3]
"""

CTX = RouteContext()


def routers() -> tuple[StatementRouter, StatementRouter]:
    smap = parse_config(CONFIG).sharding
    return StatementRouter(smap), StatementRouter(smap)


def same(warm: StatementRouter, plan: object, fresh: StatementRouter, expected: object) -> None:
    assert describe(plan) == describe(expected)  # type: ignore[arg-type]
    assert warm.last_key == fresh.last_key


def test_simple_queries_follow_the_lane_exactly() -> None:
    rng = random.Random(11)
    warm, _ = routers()
    keys = ["0", "7", "007", "999", "1000", "1999", "2000", "2500", "2999", "3000",
            "123456789012345678", "9223372036854775807", "9223372036854775808",
            "99999999999999999999", "-5", "'42'", "'1500'", "42::int", "1.0", "1e3", "NULL"]
    shapes = ["SELECT * FROM accounts WHERE aid = {}", "SELECT * FROM orders WHERE tenant_id = {}",
              "UPDATE accounts SET x = 1 WHERE aid = {}"]
    for _ in range(600):
        key = rng.choice(keys + [str(rng.randint(0, 5000))])
        sql = rng.choice(shapes).format(key).encode()
        fresh = routers()[1]
        same(warm, warm.plan_query(sql, CTX), fresh, fresh.plan_query(sql, CTX))
    assert sum(lane is not None for lane in warm._lanes.values()) == 3  # the lanes were taken


def test_bound_parameters_follow_the_lane_exactly() -> None:
    rng = random.Random(12)
    warm, _ = routers()
    sql = b"SELECT * FROM accounts WHERE aid = $1"
    warm_analyses = warm.prepared(sql)

    def values() -> tuple[tuple[int, ...], BindValues]:
        v = rng.choice([0, 5, 999, 1000, 2500, 3000, 40000, -3, 2**31 - 1, 2**40])
        oid = rng.choice([0, 20, 21, 23, 1700, 25])
        match rng.choice(["int2", "int4", "int8", "text", "spaces", "null"]):
            case "int2":
                data: bytes | None = struct.pack("!h", max(-32768, min(v, 32767)))
                fmt = 1
            case "int4":
                data, fmt = struct.pack("!i", max(-2**31, min(v, 2**31 - 1))), 1
            case "int8":
                data, fmt = struct.pack("!q", v), 1
            case "text":
                data, fmt = str(v).encode(), 0
            case "spaces":
                data, fmt = f" {v} ".encode(), 0
            case _:
                data, fmt = None, 0
        return (oid,), BindValues((fmt,), (data,))

    for _ in range(800):
        types, params = values()
        fresh = routers()[1]
        expected = fresh.plan_bind(fresh.prepared(sql), types, params, CTX)
        same(warm, warm.plan_bind(warm_analyses, types, params, CTX), fresh, expected)
    assert any(lane is not None for lane in warm._lanes.values())  # the lane was taken
