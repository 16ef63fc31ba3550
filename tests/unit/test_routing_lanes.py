"""The routing lanes (proxy/routing.py `_Lane`): once a statement shape is known to route by
an integer key alone, its later executions skip the analysis. Property: every plan a lane
gives is the plan a fresh router (no lanes yet) gives for the same statement and values."""

from __future__ import annotations

import functools
import random
import struct

from shardwire.config.load import parse_config
from shardwire.proxy.routing import BindValues, Prepared, StatementRouter, read_bind
from shardwire.router.plan import describe
from shardwire.router.route import RouteContext
from shardwire.router.shardmap import ShardMap

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


@functools.cache
def shard_map() -> ShardMap:
    return parse_config(CONFIG).sharding


def routers() -> tuple[StatementRouter, StatementRouter]:
    """A router, and another with nothing cached (its lanes are taken afresh)."""
    return StatementRouter(shard_map()), StatementRouter(shard_map())


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
    laned = 0
    for _ in range(600):
        key = rng.choice(keys + [str(rng.randint(0, 5000))])
        sql = rng.choice(shapes).format(key).encode()
        fresh = routers()[1]
        # As the proxy asks: the Query message's lane first (its text and closing NUL).
        plan = warm.query_lane(sql + b"\0")
        if plan is None:
            plan = warm.plan_query(sql, CTX, lane_tried=True)
        else:
            laned += 1
        same(warm, plan, fresh, fresh.plan_query(sql, CTX))
    assert sum(lane is not None for lane in warm._lanes.values()) == 3  # the lanes were taken
    assert laned > 150


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


def bind_body(statement: bytes, formats: list[int], values: list[bytes | None]) -> bytes:
    """A Bind message's body: unnamed portal, `statement`, its formats and values."""
    out = b"\0" + statement + b"\0" + struct.pack("!h", len(formats))
    out += b"".join(struct.pack("!h", f) for f in formats)
    out += struct.pack("!h", len(values))
    for v in values:
        out += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
    return out + struct.pack("!h", 0)


def test_bind_messages_read_in_place_route_as_read_whole() -> None:
    """`lane_plan` reads a lane's parameter from the message itself: for any format codes
    (none, one for all, one each), parameter position, NULL or short message, its plan is the
    one `plan_bind` gives for the message read whole (or it gives none, and the proxy reads
    the message whole)."""
    rng = random.Random(13)
    warm, _ = routers()
    shapes = {b"SELECT * FROM accounts WHERE aid = $1": 0,
              b"SELECT * FROM accounts WHERE note = $1 AND aid = $2": 1}
    prepared = {sql: warm.prepared(sql) for sql in shapes}
    laned = 0
    for _ in range(1500):
        sql = rng.choice(list(shapes))
        v = rng.choice([0, 5, 999, 1000, 2500, 3000, 40000, -3, 2**31 - 1, 2**40])
        binary = rng.random() < 0.5
        key: bytes | None = struct.pack("!q" if rng.random() < 0.5 else "!i",
                                        max(-2**31, min(v, 2**31 - 1))) if binary else (
            str(v).encode() if rng.random() < 0.9 else b"12x")
        if rng.random() < 0.05:
            key = None
        values = [b"memo", key] if shapes[sql] else [key]
        n = len(values)
        formats = rng.choice([[], [1 if binary else 0], [0] * (n - 1) + [1 if binary else 0]])
        if not binary and formats == [] and rng.random() < 0.5:
            formats = [0]
        if binary and not formats:
            formats = [1] * n
        types = tuple(rng.choice([0, 20, 23, 25]) for _ in range(n))
        body = bind_body(b"s", formats, values)
        if rng.random() < 0.05:
            body = body[:rng.randrange(len(body))]  # cut short: read whole, it is refused
        fresh = routers()[1]
        try:
            expected = fresh.plan_bind(fresh.prepared(sql), types, read_bind(body)[2], CTX)
        except (struct.error, ValueError, IndexError):
            continue  # a message too short to read at all: never reaches routing
        plan = warm.lane_plan(prepared[sql], types, body, 3)
        if plan is None:
            plan = warm.plan_bind(prepared[sql], types, read_bind(body)[2], CTX)
        else:
            laned += 1
        same(warm, plan, fresh, expected)
    assert sum(lane is not None for lane in warm._lanes.values()) == 2  # both lanes taken
    assert laned > 500


def test_a_bound_lane_routes_as_the_message_read_whole() -> None:
    """The lane a client's last Bind used (`BoundLane`) is taken only for the commonest
    layout, and for any later Bind that starts with its head (any text, NULL, short or
    long value) it gives the plan `plan_bind` gives for the message read whole, or none.
    Another router's (the map reloaded) is never taken."""
    rng = random.Random(17)
    warm, _ = routers()
    sql = b"SELECT * FROM accounts WHERE aid = $1"
    known = Prepared(warm.prepared(sql), (23,), sql)
    first = bind_body(b"s", [], [b"5"])
    assert warm.plan_bind(known.analyses, known.param_types, read_bind(first)[2], CTX)
    assert warm.lane_plan(known.analyses, known.param_types, first, 3) is not None
    bound = warm.bound_lane(known, first, 3)
    assert bound is not None and first.startswith(bound.head)
    # Not the commonest layout: format codes, a named portal, the key not first.
    assert warm.bound_lane(known, bind_body(b"s", [0], [b"5"]), 3) is None
    assert warm.bound_lane(known, b"p" + first, 4) is None
    two = Prepared(warm.prepared(b"SELECT * FROM accounts WHERE note = $1 AND aid = $2"),
                   (25, 23), b"")
    assert warm.lane_plan(two.analyses, two.param_types,
                          bind_body(b"s", [], [b"x", b"5"]), 3) is None  # learns the lane
    warm.plan_bind(two.analyses, two.param_types,
                   read_bind(bind_body(b"s", [], [b"x", b"5"]))[2], CTX)
    assert warm.bound_lane(two, bind_body(b"s", [], [b"x", b"5"]), 3) is None
    taken = 0
    for _ in range(1000):
        v = rng.choice([0, 5, 999, 1000, 1999, 2000, 2500, 3000, 40000, -3, 2**31 - 1,
                        10**9, 10**12])
        key: bytes | None = rng.choice([str(v).encode(), str(v).encode(), b" 7", b"1_0",
                                        b"+5", b"12x", b"", b"0" * 12 + b"7"])
        if rng.random() < 0.05:
            key = None
        body = bind_body(b"s", [], [key])
        if rng.random() < 0.05:
            body = body[:rng.randrange(len(bound.head), len(body))]
        plan = warm.bound_plan(bound, body)
        fresh = routers()[1]
        try:
            expected = fresh.plan_bind(fresh.prepared(sql), (23,), read_bind(body)[2], CTX)
        except (struct.error, ValueError, IndexError):
            assert plan is None  # too short to read: the general path refuses it
            continue
        if plan is not None:
            taken += 1
            same(warm, plan, fresh, expected)
    assert taken > 80  # plain keys of the ranges' shards
    other = routers()[1]
    assert other.bound_plan(bound, first) is None


def test_a_lanes_bisect_finds_the_shard_the_rule_gives() -> None:
    """Range layouts with and without open ends, gaps and ranges that touch: the lane's
    bisect over its bounds agrees with `Rule.shard_for` on every key around every bound."""
    from shardwire.proxy.routing import _Lane

    rng = random.Random(14)
    for _ in range(200):
        points = sorted(rng.sample(range(-50, 50), rng.randint(2, 8)))
        ranges = []
        for i in range(0, len(points) - 1, rng.choice([1, 2])):
            ranges.append({"from": points[i], "to": points[i + 1],
                           "shard": rng.choice(["s1", "s2"])})
        if rng.random() < 0.5:
            del ranges[0]["from"]
        if rng.random() < 0.5:
            del ranges[-1]["to"]
        rule = parse_config(CONFIG.split("sharding:")[0] + "sharding:\n  rules:\n    r:\n"
                            "      kind: range\n      column: k\n      type: integer\n"
                            "      tables: [t]\n      ranges:\n" + "".join(
                                f"        - {r}\n".replace("'", "") for r in ranges)
                            ).sharding.rules["r"]
        lane = _Lane(0, rule)
        assert lane.bounds is not None
        for key in range(-60, 60):
            plan = lane.plan(key)
            assert (plan.shard if plan is not None else None) == rule.shard_for(key), (
                ranges, key)


def test_a_query_lane_is_a_statement_on_a_sharded_table() -> None:
    """The proxy asks `query_lane` before it looks for the first words of the queries it may
    answer itself (SET, SHOW, BEGIN...): a lane must never answer for one of those, however
    often its shape has been planned, and must answer as `plan_query` does otherwise."""
    router, fresh = routers()
    local = [b"SET statement_timeout = %d", b"SHOW ROUTE FOR SELECT * FROM accounts WHERE aid = %d",
             b"BEGIN; SELECT * FROM accounts WHERE aid = %d", b"set   work_mem = %d",
             b"START TRANSACTION; UPDATE accounts SET x = 1 WHERE aid = %d"]
    for shape in local:
        for value in (5, 77, 1500):
            router.plan_query(shape % value, CTX)
        assert router.query_lane(shape % 2500 + b"\0") is None, shape
    sql = b"SELECT * FROM accounts WHERE aid = %d"
    router.plan_query(sql % 1, CTX)
    for value in (7, 999, 1000, 1999, 3000, 123456):
        plan = router.query_lane(sql % value + b"\0")
        assert plan is not None
        same(router, plan, fresh, fresh.plan_query(sql % value, CTX))
    assert router.query_lane(sql % 2500 + b"\0") is None  # in no range: the general path says why
    for hinted in (b"/* shard: s3 */ SELECT * FROM accounts WHERE aid = %d",
                   b"SELECT * FROM accounts /* shard: s3 */ WHERE aid = %d"):
        for value in (7, 8, 9):  # a hint in a learnt shape: the lane never overrules it
            assert describe(router.plan_query(hinted % value, CTX)) == describe(
                fresh.plan_query(hinted % value, CTX))
            assert router.query_lane(hinted % value + b"\0") is None
