"""``shardwire demo``: local PostgreSQL shards, a sample shop database and the proxy in one command.

Everything lives in one directory (``.demo`` by default)::

    DIR/shard1/ .. DIR/shardK/   the servers' data directories (initdb on the first run only;
                                 each remembers its port, so later runs come back on it)
    DIR/shard1.log ..            the servers' logs
    DIR/shardwire.yaml           the proxy's config, rewritten at every start
    DIR/demo.lock                held while a demo runs, so two cannot share the servers

Every shard has the database ``demo`` with the sample shop's tables and ``shardwire_next_id()``
(global ids, ``shardwire.ids``); shard1, the default shard, also holds the catalog database,
with the directory of the lookup rule for users. The config's shard map spreads tenants,
product categories, quarters of events and users over the shards, and the demo loads each row
straight onto the shard the map (for users, the directory it fills) gives it (the proxy itself
refuses writes to several shards until distributed transactions exist).

Only the ready line goes to stdout; progress and errors go to stderr. SIGINT or SIGTERM, at
any point, stops the proxy and every server the demo started.
"""

from __future__ import annotations

import asyncio
import datetime
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import yaml

from .config.load import ConfigError, load_config
from .config.model import Config
from .ids import install_sql, shard_numbers
from .router.shardmap import Rule
from .testing import ClusterError, PostgresCluster, PsqlError, free_port, stop_clusters

__all__ = ["run_demo"]

DEMO_DATABASE = "demo"
CATALOG_DATABASE = "shardwire_catalog"
DEMO_USER = "demo"
DEMO_PASSWORD = "demo"
CONFIG_FILE = "shardwire.yaml"
LOCK_FILE = "demo.lock"
SHARD_PREFIX = "shard"
LISTEN_HOST = "127.0.0.1"
HEAT_FLUSH_INTERVAL = 5  # seconds per heat window (rebalance.heat_flush_interval)

_CONFIG_HEADER = """\
# Written by `shardwire demo` at every start: edits here are overwritten. Copy the file to
# change it, then run `shardwire serve --config <copy>` while the demo's servers run.
#
# The demo user's password is in plain text, which is fine for a throwaway local demo that
# listens on 127.0.0.1 only. Real configs take passwords from the environment
# ("${APP_PASSWORD}") or hold a scram_verifier; either way Shardwire turns a password into a
# SCRAM verifier when it loads the file. See docs/configuration.md.
"""

# The sample shop. Tenants (the shops) own their customers, orders and order items, all under
# the tenant rule, so a shop's rows are on one shard and joins on tenant_id stay there.
# Products are placed by category and events by time (a quarter of 2026 per range); countries
# is reference data, copied to every shard; users (the shops' staff accounts) are placed one by
# one by a lookup rule, whose directory in the catalog database names each user's shard. Every
# table exists on every shard, each shard holding some of the rows. Ids come from
# shardwire_next_id() (shardwire.ids), which no two shards repeat. No foreign keys: a product
# is on its category's shard, not with the orders that name it, and a tenant's rows move
# between shards when they are rebalanced. The primary keys of a tenant's tables begin with
# tenant_id: `shardwire rebalance apply` moves a tenant with logical replication, whose row
# filter on tenant_id needs the key column in each table's replica identity.
SAMPLE_TABLES = ("countries", "tenants", "customers", "products", "orders", "order_items",
                 "events", "users")
# Part of the mark a loaded shard carries (a comment on its tenants table): a shard whose
# mark differs (an older demo, another --shards) has everything loaded again.
SAMPLE_VERSION = 4

SCHEMA_SQL = """\
CREATE TABLE countries (
    code         text PRIMARY KEY,          -- ISO 3166-1 alpha-2
    name         text NOT NULL,
    currency     text NOT NULL
);
-- Tenant ids are chosen, not generated: the shard map names tenants by id.
CREATE TABLE tenants (
    tenant_id    bigint PRIMARY KEY,
    name         text NOT NULL,
    country_code text NOT NULL,
    plan         text NOT NULL,
    created_at   timestamptz NOT NULL
);
CREATE TABLE customers (
    customer_id  bigint NOT NULL DEFAULT shardwire_next_id(),
    tenant_id    bigint NOT NULL,
    name         text NOT NULL,
    email        text NOT NULL,
    country_code text NOT NULL,
    PRIMARY KEY (tenant_id, customer_id),
    UNIQUE (tenant_id, email)
);
CREATE TABLE products (
    product_id   bigint PRIMARY KEY DEFAULT shardwire_next_id(),
    tenant_id    bigint NOT NULL,           -- the shop that sells it
    category     text NOT NULL,
    sku          text NOT NULL UNIQUE,
    name         text NOT NULL,
    price        numeric(10, 2) NOT NULL
);
CREATE TABLE orders (
    order_id     bigint NOT NULL DEFAULT shardwire_next_id(),
    tenant_id    bigint NOT NULL,
    order_no     integer NOT NULL,          -- the number the shop shows its customer
    customer_id  bigint NOT NULL,
    status       text NOT NULL,
    ordered_at   timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, order_id),
    UNIQUE (tenant_id, order_no)
);
CREATE TABLE order_items (
    tenant_id    bigint NOT NULL,
    order_id     bigint NOT NULL,
    line_no      integer NOT NULL,
    product_id   bigint NOT NULL,           -- on the shard of the product's category
    quantity     integer NOT NULL,
    unit_price   numeric(10, 2) NOT NULL,
    PRIMARY KEY (tenant_id, order_id, line_no)
);
CREATE TABLE events (
    event_id     bigint PRIMARY KEY DEFAULT shardwire_next_id(),
    tenant_id    bigint NOT NULL,
    occurred_at  timestamptz NOT NULL,
    kind         text NOT NULL,
    customer_id  bigint,
    payload      jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX ON events (occurred_at);
-- The key of the lookup rule: an INSERT through the proxy must give it (SELECT
-- shardwire_next_id() first), so that the directory can place the user before the row exists.
CREATE TABLE users (
    user_id      bigint PRIMARY KEY DEFAULT shardwire_next_id(),
    tenant_id    bigint NOT NULL,
    email        text NOT NULL UNIQUE,         -- unique on each shard, not checked across them
    name         text NOT NULL,
    role         text NOT NULL
);
"""

# The directory of the users' lookup rule, in the catalog database: the table that
# proxy.directory.Directory creates on first use (for an integer key). The demo creates it
# itself so that it can fill it before the proxy starts.
DIRECTORY_SQL = """\
CREATE TABLE {table} (
    key          bigint PRIMARY KEY,
    shard        text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);"""

COUNTRIES = (
    ("BR", "Brazil", "BRL"), ("CA", "Canada", "CAD"), ("DE", "Germany", "EUR"),
    ("ES", "Spain", "EUR"), ("FR", "France", "EUR"), ("GB", "United Kingdom", "GBP"),
    ("IN", "India", "INR"), ("JP", "Japan", "JPY"), ("NL", "Netherlands", "EUR"),
    ("US", "United States", "USD"),
)
# (tenant_id, name, country, plan, created_at)
TENANTS = (
    (1, "Acme Books", "DE", "pro", "2025-03-14 10:00:00+00:00"),
    (2, "Bluebird Games", "US", "enterprise", "2025-05-02 16:30:00+00:00"),
    (3, "Cedar Garden", "GB", "free", "2025-07-21 08:15:00+00:00"),
    (4, "Dune Kitchen", "FR", "pro", "2025-09-09 12:45:00+00:00"),
    (5, "Echo Music", "JP", "free", "2025-11-30 03:00:00+00:00"),
    (6, "Fable Toys", "BR", "enterprise", "2025-12-05 19:20:00+00:00"),
    (7, "Granite Tools", "CA", "pro", "2026-01-12 09:40:00+00:00"),
    (8, "Harbor Tea", "IN", "free", "2026-02-03 14:10:00+00:00"),
)
PLACED_TENANTS = 6  # tenants 1 to 6 are listed in the shard map; 7, 8 and new ones take its default
CATEGORIES = (("books", "novel"), ("games", "board game"), ("garden", "planter"),
              ("kitchen", "knife set"), ("music", "vinyl record"), ("toys", "kite"))
QUARTERS = ("2026-04-01", "2026-07-01", "2026-10-01")  # where the ranges of events meet
CUSTOMERS_PER_TENANT = 10
PRODUCTS_PER_TENANT = 4
ORDERS_PER_TENANT = 12
EVENTS_PER_TENANT = 20

_FIRST_NAMES = ("Ada", "Bruno", "Chen", "Dana", "Emil", "Farah", "Goro", "Hana", "Ines", "Jonas",
                "Kemi", "Liam")
_LAST_NAMES = ("Alves", "Berg", "Costa", "Dubois", "Evans", "Fischer", "Garcia", "Haddad", "Ito",
               "Jensen")
_PRODUCT_WORDS = ("Classic", "Deluxe", "Mini", "Eco", "Pocket", "Grand", "Smart", "Vintage")
USER_ROLES = ("owner", "staff")  # each tenant's staff accounts
_STATUSES = ("paid", "shipped", "delivered", "delivered", "cancelled")
_EVENT_KINDS = ("page_view", "page_view", "signup", "add_to_cart", "checkout", "refund")


class SampleDataServer(Protocol):
    """What the sample data loader needs of a server: its shard name and psql (the demo's
    own servers, or those of a config: shardwire.demo_data)."""

    name: str

    def sql(self, query: str, dbname: str = ...) -> str: ...


class DemoError(Exception):
    """What stopped the demo, worded for the person who ran it."""


def run_demo(*, port: int, data_dir: str, shards: int) -> int:
    """Run the demo until SIGINT or SIGTERM; returns the process exit status."""
    try:
        if not 1 <= port <= 65535:
            raise DemoError(f"--port must be between 1 and 65535, not {port}")
        if not 1 <= shards <= 32:
            raise DemoError(f"--shards must be between 1 and 32, not {shards}")
        # Absolute: the servers run in their own data directories and the config names them.
        base = Path(data_dir).resolve()
        with _interrupted_by_signals(), _exclusive(base):
            _run(base, port, shards)
    except (DemoError, ClusterError) as e:
        _say(f"shardwire demo: {e}")
        return 1
    except OSError as e:
        _say(f"shardwire demo: {e.filename or data_dir}: {e.strerror or e}")
        return 1
    except KeyboardInterrupt:
        _say("shardwire demo: interrupted; everything it started is stopped")
        return 130
    return 0


def _run(base: Path, port: int, shards: int) -> None:
    _require_free_port(port)
    clusters = _shard_clusters(base, shards)
    try:
        _bring_up(base, clusters)
        config = _write_config(base, port, clusters)
        user_id = _load_sample_data(clusters, config)
        _serve(config, user_id)
    finally:
        _stop(clusters)


# --- the PostgreSQL servers -----------------------------------------------------------------


def _shard_clusters(base: Path, count: int) -> list[PostgresCluster]:
    clusters = []
    for i in range(1, count + 1):
        name = f"{SHARD_PREFIX}{i}"
        cluster = PostgresCluster(base / name, name=name)
        # A reused directory comes back on the port it remembers. If something else has
        # taken that port since, move to a free one rather than fail.
        if cluster.exists() and not cluster.is_running() and not _can_bind(cluster.port):
            cluster = PostgresCluster(base / name, port=free_port(), name=name)
        clusters.append(cluster)
    return clusters


def _bring_up(base: Path, clusters: list[PostgresCluster]) -> None:
    fresh = [c.name for c in clusters if not c.exists()]
    if fresh:
        _say(f"creating PostgreSQL servers {', '.join(fresh)} in {base} "
             "(first run only; later runs reuse them)...")
    _say(f"starting {len(clusters)} PostgreSQL servers...")
    started = time.monotonic()

    def bring_up(cluster: PostgresCluster) -> None:
        cluster.init()
        cluster.start()
        cluster.create_database(DEMO_DATABASE)
        if cluster is clusters[0]:
            cluster.create_database(CATALOG_DATABASE)

    with ThreadPoolExecutor(max_workers=len(clusters), thread_name_prefix="demo-pg") as pool:
        errors = [f.exception() for f in [pool.submit(bring_up, c) for c in clusters]]
    failures = [(c, e) for c, e in zip(clusters, errors, strict=True) if e is not None]
    if failures:
        raise DemoError("could not start the PostgreSQL servers:\n" + "\n\n".join(
            f"{c.name}: {_describe_error(e)}" for c, e in failures))
    ports = ", ".join(f"{c.name} on {c.port}" for c in clusters)
    _say(f"PostgreSQL servers running ({ports}) in {time.monotonic() - started:.1f}s")


def _stop(clusters: list[PostgresCluster]) -> None:
    running = [c for c in clusters if c.is_running()]
    if not running:
        return
    _say("stopping the PostgreSQL servers...")
    # A second Ctrl-C must not cut the shutdown short and leave servers behind.
    with _signals_ignored():
        try:
            stop_clusters(running, mode="fast")
        except ClusterError as e:
            _say(f"shardwire demo: could not stop every server: {e}")
        else:
            _say("PostgreSQL servers stopped")


def _describe_error(error: BaseException) -> str:
    text = str(error)
    if "not found" in text and "PostgreSQL" in text:
        text += "\n(on Debian or Ubuntu: apt-get install -y postgresql)"
    return text


# --- sample data ----------------------------------------------------------------------------


def _load_sample_data(clusters: Sequence[SampleDataServer], config: Config) -> int | None:
    """Create the schema and shardwire_next_id() on every shard, put each sample row on the
    shard the config's map names and fill the users' directory in the catalog database; a later
    start finds the data there and leaves it alone. Returns a user's id for the sample query
    (None if the directory is empty)."""
    numbers = shard_numbers(config)
    catalog = clusters[0]  # the config's catalog is CATALOG_DATABASE there
    directory = config.sharding.rules["by_user"].directory
    mark = f"shardwire demo sample data v{SAMPLE_VERSION} for {len(clusters)} shards"
    first_user = f"SELECT min(key) FROM {directory}"
    try:
        marks = [c.sql("SELECT obj_description(to_regclass('public.tenants'), 'pg_class')",
                       DEMO_DATABASE) for c in clusters]
        marks.append(catalog.sql(f"SELECT obj_description(to_regclass({_literal(directory)}), "
                                 "'pg_class')", CATALOG_DATABASE))
        if all(m == mark for m in marks):
            # Still (re)install the function: cheap, and it repairs a dropped one.
            for c in clusters:
                c.sql(install_sql(numbers[c.name]), DEMO_DATABASE)
            _say(f"sample data already loaded (database {DEMO_DATABASE} on every shard, the "
                 f"users' directory in {CATALOG_DATABASE} on {catalog.name})")
            return _int_or_none(catalog.sql(first_user, CATALOG_DATABASE))
        if any(marks):
            _say("the sample data there was loaded by another version of the demo or for "
                 "another number of shards: loading it again")
        _say(f"loading the sample shop data, each row onto its shard (database "
             f"{DEMO_DATABASE})...")
        shop = _SampleShop(config)
        # Customers, products and users first: the ids the database gives them are needed by
        # rows on other shards (events name customers, order items name products) and by the
        # users' directory.
        ids: dict[str, int] = {}
        for c in clusters:
            out = c.sql(shop.first_script(c.name, numbers[c.name]), DEMO_DATABASE)
            for line in out.splitlines():
                natural_key, _, row_id = line.rpartition("|")
                ids[natural_key] = int(row_id)
        # The proxy writes a new key's directory row before its data row; here the rows come
        # first (each user's id is made on its shard), which is safe only because the proxy
        # does not run yet. A load that fails leaves no mark, so the next start redoes it all.
        _say(f"writing the users' directory ({directory} in database {CATALOG_DATABASE} on "
             f"{catalog.name})...")
        catalog.sql(shop.directory_script(ids, mark), CATALOG_DATABASE)
        for c in clusters:
            c.sql(shop.second_script(c.name, ids, mark), DEMO_DATABASE)
        return _int_or_none(catalog.sql(first_user, CATALOG_DATABASE))
    except PsqlError as e:
        raise DemoError(f"could not load the sample data: {e}") from None


def _int_or_none(text: str) -> int | None:
    return int(text) if text else None  # psql prints NULL as nothing


class _SampleShop:
    """The sample rows, and for each the shard that the shard map gives its key."""

    def __init__(self, config: Config) -> None:
        rules = config.sharding.rules
        self.tenant_rule = rules["by_tenant"]
        self.category_rule = rules["by_category"]
        self.time_rule = rules["by_time"]
        self.user_rule = rules["by_user"]
        self.products = [
            (t, CATEGORIES[(n + t) % len(CATEGORIES)], n) for t, *_ in TENANTS
            for n in range(1, PRODUCTS_PER_TENANT + 1)]
        # (shard, (tenant_id, email, name, role)): users placed as the directory's least_loaded
        # policy places new keys one by one (the shard with the fewest keys, the first listed
        # on a tie), that is in turn over the rule's shards.
        shards = self.user_rule.shards
        users = [(t, f"{role}@{_slug(name)}.example", _person(t, n), role)
                 for t, name, *_ in TENANTS for n, role in enumerate(USER_ROLES)]
        self.users = [(shards[i % len(shards)], row) for i, row in enumerate(users)]

    def shard_of(self, rule: Rule, key: object) -> str:
        shard = rule.shard_for(key)
        if shard is None:
            raise DemoError(f"the demo's shard map has no shard for {key!r} (rule {rule.name})")
        return shard

    def first_script(self, shard: str, number: int) -> str:
        tables = ", ".join(SAMPLE_TABLES)
        parts = ["BEGIN;", f"DROP TABLE IF EXISTS {tables};", install_sql(number), SCHEMA_SQL,
                 _insert("countries", ("code", "name", "currency"), COUNTRIES)]
        users = [row for user_shard, row in self.users if user_shard == shard]
        parts.append(_insert("users", ("tenant_id", "email", "name", "role"), users,
                             returning="'user:' || email, user_id"))
        customers = [row for t, *_ in TENANTS if self.shard_of(self.tenant_rule, t) == shard
                     for row in _customers(t)]
        parts.append(_insert("customers", ("tenant_id", "name", "email", "country_code"),
                             customers, returning="'customer:' || email, customer_id"))
        products = [(t, category, _sku(t, n), _product_name(t, n, noun), _price(t, n))
                    for t, (category, noun), n in self.products
                    if self.shard_of(self.category_rule, category) == shard]
        parts.append(_insert("products", ("tenant_id", "category", "sku", "name", "price"),
                             products, returning="'product:' || sku, product_id"))
        parts.append("COMMIT;")
        return "\n".join(p for p in parts if p)

    def directory_script(self, ids: dict[str, int], mark: str) -> str:
        """The users' directory, made anew: each user's id and the shard that holds the row."""
        table = self.user_rule.directory
        rows = [(ids[f"user:{email}"], shard) for shard, (_, email, *_) in self.users]
        return "\n".join(["BEGIN;", f"DROP TABLE IF EXISTS {table};",
                          DIRECTORY_SQL.format(table=table), _insert(table, ("key", "shard"), rows),
                          f"COMMENT ON TABLE {table} IS {_literal(mark)};", "COMMIT;"])

    def second_script(self, shard: str, ids: dict[str, int], mark: str) -> str:
        tenants = [row for row in TENANTS if self.shard_of(self.tenant_rule, row[0]) == shard]
        orders: list[tuple[int, int, int, str, datetime.datetime]] = []
        items: list[tuple[int, int, int, int, int, Decimal]] = []
        for t, *_ in tenants:
            products = [(n, _price(t, n)) for tt, _, n in self.products if tt == t]
            for n in range(1, ORDERS_PER_TENANT + 1):
                email = _customers(t)[(n * 7) % CUSTOMERS_PER_TENANT][2]
                ordered_at = (datetime.datetime(2026, 1, 1, 8, tzinfo=datetime.UTC)
                              + datetime.timedelta(days=(n * 23 + t * 7) % 320,
                                                   minutes=(n * 37 + t * 13) % 720))
                orders.append((t, 1000 + n, ids[f"customer:{email}"],
                               _STATUSES[(n + t) % len(_STATUSES)], ordered_at))
                for line in range(1, 2 + (n + t) % 3):
                    p, price = products[(n + line * 3) % len(products)]
                    items.append((t, 1000 + n, line, ids[f"product:{_sku(t, p)}"],
                                  1 + (n + line) % 3, price))
        orders.sort(key=lambda row: row[4])  # ids then follow the order dates
        events: list[tuple[int, datetime.datetime, str, int | None, str]] = []
        for t, *_ in TENANTS:
            for n in range(1, EVENTS_PER_TENANT + 1):
                at = (datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
                      + datetime.timedelta(hours=(n * 433 + t * 97) % 8760))
                if self.shard_of(self.time_rule, at) != shard:
                    continue
                kind = _EVENT_KINDS[(n * 5 + t) % len(_EVENT_KINDS)]
                email = _customers(t)[n % CUSTOMERS_PER_TENANT][2]
                customer = None if kind == "page_view" else ids[f"customer:{email}"]
                path = f"/p/{_sku(t, 1 + n % PRODUCTS_PER_TENANT)}"
                events.append((t, at, kind, customer, json.dumps({"path": path})))
        events.sort(key=lambda row: row[1])
        parts = [
            "BEGIN;",
            _insert("tenants", ("tenant_id", "name", "country_code", "plan", "created_at"),
                    tenants),
            _insert("orders", ("tenant_id", "order_no", "customer_id", "status", "ordered_at"),
                    orders),
        ]
        if items:
            # Each item finds its order by the order's number: the order ids were just made.
            parts.append(
                "INSERT INTO order_items (tenant_id, order_id, line_no, product_id, quantity, "
                "unit_price)\nSELECT o.tenant_id, o.order_id, v.line_no, v.product_id, "
                "v.quantity, v.unit_price\nFROM (VALUES\n    "
                + ",\n    ".join(_row(item) for item in items)
                + "\n) AS v (tenant_id, order_no, line_no, product_id, quantity, unit_price)\n"
                "JOIN orders o ON o.tenant_id = v.tenant_id AND o.order_no = v.order_no;")
        parts += [
            _insert("events", ("tenant_id", "occurred_at", "kind", "customer_id", "payload"),
                    events),
            f"COMMENT ON TABLE tenants IS {_literal(mark)};",
            "COMMIT;",
        ]
        return "\n".join(p for p in parts if p)


def _customers(tenant: int) -> list[tuple[int, str, str, str]]:
    """(tenant_id, name, email, country_code) of a tenant's customers."""
    out = []
    for n in range(1, CUSTOMERS_PER_TENANT + 1):
        first = _FIRST_NAMES[(tenant * 7 + n) % len(_FIRST_NAMES)]
        last = _LAST_NAMES[(tenant * 5 + n * 3) % len(_LAST_NAMES)]
        out.append((tenant, f"{first} {last}", f"{first.lower()}.{tenant * 100 + n}@example.com",
                    COUNTRIES[(tenant * 3 + n) % len(COUNTRIES)][0]))
    return out


def _person(tenant: int, n: int) -> str:
    return (f"{_FIRST_NAMES[(tenant * 5 + n) % len(_FIRST_NAMES)]} "
            f"{_LAST_NAMES[(tenant + n * 7) % len(_LAST_NAMES)]}")


def _product_name(tenant: int, n: int, noun: str) -> str:
    return f"{_PRODUCT_WORDS[(n * 3 + tenant) % len(_PRODUCT_WORDS)]} {noun}"


def _sku(tenant: int, n: int) -> str:
    return f"T{tenant}-{n:02d}"


def _price(tenant: int, n: int) -> Decimal:
    return Decimal(f"{(n * 7 + tenant * 3) % 40 + 5}.99")


def _slug(name: str) -> str:
    return name.lower().replace(" ", "-")


def _insert(table: str, columns: Sequence[str], rows: Sequence[Sequence[object]],
            returning: str | None = None) -> str:
    if not rows:
        return ""
    tail = f"\nRETURNING {returning}" if returning else ""
    return (f"INSERT INTO {table} ({', '.join(columns)}) VALUES\n    "
            + ",\n    ".join(_row(row) for row in rows) + tail + ";")


def _row(values: Sequence[object]) -> str:
    return "(" + ", ".join(_literal(v) for v in values) + ")"


def _literal(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, int | Decimal):
        return str(value)
    if isinstance(value, datetime.datetime):
        value = value.isoformat(sep=" ")
    return "'" + str(value).replace("'", "''") + "'"


# --- the proxy ------------------------------------------------------------------------------


def _write_config(base: Path, port: int, clusters: list[PostgresCluster]) -> Config:
    tree: dict[str, Any] = {
        "listen": {"host": LISTEN_HOST, "port": port},
        "auth": {"method": "scram-sha-256"},
        "database": DEMO_DATABASE,
        "users": {DEMO_USER: {"password": DEMO_PASSWORD, "admin": True}},
        "shards": {c.name: {"primary": c.dsn(DEMO_DATABASE)} for c in clusters},
        "default_shard": clusters[0].name,
        "catalog": clusters[0].dsn(CATALOG_DATABASE),
        "pool": {"size": 10},
        # Heat windows of a few seconds, so that `shardwire rebalance status` sees a change
        # of traffic soon (docs/rebalancing.md, walk-through); kept for an hour.
        "rebalance": {"heat_flush_interval": HEAT_FLUSH_INTERVAL, "heat_retention": 3600},
    }
    path = base / CONFIG_FILE
    names = [c.name for c in clusters]
    text = (_CONFIG_HEADER + "\n" + yaml.safe_dump(tree, sort_keys=False) + "\n"
            + _sharding_yaml(names, _moved_keys(path, names)))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    try:
        config = load_config(path)
    except ConfigError as e:
        raise DemoError(f"{path} was rejected (a bug in the demo):\n  "
                        + "\n  ".join(e.problems)) from None
    _say(f"config written to {path}")
    return config


def _moved_keys(path: Path, shards: list[str]) -> dict[str, dict[Any, str]]:
    """The tenants and categories that `shardwire rebalance apply` placed in the config the
    last run left (it rewrites the file when it moves them): {rule: {key: shard}}.

    The file is rewritten at every start, but rows that were moved are on their new shard:
    writing the map anew would send their queries to the old one. Empty when there is no
    such file, it does not load, or it names other shards (the data is loaded afresh then)."""
    if not path.exists():
        return {}
    try:
        old = load_config(path)
    except (ConfigError, OSError):
        return {}
    if list(old.shards) != shards:
        return {}
    out: dict[str, dict[Any, str]] = {}
    for name in ("by_tenant", "by_category"):
        rule = old.sharding.rules.get(name)
        if rule is not None:
            out[name] = {k: v for k, v in rule.values.items() if v in shards}
    return out


def _sharding_yaml(shards: list[str], moved: dict[str, dict[Any, str]] | None = None) -> str:
    """The demo's shard map, written out with comments: it is the example a reader opens.
    `moved`: tenants and categories whose shard differs from the demo's own placement
    (`_moved_keys`)."""
    def spread(i: int) -> str:
        return shards[i % len(shards)]

    moved = moved or {}
    placed_tenants: dict[Any, str] = {t: spread(t - 1) for t, *_ in TENANTS[:PLACED_TENANTS]}
    placed_tenants.update(moved.get("by_tenant", {}))
    placed_categories: dict[Any, str] = {c: spread(i) for i, (c, _) in enumerate(CATEGORIES)}
    placed_categories.update(moved.get("by_category", {}))
    tenants = ", ".join(f"{t}: {s}" for t, s in placed_tenants.items())
    categories = ", ".join(f"{c}: {s}" for c, s in placed_categories.items())
    bounds: list[str | None] = [None, *QUARTERS, None]
    ranges = []
    for q in range(len(bounds) - 1):
        low, high = bounds[q], bounds[q + 1]
        parts = ([f"from: {low}"] if low else []) + ([f"to: {high}"] if high else [])
        # In order: the first quarters on the first shards, so that a time window reaches
        # neighbouring shards only.
        shard = shards[q * len(shards) // (len(bounds) - 1)]
        ranges.append(f"        - {{{', '.join(parts)}, shard: {shard}}}"
                      f"{'  # open: everything before' if low is None else ''}"
                      f"{'  # open: everything from here on' if high is None else ''}")
    range_lines = "\n".join(ranges)
    return f"""\
# Where rows live: docs/sharding.md. Every table exists on every shard; the demo loads each row
# onto the shard this map gives its key.
sharding:
  rules:
    # A shop (tenant) and everything it owns are on one shard: a join on tenant_id stays there.
    by_tenant:
      kind: tenant
      column: tenant_id
      type: integer
      tables: [tenants, customers, orders, order_items]
      tenants: {{{tenants}}}
      default: {shards[-1]}  # tenants 7, 8 and every tenant not listed
    # Products by category: all products of a category are on one shard.
    by_category:
      kind: category
      column: category
      type: text
      tables: [products]
      values: {{{categories}}}
      default: {shards[0]}  # categories not listed
    # Events by time, a quarter of 2026 per range, in order over the shards: [from, to),
    # times in UTC.
    by_time:
      kind: range
      column: occurred_at
      type: timestamptz
      tables: [events]
      ranges:
{range_lines}
    # Users (the shops' staff accounts) one by one: a directory, the table
    # shardwire_directory_by_user in the catalog database, names each user's shard. Keyed by
    # user_id, not email: the id is what an application keeps in its session and what other
    # tables name, and it never changes (an email does, and a row cannot change its key
    # without moving). A user_id not in the directory gets a shard at its first INSERT.
    by_user:
      kind: lookup
      column: user_id
      type: integer
      tables: [users]
      new_keys: least_loaded  # the shard with the fewest users
  # A full copy on every shard: reads go to any one, writes to all of them.
  reference: [countries]
"""


def _serve(config: Config, user_id: int | None) -> None:
    from .proxy.server import Proxy, install_uvloop, run

    def ready(proxy: Proxy) -> None:
        address = f"{DEMO_USER}:{DEMO_PASSWORD}@{config.listen.host}:{proxy.port}"
        print(f"shardwire demo ready: psql postgresql://{address}/{config.database}  "
              f"(admin console: psql postgresql://{address}/{config.admin_database})",
              flush=True)
        if user_id is not None:
            _say(f"try: SELECT name, role FROM users WHERE user_id = {user_id};  "
                 "(more sample queries in README.md)")
        _say("Ctrl-C stops the proxy and the PostgreSQL servers.")

    install_uvloop()
    # asyncio takes SIGINT and SIGTERM over while it runs and gives them back afterwards.
    try:
        asyncio.run(run(config, ready=ready))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise DemoError(_port_taken(config.listen.port)) from None
        raise DemoError(f"cannot listen on {config.listen.host}:{config.listen.port}: "
                        f"{e.strerror or e}") from None
    _say("proxy stopped")


def _require_free_port(port: int) -> None:
    # Checked before the servers start, so a taken port fails in a moment, not after initdb.
    if not _can_bind(port):
        raise DemoError(_port_taken(port))


def _port_taken(port: int) -> str:
    return f"port {port} is taken; use --port (make demo PORT=...)"


def _can_bind(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # The proxy and PostgreSQL bind with SO_REUSEADDR: a port in TIME_WAIT is free to them.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LISTEN_HOST, port))
        except OSError:
            return False
        return True


# --- signals, locking, output ---------------------------------------------------------------


@contextmanager
def _interrupted_by_signals() -> Iterator[None]:
    """Make SIGINT and SIGTERM raise KeyboardInterrupt, so either unwinds through the cleanup.

    By default SIGTERM would end the process at once, leaving the servers running. The first
    signal starts the shutdown; later ones are ignored so they cannot cut the cleanup short.
    """

    def interrupt(signum: int, frame: FrameType | None) -> None:
        _set_handlers(signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = _set_handlers(interrupt)
    try:
        yield
    finally:
        _restore_handlers(previous)


@contextmanager
def _signals_ignored() -> Iterator[None]:
    previous = _set_handlers(signal.SIG_IGN)
    try:
        yield
    finally:
        _restore_handlers(previous)


_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def _set_handlers(handler: _Handler) -> dict[signal.Signals, _Handler]:
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.getsignal(sig)
        signal.signal(sig, handler)  # type: ignore[arg-type]
    return previous


def _restore_handlers(previous: dict[signal.Signals, _Handler]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)  # type: ignore[arg-type]


@contextmanager
def _exclusive(base: Path) -> Iterator[None]:
    """Hold DIR/demo.lock: a second demo on the same directory would stop the first's servers."""
    base.mkdir(parents=True, exist_ok=True)
    with open(base / LOCK_FILE, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DemoError(f"another shardwire demo is running with {base}; stop it first, "
                            "or use another --data-dir") from None
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
