"""A writer that keeps inserting and updating rows through a proxy while a move runs, and
remembers what the proxy acknowledged: the invariant of every rebalance test is that each
acknowledged write is on the keys' shard afterwards, exactly once (test_rebalance_*.py)."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

import psycopg


@dataclass
class KeyWriter:
    """Inserts and updates rows of `table` whose `column` is one of the keys, through one
    proxy, one statement per transaction, half of them on the moving keys. Ids from
    `first_id` on are this writer's own; ids below `existing` were there before (value 0) and
    are updated too. Several writers may share keys when each has its own ids and none
    updates the rows that were there before (`existing` 0)."""

    dsn: str
    table: str
    column: str
    moving: list[int]
    others: list[int]
    first_id: int
    existing: int = 0
    acked: dict[tuple[int, int], int] = field(default_factory=dict)  # (key, id) -> value
    latencies: dict[int, list[float]] = field(default_factory=dict)  # seconds, by key
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        keys = self.moving + self.others
        self.next_id = {k: self.first_id for k in keys}
        self.updatable = {k: list(range(self.existing)) for k in keys}
        self.acked.update({(k, i): 0 for k in keys for i in range(self.existing)})

    def moving_latencies(self) -> list[float]:
        return [s for k in self.moving for s in self.latencies.get(k, [])]

    def run(self) -> None:
        rnd = random.Random(self.first_id)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.is_set():
                key = rnd.choice(self.moving if rnd.random() < 0.5 else self.others)
                started = time.monotonic()
                try:
                    if rnd.random() < 0.5 or not self.updatable[key]:
                        i = self.next_id[key]
                        conn.execute(f"INSERT INTO {self.table} ({self.column}, id, v) "
                                     "VALUES (%s, %s, %s)", (key, i, 1))
                        self.next_id[key] = i + 1
                        self.updatable[key].append(i)
                        self.acked[(key, i)] = 1
                    else:
                        i = rnd.choice(self.updatable[key])
                        value = rnd.randrange(2, 1_000_000)
                        cur = conn.execute(f"UPDATE {self.table} SET v = %s WHERE "
                                           f"{self.column} = %s AND id = %s", (value, key, i))
                        if cur.rowcount != 1:
                            self.errors.append(f"update of {(key, i)} hit {cur.rowcount}")
                        self.acked[(key, i)] = value
                except psycopg.Error as e:
                    self.errors.append(f"{key}: {e.sqlstate} {e}")
                self.latencies.setdefault(key, []).append(time.monotonic() - started)
                time.sleep(0.002)

    def __enter__(self) -> KeyWriter:
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.5)  # writes after the move, too
        self.stop.set()
        assert self.thread is not None
        self.thread.join(30)
