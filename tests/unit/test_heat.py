"""The space-saving sketch and the heat windows (rebalancer/heat.py)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from shardwire.rebalancer.heat import Heat, SpaceSaving, merge_windows


def zipf_stream(n: int, distinct: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    weights = [1 / (rank + 1) ** 1.1 for rank in range(distinct)]
    return rng.choices(range(distinct), weights, k=n)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("capacity", [1, 5, 50])
def test_heavy_keys_are_kept_and_counts_are_within_the_bound(seed: int, capacity: int) -> None:
    rng = random.Random(seed)
    stream = zipf_stream(rng.randint(1, 5000), rng.choice([3, 100, 2000]), seed)
    rng.shuffle(stream)
    sketch = SpaceSaving(capacity)
    for key in stream:
        sketch.add(key)
    truth = Counter(stream)
    bound = len(stream) / capacity
    assert sketch.total == len(stream)
    assert sketch.bound == pytest.approx(bound)
    assert len(sketch.counts) <= capacity
    for key, true_count in truth.items():
        if true_count > bound:
            assert key in sketch.counts, (key, true_count, bound)
    errors = sketch.errors()
    for key, count in sketch.counts.items():
        # an overestimate, by at most the key's recorded error, itself at most N/K
        assert truth[key] <= count <= truth[key] + errors[key]
        assert errors[key] <= bound


@pytest.mark.parametrize("seed", range(10))
def test_weighted_counts_keep_the_same_guarantee(seed: int) -> None:
    rng = random.Random(seed)
    sketch = SpaceSaving(10)
    truth: Counter[str] = Counter()
    for key in zipf_stream(3000, 300, seed):
        weight = rng.expovariate(1000)  # seconds of busy time
        sketch.add(f"k{key}", weight)
        truth[f"k{key}"] += weight
    total = sum(truth.values())
    for key, weight in truth.items():
        if weight > total / 10:
            assert key in sketch.counts
    errors = sketch.errors()
    for key, count in sketch.counts.items():
        assert truth[key] - 1e-9 <= count <= truth[key] + errors[key] + 1e-9


def test_exact_while_the_keys_fit() -> None:
    sketch = SpaceSaving(3)
    for key in "abacab":
        sketch.add(key)
    assert sketch.top() == [("a", 3, 0), ("b", 2, 0), ("c", 1, 0)]
    sketch.add("d")  # evicts c (the smallest), inheriting its count as the error
    assert sketch.top() == [("a", 3, 0), ("b", 2, 0), ("d", 2, 1)]


def test_a_window_reports_shards_and_hot_keys_and_rotation_starts_afresh() -> None:
    heat = Heat(start=100.0, top_keys=2, miss_sample=1)  # every miss recorded: exact
    s1 = heat.shard("s1")
    s1.statements += 3
    s1.busy += 0.3
    s1.rows += 7
    for key in (1, 1, 1, 2, 3):
        heat.record_key("by_tenant", key, "s1", 0.1 if key == 1 else 0.5)
    window = heat.rotate(160.0, top_keys=5)
    assert window.seconds == 60
    assert window.shards["s1"].statements == 3 and window.shards["s1"].rows == 7
    hot = window.keys["by_tenant"]
    assert hot[0].key == 1 and hot[0].statements == 3 and hot[0].statements_error == 0
    assert {k.key for k in hot} == {1, 2, 3}  # 3 is in the busy sketch only
    assert heat.shard("s1") is s1 and s1.statements == 0 and heat.rules == {}
    assert heat.top_keys == 5 and heat.start == 160.0
    assert heat.last is window


def test_a_full_sketch_samples_the_keys_it_misses_and_still_finds_the_hot_one() -> None:
    """Uniform keys over a million accounts fill the sketch at once; one key in ten is the hot
    tenant's. Misses are recorded about one in 16 (weighted by 16), so the estimates stay near
    the truth while most long-tail statements skip the eviction."""
    heat = Heat(0.0, top_keys=100, miss_sample=16, seed=7)
    rng = random.Random(3)
    total = 200_000
    for i in range(total):
        key = 42 if i % 10 == 0 else rng.randrange(1, 10**6)
        heat.record_key("by_aid", key, "s1", 0.001)
    hot = heat.rotate(1.0).keys["by_aid"]
    assert hot[0].key == 42
    assert abs(hot[0].statements - total // 10) <= 16 + hot[0].statements_error
    assert abs(hot[0].busy - total // 10 * 0.001) <= 0.016 + hot[0].busy_error
    sketch_total = sum(k.statements for k in hot)  # what the sketch accounts for
    assert 0.95 * total < sketch_total < 1.05 * total


def test_a_key_the_full_sketch_holds_is_counted_exactly_between_samples() -> None:
    heat = Heat(0.0, top_keys=2, miss_sample=1000, seed=1)
    for key in ("a", "b"):  # room: taken in as they come
        heat.record_key("r", key, "s1", 1.0)
    for _ in range(50):
        heat.record_key("r", "a", "s1", 1.0)
        heat.record_key("r", "new", "s1", 1.0)  # full: almost never recorded
    counts = {k.key: k.statements for k in heat.rotate(1.0).keys["r"]}
    assert counts == {"a": 51, "b": 1}  # "new" never got in (the seed draws no sample)


def test_statements_the_proxy_queued_are_in_the_window() -> None:
    """The pool only appends (`pending`); a window read before the proxy's next drain holds
    them all the same."""
    heat = Heat(0.0)
    heat.pending += [(("by_tenant", 7), "s2", 0.25)] * 3
    hot = heat.snapshot(1.0).keys["by_tenant"]
    assert [(k.key, k.shard, k.statements, k.busy) for k in hot] == [(7, "s2", 3, 0.75)]
    assert heat.pending == []


def test_windows_of_several_proxies_add_up() -> None:
    a, b = Heat(0.0), Heat(0.0)
    for heat, n in ((a, 2), (b, 3)):
        heat.shard("s1").statements += n
        for _ in range(n):
            heat.record_key("r", "x", "s1", 1.0)
    merged = merge_windows([a.rotate(10.0), b.rotate(12.0)])
    assert merged.shards["s1"].statements == 5
    assert merged.keys["r"][0].statements == 5 and merged.keys["r"][0].busy == 5.0
    assert (merged.start, merged.end) == (0.0, 12.0)


def test_the_relay_counts_rows_from_command_tags_and_errors() -> None:
    from shardwire.proxy.protocol import messages as m
    from shardwire.proxy.protocol.errors import PgError
    from shardwire.proxy.protocol.relay import ServerLink

    link = ServerLink()
    link.note_sent(True)
    tags = ["BEGIN", "SELECT 3", "INSERT 0 12", "UPDATE 105", "CREATE TABLE", "COMMIT"]
    reply = b"".join(m.command_complete(t) for t in tags) + m.ready_for_query(b"I")
    assert link.feed(reply) == reply  # forwarded untouched
    link.note_sent(True)
    # split in the middle of a tag: counted once the message is whole
    error = m.error_response(PgError("23505", "duplicate key"))
    reply = m.command_complete("DELETE 7") + error + m.ready_for_query(b"I")
    assert link.feed(reply[:7]) + link.feed(reply[7:]) == reply
    assert (link.rows, link.errors) == (3 + 12 + 105 + 7, 1)
