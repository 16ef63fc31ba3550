"""Routing cost per cached statement (issue 3's micro-benchmark): pgbench's point query on a
range-sharded pgbench_accounts, simple protocol (fingerprint + cached analysis + route) and
extended protocol (cached analysis + Bind values + route). Prints µs per statement, median of
rounds. Usage: .venv/bin/python bench/routing.py"""

from __future__ import annotations

import statistics
import struct
import timeit

from shardwire.config.load import parse_config
from shardwire.proxy.routing import BindValues, StatementRouter
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

    for name, fn in (("simple (fingerprint + route)", simple), ("prepared (bind + route)",
                                                                 prepared)):
        fn()
        rounds = [timeit.timeit(fn, number=20000) / 20000 * 1e6 for _ in range(7)]
        print(f"{name:32} {statistics.median(rounds):6.2f} µs per statement")


if __name__ == "__main__":
    main()
