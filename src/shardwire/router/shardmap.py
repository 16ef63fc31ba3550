"""Shard maps: which shard holds which rows. Pure data and pure functions.

A `ShardMap` has named rules; each rule says which column carries the key and how key values
map to shards, and governs a set of tables (co-located: a key value lives on the same shard for
all of them). Reference tables have a full copy on every shard. Any other table is unsharded and
lives on the default shard.

Key values are Python values of the rule's key type: int (integer), Decimal (numeric), str
(text), datetime.date (date), datetime.datetime (timestamp; naive, or aware for timestamptz),
uuid.UUID (uuid).
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

KeyValue = Any  # int | Decimal | str | date | datetime | UUID


class RuleKind(enum.Enum):
    TENANT = "tenant"
    CATEGORY = "category"
    RANGE = "range"
    LOOKUP = "lookup"
    HASH = "hash"


class KeyType(enum.Enum):
    INTEGER = "integer"
    NUMERIC = "numeric"
    TEXT = "text"
    DATE = "date"
    TIMESTAMP = "timestamp"
    TIMESTAMPTZ = "timestamptz"
    UUID = "uuid"


@dataclass(frozen=True, slots=True)
class TableName:
    """A table as PostgreSQL names it: schema and name, already case-folded."""

    schema: str
    name: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True, slots=True)
class RangeBound:
    """Rows with lower <= key < upper live on `shard`; None is an open end."""

    lower: KeyValue | None
    upper: KeyValue | None
    shard: str


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    kind: RuleKind
    key_type: KeyType
    column: str  # the key column of tables that do not name their own
    tables: dict[TableName, str]  # each governed table and its key column
    shards: tuple[str, ...]  # every shard that may hold rows of this rule
    # tenant and category: explicit values, and where the others go
    values: dict[KeyValue, str] = field(default_factory=dict)
    default: str | None = None
    # range: sorted, non-overlapping
    ranges: tuple[RangeBound, ...] = ()
    # lookup: the directory table in the catalog, and where new keys go
    directory: str = ""
    new_keys: str = "least_loaded"  # or a shard name
    # Seconds after a session's write during which its reads by this rule's key go to the
    # primary; None: `replicas.read_your_writes` decides (proxy/server.py, `_pool_for`).
    read_your_writes: float | None = None

    def shard_for(self, key: KeyValue) -> str | None:
        """The shard that holds rows with this key; None when the key maps to no shard (a
        range rule with a gap), or, for lookup rules, when the key is not in the directory
        (the caller asks the directory: see `router.route.NeedLookup`)."""
        kind = self.kind
        if kind is RuleKind.TENANT or kind is RuleKind.CATEGORY:
            return self.values.get(key, self.default)
        if kind is RuleKind.RANGE:
            return _range_shard(self.ranges, key)
        if kind is RuleKind.HASH:
            return self.shards[hash_key(key) % len(self.shards)]
        return None

    def shards_between(self, lower: KeyValue | None, lower_inclusive: bool,
                       upper: KeyValue | None, upper_inclusive: bool) -> frozenset[str] | None:
        """Range rules: the shards whose ranges meet the interval; None for other kinds
        (an interval says nothing about where their keys live)."""
        if self.kind is not RuleKind.RANGE:
            return None
        out = set()
        for r in self.ranges:
            # Does [r.lower, r.upper) meet the interval?
            if upper is not None and r.lower is not None and (
                    r.lower > upper or (r.lower == upper and not upper_inclusive)):
                continue
            if lower is not None and r.upper is not None and r.upper <= lower:
                continue
            out.add(r.shard)
        return frozenset(out)


def _range_shard(ranges: tuple[RangeBound, ...], key: KeyValue) -> str | None:
    # Ranges are sorted by lower bound, an open lower bound first: find the last one that
    # starts at or below the key, then check its upper bound.
    lo, hi = 0, len(ranges)
    while lo < hi:
        mid = (lo + hi) // 2
        low = ranges[mid].lower
        if low is None or low <= key:
            lo = mid + 1
        else:
            hi = mid
    if lo == 0:
        return None
    r = ranges[lo - 1]
    if r.upper is not None and key >= r.upper:
        return None
    return r.shard


def hash_key(key: KeyValue) -> int:
    """A stable 64-bit hash of a key's canonical text form (documented in docs/sharding.md:
    BLAKE2b with an 8-byte digest of the UTF-8 text, read big-endian)."""
    return int.from_bytes(hashlib.blake2b(canonical_text(key).encode(), digest_size=8).digest(),
                          "big")


def canonical_text(key: KeyValue) -> str:
    if isinstance(key, datetime.datetime):
        if key.tzinfo is not None:
            key = key.astimezone(datetime.UTC)
        return key.isoformat(sep=" ")
    if isinstance(key, Decimal):
        if key.is_zero():
            return "0"  # PostgreSQL has no negative zero
        return format(key.normalize(), "f")
    if isinstance(key, uuid.UUID):
        return str(key)
    return str(key)


@dataclass(frozen=True, slots=True)
class TableRule:
    """How one table is placed."""

    rule: Rule | None  # None: reference or unsharded
    column: str = ""  # the key column (sharded tables)
    reference: bool = False


@dataclass(frozen=True, slots=True)
class ShardMap:
    shards: tuple[str, ...]
    default_shard: str
    rules: dict[str, Rule] = field(default_factory=dict)
    reference: frozenset[TableName] = frozenset()
    # Derived from the rules and reference tables; declared so that the slotted class has room.
    _tables: dict[TableName, TableRule] = field(init=False, repr=False, compare=False,
                                                default_factory=dict)

    def __post_init__(self) -> None:
        tables: dict[TableName, TableRule] = {}
        for rule in self.rules.values():
            for table, column in rule.tables.items():
                tables[table] = TableRule(rule, column)
        for table in self.reference:
            tables[table] = TableRule(None, reference=True)
        object.__setattr__(self, "_tables", tables)

    def table(self, name: TableName) -> TableRule | None:
        """The placement of a table; None for an unsharded table (on the default shard)."""
        return self._tables.get(name)

    @property
    def sharded(self) -> bool:
        return bool(self.rules) or bool(self.reference)
