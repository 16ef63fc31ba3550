"""Heat statistics: how much work each shard and each hot key gives the shards.

Every proxy keeps, for the window since its last flush, per shard counters (statements, rows,
busy seconds, errors) and, per sharding rule, the heaviest keys by statements and by busy time.
The keys are counted with a space-saving sketch (Metwally, Agrawal, El Abbadi, "Efficient
computation of frequent and top-k elements in data streams", 2005), so memory stays bounded
however many distinct keys pass through.

Recording is on the proxy's hot path: a shard's counters are plain attributes the pool holds
directly, and a statement's key is appended to a list that the proxy drains every
`DRAIN_INTERVAL` seconds: recorded in a batch, the sketches' code and data stay in the CPU's
caches, where recording each statement between two others' network work found them cold
(measured: about 3 µs a statement against 0.5 µs). A key already in the sketch costs one
dict read and one dict write per sketch. A key missing from a full sketch would evict another
(a heap operation), so only about one in `MISS_SAMPLE` such statements is recorded, with that
much more weight.

No I/O here: the proxy rotates windows on its own clock and writes them to the catalog
(`store.py`).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

from ..router.shardmap import KeyValue

DEFAULT_TOP_KEYS = 100
# A statement whose key a full sketch does not hold is recorded with this probability
# (1 / MISS_SAMPLE), weighted by MISS_SAMPLE; see `Heat._record`.
MISS_SAMPLE = 16
# How often the proxy records the statements answered since (`Heat.drain`).
DRAIN_INTERVAL = 0.05


class SpaceSaving:
    """The `capacity` heaviest keys of a weighted stream, approximately.

    Every key seen is either monitored (in `counts`) or was evicted. A monitored key's count
    overestimates its true weight by at most its error (`errors()`), which is at most
    `total / capacity`; and every key whose true weight exceeds `total / capacity` is
    monitored. (`total` is the weight of the whole stream: the counts always add up to it,
    since an evicted key's count passes to its successor.)

    Eviction finds the smallest count with a heap whose entries may be stale (counts only
    grow, and the heap is not updated on every add): a stale entry at the top is pushed down
    again with its current count until the top is current. So an add of a monitored key is a
    dict read and write, and an add of a new key is O(log capacity) amortised. A heap entry
    also carries what is only read when reporting: the key's label and error.
    """

    __slots__ = ("capacity", "counts", "_heap", "_tick")

    def __init__(self, capacity: int = DEFAULT_TOP_KEYS) -> None:
        if capacity < 1:
            raise ValueError("a sketch needs room for at least one key")
        self.capacity = capacity
        self.counts: dict[Hashable, float] = {}
        # (count when pushed, tick, key, label, error): ties are broken by age (the tick),
        # never by comparing keys; the label is the shard the key was on when it came in.
        self._heap: list[tuple[float, int, Hashable, str, float]] = []
        self._tick = 0

    def add(self, key: Hashable, weight: float = 1, label: str = "") -> None:
        count = self.counts.get(key)
        if count is not None:
            self.counts[key] = count + weight
        else:
            self.insert(key, weight, label)

    def insert(self, key: Hashable, weight: float, label: str) -> None:
        """Add a key that is not monitored (`add` without the look-up)."""
        counts, heap = self.counts, self._heap
        self._tick += 1
        if len(counts) < self.capacity:
            counts[key] = weight
            heapq.heappush(heap, (weight, self._tick, key, label, 0))
            return
        while True:  # the smallest current count: refresh stale entries at the top
            entry = heap[0]
            current = counts[entry[2]]
            if current == entry[0]:
                break
            heapq.heapreplace(heap, (current, *entry[1:]))
        smallest = entry[0]
        del counts[entry[2]]
        counts[key] = smallest + weight
        heapq.heapreplace(heap, (smallest + weight, self._tick, key, label, smallest))

    @property
    def total(self) -> float:
        return sum(self.counts.values())

    @property
    def bound(self) -> float:
        """The most any reported count can exceed the true weight: total / capacity."""
        return self.total / self.capacity

    def errors(self) -> dict[Hashable, float]:
        """How much of each monitored key's count may belong to keys it replaced."""
        return {entry[2]: entry[4] for entry in self._heap}

    def labels(self) -> dict[Hashable, str]:
        return {entry[2]: entry[3] for entry in self._heap}

    def top(self, n: int | None = None) -> list[tuple[Hashable, float, float]]:
        """(key, count, error) of the heaviest keys, heaviest first."""
        errors = self.errors()
        ranked = sorted(self.counts.items(), key=lambda kv: kv[1], reverse=True)
        return [(k, c, errors[k]) for k, c in ranked[:n]]


class ShardCounters:
    """What one shard was given in the current window. The shard's pools hold this object
    and add to it directly; `Heat.rotate` zeroes it in place."""

    __slots__ = ("statements", "rows", "busy", "errors")

    def __init__(self) -> None:
        self.statements = 0  # units of work: a Query, or an extended batch up to its Sync
        self.rows = 0  # rows returned or changed (from CommandComplete), relayed work only
        self.busy = 0.0  # seconds with a request outstanding on a connection of the shard
        self.errors = 0  # ErrorResponses from the shard, relayed work only


class RuleHeat:
    """The heaviest keys of one rule: by statements and by busy seconds."""

    __slots__ = ("statements", "busy", "statement_counts", "busy_counts")

    def __init__(self, capacity: int) -> None:
        self.statements = SpaceSaving(capacity)
        self.busy = SpaceSaving(capacity)
        # The sketches' own dicts, for `Heat._record`'s common case without method calls.
        self.statement_counts = self.statements.counts
        self.busy_counts = self.busy.counts


@dataclass(frozen=True, slots=True)
class ShardLoad:
    statements: int = 0
    rows: int = 0
    busy: float = 0.0
    errors: int = 0

    def __add__(self, other: ShardLoad) -> ShardLoad:
        return ShardLoad(self.statements + other.statements, self.rows + other.rows,
                         self.busy + other.busy, self.errors + other.errors)


@dataclass(frozen=True, slots=True)
class KeyLoad:
    """A hot key's estimates. A count may be over by its error; a key missing from one of the
    two sketches has 0 there, with that sketch's bound as the error."""

    rule: str
    key: KeyValue
    shard: str  # where the key's statements ran
    statements: int
    statements_error: int
    busy: float
    busy_error: float


@dataclass(frozen=True, slots=True)
class HeatWindow:
    """One closed (or, for SHOW HOT, still open) window of one proxy's heat."""

    start: float  # wall-clock seconds (time.time())
    end: float
    shards: dict[str, ShardLoad] = field(default_factory=dict)
    keys: dict[str, tuple[KeyLoad, ...]] = field(default_factory=dict)  # rule -> hottest first

    @property
    def seconds(self) -> float:
        return max(self.end - self.start, 0.0)


class Heat:
    """A proxy's heat for the window now open."""

    def __init__(self, start: float, top_keys: int = DEFAULT_TOP_KEYS,
                 miss_sample: int = MISS_SAMPLE, seed: int | None = None) -> None:
        self.start = start
        self.top_keys = top_keys
        self.miss_sample = miss_sample  # 1: record every miss (exact space-saving)
        self._draw = random.Random(seed).randint
        self._skip = self._draw(1, 2 * miss_sample - 1)  # misses until one is recorded
        # Statements answered but not yet recorded: ((rule, key), shard, busy seconds). The
        # proxy appends here (one list append on its hot path) and `drain` records them in a
        # tight loop, every DRAIN_INTERVAL seconds and before any window is read.
        self.pending: list[tuple[tuple[str, KeyValue], str, float]] = []
        self.shards: dict[str, ShardCounters] = {}
        self.rules: dict[str, RuleHeat] = {}
        self.last: HeatWindow | None = None  # the window closed last

    def drain(self) -> None:
        """Record the statements `pending` holds."""
        pending = self.pending
        if pending:
            self.pending = []
            self._record(pending)

    def shard(self, name: str) -> ShardCounters:
        """The counters of a shard (created once, kept across windows)."""
        counters = self.shards.get(name)
        if counters is None:
            counters = self.shards[name] = ShardCounters()
        return counters

    def record_key(self, rule: str, key: KeyValue, shard: str, busy: float) -> None:
        """One statement of a single-shard route with a known key finished after `busy` s."""
        self._record([((rule, key), shard, busy)])

    def _record(self, items: list[tuple[tuple[str, KeyValue], str, float]]) -> None:
        """`record_key` for each item. This runs for every statement routed by its key, so
        it is SpaceSaving.add inlined, with the current rule's dicts in locals."""
        rule: str | None = None
        found: RuleHeat | None = None
        counts: dict[Hashable, float] = {}
        busy_counts: dict[Hashable, float] = {}
        capacity = 0
        for (name, key), shard, busy in items:
            if name != rule:
                rule, found = name, self.rules.get(name)
                if found is None:
                    found = self.rules[name] = RuleHeat(self.top_keys)
                counts, busy_counts = found.statement_counts, found.busy_counts
                capacity = found.statements.capacity
            count, seconds = counts.get(key), busy_counts.get(key)
            if count is not None and seconds is not None:
                counts[key] = count + 1
                busy_counts[key] = seconds + busy
                continue
            weight = 1
            if len(counts) >= capacity:
                # Full: taking the key in evicts another, which costs a heap operation. A
                # key spread thin over many others (the common reason to be missing) is not
                # worth that on every statement, so about one such miss in `miss_sample` is
                # recorded, at random, with `miss_sample` times the weight (rebalancing.md:
                # the cost). A sketch that holds the key counts it exactly all the same.
                self._skip -= 1
                if self._skip > 0:
                    if count is not None:
                        counts[key] = count + 1
                    elif seconds is not None:
                        busy_counts[key] = seconds + busy
                    continue
                self._skip = self._draw(1, 2 * self.miss_sample - 1)
                weight = self.miss_sample
            assert found is not None
            if count is None:
                found.statements.insert(key, weight, shard)
            else:
                counts[key] = count + 1
            if seconds is None:
                found.busy.insert(key, busy * weight, shard)
            else:
                busy_counts[key] = seconds + busy

    def snapshot(self, now: float) -> HeatWindow:
        self.drain()
        shards = {name: ShardLoad(c.statements, c.rows, c.busy, c.errors)
                  for name, c in self.shards.items()}
        return HeatWindow(self.start, now, shards,
                          {rule: _key_loads(rule, h) for rule, h in self.rules.items()})

    def rotate(self, now: float, top_keys: int | None = None) -> HeatWindow:
        """Close the window: its snapshot, and a fresh window from `now` (with `top_keys` keys
        per sketch from now on, when given)."""
        window = self.snapshot(now)
        for counters in self.shards.values():
            counters.statements = counters.rows = counters.errors = 0
            counters.busy = 0.0
        self.rules = {}
        self.start = now
        if top_keys is not None:
            self.top_keys = top_keys
        self.last = window
        return window


def _key_loads(rule: str, heat: RuleHeat) -> tuple[KeyLoad, ...]:
    by_count, by_busy = heat.statements, heat.busy
    count_errors, busy_errors = by_count.errors(), by_busy.errors()
    labels = {**by_busy.labels(), **by_count.labels()}
    count_bound, busy_bound = int(by_count.bound), by_busy.bound
    out = []
    for key in {**by_count.counts, **by_busy.counts}:
        count = by_count.counts.get(key)
        busy = by_busy.counts.get(key)
        out.append(KeyLoad(
            rule, key, labels[key],
            int(count) if count is not None else 0,
            int(count_errors[key]) if count is not None else count_bound,
            busy if busy is not None else 0.0,
            busy_errors[key] if busy is not None else busy_bound))
    out.sort(key=lambda k: (k.statements, k.busy), reverse=True)
    return tuple(out)


def merge_windows(windows: Iterable[HeatWindow]) -> HeatWindow:
    """Several windows (of one proxy over time, or of several proxies) as one: counters add
    up, and so do a key's estimates and their errors."""
    windows = list(windows)
    if not windows:
        return HeatWindow(0.0, 0.0)
    shards: dict[str, ShardLoad] = {}
    keys: dict[str, dict[tuple[KeyValue, str], KeyLoad]] = {}
    for w in windows:
        for name, load in w.shards.items():
            shards[name] = shards.get(name, ShardLoad()) + load
        for rule, loads in w.keys.items():
            into = keys.setdefault(rule, {})
            for k in loads:
                old = into.get((k.key, k.shard))
                into[(k.key, k.shard)] = k if old is None else KeyLoad(
                    rule, k.key, k.shard, old.statements + k.statements,
                    old.statements_error + k.statements_error, old.busy + k.busy,
                    old.busy_error + k.busy_error)
    ranked = {rule: tuple(sorted(found.values(), key=lambda k: (k.statements, k.busy),
                                 reverse=True))
              for rule, found in keys.items()}
    return HeatWindow(min(w.start for w in windows), max(w.end for w in windows), shards,
                      ranked)
