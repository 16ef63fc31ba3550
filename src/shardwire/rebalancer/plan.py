"""Planning moves from hot shards to cool ones. Pure: no I/O, no clock.

Input: each shard's load and size, the hot keys' load (and, where measured, their rows and
bytes), and the shard map. Output: a `RebalancePlan`, moves that bring every shard's load
under `threshold` × the mean load where the measured keys allow it, and warnings where they
do not.

With a `capacity` (`rebalance.max_shard_bytes`), a shard is a target only if its database
size plus the bytes the move copies stays within it: the free disk of a server cannot be
read through SQL, so the operator says how much a shard may hold, and `apply` refuses the
same moves (move.py).

A move takes one unit of placement to another shard: a tenant, a category value, a set of
lookup keys, or part of a range (split at a hot key's value, or the whole range). Only load
the heat statistics attribute to keys can move: load that no tracked key carries is assumed
to stay where it is. Hash rules place keys by arithmetic; a key cannot move on its own, so
their hot keys are reported, not moved.

The plan is also the file format `shardwire rebalance apply` will read (`plan_to_dict`,
`plan_from_dict`; described in docs/rebalancing.md).
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from ..router.shardmap import KeyType, KeyValue, RangeBound, Rule, RuleKind, ShardMap
from ..router.values import to_key

FORMAT_VERSION = 1
DEFAULT_THRESHOLD = 1.2
_EPSILON = 1e-9


class PlanError(ValueError):
    """A plan file that cannot be read against the shard map."""


@dataclass(frozen=True, slots=True)
class ShardState:
    """A shard's measured load (busy seconds or statements) and the size of its sharded
    tables."""

    name: str
    load: float
    bytes: int = 0
    rows: int = 0
    # pg_database_size of the shard's database (None: not measured), for the capacity check.
    database_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class KeyState:
    """A hot key: its load on `shard`, and its rows and bytes there (None: not measured)."""

    rule: str
    key: KeyValue
    shard: str
    load: float
    rows: int | None = None
    bytes: int | None = None


@dataclass(frozen=True, slots=True)
class Move:
    """Move rows of `rule` from `source` to `target`.

    Tenant, category and lookup moves name their `keys`. A range move names the part that
    moves, `lower <= key < upper` (None: open), and `split_at`, the boundary the map gains
    (None when a whole range moves)."""

    rule: str
    kind: RuleKind
    source: str
    target: str
    keys: tuple[KeyValue, ...] = ()
    lower: KeyValue | None = None
    upper: KeyValue | None = None
    split_at: KeyValue | None = None
    load: float = 0.0  # the measured load that moves with it
    rows: int = 0  # rows to copy, over all tables of the rule (a lower bound if not measured)
    bytes: int = 0
    measured: bool = True  # rows and bytes were counted, not only summed from hot keys
    # Expected load and size of the two shards once this move (and the ones before it) is done.
    source_load: float = 0.0
    target_load: float = 0.0
    source_bytes: int = 0
    target_bytes: int = 0


@dataclass(frozen=True, slots=True)
class RebalancePlan:
    metric: str  # "busy" (seconds) or "statements"
    threshold: float
    before: dict[str, ShardState]
    after: dict[str, ShardState]
    moves: tuple[Move, ...] = ()
    warnings: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)  # where the heat came from, etc.
    capacity: int = 0  # rebalance.max_shard_bytes the plan kept to (0: not checked)

    @property
    def mean(self) -> float:
        return sum(s.load for s in self.before.values()) / max(len(self.before), 1)

    @property
    def limit(self) -> float:
        return self.threshold * self.mean


def skew(loads: Mapping[str, float]) -> float:
    """The hottest shard's load over the mean load (1.0 is perfectly even; 0 with no load)."""
    if not loads:
        return 0.0
    mean = sum(loads.values()) / len(loads)
    return max(loads.values()) / mean if mean > 0 else 0.0


# -- planning ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Option:
    """A candidate move before its target is chosen."""

    move: Move  # source, keys or range, load, rows, bytes filled; target not yet
    unit: tuple[object, ...]  # what it uses up: ("key", rule, key) or ("range", rule, index)
    targets: tuple[str, ...]  # where it may go


PartSizes = Mapping[tuple[str, KeyValue | None, KeyValue | None], tuple[int, int]]


def plan_moves(shards: Sequence[ShardState], keys: Sequence[KeyState], smap: ShardMap, *,
               threshold: float = DEFAULT_THRESHOLD, metric: str = "busy", capacity: int = 0,
               part_sizes: PartSizes | None = None) -> RebalancePlan:
    """Moves that bring every shard's load to at most `threshold` × the mean load.

    Greedy: while a shard is over the limit, take the hottest such shard and, among the
    moves of its measured units to the coolest shard that stays under the limit, pick the one
    that brings the source under the limit if any does, else the one leaving the smaller of
    the two loads the larger; ties go to the move that copies fewer bytes. Each unit moves
    at most once. A shard that no unit can relieve gets a warning instead.

    With `capacity` > 0, a target must also have room: its database size (plus what earlier
    moves put there) plus the move's bytes at most `capacity`; a shard whose database size
    is unknown is no target. A source does not get smaller: PostgreSQL keeps the space of
    deleted rows for later writes. `part_sizes` gives measured (rows, bytes) of range parts,
    by (rule, lower, upper), where the hot keys alone would underestimate them."""
    if threshold < 1:
        raise ValueError("the threshold is a multiple of the mean load: at least 1")
    state = {s.name: s for s in shards}
    for name in smap.shards:
        state.setdefault(name, ShardState(name, 0.0))
    before = dict(state)
    loads = {name: s.load for name, s in state.items()}
    sizes = {name: s.bytes for name, s in state.items()}
    rows = {name: s.rows for name, s in state.items()}
    database = {name: s.database_bytes for name, s in state.items()}
    total = sum(loads.values())
    limit = threshold * total / len(loads) if loads else 0.0
    warnings: list[str] = []
    if total <= 0:
        warnings.append("no heat recorded: nothing to balance (are the proxies flushing heat "
                        "to the catalog? see rebalance.heat_flush_interval)")
        return RebalancePlan(metric, threshold, before, before, (), tuple(warnings),
                             capacity=capacity)
    keys = _placed(keys, smap, warnings)
    used: set[tuple[object, ...]] = set()
    stuck: set[str] = set()
    moves: list[Move] = []
    warned_hash: set[str] = set()
    while True:
        hot = sorted((s for s in loads if loads[s] > limit + _EPSILON and s not in stuck),
                     key=lambda s: -loads[s])
        if not hot:
            break
        source = hot[0]
        for k in keys:
            rule = smap.rules[k.rule]
            if k.shard == source and rule.kind is RuleKind.HASH and k.rule not in warned_hash:
                warned_hash.add(k.rule)
                warnings.append(
                    f"hash rule {k.rule} has hot keys on {source} (such as {k.key!r}); a key "
                    "of a hash rule cannot move on its own and changing the rule's shards "
                    "moves most of its keys: not planned")
        best: tuple[tuple[bool, float, int], Move, tuple[object, ...]] | None = None
        no_room: list[str] = []
        for option in _options(source, keys, smap, used, part_sizes or {}):
            load = option.move.load
            if load <= _EPSILON:
                continue
            fits = [t for t in option.targets if t != source and loads[t] + load <= limit]
            roomy = [t for t in fits if _has_room(database[t], option.move.bytes, capacity)]
            if fits and not roomy:
                no_room.append(_no_room(option.move, fits, database, capacity))
            fits = roomy
            if not fits:
                continue
            target = min(fits, key=lambda t: (loads[t], t))
            after_source = max(loads[source] - load, 0.0)
            after_target = loads[target] + load
            score = (after_source > limit + _EPSILON, max(after_source, after_target),
                     option.move.bytes)
            if best is None or score < best[0]:
                best = (score, replace(option.move, target=target), option.unit)
        if best is None:
            stuck.add(source)
            why = _why_stuck(source, loads, limit, keys, smap, used)
            if no_room:
                why = (f"{source} stays above the limit ({loads[source]:.4g} > {limit:.4g}): "
                       f"no target has room (rebalance.max_shard_bytes = {capacity}): "
                       + "; ".join(no_room[:3]) + ". Fix: raise rebalance.max_shard_bytes if "
                       "the target's disk has room, free space there (VACUUM FULL), or add a "
                       "shard")
            warnings.append(why)
            continue
        _, move, unit = best
        used.add(unit)
        used.update(("key", move.rule, k) for k in _keys_moved(move, keys))
        loads[move.source] = max(loads[move.source] - move.load, 0.0)
        loads[move.target] += move.load
        sizes[move.source] = max(sizes[move.source] - move.bytes, 0)
        sizes[move.target] += move.bytes
        rows[move.source] = max(rows[move.source] - move.rows, 0)
        rows[move.target] += move.rows
        if database[move.target] is not None:
            database[move.target] = (database[move.target] or 0) + move.bytes
        moves.append(replace(move, source_load=loads[move.source],
                             target_load=loads[move.target], source_bytes=sizes[move.source],
                             target_bytes=sizes[move.target]))
    after = {name: ShardState(name, loads[name], sizes[name], rows[name], database[name])
             for name in loads}
    return RebalancePlan(metric, threshold, before, after, tuple(_grouped(moves)),
                         tuple(warnings), capacity=capacity)


def _has_room(database_bytes: int | None, nbytes: int, capacity: int) -> bool:
    if capacity <= 0:
        return True
    return database_bytes is not None and database_bytes + nbytes <= capacity


def _no_room(move: Move, targets: Sequence[str], database: Mapping[str, int | None],
             capacity: int) -> str:
    what = (f"range [{move.lower}, {move.upper})" if move.kind is RuleKind.RANGE
            else f"{move.kind.value} {', '.join(map(str, move.keys))}")
    sizes = ", ".join(f"{t} holds {'an unknown size' if database[t] is None else database[t]}"
                      for t in targets)
    return f"{move.rule} {what} ({move.bytes} bytes) fits on no shard: {sizes}"


def _placed(keys: Sequence[KeyState], smap: ShardMap, warnings: list[str]) -> list[KeyState]:
    """The keys of known rules, where the map still puts them (heat from before a map change
    is left out, with a warning), heaviest first."""
    out = []
    stale: dict[str, int] = {}
    for k in keys:
        rule = smap.rules.get(k.rule)
        if rule is None:
            stale[k.rule] = stale.get(k.rule, 0) + 1
            continue
        if rule.kind is not RuleKind.LOOKUP and rule.kind is not RuleKind.HASH:
            try:
                now = rule.shard_for(k.key)
            except TypeError:
                now = None
            if now != k.shard:
                stale[k.rule] = stale.get(k.rule, 0) + 1
                continue
        out.append(k)
    for rule_name, count in stale.items():
        warnings.append(f"{count} hot key(s) of rule {rule_name} ran on a shard the map no "
                        "longer gives them (heat from before a map change): left out")
    out.sort(key=lambda k: -k.load)
    return out


def _options(source: str, keys: Sequence[KeyState], smap: ShardMap,
             used: set[tuple[object, ...]], part_sizes: PartSizes) -> list[_Option]:
    out: list[_Option] = []
    ranged: dict[tuple[str, int], list[KeyState]] = {}
    for k in keys:
        if k.shard != source or ("key", k.rule, k.key) in used:
            continue
        rule = smap.rules[k.rule]
        if rule.kind in (RuleKind.TENANT, RuleKind.CATEGORY, RuleKind.LOOKUP):
            targets = rule.shards if rule.kind is RuleKind.LOOKUP else smap.shards
            out.append(_Option(
                Move(k.rule, rule.kind, source, "", keys=(k.key,), load=k.load,
                     rows=k.rows or 0, bytes=k.bytes or 0, measured=k.rows is not None),
                ("key", k.rule, k.key), tuple(targets)))
        elif rule.kind is RuleKind.RANGE:
            index = _range_index(rule, k.key)
            if index is not None and ("range", k.rule, index) not in used:
                ranged.setdefault((k.rule, index), []).append(k)
    for (rule_name, index), inside in ranged.items():
        rule = smap.rules[rule_name]
        out.extend(_range_options(rule, index, inside, smap.shards, part_sizes))
    return out


def _range_index(rule: Rule, key: KeyValue) -> int | None:
    for i, r in enumerate(rule.ranges):
        try:
            if (r.lower is None or r.lower <= key) and (r.upper is None or key < r.upper):
                return i
        except TypeError:
            return None
    return None


def _range_options(rule: Rule, index: int, inside: list[KeyState],
                   shards: Sequence[str], part_sizes: PartSizes) -> list[_Option]:
    """Each split at a hot key's value with either side moving, and the whole range."""
    r: RangeBound = rule.ranges[index]
    inside = sorted(inside, key=lambda k: k.key)
    unit = ("range", rule.name, index)

    def part(keys: list[KeyState], lower: KeyValue | None, upper: KeyValue | None,
             split_at: KeyValue | None) -> _Option:
        measured = part_sizes.get((rule.name, lower, upper))
        nrows, nbytes = measured or (sum(k.rows or 0 for k in keys),
                                     sum(k.bytes or 0 for k in keys))
        return _Option(Move(
            rule.name, RuleKind.RANGE, r.shard, "", lower=lower, upper=upper, split_at=split_at,
            load=sum(k.load for k in keys), rows=nrows, bytes=nbytes,
            measured=measured is not None), unit, tuple(shards))

    options = []
    for i, k in enumerate(inside):
        if r.lower is not None and k.key == r.lower:
            continue  # splitting at the range's own start is moving it whole
        if i and inside[i - 1].key == k.key:
            continue
        options.append(part(inside[i:], k.key, r.upper, k.key))  # the upper part moves
        options.append(part(inside[:i], r.lower, k.key, k.key))  # the lower part moves
    # Last: with the same measured load, a split wins (the rest of the range stays).
    options.append(part(inside, r.lower, r.upper, None))
    return options


def _keys_moved(move: Move, keys: Sequence[KeyState]) -> list[KeyValue]:
    if move.kind is not RuleKind.RANGE:
        return list(move.keys)
    out = []
    for k in keys:
        if k.rule != move.rule or k.shard != move.source:
            continue
        try:
            if (move.lower is None or move.lower <= k.key) and (
                    move.upper is None or k.key < move.upper):
                out.append(k.key)
        except TypeError:
            continue
    return out


def _why_stuck(source: str, loads: Mapping[str, float], limit: float,
               keys: Sequence[KeyState], smap: ShardMap,
               used: set[tuple[object, ...]]) -> str:
    mine = [k for k in keys if k.shard == source and ("key", k.rule, k.key) not in used
            and smap.rules[k.rule].kind is not RuleKind.HASH]
    coolest = min((t for t in loads if t != source), key=lambda t: loads[t], default=None)
    text = (f"{source} stays above the limit ({loads[source]:.4g} > {limit:.4g}): ")
    if not mine:
        return text + "none of its load is carried by a hot key that can move"
    top = mine[0]
    if coolest is not None and top.load + loads[coolest] > limit:
        return text + (f"its hottest movable key ({top.rule} {top.key!r}, load "
                       f"{top.load:.4g}) would make even the coolest shard, {coolest}, "
                       "exceed it; give that key a shard of its own (add a shard) or raise "
                       "--threshold")
    return text + "no move of a measured key fits under the limit elsewhere"


def _grouped(moves: list[Move]) -> list[Move]:
    """Lookup keys moving between the same two shards, one after the other, as one move of a
    set of keys."""
    out: list[Move] = []
    for move in moves:
        last = out[-1] if out else None
        if (last is not None and move.kind is RuleKind.LOOKUP and last.kind is RuleKind.LOOKUP
                and (last.rule, last.source, last.target) == (move.rule, move.source,
                                                              move.target)):
            out[-1] = replace(move, keys=last.keys + move.keys, load=last.load + move.load,
                              rows=last.rows + move.rows, bytes=last.bytes + move.bytes,
                              measured=last.measured and move.measured)
        else:
            out.append(move)
    return out


def with_copy(plan: RebalancePlan, index: int, rows: int, nbytes: int) -> RebalancePlan:
    """The plan with move `index` measured at `rows` rows and `nbytes` bytes to copy (a range
    move's size is only known once its bounds are); the sizes after every move follow."""
    moves = list(plan.moves)
    moves[index] = replace(moves[index], rows=rows, bytes=nbytes, measured=True)
    sizes = {name: s.bytes for name, s in plan.before.items()}
    counts = {name: s.rows for name, s in plan.before.items()}
    database = {name: s.database_bytes for name, s in plan.before.items()}
    for i, move in enumerate(moves):
        sizes[move.source] = max(sizes[move.source] - move.bytes, 0)
        sizes[move.target] += move.bytes
        counts[move.source] = max(counts[move.source] - move.rows, 0)
        counts[move.target] += move.rows
        if database[move.target] is not None:
            database[move.target] = (database[move.target] or 0) + move.bytes
        moves[i] = replace(move, source_bytes=sizes[move.source],
                           target_bytes=sizes[move.target])
    after = {name: replace(s, bytes=sizes[name], rows=counts[name],
                           database_bytes=database[name])
             for name, s in plan.after.items()}
    return replace(plan, moves=tuple(moves), after=after)


# -- the plan file -----------------------------------------------------------------------


def key_to_yaml(value: KeyValue) -> object:
    """A key as the shard map writes it: integers as numbers, the rest as text."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, datetime.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(datetime.UTC)
            return value.isoformat(sep=" ").replace("+00:00", "+00")
        return value.isoformat(sep=" ")
    if isinstance(value, (datetime.date, Decimal, uuid.UUID)):
        return str(value)
    return value


def plan_to_dict(plan: RebalancePlan) -> dict[str, Any]:
    """The plan as plain data, in the order an operator reads it (docs/rebalancing.md)."""
    shards: dict[str, dict[str, Any]] = {}
    for name, s in plan.before.items():
        a = plan.after[name]
        shards[name] = {"load": _round(s.load), "bytes": s.bytes, "rows": s.rows,
                        "load_after": _round(a.load), "bytes_after": a.bytes,
                        "rows_after": a.rows}
        if s.database_bytes is not None:  # pg_database_size, for rebalance.max_shard_bytes
            shards[name].update(database_bytes=s.database_bytes,
                                database_bytes_after=a.database_bytes)
    moves = []
    for i, mv in enumerate(plan.moves, 1):
        item: dict[str, Any] = {"id": i, "rule": mv.rule, "kind": mv.kind.value}
        if mv.kind is RuleKind.RANGE:
            item["range"] = {"from": key_to_yaml(mv.lower) if mv.lower is not None else None,
                             "to": key_to_yaml(mv.upper) if mv.upper is not None else None}
            item["split_at"] = key_to_yaml(mv.split_at) if mv.split_at is not None else None
        else:
            item["keys"] = [key_to_yaml(k) for k in mv.keys]
        item.update({
            "from": mv.source, "to": mv.target,
            "copy": {"rows": mv.rows, "bytes": mv.bytes,
                     "estimate": not mv.measured},
            "load": _round(mv.load),
            "after": {mv.source: {"load": _round(mv.source_load), "bytes": mv.source_bytes},
                      mv.target: {"load": _round(mv.target_load), "bytes": mv.target_bytes}},
        })
        moves.append(item)
    return {
        "version": FORMAT_VERSION,
        **plan.info,
        "metric": plan.metric,
        "threshold": plan.threshold,
        "mean_load": _round(plan.mean),
        "limit": _round(plan.limit),
        "skew_before": _round(skew({n: s.load for n, s in plan.before.items()})),
        "skew_after": _round(skew({n: s.load for n, s in plan.after.items()})),
        **({"max_shard_bytes": plan.capacity} if plan.capacity else {}),
        "shards": shards,
        "moves": moves,
        "warnings": list(plan.warnings),
    }


def without_room(plan: RebalancePlan) -> list[int]:
    """The moves (indexes) whose target would exceed `plan.capacity`, in the sizes the plan
    has now (after `with_copy` measured its range moves)."""
    if plan.capacity <= 0:
        return []
    database = {name: s.database_bytes for name, s in plan.before.items()}
    out = []
    for i, move in enumerate(plan.moves):
        if not _has_room(database[move.target], move.bytes, plan.capacity):
            out.append(i)
        elif database[move.target] is not None:
            database[move.target] = (database[move.target] or 0) + move.bytes
    return out


def _round(x: float) -> float:
    return float(f"{x:.6g}")


HASH_REFUSAL = (
    "rule {rule} is a hash rule: its keys go to shards by hash modulo the number of shards, "
    "so no key can be placed on a shard of its own, and a change of the rule's shards moves "
    "most keys of every shard at once (docs/rebalancing.md, hash rules). Shardwire does not "
    "move hash keys. Instead: make it a lookup rule (its directory can then move keys one "
    "by one), or move the whole rule's data to new shards by hand")


@dataclass(frozen=True, slots=True)
class PlannedMove:
    """A move as `apply` will take it from a plan file, checked against the shard map."""

    id: int
    rule: Rule
    source: str
    target: str
    keys: tuple[KeyValue, ...] = ()
    lower: KeyValue | None = None
    upper: KeyValue | None = None
    split_at: KeyValue | None = None


def plan_from_dict(data: Mapping[str, Any], smap: ShardMap) -> list[PlannedMove]:
    """The moves of a plan file (perhaps edited by hand), checked against the current map:
    rules and shards exist, keys read as the rule's key type, each key or range is where the
    map says the move takes it from. Raises PlanError naming the move and what is wrong."""
    if not isinstance(data, Mapping) or data.get("version") != FORMAT_VERSION:
        raise PlanError(f"not a version {FORMAT_VERSION} rebalance plan")
    out = []
    for i, item in enumerate(data.get("moves") or [], 1):
        where = f"moves[{i - 1}]"
        if not isinstance(item, Mapping):
            raise PlanError(f"{where}: a move is a mapping")
        rule = smap.rules.get(str(item.get("rule")))
        if rule is None:
            raise PlanError(f"{where}.rule: no rule {item.get('rule')!r} in the shard map")
        if item.get("kind") != rule.kind.value:
            raise PlanError(f"{where}.kind: rule {rule.name} is a {rule.kind.value} rule")
        if rule.kind is RuleKind.HASH:
            raise PlanError(f"{where}: " + HASH_REFUSAL.format(rule=rule.name))
        source, target = str(item.get("from")), str(item.get("to"))
        for name, shard in (("from", source), ("to", target)):
            if shard not in smap.shards:
                raise PlanError(f"{where}.{name}: unknown shard {shard!r}")
        if source == target:
            raise PlanError(f"{where}: from and to are the same shard")
        if rule.kind is RuleKind.LOOKUP and target not in rule.shards:
            raise PlanError(f"{where}.to: {target} is not among the shards of lookup rule "
                            f"{rule.name} ({', '.join(rule.shards)})")
        move_id = int(item.get("id", i))
        if rule.kind is RuleKind.RANGE:
            bounds = item.get("range") or {}
            lower = _read_key(bounds.get("from"), rule.key_type, f"{where}.range.from")
            upper = _read_key(bounds.get("to"), rule.key_type, f"{where}.range.to")
            split = _read_key(item.get("split_at"), rule.key_type, f"{where}.split_at")
            index = _range_index(rule, lower) if lower is not None else (
                0 if rule.ranges and rule.ranges[0].lower is None else None)
            if index is None or rule.ranges[index].shard != source:
                raise PlanError(f"{where}.range: not within a range of {rule.name} on {source}")
            r = rule.ranges[index]
            if upper != r.upper and lower != r.lower:
                raise PlanError(f"{where}.range: the part that moves must reach one end of "
                                "its range")
            if upper is not None and (r.upper is None or upper > r.upper) or (
                    upper is None and r.upper is not None):
                raise PlanError(f"{where}.range: not within a range of {rule.name} on {source}")
            whole = lower == r.lower and upper == r.upper
            if split is None and not whole:
                raise PlanError(f"{where}.split_at: a part of a range moves with a split "
                                f"point (its from, or its to)")
            if split is not None and not whole and split != (
                    lower if upper == r.upper else upper):
                raise PlanError(f"{where}.split_at: the range splits where the moving part "
                                "starts (its from) or ends (its to)")
            if whole:
                split = None
            out.append(PlannedMove(move_id, rule, source, target, lower=lower, upper=upper,
                                   split_at=split))
            continue
        raw = item.get("keys")
        if not isinstance(raw, list) or not raw:
            raise PlanError(f"{where}.keys: a list of at least one key")
        keys = tuple(_read_key(k, rule.key_type, f"{where}.keys[{j}]")
                     for j, k in enumerate(raw))
        if rule.kind is not RuleKind.LOOKUP:
            for j, key in enumerate(keys):
                if rule.shard_for(key) != source:
                    raise PlanError(f"{where}.keys[{j}]: the map puts {key!r} on "
                                    f"{rule.shard_for(key)}, not {source}")
        out.append(PlannedMove(move_id, rule, source, target, keys=keys))
    return out


def _read_key(raw: object, key_type: KeyType, where: str) -> KeyValue | None:
    if raw is None:
        return None
    try:
        return to_key(raw if isinstance(raw, (str, int)) else str(raw), key_type)
    except ValueError as e:
        raise PlanError(f"{where}: {e}") from None
