"""Cost of recording heat statistics (issue 6) on the proxy's hot path, per statement: what a
server connection does when a statement is answered (`ServerConnection._finished`: shard
counters, and both space-saving sketches of the statement's key), and the row count read from
a CommandComplete tag by the relay, and the clock read when a request is written. Prints ns
per statement, the best of several rounds (the least disturbed by other processes).
Usage: .venv/bin/python bench/heat.py"""

from __future__ import annotations

import itertools
import random
import time
import timeit

from shardwire.config.model import PoolSettings, ServerAddress
from shardwire.proxy.pool import Pool, ServerConnection
from shardwire.proxy.protocol import relay
from shardwire.proxy.protocol.relay import ServerLink
from shardwire.rebalancer.heat import Heat

N = 200_000


def per_statement(run: object, number: int = N, rounds: int = 9) -> float:
    times = timeit.repeat(run, number=number, repeat=rounds)  # type: ignore[arg-type]
    return min(times) / number * 1e9


class _Transport:
    def write(self, data: bytes) -> None:
        pass


def main() -> None:
    heat = Heat(time.time(), top_keys=100)
    pool = Pool("s1", "primary", ServerAddress(host="127.0.0.1", port=5432, user="u",
                                               database="d"), PoolSettings(), heat)
    conn = ServerConnection(pool)
    tenants = [("by_tenant", random.randrange(50)) for _ in range(1024)]  # 50 keys: kept
    many = [("by_tenant", random.randrange(10**6)) for _ in range(1024)]  # long tail: evicts
    keys = itertools.cycle(tenants)
    tail = itertools.cycle(many)

    def baseline() -> None:
        conn.busy_since = 1.0
        next(keys)

    def finished_key() -> None:
        conn.busy_since = 1.0
        conn._finished(next(keys))

    def finished_tail() -> None:
        conn.busy_since = 1.0
        conn._finished(next(tail))

    def finished_no_key() -> None:
        conn.busy_since = 1.0
        next(keys)
        conn._finished(None)

    base = per_statement(baseline)
    for name, run in (("key among the hot ones", finished_key),
                      ("no key (multi-shard, BEGIN...)", finished_no_key),
                      ("key new to the sketch (evicts)", finished_tail)):
        print(f"statement answered, {name:32} {per_statement(run) - base:6.0f} ns")

    conn.transport = _Transport()  # type: ignore[assignment]
    transport = conn.transport

    def write_plain() -> None:
        transport.write(b"")

    def write_timed() -> None:
        conn.busy_since = 0.0
        conn.write(b"")

    print(f"request written, clock started             "
          f"{per_statement(write_timed) - per_statement(write_plain):6.0f} ns")

    reply = (b"D\x00\x00\x00\x0b\x00\x01\x00\x00\x00\x01x"
             + b"C\x00\x00\x00\x0dSELECT 1\x00" + b"Z\x00\x00\x00\x05I")
    link = ServerLink()

    def feed() -> None:
        link.note_sent(True)
        link.feed(reply)

    with_rows = per_statement(feed)
    inspected = relay._INSPECT
    relay._INSPECT = inspected - {ord("C")}  # as before rows were counted
    try:
        without = per_statement(feed)
    finally:
        relay._INSPECT = inspected
    print(f"relay of a 1-row reply: {without:.0f} ns, reading the rows from CommandComplete "
          f"adds {with_rows - without:.0f} ns")

if __name__ == "__main__":
    main()
