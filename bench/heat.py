"""Cost of recording heat statistics (issue 6) per statement: what a server connection does
when a statement is answered (`ServerConnection._finished`: shard counters, and the statement's
key queued), what the drain then costs per statement (`Heat.drain`: both space-saving
sketches, in batches), the row count read from a CommandComplete tag by the relay, and the
clock read when a request is written. Prints ns per statement, the best of several rounds (the
least disturbed by other processes); these are warm-cache figures, below what the same code
costs between two statements' network work.
Usage: .venv/bin/python bench/heat.py"""

from __future__ import annotations

import itertools
import random
import time
import timeit
from collections.abc import Callable

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
        if len(heat.pending) > 4096:
            heat.pending.clear()  # drained below, on its own

    def finished_no_key() -> None:
        conn.busy_since = 1.0
        next(keys)
        conn._finished(None)

    base = per_statement(baseline)
    for name, run in (("with a key (queued for the drain)", finished_key),
                      ("no key (multi-shard, BEGIN...)", finished_no_key)):
        print(f"statement answered, {name:34} {per_statement(run) - base:6.0f} ns")

    # The drain records what the pools queued: a batch of 1,000 statements at a time.
    batch = 1000

    def queue(stream: itertools.cycle[tuple[str, int]]) -> Callable[[], None]:
        def run() -> None:
            heat.pending = [(next(stream), "s1", 0.001) for _ in range(batch)]
        return run

    def queue_and_drain(stream: itertools.cycle[tuple[str, int]]) -> Callable[[], None]:
        fill = queue(stream)

        def run() -> None:
            fill()
            heat.drain()
        return run

    for name, stream in (("key among the hot ones", keys),
                         ("key new to a full sketch (sampled)", tail)):
        cost = (per_statement(queue_and_drain(stream), number=200)
                - per_statement(queue(stream), number=200)) / batch
        print(f"recorded by the drain, {name:31} {cost:6.0f} ns")

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
