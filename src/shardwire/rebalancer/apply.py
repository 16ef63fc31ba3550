"""`shardwire rebalance apply` and `shardwire rebalance abort` (move.py does the work)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg
import yaml

from ..config.load import ConfigError, load_config
from ..config.model import Config
from ..router.shardmap import Rule, RuleKind, ShardMap
from ..router.values import to_key
from .move import MoveError, Mover, open_catalog, state_from_row
from .plan import FORMAT_VERSION, PlanError, key_to_yaml, plan_from_dict

_FAILURES = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


def moves_from_args(moves: Sequence[str], smap: ShardMap) -> dict[str, Any]:
    """`--move RULE:KEY[,KEY...]:TO` as plan data; the source is where the map puts the
    first key (for a lookup rule, `apply` asks the directory). For a range rule,
    `--move RULE:POINT..:TO` moves the part of the range holding POINT from POINT on, and
    `RULE:..POINT:TO` the part below POINT."""
    items = []
    for i, text in enumerate(moves, 1):
        rule_name, sep, rest = text.partition(":")
        keys_text, sep2, target = rest.rpartition(":")
        if not sep or not sep2 or not keys_text or not target:
            raise PlanError(f"--move {text!r}: write RULE:KEY[,KEY...]:TO, e.g. by_tenant:42:s2")
        rule = smap.rules.get(rule_name)
        if rule is None:
            raise PlanError(f"--move {text!r}: no rule {rule_name!r} in the shard map")
        if rule.kind is RuleKind.RANGE:
            items.append(_range_move(i, text, rule, keys_text, target))
            continue
        keys = [k.strip() for k in keys_text.split(",")]
        source = None
        if rule.kind in (RuleKind.TENANT, RuleKind.CATEGORY):
            try:
                source = rule.shard_for(to_key(keys[0], rule.key_type))
            except ValueError as e:
                raise PlanError(f"--move {text!r}: {e}") from None
        items.append({"id": i, "rule": rule_name, "kind": rule.kind.value, "keys": keys,
                      "from": source, "to": target})
    return {"version": FORMAT_VERSION, "moves": items}


def _range_move(i: int, text: str, rule: Rule, where: str, target: str) -> dict[str, Any]:
    low, dots, high = where.partition("..")
    if not dots or bool(low) == bool(high):
        raise PlanError(f"--move {text!r}: for range rule {rule.name} write RULE:POINT..:TO "
                        "(the keys from POINT on move) or RULE:..POINT:TO (the keys below it)")
    try:
        point = to_key(low or high, rule.key_type)
    except ValueError as e:
        raise PlanError(f"--move {text!r}: {e}") from None
    found = next((r for r in rule.ranges if (r.lower is None or r.lower <= point) and (
        r.upper is None or point < r.upper)), None)
    if found is None:
        raise PlanError(f"--move {text!r}: no range of {rule.name} holds {low or high}")
    lower, upper = (point, found.upper) if low else (found.lower, point)
    whole = lower == found.lower and upper == found.upper
    if lower == upper:
        raise PlanError(f"--move {text!r}: nothing of the range is below {high}")

    def value(v: Any) -> Any:
        return None if v is None else key_to_yaml(v)
    return {"id": i, "rule": rule.name, "kind": rule.kind.value,
            "range": {"from": value(lower), "to": value(upper)},
            "split_at": None if whole else key_to_yaml(point), "from": found.shard,
            "to": target}


def _already_done(item: Mapping[str, Any], smap: ShardMap) -> bool:
    """A tenant or category move whose keys the map already puts on its `to`, or a range
    move whose part the map already puts there (a plan applied before, or resumed): nothing
    left to do."""
    rule = smap.rules.get(str(item.get("rule")))
    if rule is not None and rule.kind is RuleKind.RANGE:
        bounds = item.get("range") or {}
        try:
            lower, upper = (None if bounds.get(end) is None else to_key(
                str(bounds[end]) if not isinstance(bounds[end], (str, int)) else bounds[end],
                rule.key_type) for end in ("from", "to"))
        except (ValueError, AttributeError):
            return False
        return any(r.lower == lower and r.upper == upper and r.shard == item.get("to")
                   for r in rule.ranges)
    keys = item.get("keys")
    if rule is None or rule.kind not in (RuleKind.TENANT, RuleKind.CATEGORY) or not isinstance(
            keys, list) or not keys:
        return False
    try:
        return all(rule.shard_for(to_key(k if isinstance(k, (str, int)) else str(k),
                                         rule.key_type)) == item.get("to") for k in keys)
    except ValueError:
        return False


async def apply_moves(config: Config, data: Mapping[str, Any]) -> tuple[int, list[float]]:
    """Resume any unfinished move, then run the plan's moves in order. Returns the moves run
    and the write pauses measured."""
    if not isinstance(data, Mapping) or data.get("version") != FORMAT_VERSION:
        raise PlanError(f"not a version {FORMAT_VERSION} rebalance plan")
    catalog = await open_catalog(config)
    done = 0
    pauses = []
    try:
        mover = Mover(config, catalog)
        for row in await mover.running():
            await mover.run(state_from_row(row, config), resumed=True)
            done += 1
            if mover.pause is not None:
                pauses.append(mover.pause)
        for i, item in enumerate(data.get("moves") or []):
            assert config.path is not None
            config = load_config(config.path)  # the map as the last move left it
            mover = Mover(config, catalog)
            if isinstance(item, Mapping) and _already_done(item, config.sharding):
                mover.say(f"moves[{i}]: already done (the map puts its keys on "
                          f"{item.get('to')})")
                continue
            if isinstance(item, Mapping):
                item, done_already = await _lookup_source(mover, item, config.sharding)
                if done_already:
                    mover.say(f"moves[{i}]: already done (the directory puts its keys on "
                              f"{item.get('to')})")
                    continue
            try:
                (planned,) = plan_from_dict({"version": FORMAT_VERSION, "moves": [item]},
                                            config.sharding)
            except PlanError as e:
                raise PlanError(str(e).replace("moves[0]", f"moves[{i}]", 1)) from None
            state = await mover.new_move(planned.rule, planned.keys, planned.source,
                                         planned.target, planned.id, lower=planned.lower,
                                         upper=planned.upper, split_at=planned.split_at)
            await mover.run(state)
            done += 1
            if mover.pause is not None:
                pauses.append(mover.pause)
    finally:
        await catalog.close()
    return done, pauses


async def _lookup_source(mover: Mover, item: Mapping[str, Any], smap: ShardMap
                         ) -> tuple[Mapping[str, Any], bool]:
    """A lookup move: its `from` filled in from the directory when it is not given (`--move`),
    and whether the directory already puts all its keys on its `to`."""
    rule = smap.rules.get(str(item.get("rule")))
    keys = item.get("keys")
    if rule is None or rule.kind is not RuleKind.LOOKUP or not isinstance(keys, list) or (
            not keys):
        return item, False
    try:
        values = [to_key(k if isinstance(k, (str, int)) else str(k), rule.key_type)
                  for k in keys]
    except ValueError:
        return item, False  # plan_from_dict names the key
    found = await mover.directory_shards(rule, values)
    if all(found.get(k) == item.get("to") for k in values):
        return item, True
    if item.get("from") is None:
        shards = {found.get(k) for k in values}
        if len(shards) != 1 or None in shards:
            where = ", ".join(f"{k}: {found.get(v) or 'not in the directory'}"
                              for k, v in zip(keys, values, strict=True))
            raise PlanError(f"rule {rule.name}: the keys of one move must all be on one shard "
                            f"in the directory {rule.directory} ({where})")
        item = {**item, "from": shards.pop()}
    return item, False


async def abort_moves(config: Config) -> int:
    catalog = await open_catalog(config)
    try:
        mover = Mover(config, catalog)
        rows = await mover.running()
        if not rows:
            mover.say("no move is running")
            return 0
        for row in rows:
            await mover.abort(state_from_row(row, config))
        return len(rows)
    finally:
        await catalog.close()


def apply_command(args: Any, config: Config) -> int:
    try:
        if args.action == "abort":
            asyncio.run(abort_moves(config))
            return 0
        if args.plan:
            with open(args.plan) as f:
                data = yaml.safe_load(f)
        else:
            data = moves_from_args(args.move or [], config.sharding)
        count, pauses = asyncio.run(apply_moves(config, data))
    except (MoveError, PlanError) as e:
        print(f"rebalance {args.action}: {e}", file=sys.stderr)
        return 1
    except ConfigError as e:
        print(f"rebalance {args.action}: the config file: {'; '.join(e.problems)}",
              file=sys.stderr)
        return 1
    except _FAILURES as e:
        print(f"rebalance {args.action}: {type(e).__name__}: {e}; run it again to resume",
              file=sys.stderr)
        return 1
    except yaml.YAMLError as e:
        print(f"rebalance apply: {args.plan}: {e}", file=sys.stderr)
        return 2
    summary = f"{count} move(s) done"
    if pauses:
        summary += "; writes held " + ", ".join(f"{p * 1000:.0f} ms" for p in pauses)
    print(summary)
    return 0
