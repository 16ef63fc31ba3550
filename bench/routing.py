"""Routing cost per cached statement (issue 3's micro-benchmark): pgbench's point query on a
range-sharded pgbench_accounts, simple protocol (fingerprint + cached analysis + route) and
extended protocol (cached analysis + Bind values + route), and what the proxy does with a Bind
message (the lane reads the key in place). Prints µs per statement, median of rounds.
Usage: .venv/bin/python bench/routing.py"""

from __future__ import annotations

import itertools
import statistics
import struct
import timeit

from shardwire.config.load import parse_config
from shardwire.proxy.routing import BindValues, Prepared, StatementRouter, read_bind
from shardwire.router.route import RouteContext

CONFIG = """
auth: {method: trust}
database: bench
users: {bench: {}}
shards:
  s1: {primary: "postgresql://postgres@127.0.0.1:5432/bench"}
  s2: {primary: "postgresql://postgres@127.0.0.1:5433/bench"}
default_shard: s1
sharding:
  rules:
    by_aid:
      kind: range
      column: aid
      tables: [pgbench_accounts]
      ranges:
        - {to: 500001, shard: s1}
        - {from: 500001, shard: s2}
  reference: [pgbench_branches, pgbench_tellers]
"""


def main() -> None:
    router = StatementRouter(parse_config(CONFIG).sharding)
    ctx = RouteContext()
    aids = iter(range(1, 10**9))

    def simple() -> None:
        sql = b"SELECT abalance FROM pgbench_accounts WHERE aid = %d;" % next(aids)
        router.plan_query(sql, ctx)

    analyses = router.prepared(b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;")

    def prepared() -> None:
        params = BindValues((1,), (struct.pack("!i", next(aids) % 1000000 + 1),))
        router.plan_bind(analyses, (23,), params, ctx)

    def bind_message(aid: int) -> bytes:
        """A Bind of statement P0_1 with the aid in binary, as a body (what the proxy reads)."""
        return (b"\0P0_1\0" + struct.pack("!hhhi", 1, 1, 1, 4) + struct.pack("!i", aid)
                + struct.pack("!h", 0))

    def text_bind_message(aid: int) -> bytes:
        """The same with no format codes and the aid as text, as libpq and pgbench send it."""
        value = b"%d" % aid
        return (b"\0P0_1\0" + struct.pack("!hhi", 0, 1, len(value)) + value
                + struct.pack("!h", 0))

    values_at = len(b"\0P0_1\0")

    keys = [aid * 977 % 1000000 + 1 for aid in range(4096)]
    bodies = itertools.cycle([bind_message(aid) for aid in keys])
    text_bodies = itertools.cycle([text_bind_message(aid) for aid in keys])

    def bound() -> None:
        # The proxy's path for a Bind (server.py `_route_unit`): the lane reads the key from
        # the message; a statement without a lane would be read whole and planned.
        body = next(bodies)
        if router.lane_plan(analyses, (23,), body, values_at) is None:
            router.plan_bind(analyses, (23,), read_bind(body)[2], ctx)

    statement = Prepared(analyses, (), b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;")

    def bound_text() -> None:
        # A client binding the same statement again, as pgbench does: its BoundLane knows
        # the message by its first bytes and reads the key where it lies.
        body = next(text_bodies)
        bound = statement.bound
        if bound is not None and router.bound_plan(bound, body) is not None:
            return
        if router.lane_plan(analyses, (), body, values_at) is None:
            router.plan_bind(analyses, (), read_bind(body)[2], ctx)
        else:
            statement.bound = router.bound_lane(statement, body, values_at)

    for name, fn in (("simple (fingerprint + route)", simple),
                     ("prepared (bind + route)", prepared),
                     ("Bind message (lane), binary", bound),
                     ("Bind message (lane), text", bound_text)):
        fn()
        rounds = [timeit.timeit(fn, number=20000) / 20000 * 1e6 for _ in range(7)]
        print(f"{name:34} {statistics.median(rounds):6.2f} µs per statement")


if __name__ == "__main__":
    main()
