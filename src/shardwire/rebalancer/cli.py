"""`shardwire rebalance status` and `shardwire rebalance plan`: read the heat the proxies wrote
to the catalog and the sizes of the sharded tables on each shard, show them, and plan moves.
No running proxy is needed. `apply` and `abort` are in apply.py."""

from __future__ import annotations

import asyncio
import datetime
import json
import sys
from dataclasses import dataclass, field, replace
from typing import Any

import asyncpg
import yaml

from ..config.model import Config
from ..router.shardmap import KeyValue, RuleKind, TableName
from ..router.values import to_key
from .heat import KeyLoad
from .plan import (
    KeyState,
    RebalancePlan,
    ShardState,
    plan_moves,
    plan_to_dict,
    skew,
    with_copy,
    without_room,
)
from .store import StoredHeat, TableSize, connect, heat_address, read_heat, rows_where, table_sizes

KEYS_MEASURED = 20  # hot keys per rule whose rows are counted for a plan
KEYS_SHOWN = 3  # hottest keys per shard in the status table
_FAILURES = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


@dataclass(frozen=True, slots=True)
class Survey:
    heat: StoredHeat
    sizes: dict[str, dict[TableName, TableSize]]  # shard -> its sharded tables
    unreachable: dict[str, str]  # shard -> why its sizes are missing
    database_bytes: dict[str, int] = field(default_factory=dict)  # shard -> pg_database_size

    def shard_bytes(self, shard: str) -> int:
        return sum(s.bytes for s in self.sizes.get(shard, {}).values())

    def shard_rows(self, shard: str) -> int:
        return sum(s.rows for s in self.sizes.get(shard, {}).values())


def load_of(busy: float, statements: int, metric: str) -> float:
    return busy if metric == "busy" else float(statements)


async def survey(config: Config, seconds: float) -> Survey:
    catalog = await connect(heat_address(config))
    try:
        heat = await read_heat(catalog, seconds)
    finally:
        await catalog.close()
    tables = [t for rule in config.sharding.rules.values() for t in rule.tables]
    sizes: dict[str, dict[TableName, TableSize]] = {}
    unreachable: dict[str, str] = {}
    database_bytes: dict[str, int] = {}
    for name, shard in config.shards.items():
        try:
            conn = await connect(shard.primary)
        except _FAILURES as e:
            unreachable[name] = str(e) or type(e).__name__
            continue
        try:
            sizes[name] = await table_sizes(conn, tables)
            database_bytes[name] = await conn.fetchval(
                "SELECT pg_database_size(current_database())")
        finally:
            await conn.close()
    return Survey(heat, sizes, unreachable, database_bytes)


def _heat_line(s: StoredHeat) -> str:
    if not s.windows:
        return "no heat recorded in the period (see rebalance.heat_flush_interval)"
    start = datetime.datetime.fromtimestamp(s.window.start, datetime.UTC)
    end = datetime.datetime.fromtimestamp(s.window.end, datetime.UTC)
    return (f"{s.windows} window(s) from {s.proxies} proxy(ies), {start:%Y-%m-%d %H:%M:%S} "
            f"to {end:%H:%M:%S} UTC ({s.window.seconds:.0f} s)")


def status_data(config: Config, sv: Survey, metric: str, threshold: float) -> dict[str, Any]:
    window = sv.heat.window
    loads = {name: 0.0 for name in config.shards}
    for name, counted in window.shards.items():
        loads[name] = load_of(counted.busy, counted.statements, metric)
    total = sum(loads.values())
    mean = total / len(loads)
    hot: dict[str, list[KeyLoad]] = {}
    for keys in window.keys.values():
        for k in keys:
            hot.setdefault(k.shard, []).append(k)
    shards = []
    for name in config.shards:
        s = window.shards.get(name)
        mine = sorted(hot.get(name, []), key=lambda k: -load_of(k.busy, k.statements, metric))
        shards.append({
            "shard": name,
            "statements": s.statements if s else 0,
            "busy_seconds": round(s.busy, 6) if s else 0.0,
            "rows": s.rows if s else 0,
            "errors": s.errors if s else 0,
            "load_share": round(loads[name] / total, 4) if total else 0.0,
            "over_threshold": total > 0 and loads[name] > threshold * mean,
            "bytes": sv.shard_bytes(name) if name in sv.sizes else None,
            "table_rows": sv.shard_rows(name) if name in sv.sizes else None,
            "hot_keys": [{"rule": k.rule, "key": k.key, "statements": k.statements,
                          "busy_seconds": round(k.busy, 6),
                          "load_share": round(load_of(k.busy, k.statements, metric) / total, 4)
                          if total else 0.0}
                         for k in mine[:KEYS_SHOWN]],
        })
    hottest = max(loads, key=lambda n: loads[n]) if total else None
    return {"heat": _heat_line(sv.heat), "metric": metric, "threshold": threshold,
            "skew": round(skew(loads), 4), "hottest": hottest, "shards": shards,
            "unreachable": sv.unreachable}


def print_status(data: dict[str, Any]) -> None:
    print(f"heat: {data['heat']}; load = "
          f"{'busy time' if data['metric'] == 'busy' else 'statements'}")
    header = ["shard", "statements", "busy_s", "load", "rows", "errors", "size", "table_rows",
              "hottest keys"]
    lines = [header]
    for s in data["shards"]:
        keys = ", ".join(f"{k['rule']} {k['key']} ({k['load_share']:.0%})"
                         for k in s["hot_keys"])
        lines.append([
            s["shard"] + (" *" if s["over_threshold"] else ""), str(s["statements"]),
            f"{s['busy_seconds']:.3f}", f"{s['load_share']:.1%}", str(s["rows"]),
            str(s["errors"]), _size(s["bytes"]),
            "?" if s["table_rows"] is None else str(s["table_rows"]), keys])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    for line in lines:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                 enumerate(zip(line, widths, strict=False))]
        print("  ".join(cells + [line[-1]]).rstrip())
    over = [s["shard"] for s in data["shards"] if s["over_threshold"]]
    print(f"skew: {data['skew']:.2f} (hottest shard's load / mean load"
          + (f"; hottest: {data['hottest']}" if data["hottest"] else "") + ")")
    if over:
        print(f"* over the threshold ({data['threshold']:g} x mean): {', '.join(over)}; "
              "`shardwire rebalance plan` proposes moves")
    for shard, why in data["unreachable"].items():
        print(f"{shard}: sizes unknown: {why}", file=sys.stderr)


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


async def make_plan(config: Config, sv: Survey, metric: str, threshold: float
                    ) -> RebalancePlan:
    """Measure the hot keys' rows on their shards, plan, then measure the range moves (and
    plan again while a measured range move does not fit rebalance.max_shard_bytes)."""
    smap = config.sharding
    window = sv.heat.window
    shards = []
    for name in config.shards:
        load = window.shards.get(name)
        shards.append(ShardState(name, load_of(load.busy, load.statements, metric)
                                 if load else 0.0, sv.shard_bytes(name), sv.shard_rows(name),
                                 sv.database_bytes.get(name)))
    keys: list[KeyState] = []
    conns: dict[str, Any] = {}
    try:
        for rule_name, loads in window.keys.items():
            rule = smap.rules.get(rule_name)
            if rule is None:
                continue
            ranked = sorted(loads, key=lambda k: -load_of(k.busy, k.statements, metric))
            for k in ranked[:KEYS_MEASURED]:
                value = _key(k.key, rule.key_type)
                if value is None:
                    continue
                rows = nbytes = None
                if rule.kind is not RuleKind.HASH and k.shard in sv.sizes:
                    conn = await _conn(config, k.shard, conns)
                    rows, nbytes = await rows_where(conn, rule, {"lower": None, "equal": value},
                                                    sv.sizes[k.shard])
                keys.append(KeyState(rule_name, value, k.shard,
                                     load_of(k.busy, k.statements, metric), rows, nbytes))
        capacity = config.rebalance.max_shard_bytes
        parts: dict[tuple[str, Any, Any], tuple[int, int]] = {}
        for _ in range(5):  # each round measures a range part planned on estimates
            plan = plan_moves(shards, keys, smap, threshold=threshold, metric=metric,
                              capacity=capacity, part_sizes=parts)
            for i, move in enumerate(plan.moves):
                if move.kind is RuleKind.RANGE and move.source in sv.sizes:
                    part = (move.rule, move.lower, move.upper)
                    if part not in parts:
                        rule = smap.rules[move.rule]
                        conn = await _conn(config, move.source, conns)
                        parts[part] = await rows_where(conn, rule, {"lower": move.lower,
                                                                    "upper": move.upper},
                                                       sv.sizes[move.source])
                    plan = with_copy(plan, i, *parts[part])
            if not without_room(plan):
                break
        else:
            late = without_room(plan)
            plan = replace(plan, warnings=plan.warnings + tuple(
                f"move {i + 1}: once measured, it would take {plan.moves[i].target} above "
                f"rebalance.max_shard_bytes ({capacity}); apply will refuse it" for i in late))
    finally:
        for conn in conns.values():
            await conn.close()
    return plan


async def _conn(config: Config, shard: str, conns: dict[str, Any]) -> Any:
    if shard not in conns:
        conns[shard] = await connect(config.shards[shard].primary)
    return conns[shard]


def _key(text: str, key_type: Any) -> KeyValue | None:
    try:
        return to_key(text, key_type)
    except ValueError:
        return None


def print_plan_summary(plan: RebalancePlan, out: Any) -> None:
    unit = "s busy" if plan.metric == "busy" else " statements"
    print(f"mean load {plan.mean:.4g}{unit}, limit {plan.limit:.4g} ({plan.threshold:g} x "
          f"mean); skew {skew({n: s.load for n, s in plan.before.items()}):.2f} -> "
          f"{skew({n: s.load for n, s in plan.after.items()}):.2f}", file=out)
    if not plan.moves:
        print("no move proposed", file=out)
    for i, mv in enumerate(plan.moves, 1):
        if mv.kind is RuleKind.RANGE:
            what = (f"range [{mv.lower if mv.lower is not None else '..'}, "
                    f"{mv.upper if mv.upper is not None else '..'})"
                    + (f" split at {mv.split_at}" if mv.split_at is not None else ""))
        else:
            what = f"{mv.kind.value} {', '.join(str(k) for k in mv.keys)}"
        print(f"move {i}: {mv.rule} {what} from {mv.source} to {mv.target}: "
              f"{mv.rows} rows, {_size(mv.bytes)}{' (estimate)' if not mv.measured else ''}; "
              f"load {mv.source} {mv.source_load:.4g}, {mv.target} {mv.target_load:.4g} after",
              file=out)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=out)


def rebalance_command(args: Any, config: Config) -> int:
    if args.action in ("apply", "abort"):
        from .apply import apply_command
        return apply_command(args, config)
    try:
        sv = asyncio.run(survey(config, args.since))
    except _FAILURES as e:
        print(f"cannot read the heat statistics: {e}", file=sys.stderr)
        return 1
    if args.action == "status":
        data = status_data(config, sv, args.metric, args.threshold)
        if args.json:
            print(json.dumps(data, indent=2, default=str))
        else:
            print_status(data)
        return 0
    try:
        plan = asyncio.run(make_plan(config, sv, args.metric, args.threshold))
    except _FAILURES as e:
        print(f"cannot measure the hot keys on the shards: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return 2
    info = {"created": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
            "config": config.path, "heat": _heat_line(sv.heat)}
    data = plan_to_dict(replace(plan, info=info))
    text = ("# shardwire rebalance plan (docs/rebalancing.md). Edit it if you like: remove a "
            "move, change its 'to'.\n"
            + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
        print_plan_summary(plan, sys.stdout)
        print(f"plan written to {args.output}")
    else:
        sys.stdout.write(text)
        print_plan_summary(plan, sys.stderr)
    balanced = all(s.load <= plan.limit + 1e-9 for s in plan.after.values())
    return 0 if balanced else 1
