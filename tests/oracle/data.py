"""The oracle's data: the shard map, the tables, seeded rows, and where each row goes.

The same rows are loaded into one reference PostgreSQL (all of them) and into the shards (each
row on the shard the map puts its key on, reference tables on every shard). A query then has one
right answer: the reference server's.

What the map says (three shards; `default_shard` s1):

- `by_tenant`, tenant rule on integer `tenant_id` for `orders` and `order_items` (co-located):
  1 → s1, 2 → s2, 3 → s3, 4 → s3, 5 → s1, 9 → s3, every other tenant → s2. Tenant 1 holds about
  a third of all orders (skew); tenants 11 and 12 have a handful.
- `by_customer`, hash rule on integer `customer_id` for `customers`, over s1, s2, s3; ids run
  from -5 to 300.
- `by_category`, category rule on text `category` for `products`: books, games, Électronique →
  s1; music, toys, Books → s2; no default. s3 holds no product at all (an empty shard).
- `by_time`, range rule on timestamptz `created_at` for `events`: [.., 2025-01-01) → s1,
  [2025-01-01, 2025-07-01) → s2, [2025-07-01, 2026-01-01) → s3, a gap [2026-01-01, 2026-02-01)
  with no rows, [2026-02-01, ..) → s1. Rows sit on and right next to every boundary.
- `countries` is a reference table: a full copy on every shard.

The rows (TESTING idea 1): NULLs in most non-key columns on every shard, repeated values and
ties, negative numbers, numerics of one value written with different scales (1, 1.0, 1.00),
float columns whose sums depend on the order of addition, text in mixed case and outside ASCII,
empty strings, dates, timestamps with and without microseconds, booleans with NULLs. Group
values appear on several shards, and per-shard averages differ from the overall one.

Every table has a unique column (`UNIQUE_KEYS`), which the query generator appends to ORDER BY
when the order of the rows must be total.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import psycopg
import yaml

from shardwire.config.load import parse_config
from shardwire.router.shardmap import ShardMap
from shardwire.router.values import to_key
from shardwire.testing import PostgresCluster
from shardwire.testing.proxy import ProxyProcess

UTC = dt.UTC
DATABASE = "oracle"
SHARD_NAMES = ("s1", "s2", "s3")
# The rows never change with the query seed: a regression case found with any seed replays
# against the same data.
DATA_SEED = 20260101

SHARD_MAP: dict[str, Any] = {
    "rules": {
        "by_tenant": {
            "kind": "tenant", "column": "tenant_id", "type": "integer",
            "tables": ["orders", "order_items"],
            "tenants": {1: "s1", 2: "s2", 3: "s3", 4: "s3", 5: "s1", 9: "s3"},
            "default": "s2",
        },
        "by_customer": {
            "kind": "hash", "column": "customer_id", "type": "integer",
            "tables": ["customers"], "shards": list(SHARD_NAMES),
        },
        "by_category": {
            "kind": "category", "column": "category", "type": "text", "tables": ["products"],
            "values": {"books": "s1", "games": "s1", "Électronique": "s1",
                       "music": "s2", "toys": "s2", "Books": "s2"},
        },
        "by_time": {
            "kind": "range", "column": "created_at", "type": "timestamptz", "tables": ["events"],
            "ranges": [
                {"to": "2025-01-01", "shard": "s1"},
                {"from": "2025-01-01", "to": "2025-07-01", "shard": "s2"},
                {"from": "2025-07-01", "to": "2026-01-01", "shard": "s3"},
                {"from": "2026-02-01", "shard": "s1"},  # [2026-01-01, 2026-02-01) is a gap
            ],
        },
    },
    "reference": ["countries"],
}

# Boundaries of by_time, for the rows and for the query generator.
TIME_BOUNDARIES = tuple(dt.datetime(*ymd, tzinfo=UTC) for ymd in
                        ((2025, 1, 1), (2025, 7, 1), (2026, 1, 1), (2026, 2, 1)))
GAP = (TIME_BOUNDARIES[2], TIME_BOUNDARIES[3])


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    sql_type: str
    kind: str  # int, numeric, float, text, bool, date, ts: what the generator may do with it
    nullable: bool = True


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    key: str | None  # the sharding key column; None for the reference table
    unique: str  # a column unique over the whole table (on every shard together)

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)

    def ddl(self) -> str:
        cols = ", ".join(f"{c.name} {c.sql_type}{'' if c.nullable else ' NOT NULL'}"
                         for c in self.columns)
        return f"CREATE TABLE {self.name} ({cols})"


def _t(name: str, key: str | None, unique: str, *cols: tuple[str, str, str, bool]) -> Table:
    return Table(name, tuple(Column(*c) for c in cols), key, unique)


TABLES: dict[str, Table] = {t.name: t for t in (
    _t("countries", None, "code",
       ("code", "text", "text", False),
       ("name", "text", "text", False),
       ("region", "text", "text", True),
       ("eu", "boolean", "bool", True),
       ("population", "bigint", "int", True),
       ("gdp", "numeric", "numeric", True)),
    _t("customers", "customer_id", "customer_id",
       ("customer_id", "integer", "int", False),
       ("name", "text", "text", True),
       ("country", "text", "text", True),
       ("tier", "text", "text", True),
       ("signup", "date", "date", True),
       ("active", "boolean", "bool", True),
       ("credit", "numeric(12,2)", "numeric", True),
       ("score", "double precision", "float", True)),
    _t("orders", "tenant_id", "order_id",
       ("order_id", "bigint", "int", False),
       ("tenant_id", "integer", "int", False),
       ("customer_id", "integer", "int", True),
       ("status", "text", "text", True),
       ("amount", "numeric", "numeric", True),
       ("qty", "integer", "int", True),
       ("weight", "double precision", "float", True),
       ("created_at", "timestamptz", "ts", False),
       ("ship_date", "date", "date", True),
       ("express", "boolean", "bool", True),
       ("priority", "smallint", "int", True),
       ("note", "text", "text", True),
       ("country", "text", "text", True)),
    _t("order_items", "tenant_id", "item_id",
       ("item_id", "bigint", "int", False),
       ("order_id", "bigint", "int", False),
       ("tenant_id", "integer", "int", False),
       ("sku", "text", "text", True),
       ("qty", "integer", "int", False),
       ("unit_price", "numeric(10,2)", "numeric", True),
       ("discount", "numeric(4,3)", "numeric", True),
       ("gift", "boolean", "bool", False)),
    _t("products", "category", "sku",
       ("sku", "text", "text", False),
       ("category", "text", "text", False),
       ("name", "text", "text", True),
       ("price", "numeric(8,2)", "numeric", True),
       ("stock", "integer", "int", True),
       ("rating", "real", "float", True),
       ("discontinued", "boolean", "bool", False),
       ("added", "date", "date", True)),
    _t("events", "created_at", "event_id",
       ("event_id", "bigint", "int", False),
       ("created_at", "timestamptz", "ts", False),
       ("tenant_id", "integer", "int", True),
       ("kind", "text", "text", True),
       ("severity", "integer", "int", True),
       ("score", "double precision", "float", True),
       ("happened_on", "date", "date", True),
       ("ok", "boolean", "bool", True),
       ("payload", "text", "text", True),
       ("amount", "numeric", "numeric", True)),
)}

RULE_OF_TABLE = {"orders": "by_tenant", "order_items": "by_tenant", "customers": "by_customer",
                 "products": "by_category", "events": "by_time"}
REFERENCE_TABLES = ("countries",)

# Text that sorts differently by byte, by case and by accent; duplicates on purpose.
NOTES = ("Rush", "rush", "RUSH", "café", "Café", "CAFÉ", "naïve", "Ärger", "zebra", "Zebra",
         "日本", "", " ", "a_b%c", "O'Brien", "résumé", "ß", "Ω", "emoji 🙂", "zz")
STATUSES = ("new", "paid", "shipped", "cancelled", "Paid")
TENANT_WEIGHTS = (35, 15, 10, 8, 6, 6, 5, 5, 4, 3, 2, 1)  # tenants 1..12
CATEGORIES = ("books", "books", "books", "music", "games", "toys", "Books", "Électronique")
EVENT_KINDS = ("click", "view", "buy", "error", "Click")
SKUS = tuple(f"SKU-{i:04d}" for i in range(400))

COUNTRY_ROWS: tuple[tuple[Any, ...], ...] = (
    ("at", "Österreich", "Europe", True, 9_100_000, Decimal("477.08")),
    ("br", "Brasil", "Americas", False, 216_000_000, Decimal("2173.7")),
    ("ci", "Côte d'Ivoire", "Africa", False, 28_000_000, None),
    ("de", "Deutschland", "Europe", True, 84_000_000, Decimal("4456.08")),
    ("es", "España", "Europe", True, 48_000_000, Decimal("1580")),
    ("fr", "France", "Europe", True, 68_000_000, Decimal("3030.90")),
    ("is", "Ísland", "Europe", False, 380_000, Decimal("31.0")),
    ("jp", "日本", "Asia", False, 124_000_000, Decimal("4212.945")),
    ("kr", "대한민국", "Asia", False, 51_000_000, Decimal("1712.79")),
    ("mx", "México", "Americas", False, 128_000_000, Decimal("1789.11")),
    ("ng", "Nigeria", "Africa", None, None, Decimal("362.81")),
    ("nz", "Aotearoa", "Oceania", False, 5_200_000, Decimal("252.18")),
    ("se", "Sverige", "Europe", True, 10_500_000, Decimal("593.27")),
    ("us", "United States", "Americas", False, 335_000_000, Decimal("27360.94")),
    ("za", "South Africa", None, False, 60_000_000, Decimal("377.78")),
)
COUNTRY_CODES = tuple(r[0] for r in COUNTRY_ROWS)


# --- the proxy's configuration --------------------------------------------------------------


def proxy_config(shard_dsns: Sequence[str]) -> dict[str, Any]:
    """A Shardwire configuration with the map above over shards s1, s2, s3 at `shard_dsns`."""
    return {
        "auth": {"method": "trust"},
        "database": DATABASE,
        "users": {"app": None},
        "shards": {name: {"primary": dsn}
                   for name, dsn in zip(SHARD_NAMES, shard_dsns, strict=True)},
        "default_shard": "s1",
        "pool": {"size": 4, "checkout_timeout": 10},
        "sharding": SHARD_MAP,
    }


def shard_map() -> ShardMap:
    """The map as Shardwire itself reads it (the rows are placed with this, not with a copy
    of its logic)."""
    config = proxy_config([f"postgresql://postgres@127.0.0.1:{port}/{DATABASE}"
                           for port in range(1, len(SHARD_NAMES) + 1)])
    return parse_config(yaml.safe_dump(config, allow_unicode=True), env={}).sharding


# --- the rows ---------------------------------------------------------------------------


def _maybe(rng: random.Random, value: Any, null_share: float) -> Any:
    return None if rng.random() < null_share else value


def _amount(rng: random.Random, factor: int = 1) -> Decimal | None:
    """A numeric with a scale of its own: 1, 1.0 and 1.00 all occur."""
    if rng.random() < 0.06:
        return None
    whole = rng.choice((0, 1, 1, 2, 5, 10, 12, 19, 99, 100, 250, 1000)) * factor
    frac = rng.choice((0, 0, 0, 0.5, 0.25, 0.99, 0.125))
    scale = rng.choice((0, 1, 2, 2, 3))
    sign = -1 if rng.random() < 0.08 else 1
    return Decimal(f"{sign * (whole + frac):.{scale}f}")


def _weight(rng: random.Random) -> float | None:
    if rng.random() < 0.1:
        return None
    # Sums of these depend on the order of addition in the last bits.
    return rng.choice((0.1, 0.2, 0.3, 1 / 3, 2.5, 1e-3, 12345.678, -0.7, 1e10)) * rng.randint(1, 9)


def _instant(rng: random.Random, start: dt.datetime, days: int) -> dt.datetime:
    t = start + dt.timedelta(seconds=rng.randrange(days * 86400))
    if rng.random() < 0.3:
        t = t.replace(microsecond=rng.randrange(1_000_000))
    return t


def generate_rows(seed: int = DATA_SEED) -> dict[str, list[tuple[Any, ...]]]:
    """Every table's rows, in column order; the same for the same seed."""
    rng = random.Random(seed)
    rows: dict[str, list[tuple[Any, ...]]] = {"countries": list(COUNTRY_ROWS)}

    codes = (*COUNTRY_CODES, "xx")  # xx is in no country row: outer joins find nothing
    customers = []
    for cid in [*range(-5, 0), *range(1, 301)]:
        customers.append((
            cid,
            _maybe(rng, rng.choice(NOTES[:12]) + f" {cid % 17}", 0.05),
            _maybe(rng, rng.choice(codes), 0.1),
            _maybe(rng, rng.choice(("gold", "silver", "bronze", "Gold")), 0.15),
            _maybe(rng, dt.date(2023, 1, 1) + dt.timedelta(days=rng.randrange(900)), 0.1),
            _maybe(rng, rng.random() < 0.7, 0.1),
            _maybe(rng, Decimal(rng.randrange(-50000, 500000)) / 100, 0.1),
            _maybe(rng, rng.choice((0.1, 0.25, 1 / 7, 3.5, -2.0)) * rng.randint(0, 20), 0.1),
        ))
    rows["customers"] = customers

    orders, items = [], []
    item_id = 5000
    tenants = list(range(1, 13))
    for n in range(1200):
        order_id = 1000 + n * 7 % 1200 * 3 + n % 3  # unique, not in insertion order
        tenant = rng.choices(tenants, TENANT_WEIGHTS)[0]
        factor = 3 if tenant == 1 else 1  # tenant 1's orders are bigger: shard averages differ
        created = _instant(rng, dt.datetime(2024, 1, 1, tzinfo=UTC), 900)
        orders.append((
            order_id, tenant,
            _maybe(rng, rng.randint(-5, 300), 0.08),
            _maybe(rng, rng.choice(STATUSES), 0.1),
            _amount(rng, factor),
            _maybe(rng, rng.randint(-3, 20), 0.07),
            _weight(rng),
            created,
            _maybe(rng, created.date() + dt.timedelta(days=rng.randrange(0, 15)), 0.3),
            _maybe(rng, rng.random() < 0.3, 0.15),
            _maybe(rng, rng.randint(-2, 5), 0.1),
            _maybe(rng, rng.choice(NOTES), 0.25),
            _maybe(rng, rng.choice(codes), 0.1),
        ))
        for _ in range(rng.choice((0, 0, 1, 1, 2, 2, 3, 4))):
            qty = rng.randint(1, 6)
            items.append((
                item_id, order_id, tenant,
                _maybe(rng, rng.choice(SKUS[:300]) if rng.random() < 0.9 else "SKU-none", 0.05),
                qty,
                _maybe(rng, Decimal(rng.randrange(0, 20000)) / 100, 0.05),
                _maybe(rng, Decimal(rng.choice((0, 5, 10, 125, 250, 500))) / 1000, 0.4),
                rng.random() < 0.1,
            ))
            item_id += rng.choice((1, 1, 2))
    # A few items whose order does not exist (inner joins drop them).
    for k in range(6):
        items.append((item_id + k, 99_000 + k, rng.choice(tenants), "SKU-0001", 1,
                      Decimal("1.00"), None, False))
    rows["orders"], rows["order_items"] = orders, items

    products = []
    for i, sku in enumerate(SKUS):
        products.append((
            sku, rng.choice(CATEGORIES),
            _maybe(rng, f"{rng.choice(NOTES[:12])} {i % 23}", 0.05),
            _maybe(rng, Decimal(rng.randrange(0, 10000)) / 100, 0.05),
            _maybe(rng, rng.randint(-5, 50), 0.1),
            _maybe(rng, rng.choice((0.5, 1.0, 2.5, 3.3, 4.7, 5.0)), 0.2),
            rng.random() < 0.15,
            _maybe(rng, dt.date(2022, 1, 1) + dt.timedelta(days=rng.randrange(1500)), 0.1),
        ))
    rows["products"] = products

    events = []
    instants: list[dt.datetime] = []
    for b in TIME_BOUNDARIES:  # on each boundary and a microsecond before it
        instants += [b, b, b - dt.timedelta(microseconds=1)]
    while len(instants) < 1200:
        t = _instant(rng, dt.datetime(2024, 7, 1, tzinfo=UTC), 700)
        if GAP[0] <= t < GAP[1]:
            continue
        instants.append(t if rng.random() > 0.05 else rng.choice(instants))  # some ties
    for n, t in enumerate(instants):
        if GAP[0] <= t < GAP[1]:
            continue  # the gap holds no rows: a key there maps to no shard
        events.append((
            10_000 + n, t,
            _maybe(rng, rng.randint(1, 12), 0.1),
            _maybe(rng, rng.choice(EVENT_KINDS), 0.1),
            _maybe(rng, rng.randint(-5, 5), 0.1),
            _weight(rng),
            _maybe(rng, t.date(), 0.1),
            _maybe(rng, rng.random() < 0.8, 0.1),
            _maybe(rng, rng.choice(NOTES), 0.3),
            _amount(rng),
        ))
    rows["events"] = events
    return rows


# --- placement and loading --------------------------------------------------------------


def place(rows: dict[str, list[tuple[Any, ...]]], smap: ShardMap
          ) -> dict[str, dict[str, list[tuple[Any, ...]]]]:
    """shard -> table -> rows: each sharded row on the shard Shardwire's own map gives its key,
    reference rows on every shard."""
    out: dict[str, dict[str, list[tuple[Any, ...]]]] = {
        s: {t: [] for t in TABLES} for s in SHARD_NAMES}
    for name, table_rows in rows.items():
        table = TABLES[name]
        if table.key is None:
            for shard in SHARD_NAMES:
                out[shard][name] = list(table_rows)
            continue
        rule = smap.rules[RULE_OF_TABLE[name]]
        index = [c.name for c in table.columns].index(table.key)
        for row in table_rows:
            shard = rule.shard_for(to_key(row[index], rule.key_type))
            if shard is None:
                raise AssertionError(f"{name}: key {row[index]!r} maps to no shard")
            out[shard][name].append(row)
    return out


def _copy(conn: psycopg.Connection[Any], table: Table, rows: Iterable[tuple[Any, ...]]) -> None:
    cols = ", ".join(c.name for c in table.columns)
    with conn.cursor() as cur, cur.copy(f"COPY {table.name} ({cols}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def _load_one(cluster: PostgresCluster, tables: dict[str, list[tuple[Any, ...]]]) -> None:
    with psycopg.connect(cluster.dsn(DATABASE), autocommit=True) as conn:
        with conn.transaction():
            for name, table in TABLES.items():
                conn.execute(table.ddl())
                _copy(conn, table, tables.get(name, ()))
        # Statistics make plans (and so the order of unordered rows) closer to a real server.
        conn.execute("ANALYZE")


def recreate_database(cluster: PostgresCluster) -> None:
    with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DATABASE}")


def load(reference: PostgresCluster, shards: Sequence[PostgresCluster],
         rows: dict[str, list[tuple[Any, ...]]], smap: ShardMap) -> dict[str, dict[str, int]]:
    """Create the tables and load the rows: all of them on `reference`, each shard its own.
    Returns shard -> table -> row count."""
    placed = place(rows, smap)
    targets = [(reference, rows), *((c, placed[s]) for s, c in zip(SHARD_NAMES, shards,
                                                                  strict=True))]
    with ThreadPoolExecutor(max_workers=len(targets), thread_name_prefix="oracle-load") as pool:
        for future in [pool.submit(_load_one, cluster, data) for cluster, data in targets]:
            future.result()
    return {s: {t: len(r) for t, r in placed[s].items()} for s in SHARD_NAMES}


@dataclass(frozen=True, slots=True)
class OracleSetup:
    """The servers of a session: the reference, the shards (s1, s2, s3) and the proxy."""

    reference: PostgresCluster
    shards: list[PostgresCluster]
    proxy: ProxyProcess
    smap: ShardMap
    rows_per_shard: dict[str, dict[str, int]]  # shard -> table -> rows loaded there

    @property
    def reference_dsn(self) -> str:
        return self.reference.dsn(DATABASE)

    @property
    def proxy_dsn(self) -> str:
        return self.proxy.dsn("app", database=DATABASE)
