"""Routing cases as data: statements, shard maps and the plan each must get.

`routing/maps/*.yaml` are complete configuration files (shards s1..s4, default s1) whose shard
maps cover every rule kind. `routing/cases/*.yaml` hold the cases, one file per topic:

```yaml
map: shop.yaml                     # the file's default map; a case may name its own
cases:
  - sql: SELECT * FROM orders WHERE tenant_id = $1
    params: ["2"]                  # text format; null for NULL
    types: [23]                    # optional parameter type OIDs (0: unspecified)
    binary: true                   # optional: every parameter in binary (or a list per param)
    context: {shard: s2}           # optional: SET shardwire.shard / shardwire.key / lookups
    timezone: Europe/Paris         # optional: the session's TimeZone (default UTC)
    expect: {shards: [s2]}
```

Expectations:
- `{shards: [s2]}`: SingleShard s2; several shards: MultiShard with exactly these (any order),
  with `write: true/false` checked when given;
- `{single: true}`: SingleShard, any shard (a statement that can match no row);
- `{covers: [s2, s3]}`: SingleShard or MultiShard reaching at least these shards (used where
  the exact set is a matter of precision but missing one of them is a wrong answer);
- `{any: true}`: AnyShard;
- `{refused: "0A000", message_contains: "..."}`: Refusal with that SQLSTATE;
- `{lookup: rule, keys: [...]}`: NeedLookup for that rule (and those keys, when given);
- `{each: [[s1], [s2, s3], []]}`: a query string whose statements run each on its own shards,
  in one transaction across them (EachStatement): per statement, its shards ([] for any).

A case without `params` goes through `StatementRouter.plan_query` (the simple protocol, with
literal fingerprinting); a case with `params` through `prepared` + `plan_bind` (the extended
protocol). Simple-protocol cases also run through a fresh router, whose plan must be the same:
the cached analysis of one statement shape must not leak into another.
"""

from __future__ import annotations

import datetime
import functools
import random
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from shardwire.config import parse_config
from shardwire.proxy.routing import BindValues, StatementRouter
from shardwire.router.plan import (
    AnyShard,
    EachStatement,
    MultiShard,
    NeedLookup,
    Plan,
    Refusal,
    SingleShard,
    describe,
)
from shardwire.router.route import RouteContext
from shardwire.router.shardmap import KeyType, Rule, RuleKind, ShardMap
from shardwire.router.values import to_key

HERE = Path(__file__).parent / "routing"
MAPS = HERE / "maps"
CASES = HERE / "cases"

EXPECT_KEYS = {"shards", "single", "covers", "any", "refused", "lookup", "each"}
CASE_KEYS = {"map", "sql", "params", "types", "binary", "context", "timezone", "expect", "why"}


@dataclass(frozen=True)
class Case:
    file: str
    index: int
    map: str
    sql: str
    expect: dict[str, Any]
    params: tuple[str | None, ...] | None = None
    types: tuple[int, ...] = ()
    binary: tuple[bool, ...] = ()
    context: dict[str, Any] | None = None
    timezone: str = "UTC"
    why: str = ""

    @property
    def id(self) -> str:
        sql = " ".join(self.sql.split())
        if len(sql) > 60:
            sql = sql[:57] + "..."
        return f"{self.file}:{self.index}: {sql}"


def load_cases() -> list[Case]:
    out: list[Case] = []
    for path in sorted(CASES.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        default_map = data.get("map")
        for index, raw in enumerate(data["cases"]):
            unknown = set(raw) - CASE_KEYS
            assert not unknown, f"{path.name}:{index}: unknown case keys {unknown}"
            expect = raw["expect"]
            assert len(EXPECT_KEYS & set(expect)) == 1, \
                f"{path.name}:{index}: expect needs exactly one of {sorted(EXPECT_KEYS)}"
            params = raw.get("params")
            binary = raw.get("binary", False)
            if params is not None:
                params = tuple(None if p is None else str(p) for p in params)
                binary = tuple(binary) if isinstance(binary, list) else (bool(binary),) * len(
                    params)
            else:
                assert not binary and "types" not in raw, f"{path.name}:{index}: no params"
                binary = ()
            out.append(Case(
                file=path.stem, index=index, map=raw.get("map", default_map), sql=raw["sql"],
                expect=expect, params=params, types=tuple(raw.get("types", ())),
                binary=binary, context=raw.get("context"),
                timezone=raw.get("timezone", "UTC"), why=raw.get("why", "")))
    return out


ALL_CASES = load_cases()


@functools.cache
def shard_map(name: str) -> ShardMap:
    return parse_config((MAPS / name).read_text(), env={}).sharding


@functools.cache
def shared_router(name: str) -> StatementRouter:
    """One router per map for every case: its caches see all the statements of the suite."""
    return StatementRouter(shard_map(name))


# -- binary parameters ---------------------------------------------------------------------

_PG_EPOCH_DATE = datetime.date(2000, 1, 1)
_PG_EPOCH = datetime.datetime(2000, 1, 1)


def _numeric_binary(text: str) -> bytes:
    """PostgreSQL's numeric_send: ndigits, weight, sign, dscale, base-10000 digits."""
    value = Decimal(text)
    sign = 0x4000 if value.is_signed() else 0
    value = abs(value)
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)
    dscale = max(0, -exponent)
    digits_text = format(value, "f")
    int_part, _, frac_part = digits_text.partition(".")
    int_part = int_part.lstrip("0")
    # Pad to whole base-10000 groups on both sides of the point.
    int_part = "0" * (-len(int_part) % 4) + int_part
    frac_part = frac_part + "0" * (-len(frac_part) % 4)
    groups = [int(int_part[i:i + 4]) for i in range(0, len(int_part), 4)]
    weight = len(groups) - 1
    groups += [int(frac_part[i:i + 4]) for i in range(0, len(frac_part), 4)]
    while groups and groups[0] == 0:  # leading zero groups lower the weight
        groups.pop(0)
        weight -= 1
    while groups and groups[-1] == 0:
        groups.pop()
    if not groups:
        weight = 0
    return struct.pack(f"!hhHH{len(groups)}H", len(groups), weight, sign, dscale, *groups)


def encode_binary(text: str, oid: int) -> bytes:
    if oid == 21:
        return struct.pack("!h", int(text))
    if oid == 23:
        return struct.pack("!i", int(text))
    if oid == 20:
        return struct.pack("!q", int(text))
    if oid == 1700:
        return _numeric_binary(text)
    if oid in (25, 1043, 1042, 19):
        return text.encode()
    if oid == 2950:
        return uuid.UUID(text).bytes
    if oid == 1082:
        return struct.pack("!i", (datetime.date.fromisoformat(text) - _PG_EPOCH_DATE).days)
    if oid == 1114:
        delta = datetime.datetime.fromisoformat(text) - _PG_EPOCH
        return struct.pack("!q", delta // datetime.timedelta(microseconds=1))
    if oid == 1184:
        instant = datetime.datetime.fromisoformat(text)
        assert instant.tzinfo is not None, "binary timestamptz cases give an offset"
        delta = instant - _PG_EPOCH.replace(tzinfo=datetime.UTC)
        return struct.pack("!q", delta // datetime.timedelta(microseconds=1))
    raise AssertionError(f"the runner cannot encode OID {oid} in binary")


def bind_values(case: Case) -> BindValues:
    assert case.params is not None
    values: list[bytes | None] = []
    for i, (text, binary) in enumerate(zip(case.params, case.binary, strict=True)):
        if text is None:
            values.append(None)
        elif binary:
            oid = case.types[i] if i < len(case.types) else 0
            values.append(encode_binary(text, oid))
        else:
            values.append(text.encode())
    return BindValues(tuple(int(b) for b in case.binary), tuple(values))


# -- running a case --------------------------------------------------------------------------

def context(case: Case, smap: ShardMap) -> RouteContext:
    if not case.context:
        return RouteContext()
    lookups: dict[str, dict[Any, str | None]] = {}
    for rule_name, entries in (case.context.get("lookups") or {}).items():
        key_type = smap.rules[rule_name].key_type
        lookups[rule_name] = {to_key(str(k), key_type): v for k, v in entries.items()}
    key = case.context.get("key")
    return RouteContext(shard=case.context.get("shard"),
                        key=None if key is None else str(key), lookups=lookups)


def plan_of(case: Case, router: StatementRouter) -> Plan:
    ctx = context(case, router.smap)
    sql = case.sql.encode()
    if case.params is None:
        return router.plan_query(sql, ctx, timezone=case.timezone)
    analyses = router.prepared(sql)
    return router.plan_bind(analyses, case.types, bind_values(case), ctx,
                            timezone=case.timezone)


def shards_of(plan: Plan) -> set[str] | None:
    if isinstance(plan, SingleShard):
        return {plan.shard}
    if isinstance(plan, MultiShard):
        return set(plan.shards)
    return None


def mismatch(case: Case, plan: Plan) -> str | None:
    """Why the plan does not meet the case's expectation; None when it does."""
    e = case.expect
    if "shards" in e:
        want = set(e["shards"])
        if len(want) == 1:
            if not isinstance(plan, SingleShard) or plan.shard not in want:
                return f"expected SingleShard {sorted(want)}"
        else:
            if not isinstance(plan, MultiShard) or set(plan.shards) != want:
                return f"expected MultiShard {sorted(want)}"
            if len(plan.shards) != len(want):
                return "a shard is listed twice"
            if "write" in e and plan.write != e["write"]:
                return f"expected write={e['write']}"
        return None
    if "single" in e:
        return None if isinstance(plan, SingleShard) else "expected SingleShard (any shard)"
    if "covers" in e:
        got = shards_of(plan)
        want = set(e["covers"])
        if got is None or not want <= got:
            return f"expected a plan reaching at least {sorted(want)}"
        return None
    if "any" in e:
        return None if isinstance(plan, AnyShard) else "expected AnyShard"
    if "refused" in e:
        if not isinstance(plan, Refusal) or plan.sqlstate != str(e["refused"]):
            return f"expected Refusal {e['refused']}"
        if "message_contains" in e and e["message_contains"] not in plan.message:
            return f"expected the message to contain {e['message_contains']!r}"
        return None
    if "each" in e:
        if not isinstance(plan, EachStatement):
            return "expected EachStatement"
        got = [[] if isinstance(p, AnyShard) else sorted(shards_of(p) or ()) for p in plan.plans]
        if got != [sorted(x) for x in e["each"]]:
            return f"expected the statements on {e['each']}"
        return None
    if "lookup" in e:
        if not isinstance(plan, NeedLookup) or plan.rule != e["lookup"]:
            return f"expected NeedLookup {e['lookup']}"
        if "keys" in e:
            key_type = shard_map(case.map).rules[e["lookup"]].key_type
            want_keys = {to_key(str(k), key_type) for k in e["keys"]}
            if set(plan.keys) != want_keys:
                return f"expected lookup keys {sorted(map(str, want_keys))}"
        return None
    raise AssertionError(f"bad expectation {e}")


def report(case: Case, plan: Plan, problem: str) -> str:
    lines = [f"{case.file}.yaml case {case.index} (map {case.map}): {problem}",
             f"  sql:    {case.sql}"]
    if case.params is not None:
        lines.append(f"  params: {list(case.params)} types={list(case.types)} "
                     f"binary={list(case.binary)}")
    if case.context:
        lines.append(f"  context: {case.context}")
    if case.timezone != "UTC":
        lines.append(f"  timezone: {case.timezone}")
    if case.why:
        lines.append(f"  why:    {case.why}")
    lines.append(f"  expect: {case.expect}")
    lines.append(f"  got:    {describe(plan)}")
    return "\n".join(lines)


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.id for c in ALL_CASES])
def test_routing_case(case: Case) -> None:
    plan = plan_of(case, shared_router(case.map))
    problem = mismatch(case, plan)
    assert problem is None, report(case, plan, problem or "")
    if case.params is None:
        fresh = plan_of(case, StatementRouter(shard_map(case.map)))
        assert describe(fresh) == describe(plan), report(
            case, plan, f"a fresh router plans it differently: {describe(fresh)}")


def test_cases_are_many_and_cover_every_map() -> None:
    assert len(ALL_CASES) >= 300
    assert {c.map for c in ALL_CASES} == {p.name for p in MAPS.glob("*.yaml")}
    sqls = [(c.map, c.sql, c.params, c.context, c.timezone, c.types, c.binary)
            for c in ALL_CASES]
    duplicates = {s for s in sqls if sqls.count(s) > 1}
    assert not duplicates, f"cases listed twice: {duplicates}"


# -- property: a key routes to the shard the map gives -----------------------------------------

SHARDS = ("s1", "s2", "s3", "s4")
BASE_CONFIG = {
    "database": "app", "auth": {"method": "trust"}, "users": {"app": None},
    "shards": {s: {"primary": f"postgresql://postgres@127.0.0.1:{5433 + i}/app"}
               for i, s in enumerate(SHARDS)},
    "default_shard": "s1",
}
OIDS = {KeyType.INTEGER: 20, KeyType.NUMERIC: 1700, KeyType.TEXT: 25, KeyType.DATE: 1082,
        KeyType.TIMESTAMPTZ: 1184, KeyType.UUID: 2950}
KINDS_TYPES = {
    RuleKind.RANGE: (KeyType.INTEGER, KeyType.NUMERIC, KeyType.DATE, KeyType.TIMESTAMPTZ),
    RuleKind.TENANT: (KeyType.INTEGER, KeyType.TEXT, KeyType.UUID),
    RuleKind.HASH: (KeyType.INTEGER, KeyType.TEXT, KeyType.UUID, KeyType.DATE),
}
TABLE_NAMES = ("t", "orders", "Ev_Log", "sales.orders", "x1")
COLUMN_NAMES = ("k", "tenant_id", "created_at", "id")


def _random_key(rng: random.Random, key_type: KeyType) -> Any:
    if key_type is KeyType.INTEGER:
        return rng.choice([rng.randint(-1000, 1000), rng.randint(-2**63, 2**63 - 1),
                           rng.randint(0, 20)])
    if key_type is KeyType.NUMERIC:
        return Decimal(rng.randint(-100000, 100000)).scaleb(-rng.randint(0, 3))
    if key_type is KeyType.TEXT:
        alphabet = "abcxyzAZ09 _'é"
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
    if key_type is KeyType.DATE:
        return datetime.date(2020, 1, 1) + datetime.timedelta(days=rng.randint(0, 3000))
    if key_type is KeyType.TIMESTAMPTZ:
        return datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(
            seconds=rng.randint(0, 3000 * 86400), microseconds=rng.choice([0, 0, 500000, 1]))
    if key_type is KeyType.UUID:
        return uuid.UUID(int=rng.getrandbits(128))
    raise AssertionError(key_type)


def _yaml_value(key: Any) -> Any:
    if isinstance(key, Decimal):
        return str(key)
    if isinstance(key, uuid.UUID):
        return str(key)
    if isinstance(key, datetime.datetime):
        return key.isoformat(sep=" ")
    return key


def _text(key: Any) -> str:
    """The key as PostgreSQL text input."""
    if isinstance(key, datetime.datetime):
        return key.isoformat(sep=" ")
    return str(key)


def _literal(key: Any) -> str:
    if isinstance(key, int):
        return str(key)
    if isinstance(key, Decimal):
        return format(key, "f")
    return "'" + _text(key).replace("'", "''") + "'"


def _random_rule(rng: random.Random) -> tuple[dict[str, Any], KeyType, list[Any]]:
    """A valid rule (as YAML data), its key type, and keys worth routing."""
    kind = rng.choice(list(KINDS_TYPES))
    key_type = rng.choice(KINDS_TYPES[kind])
    keys = [_random_key(rng, key_type) for _ in range(rng.randint(2, 8))]
    rule: dict[str, Any] = {"kind": kind.value, "type": key_type.value}
    if kind is RuleKind.RANGE:
        bounds = sorted(set(keys))
        ranges = []
        lower = None if rng.random() < 0.5 else bounds[0]
        for upper in bounds[1:]:
            if rng.random() < 0.2:  # a gap
                lower = upper
                continue
            entry = {"shard": rng.choice(SHARDS), "to": _yaml_value(upper)}
            if lower is not None:
                entry["from"] = _yaml_value(lower)
            ranges.append(entry)
            lower = upper
        if not ranges or rng.random() < 0.5:
            entry = {"shard": rng.choice(SHARDS)}
            if lower is not None:
                entry["from"] = _yaml_value(lower)
            ranges.append(entry)
        rule["ranges"] = ranges
        # Probe the bounds themselves, just below them and far outside.
        probes = list(keys)
        if key_type is KeyType.INTEGER:
            probes += [k - 1 for k in keys if k > -2**63] + [-2**63, 2**63 - 1]
    elif kind is RuleKind.TENANT:
        listed = rng.sample(keys, k=rng.randint(1, len(keys)))
        tenants = {str(_yaml_value(k)) if key_type is not KeyType.INTEGER else k:
                   rng.choice(SHARDS) for k in listed}
        rule["tenants"] = tenants
        rule["default"] = rng.choice(SHARDS)
        probes = keys + [_random_key(rng, key_type)]
    else:
        rule["shards"] = rng.sample(SHARDS, k=rng.randint(1, 4))
        probes = keys
    return rule, key_type, probes


def _random_cases(seed: int, count: int
                  ) -> Iterator[tuple[str, str, str, KeyType, list[Any]]]:
    """(configuration text, table as SQL names it, key column, key type, keys to probe)."""
    rng = random.Random(seed)
    for _ in range(count):
        rule, key_type, probes = _random_rule(rng)
        table = rng.choice(TABLE_NAMES)
        column = rng.choice(COLUMN_NAMES)
        rule["column"] = column
        # Mixed-case names are created quoted: the map and the SQL both quote them.
        quoted_table = table if table.islower() or "." in table else f'"{table}"'
        rule["tables"] = [quoted_table]
        config = dict(BASE_CONFIG, sharding={"rules": {"r": rule}})
        yield yaml.safe_dump(config, sort_keys=False), quoted_table, column, key_type, probes


def _rule_text(rule: Rule) -> str:
    return (f"map rule: {rule.kind.value} {rule.key_type.value} ranges={rule.ranges} "
            f"values={rule.values} default={rule.default} shards={rule.shards}")


def test_property_keys_route_to_the_shard_of_the_map() -> None:
    """Random valid range, tenant and hash maps; random keys as literals, as text parameters
    (untyped and typed) and as binary parameters (integer, uuid, date): each routes to exactly
    `rule.shard_for(key)`, or to a single shard when no shard holds the key; an IN list of two
    keys to the union of their shards. Seeded: a failure reproduces."""
    failures: list[str] = []
    checked = 0
    for text, table, column, key_type, probes in _random_cases(seed=20260101, count=150):
        smap = parse_config(text, env={}).sharding
        rule = smap.rules["r"]
        router = StatementRouter(smap)
        prepared = router.prepared(f"SELECT * FROM {table} WHERE {column} = $1".encode())
        for key in probes:
            want = rule.shard_for(key)
            sql = f"SELECT * FROM {table} WHERE {column} = {_literal(key)}"
            attempts: list[tuple[str, Plan]] = [
                (sql, router.plan_query(sql.encode(), RouteContext()))]
            attempts.append((f"$1 = {_text(key)!r} (text)", router.plan_bind(
                prepared, (), BindValues((0,), (_text(key).encode(),)), RouteContext())))
            oid = OIDS[key_type]
            attempts.append((f"$1 = {_text(key)!r} (text, OID {oid})", router.plan_bind(
                prepared, (oid,), BindValues((0,), (_text(key).encode(),)), RouteContext())))
            if key_type in (KeyType.INTEGER, KeyType.UUID, KeyType.DATE):
                attempts.append((f"$1 = {_text(key)!r} (binary, OID {oid})", router.plan_bind(
                    prepared, (oid,), BindValues((1,), (encode_binary(_text(key), oid),)),
                    RouteContext())))
            for what, plan in attempts:
                checked += 1
                ok = isinstance(plan, SingleShard) and (want is None or plan.shard == want)
                if not ok:
                    failures.append(f"{what}: want {want or 'any single shard'}, got "
                                    f"{describe(plan)}\n    {_rule_text(rule)}")
        # An IN list reaches the union of its keys' shards.
        for first, second in zip(probes, probes[1:], strict=False):
            want_set = {rule.shard_for(first), rule.shard_for(second)} - {None}
            sql = (f"SELECT * FROM {table} WHERE {column} IN ({_literal(first)}, "
                   f"{_literal(second)})")
            plan = router.plan_query(sql.encode(), RouteContext())
            checked += 1
            if len(want_set) <= 1:
                ok = isinstance(plan, SingleShard) and (not want_set or {plan.shard} == want_set)
            else:
                ok = isinstance(plan, MultiShard) and set(plan.shards) == want_set
            if not ok:
                failures.append(f"{sql}: want {sorted(map(str, want_set)) or 'any single shard'}"
                                f", got {describe(plan)}\n    {_rule_text(rule)}")
    assert checked > 1000
    assert not failures, f"{len(failures)} of {checked} routings wrong, e.g.:\n" + "\n".join(
        failures[:8])
