"""The `sharding:` section of the configuration: YAML values in, a `ShardMap` out. Pure.

Called by `shardwire.config.load` with the section after `${VAR}` substitution. Like the rest
of the loader it collects every problem, each as `key.path: message` with a fix, and builds
nothing when there is one. docs/sharding.md describes the section for operators.
"""

from __future__ import annotations

import datetime
import difflib
import enum
import math
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar

from shardwire.router.shardmap import (
    KeyType,
    KeyValue,
    RangeBound,
    Rule,
    RuleKind,
    ShardMap,
    TableName,
)

SHARDING_KEYS = ("rules", "reference")
RULE_KEYS = ("kind", "column", "type", "tables")
# Every kind routes by a key, so every rule may have its own read_your_writes.
OPTIONAL_RULE_KEYS = ("read_your_writes",)
KIND_KEYS: dict[RuleKind, tuple[str, ...]] = {
    RuleKind.TENANT: ("tenants", "default"),
    RuleKind.CATEGORY: ("values", "default"),
    RuleKind.RANGE: ("ranges",),
    RuleKind.LOOKUP: ("directory", "new_keys", "shards"),
    RuleKind.HASH: ("shards",),
}
RANGE_KEYS = ("from", "to", "shard")
TABLE_KEYS = ("column",)
LEAST_LOADED = "least_loaded"
DIRECTORY_PREFIX = "shardwire_directory_"
MAX_NAME_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1; longer names are silently truncated

KINDS = tuple(kind.value for kind in RuleKind)
TYPES = tuple(key_type.value for key_type in KeyType)
# PostgreSQL type names an operator may write, and the key type that covers them.
_TYPE_ALIASES = {
    "int": "integer", "int2": "integer", "int4": "integer", "int8": "integer",
    "smallint": "integer", "bigint": "integer", "serial": "integer", "bigserial": "integer",
    "decimal": "numeric", "varchar": "text", "char": "text", "string": "text",
    "character varying": "text", "timestamp with time zone": "timestamptz",
    "timestamp without time zone": "timestamp", "datetime": "timestamp",
}

_RULE_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_UNQUOTED = re.compile(r"[^\W\d][\w$]*")  # a letter or _, then letters, digits, _ and $
_PLAIN = re.compile(r"[a-z_][a-z0-9_$]*")  # needs no quotes in SQL
_INTEGER = re.compile(r"[+-]?[0-9]+")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_TIMESTAMP = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r"(?:[ T][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,6})?)?)?"
    r"(?:Z|[+-][0-9]{2}(?::?[0-9]{2})?)?"
)
_E = TypeVar("_E", bound=enum.Enum)
_FOLD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


# --- names -------------------------------------------------------------------------------


def parse_identifier(text: str) -> str:
    """One PostgreSQL identifier as written in SQL: folded to lower case unless quoted.

    >>> parse_identifier("Tenant_ID"), parse_identifier('"Tenant_ID"')
    ('tenant_id', 'Tenant_ID')

    Raises ValueError saying what is wrong.
    """
    parts = _name_parts(text)
    if len(parts) != 1:
        raise ValueError(f"{text!r} is not one name (a '.' outside double quotes separates "
                         "names)")
    return parts[0]


def parse_table_name(text: str) -> TableName:
    """A table name as written in SQL: `name` or `schema.name`, each part folded to lower case
    unless double-quoted. No schema means `public` (search_path is not consulted).

    >>> parse_table_name("Orders"), parse_table_name('sales."Order Items"')
    (TableName(schema='public', name='orders'), TableName(schema='sales', name='Order Items'))

    Raises ValueError saying what is wrong.
    """
    parts = _name_parts(text)
    if len(parts) == 1:
        return TableName("public", parts[0])
    if len(parts) == 2:
        return TableName(parts[0], parts[1])
    raise ValueError(f"{text!r} has too many parts: write schema.table or table (quote a name "
                     "that contains a dot)")


def sql_name(table: TableName) -> str:
    """`table` as SQL text, each part quoted where it has to be.

    >>> sql_name(TableName("public", "orders")), sql_name(TableName("sales", "Order Items"))
    ('public.orders', 'sales."Order Items"')
    """
    return ".".join(p if _PLAIN.fullmatch(p) else '"' + p.replace('"', '""') + '"'
                    for p in (table.schema, table.name))


def _name_parts(text: str) -> list[str]:
    """The dot-separated names in `text`, unquoted names folded, quoted ones kept as written."""
    text = text.strip()
    if not text:
        raise ValueError("the name is empty")
    parts: list[str] = []
    i, n = 0, len(text)
    while True:
        if text.startswith('"', i):
            pieces: list[str] = []
            j = i + 1
            while True:
                close = text.find('"', j)
                if close < 0:
                    raise ValueError(f"{text!r}: a quoted name is missing its closing '\"'")
                pieces.append(text[j:close])
                if text.startswith('"', close + 1):  # "" stands for one " inside the name
                    pieces.append('"')
                    j = close + 2
                    continue
                i = close + 1
                break
            part = "".join(pieces)
            if not part:
                raise ValueError(f"{text!r}: a quoted name must not be empty")
        else:
            # An unquoted name runs to the next dot: it cannot contain one.
            end = text.find(".", i)
            end = n if end < 0 else end
            segment = text[i:end]
            if not _UNQUOTED.fullmatch(segment):
                raise ValueError(
                    f"{segment!r} is not a valid name: without double quotes a name is made of "
                    "letters, digits, _ and $, not starting with a digit or $ (to keep other "
                    f"characters, quote it inside the YAML string: '\"{segment}\"')")
            part = segment.translate(_FOLD)  # PostgreSQL folds ASCII letters only
            i = end
        if len(part.encode()) > MAX_NAME_BYTES:
            raise ValueError(f"{part!r} is longer than {MAX_NAME_BYTES} bytes, the longest "
                             "name PostgreSQL keeps")
        parts.append(part)
        if i == n:
            return parts
        if text[i] != ".":
            raise ValueError(f"{text!r}: unexpected {text[i]!r} after the quoted name {part!r} "
                             "(names are separated by '.')")
        i += 1
        if i == n:
            raise ValueError(f"{text!r}: a name is missing after the last '.'")


# --- key values --------------------------------------------------------------------------


def parse_key(raw: object, key_type: KeyType) -> KeyValue:
    """A key value from YAML (a string, or what YAML made of it: int, float, date, datetime)
    as the Python value of `key_type`. timestamptz values are in UTC; naive input means UTC.

    Raises ValueError with a message such as "not an integer (the rule's type is integer)".
    """
    name = key_type.value
    suffix = f" (the rule's type is {name})"
    if isinstance(raw, bool):
        # YAML reads yes/no/on/off/true/false as booleans.
        raise ValueError(f"not {_NOUNS[key_type]}{suffix}: YAML read it as a boolean; quote it")
    text = raw.strip() if isinstance(raw, str) else None
    match key_type:
        case KeyType.INTEGER:
            if isinstance(raw, int):
                return raw
            if isinstance(raw, float) and raw.is_integer():
                return int(raw)
            if text is not None and _INTEGER.fullmatch(text):
                return int(text)
        case KeyType.NUMERIC:
            if isinstance(raw, int):
                return Decimal(raw)
            if isinstance(raw, float | str):
                try:
                    # str(float) is the shortest text that reads back as the same float.
                    number = Decimal(str(raw).strip())
                except InvalidOperation:
                    pass
                else:
                    if number.is_finite():
                        return number
                    raise ValueError(f"not a finite number{suffix}: NaN and infinity cannot "
                                     "be keys")
        case KeyType.TEXT:
            if isinstance(raw, str):
                return str(raw)
            if isinstance(raw, int | float | datetime.date):
                raise ValueError(f"not text{suffix}: YAML read it as {_yaml_kind(raw)}; quote "
                                 "it")
        case KeyType.DATE:
            if isinstance(raw, datetime.datetime):
                raise ValueError(f"not a date{suffix}: it has a time of day")
            if isinstance(raw, datetime.date):
                return raw
            if text is not None and _DATE.fullmatch(text):
                try:
                    return datetime.date.fromisoformat(text)
                except ValueError as e:
                    raise ValueError(f"not a date{suffix}: {e}") from None
            raise ValueError(f"not a date{suffix}; write YYYY-MM-DD")
        case KeyType.TIMESTAMP | KeyType.TIMESTAMPTZ:
            stamp = _timestamp(raw, text, suffix)
            if key_type is KeyType.TIMESTAMPTZ:
                if stamp.tzinfo is None:
                    return stamp.replace(tzinfo=datetime.UTC)
                return stamp.astimezone(datetime.UTC)
            if stamp.tzinfo is not None:
                raise ValueError(f"has a time zone offset{suffix}, which has none: leave the "
                                 "offset out, or make the rule's type timestamptz")
            return stamp
        case KeyType.UUID:
            if text is not None:
                try:
                    return uuid.UUID(text)
                except ValueError:
                    pass
    raise ValueError(f"not {_NOUNS[key_type]}{suffix}")


_NOUNS = {
    KeyType.INTEGER: "an integer",
    KeyType.NUMERIC: "a number",
    KeyType.TEXT: "text",
    KeyType.DATE: "a date",
    KeyType.TIMESTAMP: "a timestamp",
    KeyType.TIMESTAMPTZ: "a timestamp",
    KeyType.UUID: "a uuid",
}


def _timestamp(raw: object, text: str | None, suffix: str) -> datetime.datetime:
    if isinstance(raw, datetime.datetime):
        return raw
    if isinstance(raw, datetime.date):
        return datetime.datetime(raw.year, raw.month, raw.day)
    if text is not None and _TIMESTAMP.fullmatch(text):
        try:
            return datetime.datetime.fromisoformat(text)
        except ValueError as e:
            raise ValueError(f"not a timestamp{suffix}: {e}") from None
    raise ValueError(f"not a timestamp{suffix}; write YYYY-MM-DD or YYYY-MM-DD HH:MM[:SS]")


def _yaml_kind(raw: object) -> str:
    match raw:
        case int():
            return "an integer"
        case float():
            return "a number"
        case datetime.datetime():
            return "a timestamp"
        case _:
            return "a date"


# --- the section -------------------------------------------------------------------------


def parse_sharding(
    raw: object,
    *,
    shards: Sequence[str],
    default_shard: str,
    problems: list[str],
) -> ShardMap | None:
    """The `sharding` section `raw` (None when absent) as a `ShardMap`, or None with every
    problem appended to `problems`. `shards` are the names of the configured shards; when it
    is empty (the shards themselves are wrong) shard names are not checked."""
    reader = _Reader(shards, problems)
    before = len(problems)
    shard_map = reader.sharding(raw, default_shard)
    return shard_map if len(problems) == before else None


@dataclass(frozen=True, slots=True)
class _Range:
    path: str
    lower: KeyValue | None
    upper: KeyValue | None
    shown: tuple[str, str]  # the bounds as written, ".." for an open end


class _Reader:
    def __init__(self, shards: Sequence[str], problems: list[str]) -> None:
        self.shards = list(shards)
        self.problems = problems
        self.table_paths: dict[TableName, str] = {}  # every table seen, and where
        self.directories: dict[str, str] = {}  # lookup directory -> its rule's path

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def sharding(self, raw: object, default_shard: str) -> ShardMap:
        rules: dict[str, Rule] = {}
        reference: set[TableName] = set()
        if raw is not None and not isinstance(raw, dict):
            self.problem("sharding", f"expected a mapping (rules, reference), got "
                                     f"{_describe(raw)}")
            raw = None
        if raw is not None:
            self.check_keys(raw, "sharding", SHARDING_KEYS)
            rules = self.rules(raw.get("rules"))
            reference = self.reference(raw.get("reference"))
        return ShardMap(tuple(self.shards), default_shard, rules, frozenset(reference))

    def check_keys(self, mapping: dict[Any, Any], path: str, allowed: Sequence[str],
                   what: str = "") -> None:
        for key in mapping:
            if key not in allowed:
                kinds = [k.value for k, keys in KIND_KEYS.items() if key in keys]
                if what and kinds:
                    hint = f"; {key} is for {' and '.join(kinds)} rules"
                else:
                    hint = _did_you_mean(str(key), allowed)
                self.problem(_join(path, key),
                             f"unknown key{what} (allowed: {', '.join(allowed)}){hint}")

    # -- rules ------------------------------------------------------------------------

    def rules(self, raw: object) -> dict[str, Rule]:
        path = "sharding.rules"
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.problem(path, f"expected a mapping of rule name to rule, got {_describe(raw)}")
            return {}
        rules: dict[str, Rule] = {}
        for name, entry in raw.items():
            if not isinstance(name, str) or not _RULE_NAME.fullmatch(name):
                shown = repr(name) if isinstance(name, str) else str(name)
                self.problem(path, f"rule name {shown} must be made of lower case letters, "
                                   "digits and _, not starting with a digit")
                continue
            rule = self.rule(str(name), entry, _join(path, name))
            if rule is not None:
                rules[rule.name] = rule
        return rules

    def rule(self, name: str, raw: object, path: str) -> Rule | None:
        if not isinstance(raw, dict):
            self.problem(path, f"expected a mapping (kind, column, type, tables, ...), got "
                               f"{_describe(raw)}")
            return None
        kind = self.choice(raw, "kind", path, RuleKind, None,
                           "what decides a key's shard: " + ", ".join(KINDS))
        key_type = self.choice(raw, "type", path, KeyType, KeyType.INTEGER, "")
        if kind is not None:
            self.check_keys(raw, path, (*RULE_KEYS, *KIND_KEYS[kind], *OPTIONAL_RULE_KEYS),
                            f" for a {kind.value} rule")
        column = self.column(raw.get("column"), _join(path, "column"))
        tables = self.tables(raw.get("tables"), _join(path, "tables"), column)
        read_your_writes = self.seconds(raw.get("read_your_writes"),
                                        _join(path, "read_your_writes"))
        if kind is None:
            return None
        rule = Rule(name, kind, key_type or KeyType.INTEGER, column or "", tables, ())
        match kind:
            case RuleKind.TENANT | RuleKind.CATEGORY:
                built = self.mapped(rule, raw, path, key_type)
            case RuleKind.RANGE:
                built = self.ranged(rule, raw, path, key_type)
            case RuleKind.LOOKUP:
                built = self.lookup(rule, raw, path)
            case _:  # hash
                shards = self.shard_list(raw.get("shards"), _join(path, "shards"))
                built = Rule(name, kind, rule.key_type, rule.column, tables, shards)
        if read_your_writes is None:
            return built
        return replace(built, read_your_writes=read_your_writes)

    def seconds(self, raw: object, path: str) -> float | None:
        """A rule's `read_your_writes`: seconds, 0 or more; None when absent (or wrong)."""
        if raw is None:
            return None
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            self.problem(path, f"expected a number of seconds, got {_describe(raw)}")
            return None
        if not math.isfinite(raw) or raw < 0:
            self.problem(path, f"must be a finite number of seconds, at least 0 (0 sends this "
                               f"rule's reads to replicas even right after a write), got {raw}")
            return None
        return float(raw)

    def choice(self, raw: dict[Any, Any], key: str, path: str, kind: type[_E],
               default: _E | None, required: str) -> _E | None:
        """`raw[key]` as a member of the enum `kind`; `default` when absent, None when wrong."""
        value = raw.get(key)
        path = _join(path, key)
        allowed = [str(member.value) for member in kind]
        if value is None:
            if required:
                self.problem(path, f"required ({required})")
            return default
        if isinstance(value, str) and value.strip().lower() in allowed:
            return kind(value.strip().lower())
        got = f"got {value!r}" if isinstance(value, str) else f"got {_describe(value)}"
        hint = ""
        if isinstance(value, str):
            alias = _TYPE_ALIASES.get(" ".join(value.lower().split())) if kind is KeyType else None
            hint = f"; for {value} write {alias}" if alias else _did_you_mean(value, allowed)
        self.problem(path, f"must be one of {', '.join(allowed)}, {got}{hint}")
        return None

    def column(self, raw: object, path: str) -> str | None:
        if raw is None:
            self.problem(path, "required (the column that carries the key, in every table "
                               "that does not name its own)")
            return None
        if not isinstance(raw, str):
            self.problem(path, f"expected a column name, got {_describe(raw)}")
            return None
        try:
            return parse_identifier(str(raw))
        except ValueError as e:
            self.problem(path, f"not a valid column name: {e}")
            return None

    def tables(self, raw: object, path: str, column: str | None) -> dict[TableName, str]:
        if raw is None or raw == []:
            self.problem(path, "required: list the tables this rule distributes (at least one)")
            return {}
        if not isinstance(raw, list):
            self.problem(path, f"expected a list of table names, got {_describe(raw)}")
            return {}
        tables: dict[TableName, str] = {}
        for i, entry in enumerate(raw):
            item_path = f"{path}[{i}]"
            own_column: str | None = None
            if isinstance(entry, dict):
                if len(entry) != 1:
                    self.problem(item_path, "expected a table name, or one table with its "
                                            "settings as in 'tenants: {column: id}'")
                    continue
                [(entry, settings)] = entry.items()
                settings_path = _join(item_path, entry)
                if not isinstance(settings, dict):
                    self.problem(settings_path, "expected a mapping such as {column: id}, got "
                                                f"{_describe(settings)}")
                    continue
                self.check_keys(settings, settings_path, TABLE_KEYS)
                if settings.get("column") is not None:
                    own_column = self.column(settings["column"], _join(settings_path, "column"))
                    if own_column is None:
                        continue
            table = self.table_name(entry, item_path)
            if table is None or not self.claim(table, item_path, path):
                continue
            key_column = own_column or column
            if key_column is not None:
                tables[table] = key_column
        return tables

    def table_name(self, raw: object, path: str) -> TableName | None:
        if not isinstance(raw, str):
            self.problem(path, f"expected a table name, got {_describe(raw)}")
            return None
        try:
            return parse_table_name(str(raw))
        except ValueError as e:
            self.problem(path, f"not a valid table name: {e}")
            return None

    def claim(self, table: TableName, path: str, list_path: str) -> bool:
        """Note that `table` is placed by the entry at `path`; False if it already was."""
        other = self.table_paths.get(table)
        if other is None:
            self.table_paths[table] = path
            return True
        if other.startswith(list_path + "["):
            self.problem(path, f"{table} is already listed at {other}; list each table once")
        elif path.startswith("sharding.reference"):
            self.problem(path, f"{table} is also in {other}; a reference table is copied to "
                               "every shard and cannot follow a rule: remove it from one list")
        elif other.startswith("sharding.reference"):
            self.problem(path, f"{table} is also in {other} (reference tables); a table either "
                               "follows a rule or is copied to every shard: remove it from one "
                               "list")
        else:
            self.problem(path, f"{table} is also in {other}; a table follows one rule: "
                               "remove it from one of them")
        return False

    # -- kinds ------------------------------------------------------------------------

    def mapped(self, rule: Rule, raw: dict[Any, Any], path: str,
               key_type: KeyType | None) -> Rule:
        """A tenant or category rule: explicit values, and a default for the others."""
        tenant = rule.kind is RuleKind.TENANT
        key = "tenants" if tenant else "values"
        what = "tenant" if tenant else "value"
        values_path = _join(path, key)
        entries = raw.get(key)
        values: dict[KeyValue, str] = {}
        written: dict[KeyValue, str] = {}  # value -> its key as written, for duplicates
        if entries is not None and not isinstance(entries, dict):
            self.problem(values_path, f"expected a mapping of {what} to shard, as in "
                                      f"{{1: s1, 2: s2}}, got {_describe(entries)}")
            entries = None
        for value_raw, shard_raw in (entries or {}).items():
            entry_path = _join(values_path, _shown(value_raw))
            shard = self.shard(shard_raw, entry_path)
            if key_type is None:
                continue  # the type is wrong, and reported
            try:
                value = parse_key(value_raw, key_type)
            except ValueError as e:
                self.problem(entry_path, str(e))
                continue
            if value in written:
                self.problem(entry_path, f"the same {what} as {key}.{written[value]}; list "
                                         f"each {what} once")
                continue
            written[value] = _shown(value_raw)
            if shard is not None:
                values[value] = shard
        default = None
        if raw.get("default") is not None:
            default = self.shard(raw["default"], _join(path, "default"))
        elif tenant:
            self.problem(_join(path, "default"), "required for a tenant rule (the shard of "
                                                 "tenants not listed under tenants)")
        elif not entries:
            self.problem(values_path, "required: map values to shards (as in {books: s1}), "
                                      "or give a default")
        shards = _unique([*values.values(), *([default] if default else [])])
        return Rule(rule.name, rule.kind, rule.key_type, rule.column, rule.tables, shards,
                    values=values, default=default)

    def ranged(self, rule: Rule, raw: dict[Any, Any], path: str,
               key_type: KeyType | None) -> Rule:
        ranges_path = _join(path, "ranges")
        entries = raw.get("ranges")
        if entries is None or entries == []:
            self.problem(ranges_path, "required: at least one range, as in "
                                      "[{from: 1, to: 1000, shard: s1}]")
            return rule
        if not isinstance(entries, list):
            self.problem(ranges_path, f"expected a list of ranges, got {_describe(entries)}")
            return rule
        bounds: list[RangeBound] = []
        checked: list[_Range] = []
        last = len(entries) - 1
        for i, entry in enumerate(entries):
            entry_path = f"{ranges_path}[{i}]"
            if not isinstance(entry, dict):
                self.problem(entry_path, "expected a mapping such as {from: 1, to: 1000, "
                                         f"shard: s1}}, got {_describe(entry)}")
                continue
            self.check_keys(entry, entry_path, RANGE_KEYS)
            shard = None
            if entry.get("shard") is None:
                self.problem(_join(entry_path, "shard"), "required (the shard that holds keys "
                                                         "in this range)")
            else:
                shard = self.shard(entry["shard"], _join(entry_path, "shard"))
            ok = True
            found: dict[str, KeyValue | None] = {}
            for end, may_be_open, which in (("from", i == 0, "first"), ("to", i == last, "last")):
                end_path = _join(entry_path, end)
                if entry.get(end) is None:
                    found[end] = None
                    if not may_be_open:
                        self.problem(end_path, f"required: only the {which} range may leave "
                                               f"out {end} (an open end)")
                        ok = False
                    continue
                if key_type is None:
                    ok = False
                    continue
                try:
                    found[end] = parse_key(entry[end], key_type)
                except ValueError as e:
                    self.problem(end_path, str(e))
                    ok = False
            if not ok:
                continue
            lower, upper = found["from"], found["to"]
            shown = (_shown(entry.get("from"), ".."), _shown(entry.get("to"), ".."))
            if lower is not None and upper is not None and lower >= upper:
                self.problem(entry_path, f"from ({shown[0]}) must be less than to "
                                         f"({shown[1]}): a range holds from <= key < to")
                continue
            checked.append(_Range(entry_path, lower, upper, shown))
            if shard is not None:
                bounds.append(RangeBound(lower, upper, shard))
        self.check_order(checked)
        shards = _unique([b.shard for b in bounds])
        return Rule(rule.name, rule.kind, rule.key_type, rule.column, rule.tables, shards,
                    ranges=tuple(bounds))

    def check_order(self, ranges: list[_Range]) -> None:
        """Report ranges out of order, and ranges that overlap (in sorted order)."""
        for prev, cur in zip(ranges, ranges[1:], strict=False):
            if prev.lower is not None and cur.lower is not None and cur.lower < prev.lower:
                self.problem(cur.path, f"comes before {_tail(prev.path)} (from {cur.shown[0]} "
                                       f"< {prev.shown[0]}); sort the ranges by from")
        # In order of `from`, each range must start at or after the furthest `to` so far.
        furthest: _Range | None = None
        for cur in sorted(ranges, key=lambda r: (r.lower is not None, r.lower)):
            if furthest is not None and (furthest.upper is None or cur.lower < furthest.upper):
                first, second = sorted((furthest, cur), key=lambda r: _index(r.path))
                self.problem(second.path, f"overlaps {_tail(first.path)} "
                                          f"({_interval(first)} and {_interval(second)}); "
                                          "ranges must not overlap")
            if furthest is None or (furthest.upper is not None and (
                    cur.upper is None or cur.upper > furthest.upper)):
                furthest = cur

    def lookup(self, rule: Rule, raw: dict[Any, Any], path: str) -> Rule:
        shards = self.shard_list(raw.get("shards"), _join(path, "shards"))
        directory_path = _join(path, "directory")
        directory = ""
        if raw.get("directory") is None:
            name = DIRECTORY_PREFIX + rule.name
            if len(name) > MAX_NAME_BYTES:
                self.problem(directory_path, f"required: the default name {name!r} is longer "
                                             f"than {MAX_NAME_BYTES} bytes; name the directory "
                                             "table")
            else:
                directory = sql_name(TableName("public", name))
        else:
            table = self.table_name(raw["directory"], directory_path)
            if table is not None:
                directory = sql_name(table)
        if directory:
            other = self.directories.setdefault(directory, path)
            if other != path:
                self.problem(directory_path, f"{directory} is also the directory of {other}; "
                                             "each lookup rule needs its own")
        new_keys = LEAST_LOADED
        new_keys_path = _join(path, "new_keys")
        given = raw.get("new_keys")
        if isinstance(given, str) and given.strip() == LEAST_LOADED:
            pass
        elif given is not None:
            shard = self.shard(given, new_keys_path, f"write {LEAST_LOADED} or a shard name")
            if shard is not None and shards and shard not in shards:
                self.problem(new_keys_path, f"{shard} is not one of the rule's shards "
                                            f"({', '.join(shards)}); add it to shards or "
                                            "choose one of them")
            elif shard is not None:
                new_keys = shard
        return Rule(rule.name, rule.kind, rule.key_type, rule.column, rule.tables, shards,
                    directory=directory, new_keys=new_keys)

    # -- shards and reference tables ----------------------------------------------------

    def shard(self, raw: object, path: str, instead: str = "") -> str | None:
        """A shard name; None (reported) when it is not one of the shards."""
        if not isinstance(raw, str):
            self.problem(path, f"expected a shard name, got {_describe(raw)}")
            return None
        name = str(raw).strip()
        if self.shards and name not in self.shards:
            hint = _did_you_mean(name.lower(), self.shards) + (f"; {instead}" if instead else "")
            self.problem(path, f"unknown shard {name!r} (the shards are "
                               f"{', '.join(self.shards)}){hint}")
            return None
        return name

    def shard_list(self, raw: object, path: str) -> tuple[str, ...]:
        """A rule's `shards`: all shards when absent."""
        if raw is None:
            return tuple(self.shards)
        if not isinstance(raw, list):
            self.problem(path, f"expected a list of shard names, got {_describe(raw)}")
            return ()
        if not raw:
            self.problem(path, "must list at least one shard (or leave shards out to use all "
                               "of them)")
            return ()
        names: list[str] = []
        for i, item in enumerate(raw):
            shard = self.shard(item, f"{path}[{i}]")
            if shard is None:
                continue
            if shard in names:
                self.problem(f"{path}[{i}]", f"{shard} is listed twice; list each shard once")
                continue
            names.append(shard)
        return tuple(names)

    def reference(self, raw: object) -> set[TableName]:
        path = "sharding.reference"
        if raw is None:
            return set()
        if not isinstance(raw, list):
            self.problem(path, f"expected a list of table names, got {_describe(raw)}")
            return set()
        tables: set[TableName] = set()
        for i, entry in enumerate(raw):
            table = self.table_name(entry, f"{path}[{i}]")
            if table is not None and self.claim(table, f"{path}[{i}]", path):
                tables.add(table)
        return tables


# --- helpers -----------------------------------------------------------------------------


def _join(path: str, key: object) -> str:
    return f"{path}.{_shown(key)}"


def _shown(value: object, none: str = "") -> str:
    """A YAML scalar as an operator would have written it."""
    match value:
        case None:
            return none
        case bool():
            return str(value).lower()
        case datetime.datetime():
            return value.isoformat(sep=" ")
        case _:
            return str(value)


def _describe(value: object) -> str:
    match value:
        case None:
            return "nothing"
        case bool():
            return f"a boolean ({_shown(value)})"
        case int():
            return f"an integer ({value})"
        case float():
            return f"a number ({value})"
        case str():
            return f"a string ({value!r})"
        case list():
            return "a list"
        case dict():
            return "a mapping"
        case datetime.datetime():
            return f"a timestamp ({_shown(value)})"
        case datetime.date():
            return f"a date ({value})"
        case _:
            return f"a {type(value).__name__}"


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _unique(names: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def _tail(path: str) -> str:
    """`ranges[0]` of `sharding.rules.r.ranges[0]`."""
    return path.rpartition(".")[2]


def _index(path: str) -> int:
    return int(path.rpartition("[")[2].rstrip("]"))


def _interval(r: _Range) -> str:
    return f"[{r.shown[0]}, {r.shown[1]})"
