"""The `sharding:` section: YAML into a `ShardMap`, every problem with its key path."""

from __future__ import annotations

import datetime
import doctest
import hashlib
import re
import textwrap
import uuid
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from shardwire.config import Config, ConfigError, parse_config
from shardwire.config import sharding as sharding_module
from shardwire.config.settings import SECTIONS
from shardwire.config.sharding import parse_identifier, parse_key, parse_table_name, sql_name
from shardwire.router.shardmap import (
    KeyType,
    RangeBound,
    Rule,
    RuleKind,
    ShardMap,
    TableName,
    TableRule,
    hash_key,
)

ROOT = Path(__file__).resolve().parents[2]
UTC = datetime.UTC

BASE = """\
database: app
auth: {method: trust}
users: {app: }
shards:
  s1: {primary: "postgresql://postgres@127.0.0.1:5433/app"}
  s2: {primary: "postgresql://postgres@127.0.0.1:5434/app"}
  s3: {primary: "postgresql://postgres@127.0.0.1:5435/app"}
default_shard: s1
catalog: "postgresql://postgres@127.0.0.1:5433/catalog"
"""


def load(sharding: str, base: str = BASE, env: dict[str, str] | None = None) -> Config:
    return parse_config(base + textwrap.dedent(sharding), env=env or {})


def shard_map(sharding: str) -> ShardMap:
    return load(sharding).sharding


def problems(sharding: str, base: str = BASE, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(sharding, base, env)
    return info.value.problems


def only_problem(sharding: str, base: str = BASE) -> str:
    found = problems(sharding, base)
    assert len(found) == 1, found
    return found[0]


def one_rule(**fields: Any) -> str:
    """A `sharding` section with the rule `r`: a tenant rule on `orders` unless changed
    (a field set to ... is left out)."""
    rule: dict[str, Any] = {"kind": "tenant", "column": "tenant_id", "tables": ["orders"],
                            "default": "s1"}
    rule.update(fields)
    rule = {key: value for key, value in rule.items() if value is not ...}
    return yaml.safe_dump({"sharding": {"rules": {"r": rule}}}, sort_keys=False)


def t(name: str, schema: str = "public") -> TableName:
    return TableName(schema, name)


FULL = """
sharding:
  rules:
    by_tenant:
      kind: tenant
      column: Tenant_ID
      tables:
        - Tenants: {column: id}
        - orders
        - public.order_items
      tenants: {1: s1, 2: s2, "42": s3}
      default: s1
    by_line:
      kind: category
      column: category
      type: text
      tables: [products]
      values: {books: s2, music: s3, games: s3}
    by_time:
      kind: range
      column: created_at
      type: timestamptz
      tables: [events]
      ranges:
        - {to: "2026-01-01", shard: s2}
        - {from: 2026-01-01, to: "2026-07-01 00:00+02:00", shard: s3}
        - {from: "2026-07-01", shard: s2}
    by_user:
      kind: lookup
      column: user_id
      tables: [users, user_sessions]
      new_keys: s3
      shards: [s2, s3]
    by_hash:
      kind: hash
      column: id
      type: uuid
      tables: ['"WebSessions"']
      shards: [s3, s1]
  reference: [countries, Public.Currencies]
"""


# --- valid maps ----------------------------------------------------------------------------


def test_every_rule_kind_becomes_the_right_rule() -> None:
    m = shard_map(FULL)
    assert m.shards == ("s1", "s2", "s3") and m.default_shard == "s1"
    assert m.reference == frozenset({t("countries"), t("currencies")})
    assert list(m.rules) == ["by_tenant", "by_line", "by_time", "by_user", "by_hash"]
    assert m.rules["by_tenant"] == Rule(
        "by_tenant", RuleKind.TENANT, KeyType.INTEGER, "tenant_id",
        {t("tenants"): "id", t("orders"): "tenant_id", t("order_items"): "tenant_id"},
        ("s1", "s2", "s3"), values={1: "s1", 2: "s2", 42: "s3"}, default="s1",
    )
    assert m.rules["by_line"] == Rule(
        "by_line", RuleKind.CATEGORY, KeyType.TEXT, "category", {t("products"): "category"},
        ("s2", "s3"), values={"books": "s2", "music": "s3", "games": "s3"},
    )
    jan, jun_30_22h, jul = (datetime.datetime(2026, 1, 1, tzinfo=UTC),
                            datetime.datetime(2026, 6, 30, 22, tzinfo=UTC),
                            datetime.datetime(2026, 7, 1, tzinfo=UTC))
    assert m.rules["by_time"] == Rule(
        "by_time", RuleKind.RANGE, KeyType.TIMESTAMPTZ, "created_at",
        {t("events"): "created_at"}, ("s2", "s3"),
        ranges=(RangeBound(None, jan, "s2"), RangeBound(jan, jun_30_22h, "s3"),
                RangeBound(jul, None, "s2")),
    )
    assert m.rules["by_user"] == Rule(
        "by_user", RuleKind.LOOKUP, KeyType.INTEGER, "user_id",
        {t("users"): "user_id", t("user_sessions"): "user_id"}, ("s2", "s3"),
        directory="public.shardwire_directory_by_user", new_keys="s3",
    )
    assert m.rules["by_hash"] == Rule(
        "by_hash", RuleKind.HASH, KeyType.UUID, "id", {t("WebSessions"): "id"}, ("s3", "s1"),
    )


def test_tables_are_found_by_their_folded_name() -> None:
    m = shard_map(FULL)
    assert m.table(t("tenants")) == TableRule(m.rules["by_tenant"], "id")
    assert m.table(t("order_items")) == TableRule(m.rules["by_tenant"], "tenant_id")
    assert m.table(t("currencies")) == TableRule(None, reference=True)
    assert m.table(t("websessions")) is None  # unquoted would fold: a different table
    assert m.table(t("orders", "sales")) is None  # another schema: unsharded
    assert m.sharded


def test_without_a_sharding_section_every_table_is_on_the_default_shard() -> None:
    for text in ("", "sharding:\n", "sharding: {}\n", "sharding: {rules: {}, reference: []}\n"):
        m = load(text).sharding
        assert m == ShardMap(("s1", "s2", "s3"), "s1"), text
        assert not m.sharded and m.table(t("orders")) is None


def test_a_config_made_by_hand_gets_an_empty_map() -> None:
    config = Config(database="app", shards={}, default_shard="s1", users={})
    assert config.sharding == ShardMap((), "s1")


def test_the_same_file_gives_an_equal_map_and_a_change_does_not() -> None:
    # RELOAD compares maps to tell whether routing changed.
    assert shard_map(FULL) == shard_map(FULL)
    assert shard_map(FULL) != shard_map(FULL.replace("42\": s3", "42\": s2"))


def test_default_directory_and_least_loaded() -> None:
    rule = shard_map(one_rule(kind="lookup", default=...)).rules["r"]
    assert (rule.directory, rule.new_keys, rule.shards) == (
        "public.shardwire_directory_r", "least_loaded", ("s1", "s2", "s3"))


def test_a_named_directory_is_kept_as_sql() -> None:
    rule = shard_map(one_rule(kind="lookup", default=..., directory='Dir."By User"')).rules["r"]
    assert rule.directory == 'dir."By User"'


def test_a_category_rule_may_have_only_a_default() -> None:
    rule = shard_map(one_rule(kind="category", type="text", default="s2")).rules["r"]
    assert (rule.values, rule.default, rule.shards) == ({}, "s2", ("s2",))
    assert rule.shard_for("anything") == "s2"


def test_rule_shards_follow_the_config_order() -> None:
    rule = shard_map(one_rule(tenants={5: "s3", 6: "s2", 7: "s3"}, default="s1")).rules["r"]
    assert rule.shards == ("s3", "s2", "s1")


# --- read_your_writes (docs/operations.md, "Reading your own writes") ------------------------

# One rule of each kind, as one_rule's fields (every kind routes by a key, so every kind takes
# read_your_writes).
EACH_KIND = {
    "tenant": {},
    "category": {"kind": "category", "type": "text", "values": {"books": "s2"}},
    "range": {"kind": "range", "default": ..., "ranges": [{"from": 1, "shard": "s2"}]},
    "lookup": {"kind": "lookup", "default": ...},
    "hash": {"kind": "hash", "default": ..., "shards": ["s2", "s3"]},
}


@pytest.mark.parametrize("kind", EACH_KIND)
def test_every_kind_of_rule_takes_its_own_read_your_writes(kind: str) -> None:
    rule = shard_map(one_rule(**EACH_KIND[kind], read_your_writes=2.5)).rules["r"]
    assert (rule.kind.value, rule.read_your_writes) == (kind, 2.5)
    # The rest of the rule is what it is without the option.
    assert rule == replace(shard_map(one_rule(**EACH_KIND[kind])).rules["r"],
                           read_your_writes=2.5)


def test_read_your_writes_left_out_means_the_global_option() -> None:
    assert shard_map(one_rule()).rules["r"].read_your_writes is None
    assert shard_map(one_rule(read_your_writes=None)).rules["r"].read_your_writes is None


def test_read_your_writes_zero_and_whole_seconds() -> None:
    zero = shard_map(one_rule(read_your_writes=0)).rules["r"].read_your_writes
    assert zero == 0.0 and zero is not None  # 0: this rule's reads never wait for the primary
    three = shard_map(one_rule(read_your_writes=3)).rules["r"].read_your_writes
    assert (three, type(three)) == (3.0, float)


def test_a_changed_read_your_writes_changes_the_map() -> None:
    # RELOAD compares maps: a new value must count as a change so that it is applied.
    assert shard_map(one_rule(read_your_writes=1)) == shard_map(one_rule(read_your_writes=1))
    assert shard_map(one_rule(read_your_writes=1)) != shard_map(one_rule(read_your_writes=2))
    assert shard_map(one_rule(read_your_writes=1)) != shard_map(one_rule())


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (-1, "must be a finite number of seconds, at least 0 (0 sends this rule's reads to "
             "replicas even right after a write), got -1"),
        (-0.5, "must be a finite number of seconds, at least 0 (0 sends this rule's reads to "
               "replicas even right after a write), got -0.5"),
        (float("inf"), "must be a finite number of seconds, at least 0 (0 sends this rule's "
                       "reads to replicas even right after a write), got inf"),
        (float("nan"), "must be a finite number of seconds, at least 0 (0 sends this rule's "
                       "reads to replicas even right after a write), got nan"),
        ("2", "expected a number of seconds, got a string ('2')"),
        (True, "expected a number of seconds, got a boolean (true)"),
        ([2], "expected a number of seconds, got a list"),
        ({"seconds": 2}, "expected a number of seconds, got a mapping"),
    ],
)
def test_read_your_writes_problems(value: object, expected: str) -> None:
    assert only_problem(one_rule(read_your_writes=value)) == (
        f"sharding.rules.r.read_your_writes: {expected}")


def test_a_wrong_read_your_writes_is_reported_with_the_rest_of_the_rule() -> None:
    found = problems(one_rule(kind="range", default=..., read_your_writes=-2))
    assert found == [
        "sharding.rules.r.read_your_writes: must be a finite number of seconds, at least 0 (0 "
        "sends this rule's reads to replicas even right after a write), got -2",
        "sharding.rules.r.ranges: required: at least one range, as in "
        "[{from: 1, to: 1000, shard: s1}]",
    ]


def test_the_operations_guide_example_of_a_rules_read_your_writes_loads() -> None:
    docs = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    section = docs[docs.index("**Reading your own writes.**"):]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block is not None
    config = parse_config(BASE + block.group(1), env={})
    assert config.replicas.read_your_writes == 0
    assert config.sharding.rules["by_account"].read_your_writes == 2


def test_read_your_writes_is_a_rule_key_not_a_table_key() -> None:
    text = one_rule(tables=[{"orders": {"column": "tenant_id", "read_your_writes": 1}}])
    assert only_problem(text) == (
        "sharding.rules.r.tables[0].orders.read_your_writes: unknown key (allowed: column)")


# --- shard_for and shards_between --------------------------------------------------------


def test_tenant_and_category_lookups() -> None:
    m = shard_map(FULL)
    tenant, line = m.rules["by_tenant"], m.rules["by_line"]
    assert [tenant.shard_for(k) for k in (1, 2, 42, 7)] == ["s1", "s2", "s3", "s1"]
    assert [line.shard_for(k) for k in ("books", "games", "Books", "toys")] == [
        "s2", "s3", None, None]  # no default: an unlisted value has no shard


RANGES = """
sharding:
  rules:
    r:
      kind: range
      column: k
      tables: [t]
      ranges:
        - {to: 100, shard: s1}
        - {from: 100, to: 200, shard: s2}
        - {from: 300, shard: s3}       # 200 <= k < 300 is a gap
"""


@pytest.mark.parametrize(
    ("key", "shard"),
    [(-10**18, "s1"), (99, "s1"), (100, "s2"), (199, "s2"), (200, None), (299, None),
     (300, "s3"), (10**18, "s3")],
)
def test_range_shard_for(key: int, shard: str | None) -> None:
    assert shard_map(RANGES).rules["r"].shard_for(key) == shard


@pytest.mark.parametrize(
    ("lower", "lower_inclusive", "upper", "upper_inclusive", "shards"),
    [
        (None, True, None, True, {"s1", "s2", "s3"}),
        (None, True, 50, True, {"s1"}),
        (99, True, 100, False, {"s1"}),      # k < 100: the upper bound excludes s2
        (99, True, 100, True, {"s1", "s2"}),  # k <= 100 reaches s2's first key
        (100, True, 100, True, {"s2"}),
        (150, True, 350, False, {"s2", "s3"}),
        (200, True, 300, False, set()),      # inside the gap
        (200, True, 300, True, {"s3"}),
        (199, False, 250, True, {"s2"}),     # 199 < k: conservative, s2 may still be asked
        (500, True, None, True, {"s3"}),
    ],
)
def test_range_shards_between(lower: int | None, lower_inclusive: bool, upper: int | None,
                              upper_inclusive: bool, shards: set[str]) -> None:
    rule = shard_map(RANGES).rules["r"]
    assert rule.shards_between(lower, lower_inclusive, upper, upper_inclusive) == shards


def test_shards_between_says_nothing_for_other_kinds() -> None:
    m = shard_map(FULL)
    assert m.rules["by_tenant"].shards_between(1, True, 5, True) is None
    assert m.rules["by_hash"].shards_between(None, True, None, True) is None


def test_timestamptz_ranges_compare_instants() -> None:
    rule = shard_map(FULL).rules["by_time"]
    plus2 = datetime.timezone(datetime.timedelta(hours=2))
    # 01:00 at +02:00 is still 2025 in UTC
    assert rule.shard_for(datetime.datetime(2026, 1, 1, 1, tzinfo=plus2)) == "s2"
    assert rule.shard_for(datetime.datetime(2026, 1, 1, 2, tzinfo=plus2)) == "s3"
    # the second range ends at 2026-07-01 00:00+02, a gap of two hours before the third
    assert rule.shard_for(datetime.datetime(2026, 6, 30, 21, 59, tzinfo=UTC)) == "s3"
    assert rule.shard_for(datetime.datetime(2026, 6, 30, 23, tzinfo=UTC)) is None
    assert rule.shard_for(datetime.datetime(2026, 7, 1, tzinfo=UTC)) == "s2"


def test_a_lookup_rule_leaves_keys_to_its_directory() -> None:
    assert shard_map(FULL).rules["by_user"].shard_for(1) is None


# --- hashing -----------------------------------------------------------------------------

# Computed once. A change here moves rows of every hash rule to other shards: it needs a
# migration, not a test update.
PINNED_HASHES = [
    (0, 9523843951405948789),
    (42, 6319743179241711738),
    (-7, 7251330064161976088),
    (2**62, 2661270477536733339),
    ("books", 8296214102728060544),
    ("Müller", 11917621583605588671),
    ("", 16476032584258269876),
    (Decimal("1.50"), 8796813392969411893),
    (Decimal("100"), 18202925246650630366),
    (datetime.date(2026, 1, 1), 14468321339489931496),
    (datetime.datetime(2026, 1, 1, 10, 0), 5701843195070805284),
    (datetime.datetime(2026, 1, 1, 10, 0, tzinfo=UTC), 15696043134796559880),
    (uuid.UUID("123e4567-e89b-12d3-a456-426614174000"), 4942290262562500205),
]


@pytest.mark.parametrize(("key", "expected"), PINNED_HASHES, ids=repr)
def test_hash_values_are_pinned(key: object, expected: int) -> None:
    assert hash_key(key) == expected


def test_the_hash_is_blake2b_with_an_8_byte_digest_of_the_canonical_text() -> None:
    # As docs/sharding.md describes it, so that it can be computed outside Shardwire.
    assert hash_key(42) == int.from_bytes(hashlib.blake2b(b"42", digest_size=8).digest(), "big")
    plus2 = datetime.timezone(datetime.timedelta(hours=2))
    assert hash_key(datetime.datetime(2026, 1, 1, 12, tzinfo=plus2)) == hash_key(
        datetime.datetime(2026, 1, 1, 10, tzinfo=UTC))
    assert hash_key(Decimal("1.5")) == hash_key(Decimal("1.500"))


def test_hash_rule_uses_the_listed_order() -> None:
    m = shard_map(one_rule(kind="hash", default=..., shards=["s3", "s1", "s2"]))
    rule = m.rules["r"]
    assert [rule.shard_for(k) for k, _ in PINNED_HASHES[:4]] == [
        ["s3", "s1", "s2"][h % 3] for _, h in PINNED_HASHES[:4]]
    assert rule.shard_for(42) == "s3"


# --- names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("orders", t("orders")),
        ("Orders", t("orders")),
        ("  orders ", t("orders")),
        ("Sales.Orders", t("orders", "sales")),
        ('"Orders"', t("Orders")),
        ('sales."Order Items"', t("Order Items", "sales")),
        ('"My Schema"."a.b"', t("a.b", "My Schema")),
        ('"say ""hi"""', t('say "hi"')),
        ("order$2", t("order$2")),
        ("_x1", t("_x1")),
        ("ÄPFEL", t("Äpfel")),  # PostgreSQL folds ASCII letters only
        ("x" * 63, t("x" * 63)),
    ],
)
def test_table_names_fold_like_postgresql(text: str, expected: TableName) -> None:
    assert parse_table_name(text) == expected
    assert parse_table_name(sql_name(expected)) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "the name is empty"),
        ("a.b.c", "'a.b.c' has too many parts: write schema.table or table"),
        ("1abc", "'1abc' is not a valid name: without double quotes"),
        ("order-items", "'order-items' is not a valid name"),
        ("my table", "'my table' is not a valid name"),
        ("$x", "'$x' is not a valid name"),
        ('"unclosed', "a quoted name is missing its closing '\"'"),
        ('""', "a quoted name must not be empty"),
        ("a.", "a name is missing after the last '.'"),
        (".a", "'' is not a valid name"),
        ('"a"b', "unexpected 'b' after the quoted name 'a'"),
        ("x" * 64, "is longer than 63 bytes"),
        ("ä" * 32, "is longer than 63 bytes"),
    ],
)
def test_invalid_table_names(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        parse_table_name(text)


def test_column_names() -> None:
    assert parse_identifier("Tenant_Id") == "tenant_id"
    assert parse_identifier('"TenantId"') == "TenantId"
    with pytest.raises(ValueError, match="is not one name"):
        parse_identifier("a.b")


def test_sql_name_quotes_only_what_needs_it() -> None:
    assert sql_name(t("orders")) == "public.orders"
    assert sql_name(t("Orders", "My Schema")) == '"My Schema"."Orders"'
    assert sql_name(t('a"b')) == 'public."a""b"'


def test_a_table_may_name_its_own_quoted_column() -> None:
    rule = shard_map(one_rule(tables=[{"Tenants": {"column": '"TenantID"'}}])).rules["r"]
    assert rule.tables == {t("tenants"): "TenantID"}


# --- key values --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "key_type", "expected"),
    [
        (42, KeyType.INTEGER, 42),
        ("42", KeyType.INTEGER, 42),
        (" -7 ", KeyType.INTEGER, -7),
        (3.0, KeyType.INTEGER, 3),
        (2**70, KeyType.INTEGER, 2**70),
        ("1.50", KeyType.NUMERIC, Decimal("1.50")),
        (0.1, KeyType.NUMERIC, Decimal("0.1")),
        (7, KeyType.NUMERIC, Decimal(7)),
        ("books", KeyType.TEXT, "books"),
        ("", KeyType.TEXT, ""),
        (datetime.date(2026, 1, 1), KeyType.DATE, datetime.date(2026, 1, 1)),
        ("2026-02-28", KeyType.DATE, datetime.date(2026, 2, 28)),
        (datetime.date(2026, 1, 1), KeyType.TIMESTAMP, datetime.datetime(2026, 1, 1)),
        ("2026-01-01 10:00", KeyType.TIMESTAMP, datetime.datetime(2026, 1, 1, 10)),
        ("2026-01-01T10:00:30.5", KeyType.TIMESTAMP,
         datetime.datetime(2026, 1, 1, 10, 0, 30, 500000)),
        (datetime.datetime(2026, 1, 1, 10), KeyType.TIMESTAMP, datetime.datetime(2026, 1, 1, 10)),
        ("2026-01-01", KeyType.TIMESTAMPTZ, datetime.datetime(2026, 1, 1, tzinfo=UTC)),
        ("2026-01-01 10:00", KeyType.TIMESTAMPTZ, datetime.datetime(2026, 1, 1, 10, tzinfo=UTC)),
        ("2026-01-01 10:00+02", KeyType.TIMESTAMPTZ, datetime.datetime(2026, 1, 1, 8, tzinfo=UTC)),
        ("2026-01-01T10:00:00Z", KeyType.TIMESTAMPTZ,
         datetime.datetime(2026, 1, 1, 10, tzinfo=UTC)),
        (datetime.date(2026, 1, 1), KeyType.TIMESTAMPTZ, datetime.datetime(2026, 1, 1, tzinfo=UTC)),
        ("123E4567-E89B-12D3-A456-426614174000", KeyType.UUID,
         uuid.UUID("123e4567-e89b-12d3-a456-426614174000")),
    ],
)
def test_key_values(raw: object, key_type: KeyType, expected: object) -> None:
    value = parse_key(raw, key_type)
    assert value == expected and type(value) is type(expected)
    if isinstance(value, datetime.datetime):
        assert value.tzinfo == expected.tzinfo  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("raw", "key_type", "message"),
    [
        ("abc", KeyType.INTEGER, "not an integer (the rule's type is integer)"),
        (1.5, KeyType.INTEGER, "not an integer (the rule's type is integer)"),
        ("1.0", KeyType.INTEGER, "not an integer (the rule's type is integer)"),
        (True, KeyType.INTEGER,
         "not an integer (the rule's type is integer): YAML read it as a boolean; quote it"),
        (datetime.date(2026, 1, 1), KeyType.INTEGER, "not an integer"),
        ("NaN", KeyType.NUMERIC, "not a finite number (the rule's type is numeric)"),
        ("1,5", KeyType.NUMERIC, "not a number (the rule's type is numeric)"),
        (10, KeyType.TEXT, "not text (the rule's type is text): YAML read it as an integer; "
                           "quote it"),
        (datetime.date(2026, 1, 1), KeyType.TEXT, "YAML read it as a date; quote it"),
        (False, KeyType.TEXT, "YAML read it as a boolean; quote it"),
        ("2026-02-30", KeyType.DATE, "not a date (the rule's type is date): day is out of range"),
        ("01/02/2026", KeyType.DATE, "not a date (the rule's type is date); write YYYY-MM-DD"),
        (datetime.datetime(2026, 1, 1, 10), KeyType.DATE, "it has a time of day"),
        ("yesterday", KeyType.TIMESTAMP, "not a timestamp (the rule's type is timestamp); "
                                         "write YYYY-MM-DD or YYYY-MM-DD HH:MM[:SS]"),
        ("2026-01-01 10:00+02", KeyType.TIMESTAMP,
         "has a time zone offset (the rule's type is timestamp), which has none"),
        ("not-a-uuid", KeyType.UUID, "not a uuid (the rule's type is uuid)"),
        (42, KeyType.UUID, "not a uuid"),
    ],
)
def test_invalid_key_values(raw: object, key_type: KeyType, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_key(raw, key_type)


def test_yaml_dates_and_quoted_dates_are_the_same_key() -> None:
    m = shard_map("""
        sharding:
          rules:
            r:
              kind: range
              column: day
              type: date
              tables: [t]
              ranges:
                - {from: 2026-01-01, to: "2026-02-01", shard: s1}
                - {from: "2026-02-01", to: 2026-03-01, shard: s2}
        """)
    assert m.rules["r"].ranges == (
        RangeBound(datetime.date(2026, 1, 1), datetime.date(2026, 2, 1), "s1"),
        RangeBound(datetime.date(2026, 2, 1), datetime.date(2026, 3, 1), "s2"),
    )


def test_category_values_of_every_yaml_spelling() -> None:
    rule = shard_map(one_rule(kind="category", type="text", default=...,
                              values={"no": "s1", "10": "s2"})).rules["r"]
    assert rule.values == {"no": "s1", "10": "s2"}  # safe_dump quotes them, as operators must
    text = "sharding: {rules: {r: {kind: category, type: text, column: c, tables: [t], " \
           "values: {no: s1, 10: s2}}}}\n"
    assert problems(text) == [
        "sharding.rules.r.values.false: not text (the rule's type is text): YAML read it as a "
        "boolean; quote it",
        "sharding.rules.r.values.10: not text (the rule's type is text): YAML read it as an "
        "integer; quote it",
    ]


def test_numeric_tenants_compare_by_value() -> None:
    rule = shard_map(one_rule(type="numeric", tenants={"1.50": "s2"})).rules["r"]
    assert rule.shard_for(Decimal("1.5")) == "s2"


# --- problems ----------------------------------------------------------------------------

KINDS = "tenant, category, range, lookup, hash"
TYPES = "integer, numeric, text, date, timestamp, timestamptz, uuid"
P = "sharding.rules.r"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"kind": "tennant"},
         f"{P}.kind: must be one of {KINDS}, got 'tennant'; did you mean 'tenant'?"),
        ({"kind": ...}, f"{P}.kind: required (what decides a key's shard: {KINDS})"),
        ({"kind": 3}, f"{P}.kind: must be one of {KINDS}, got an integer (3)"),
        ({"type": "bigint"},
         f"{P}.type: must be one of {TYPES}, got 'bigint'; for bigint write integer"),
        ({"type": "txt"}, f"{P}.type: must be one of {TYPES}, got 'txt'; did you mean 'text'?"),
        ({"column": ...}, f"{P}.column: required (the column that carries the key, in every "
                          "table that does not name its own)"),
        ({"column": "tenant id"}, f"{P}.column: not a valid column name: 'tenant id' is not a "
                                  "valid name: without double quotes a name is made of letters, "
                                  "digits, _ and $, not starting with a digit or $ (to keep "
                                  "other characters, quote it inside the YAML string: "
                                  "'\"tenant id\"')"),
        ({"tables": ...},
         f"{P}.tables: required: list the tables this rule distributes (at least one)"),
        ({"tables": []},
         f"{P}.tables: required: list the tables this rule distributes (at least one)"),
        ({"tables": "orders"}, f"{P}.tables: expected a list of table names, got a string "
                               "('orders')"),
        ({"tables": ["orders", "Public.ORDERS"]},
         f"{P}.tables[1]: public.orders is already listed at {P}.tables[0]; list each table "
         "once"),
        ({"tables": ["a.b.c"]}, f"{P}.tables[0]: not a valid table name: 'a.b.c' has too many "
                                "parts: write schema.table or table (quote a name that "
                                "contains a dot)"),
        ({"tables": [{"t": {"colum": "x"}}]},
         f"{P}.tables[0].t.colum: unknown key (allowed: column); did you mean 'column'?"),
        ({"tables": [{"a": None, "b": None}]},
         f"{P}.tables[0]: expected a table name, or one table with its settings as in "
         "'tenants: {column: id}'"),
        ({"tables": [12]}, f"{P}.tables[0]: expected a table name, got an integer (12)"),
        ({"tenants": {"1": "s4"}},
         f"{P}.tenants.1: unknown shard 's4' (the shards are s1, s2, s3)"),
        ({"tenants": {"abc": "s1"}},
         f"{P}.tenants.abc: not an integer (the rule's type is integer)"),
        ({"tenants": {1: "s1", "01": "s2"}},
         f"{P}.tenants.01: the same tenant as tenants.1; list each tenant once"),
        ({"tenants": ["s1"]}, f"{P}.tenants: expected a mapping of tenant to shard, as in "
                              "{1: s1, 2: s2}, got a list"),
        ({"default": ...}, f"{P}.default: required for a tenant rule (the shard of tenants "
                           "not listed under tenants)"),
        ({"default": "S1"}, f"{P}.default: unknown shard 'S1' (the shards are s1, s2, s3); "
                           "did you mean 's1'?"),
        ({"values": {"a": "s1"}}, f"{P}.values: unknown key for a tenant rule (allowed: kind, "
                                  "column, type, tables, tenants, default, read_your_writes); "
                                  "values is for category rules"),
        ({"tenant": {1: "s1"}}, f"{P}.tenant: unknown key for a tenant rule (allowed: kind, "
                                "column, type, tables, tenants, default, read_your_writes); did "
                                "you mean 'tenants'?"),
        ({"read_your_write": 1}, f"{P}.read_your_write: unknown key for a tenant rule (allowed: "
                                 "kind, column, type, tables, tenants, default, "
                                 "read_your_writes); did you mean 'read_your_writes'?"),
        ({"kind": "category", "default": ...},
         f"{P}.values: required: map values to shards (as in {{books: s1}}), or give a default"),
        ({"kind": "lookup", "default": ..., "new_keys": "s9"},
         f"{P}.new_keys: unknown shard 's9' (the shards are s1, s2, s3); write "
         "least_loaded or a shard name"),
        ({"kind": "lookup", "default": ..., "new_keys": "s3", "shards": ["s1", "s2"]},
         f"{P}.new_keys: s3 is not one of the rule's shards (s1, s2); add it to shards or "
         "choose one of them"),
        ({"kind": "lookup", "default": ..., "directory": "a b"},
         f"{P}.directory: not a valid table name: 'a b' is not a valid name: without double "
         "quotes a name is made of letters, digits, _ and $, not starting with a digit or $ (to "
         "keep other characters, quote it inside the YAML string: '\"a b\"')"),
        ({"kind": "hash", "default": ..., "shards": []},
         f"{P}.shards: must list at least one shard (or leave shards out to use all of them)"),
        ({"kind": "hash", "default": ..., "shards": ["s1", "s2", "s1"]},
         f"{P}.shards[2]: s1 is listed twice; list each shard once"),
        ({"kind": "hash", "default": ..., "shards": "s1"},
         f"{P}.shards: expected a list of shard names, got a string ('s1')"),
        ({"kind": "hash", "default": ..., "shards": ["s1", 2]},
         f"{P}.shards[1]: expected a shard name, got an integer (2)"),
        ({"kind": "range", "default": ...},
         f"{P}.ranges: required: at least one range, as in [{{from: 1, to: 1000, shard: s1}}]"),
    ],
    ids=lambda v: "" if isinstance(v, str) else str(v),
)
def test_a_rule_problem_names_its_key_path(fields: dict[str, Any], expected: str) -> None:
    assert only_problem(one_rule(**fields)) == expected


def range_rule(*ranges: str, key_type: str = "date") -> str:
    lines = "\n".join(f"        - {r}" for r in ranges)
    return f"""
sharding:
  rules:
    by_time:
      kind: range
      column: day
      type: {key_type}
      tables: [events]
      ranges:
{lines}
"""


R = "sharding.rules.by_time.ranges"


@pytest.mark.parametrize(
    ("ranges", "expected"),
    [
        (["{to: 2026-02-01, shard: s1}", "{from: 2026-01-01, shard: s2}"],
         f"{R}[1]: overlaps ranges[0] ([.., 2026-02-01) and [2026-01-01, ..)); ranges must not "
         "overlap"),
        (["{from: 2026-01-01, to: 2026-12-31, shard: s1}",
          "{from: 2026-03-01, to: 2026-04-01, shard: s2}"],
         f"{R}[1]: overlaps ranges[0] ([2026-01-01, 2026-12-31) and [2026-03-01, 2026-04-01)); "
         "ranges must not overlap"),
        (["{from: 2026-01-01, to: 2026-02-01, shard: s1}",
          "{from: 2026-01-01, to: 2026-03-01, shard: s2}"],
         f"{R}[1]: overlaps ranges[0] ([2026-01-01, 2026-02-01) and [2026-01-01, 2026-03-01)); "
         "ranges must not overlap"),
        (["{from: 2026-01-01, to: 2026-01-01, shard: s1}"],
         f"{R}[0]: from (2026-01-01) must be less than to (2026-01-01): a range holds "
         "from <= key < to"),
        (["{from: 2026-01-01, to: 2026-02-01, shard: s1}", "{to: 2026-03-01, shard: s2}"],
         f"{R}[1].from: required: only the first range may leave out from (an open end)"),
        (["{from: 2026-01-01, shard: s1}", "{from: 2026-03-01, to: 2026-04-01, shard: s2}"],
         f"{R}[0].to: required: only the last range may leave out to (an open end)"),
        (["{from: 2026-01-01, to: 2026-02-01}"],
         f"{R}[0].shard: required (the shard that holds keys in this range)"),
        (["{from: 2026-01-01, to: 2026-02-01, shard: s7}"],
         f"{R}[0].shard: unknown shard 's7' (the shards are s1, s2, s3)"),
        (["{from: 2026-01-01, to: 2026-02-01, shard: s1, to_: 3}"],
         f"{R}[0].to_: unknown key (allowed: from, to, shard); did you mean 'to'?"),
        (["{from: 2026-01-01, to: 13/01/2026, shard: s1}"],
         f"{R}[0].to: not a date (the rule's type is date); write YYYY-MM-DD"),
        (["[2026-01-01, 2026-02-01, s1]"],
         f"{R}[0]: expected a mapping such as {{from: 1, to: 1000, shard: s1}}, got a list"),
    ],
)
def test_range_problems(ranges: list[str], expected: str) -> None:
    assert only_problem(range_rule(*ranges)) == expected


def test_unsorted_ranges_say_to_sort_them() -> None:
    assert problems(range_rule("{from: 2026-03-01, to: 2026-04-01, shard: s1}",
                               "{from: 2026-01-01, to: 2026-02-01, shard: s2}")) == [
        f"{R}[1]: comes before ranges[0] (from 2026-01-01 < 2026-03-01); sort the ranges by "
        "from",
    ]


def test_a_range_inside_another_is_an_overlap_even_when_not_adjacent() -> None:
    assert problems(range_rule("{to: 2026-12-01, shard: s1}",
                               "{from: 2026-02-01, to: 2026-03-01, shard: s2}",
                               "{from: 2026-04-01, to: 2026-05-01, shard: s3}")) == [
        f"{R}[1]: overlaps ranges[0] ([.., 2026-12-01) and [2026-02-01, 2026-03-01)); ranges "
        "must not overlap",
        f"{R}[2]: overlaps ranges[0] ([.., 2026-12-01) and [2026-04-01, 2026-05-01)); ranges "
        "must not overlap",
    ]


def test_gaps_between_ranges_are_allowed() -> None:
    m = shard_map(range_rule("{to: 2026-01-01, shard: s1}",
                             "{from: 2026-06-01, shard: s2}"))
    assert m.rules["by_time"].shard_for(datetime.date(2026, 3, 1)) is None


def test_a_timestamp_range_bound_with_an_offset() -> None:
    assert only_problem(range_rule('{from: "2026-01-01 00:00+02", shard: s1}',
                                   key_type="timestamp")) == (
        f"{R}[0].from: has a time zone offset (the rule's type is timestamp), which has none: "
        "leave the offset out, or make the rule's type timestamptz"
    )


def test_a_table_in_two_rules_names_both_paths() -> None:
    text = """
    sharding:
      rules:
        a: {kind: hash, column: id, tables: [x, orders]}
        b: {kind: hash, column: id, tables: [Orders]}
    """
    assert only_problem(text) == (
        "sharding.rules.b.tables[0]: public.orders is also in sharding.rules.a.tables[1]; a "
        "table follows one rule: remove it from one of them"
    )


def test_a_table_in_a_rule_and_in_reference() -> None:
    text = """
    sharding:
      rules:
        a: {kind: hash, column: id, tables: [orders]}
      reference: [countries, public.orders, Countries]
    """
    assert problems(text) == [
        "sharding.reference[1]: public.orders is also in sharding.rules.a.tables[0]; a "
        "reference table is copied to every shard and cannot follow a rule: remove it from one "
        "list",
        "sharding.reference[2]: public.countries is already listed at sharding.reference[0]; "
        "list each table once",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sharding: [a]\n", "sharding: expected a mapping (rules, reference), got a list"),
        ("sharding: {rulez: {}}\n",
         "sharding.rulez: unknown key (allowed: rules, reference); did you mean 'rules'?"),
        ("sharding: {rules: [a]}\n",
         "sharding.rules: expected a mapping of rule name to rule, got a list"),
        ("sharding: {rules: {By-Tenant: {}}}\n",
         "sharding.rules: rule name 'By-Tenant' must be made of lower case letters, digits and "
         "_, not starting with a digit"),
        ("sharding: {rules: {r: hash}}\n",
         "sharding.rules.r: expected a mapping (kind, column, type, tables, ...), got a string "
         "('hash')"),
        ("sharding: {reference: countries}\n",
         "sharding.reference: expected a list of table names, got a string ('countries')"),
        ("sharding: {reference: ['bad name']}\n",
         "sharding.reference[0]: not a valid table name: 'bad name' is not a valid name: "
         "without double quotes a name is made of letters, digits, _ and $, not starting with "
         "a digit or $ (to keep other characters, quote it inside the YAML string: "
         "'\"bad name\"')"),
    ],
)
def test_section_problems(text: str, expected: str) -> None:
    assert only_problem(text) == expected


def test_two_lookup_rules_need_two_directories() -> None:
    text = """
    sharding:
      rules:
        a: {kind: lookup, column: id, tables: [x], directory: dir}
        b: {kind: lookup, column: id, tables: [y], directory: public.DIR}
    """
    assert only_problem(text) == (
        "sharding.rules.b.directory: public.dir is also the directory of sharding.rules.a; "
        "each lookup rule needs its own"
    )


def test_a_default_directory_name_too_long_for_postgresql() -> None:
    name = "r" * 44
    text = f"sharding: {{rules: {{{name}: {{kind: lookup, column: id, tables: [x]}}}}}}\n"
    assert only_problem(text) == (
        f"sharding.rules.{name}.directory: required: the default name "
        f"'shardwire_directory_{name}' is longer than 63 bytes; name the directory table"
    )


def test_a_lookup_rule_needs_the_catalog() -> None:
    base = BASE.replace('catalog: "postgresql://postgres@127.0.0.1:5433/catalog"\n', "")
    assert only_problem(one_rule(kind="lookup", default=...), base) == (
        "catalog: required by the lookup rule sharding.rules.r (its directory is a table in the "
        "catalog database)"
    )


def test_every_problem_is_reported_at_once() -> None:
    text = """
    sharding:
      rules:
        by_tenant:
          kind: tenant
          column: tenant_id
          type: integer
          tables: [orders]
          tenants: {abc: s1, 2: s9}
        by_line:
          kind: categori
          column: category
          tables: [orders]
      reference: [currencies]
    """
    assert problems(text) == [
        "sharding.rules.by_tenant.tenants.abc: not an integer (the rule's type is integer)",
        "sharding.rules.by_tenant.tenants.2: unknown shard 's9' (the shards are s1, s2, s3)",
        "sharding.rules.by_tenant.default: required for a tenant rule (the shard of tenants "
        "not listed under tenants)",
        f"sharding.rules.by_line.kind: must be one of {KINDS}, got 'categori'; did you mean "
        "'category'?",
        "sharding.rules.by_line.tables[0]: public.orders is also in "
        "sharding.rules.by_tenant.tables[0]; a table follows one rule: remove it from one of "
        "them",
    ]


def test_shard_names_are_not_checked_when_the_shards_are_missing() -> None:
    base = "database: app\nauth: {method: trust}\nusers: {app: }\ndefault_shard: s1\n"
    assert problems(one_rule(), base) == [
        "shards: at least one is required (a mapping of shard name to servers)"]


def test_an_unset_variable_in_the_map_is_reported_once() -> None:
    assert problems(one_rule(default="${DEFAULT_SHARD}")) == [
        f"{P}.default: environment variable DEFAULT_SHARD is not set"]
    rule = load(one_rule(default="${DEFAULT_SHARD}"), env={"DEFAULT_SHARD": "s2"}).sharding
    assert rule.rules["r"].default == "s2"


# --- examples and docs -------------------------------------------------------------------


def test_the_sharded_example_loads() -> None:
    env = {"APP_PASSWORD": "app", "OPS_PASSWORD": "ops", "PG_PASSWORD": "pg"}
    path = ROOT / "examples" / "sharded.yaml"
    config = parse_config(path.read_text(), path=path, env=env)
    m = config.sharding
    assert {rule.kind for rule in m.rules.values()} == set(RuleKind)
    assert m.reference and m.default_shard in m.shards


def test_the_docs_name_every_kind_and_type() -> None:
    docs = (ROOT / "docs" / "sharding.md").read_text(encoding="utf-8")
    for word in (*(f"`{k.value}`" for k in RuleKind), *(f"`{k.value}`" for k in KeyType)):
        assert word in docs, word


def test_configuration_docs_list_every_section_and_its_reloadability() -> None:
    docs = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    for section in SECTIONS:
        row = f"| `{section.path}` | {'yes' if section.reloadable else 'no'} |"
        assert row in docs, row


def test_doctests() -> None:
    assert doctest.testmod(sharding_module).failed == 0


def test_the_docs_yaml_examples_load() -> None:
    docs = (ROOT / "docs" / "sharding.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", docs, re.S)
    assert len(blocks) >= 6
    for block in blocks:
        if block.startswith("shards:"):  # a whole file but for users and database
            text = "database: app\nauth: {method: trust}\nusers: {app: }\n" + block
        else:  # one rule
            text = BASE + "sharding:\n  rules:\n" + textwrap.indent(block, "    ")
        assert parse_config(text, env={}).sharding.rules, block
