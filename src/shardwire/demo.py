"""``shardwire demo``: local PostgreSQL shards, a sample shop database and the proxy in one command.

Everything lives in one directory (``.demo`` by default)::

    DIR/shard1/ .. DIR/shardK/   the servers' data directories (initdb on the first run only;
                                 each remembers its port, so later runs come back on it)
    DIR/shard1.log ..            the servers' logs
    DIR/shardwire.yaml           the proxy's config, rewritten at every start
    DIR/demo.lock                held while a demo runs, so two cannot share the servers

Every shard has the database ``demo``; shard1 also holds the catalog database. Until routing
rules exist, the sample data lives on the default shard (shard1).

Only the ready line goes to stdout; progress and errors go to stderr. SIGINT or SIGTERM, at
any point, stops the proxy and every server the demo started.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from .config.load import ConfigError, load_config
from .config.model import Config
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

_CONFIG_HEADER = """\
# Written by `shardwire demo` at every start: edits here are overwritten. Copy the file to
# change it, then run `shardwire serve --config <copy>` while the demo's servers run.
#
# The demo user's password is in plain text, which is fine for a throwaway local demo that
# listens on 127.0.0.1 only. Real configs take passwords from the environment
# ("${APP_PASSWORD}") or hold a scram_verifier; either way Shardwire turns a password into a
# SCRAM verifier when it loads the file. See docs/configuration.md.
"""

# The sample shop: tenants (the shops) own their customers, products, orders, order items
# and events, so every tenant-owned table carries tenant_id and has it first in its primary
# key; countries is small reference data every shard can hold a copy of. Ids are explicit
# and unique per table across all tenants (no sequences: each shard would count on its own).
# No foreign keys: rows of one tenant will move between shards, and products may be
# distributed by category rather than by tenant.
SAMPLE_TABLES = ("countries", "tenants", "customers", "products", "orders", "order_items",
                 "events")

SAMPLE_SQL = """\
BEGIN;

CREATE TABLE IF NOT EXISTS countries (
    code        text PRIMARY KEY,            -- ISO 3166-1 alpha-2
    name        text NOT NULL,
    currency    text NOT NULL
);
CREATE TABLE IF NOT EXISTS tenants (
    tenant_id    bigint PRIMARY KEY,
    name         text NOT NULL,
    country_code text NOT NULL,
    plan         text NOT NULL,
    created_at   timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS customers (
    tenant_id    bigint NOT NULL,
    customer_id  bigint NOT NULL,
    name         text NOT NULL,
    email        text NOT NULL,
    country_code text NOT NULL,
    PRIMARY KEY (tenant_id, customer_id)
);
CREATE TABLE IF NOT EXISTS products (
    tenant_id    bigint NOT NULL,
    product_id   bigint NOT NULL,
    category     text NOT NULL,
    name         text NOT NULL,
    price        numeric(10, 2) NOT NULL,
    PRIMARY KEY (tenant_id, product_id)
);
CREATE TABLE IF NOT EXISTS orders (
    tenant_id    bigint NOT NULL,
    order_id     bigint NOT NULL,
    customer_id  bigint NOT NULL,
    status       text NOT NULL,
    ordered_at   timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, order_id)
);
CREATE TABLE IF NOT EXISTS order_items (
    tenant_id    bigint NOT NULL,
    order_id     bigint NOT NULL,
    line_no      integer NOT NULL,
    product_id   bigint NOT NULL,
    quantity     integer NOT NULL,
    unit_price   numeric(10, 2) NOT NULL,
    PRIMARY KEY (tenant_id, order_id, line_no)
);
CREATE TABLE IF NOT EXISTS events (
    tenant_id    bigint NOT NULL,
    event_id     bigint NOT NULL,
    occurred_at  timestamptz NOT NULL,
    kind         text NOT NULL,
    customer_id  bigint,
    payload      jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (tenant_id, event_id)
);

INSERT INTO countries (code, name, currency) VALUES
    ('BR', 'Brazil', 'BRL'), ('CA', 'Canada', 'CAD'), ('DE', 'Germany', 'EUR'),
    ('ES', 'Spain', 'EUR'), ('FR', 'France', 'EUR'), ('GB', 'United Kingdom', 'GBP'),
    ('IN', 'India', 'INR'), ('JP', 'Japan', 'JPY'), ('NL', 'Netherlands', 'EUR'),
    ('US', 'United States', 'USD')
ON CONFLICT DO NOTHING;

INSERT INTO tenants (tenant_id, name, country_code, plan, created_at) VALUES
    (1, 'Acme Books',     'DE', 'pro',        '2023-03-14 10:00:00+00'),
    (2, 'Bluebird Games', 'US', 'enterprise', '2023-05-02 16:30:00+00'),
    (3, 'Cedar Garden',   'GB', 'free',       '2023-07-21 08:15:00+00'),
    (4, 'Dune Kitchen',   'FR', 'pro',        '2023-09-09 12:45:00+00'),
    (5, 'Echo Music',     'JP', 'free',       '2023-11-30 03:00:00+00'),
    (6, 'Fable Toys',     'BR', 'enterprise', '2024-01-05 19:20:00+00')
ON CONFLICT DO NOTHING;

-- Ten customers per tenant: customer_id = tenant_id * 1000 + n.
INSERT INTO customers (tenant_id, customer_id, name, email, country_code)
SELECT t.tenant_id, t.tenant_id * 1000 + n, f.name || ' ' || l.name,
       lower(f.name) || '.' || (t.tenant_id * 1000 + n) || '@example.com',
       (ARRAY['BR','CA','DE','ES','FR','GB','IN','JP','NL','US'])[1 + (t.tenant_id * 3 + n) % 10]
FROM tenants t
CROSS JOIN generate_series(1, 10) AS n
CROSS JOIN LATERAL (SELECT (ARRAY['Ada','Bruno','Chen','Dana','Emil','Farah','Goro','Hana',
                                  'Ines','Jonas','Kemi','Liam'])[1 + (t.tenant_id * 7 + n) % 12]
                    AS name) f
CROSS JOIN LATERAL (SELECT (ARRAY['Alves','Berg','Costa','Dubois','Evans','Fischer','Garcia',
                                  'Haddad','Ito','Jensen'])[1 + (t.tenant_id * 5 + n * 3) % 10]
                    AS name) l
ON CONFLICT DO NOTHING;

-- Eight products per tenant over six categories: product_id = tenant_id * 1000 + n.
INSERT INTO products (tenant_id, product_id, category, name, price)
SELECT t.tenant_id, t.tenant_id * 1000 + n, c.category,
       (ARRAY['Classic','Deluxe','Mini','Eco','Pocket','Grand','Smart','Vintage'])[n]
           || ' ' || c.noun,
       ((n * 7 + t.tenant_id * 3) % 40 + 5) + 0.99
FROM tenants t
CROSS JOIN generate_series(1, 8) AS n
JOIN (VALUES (0, 'books', 'novel'), (1, 'games', 'board game'), (2, 'garden', 'planter'),
             (3, 'kitchen', 'knife set'), (4, 'music', 'vinyl record'), (5, 'toys', 'kite'))
     AS c (slot, category, noun) ON c.slot = (n + t.tenant_id) % 6
ON CONFLICT DO NOTHING;

-- Fifteen orders per tenant in the first half of 2024: order_id = tenant_id * 1000 + n.
INSERT INTO orders (tenant_id, order_id, customer_id, status, ordered_at)
SELECT t.tenant_id, t.tenant_id * 1000 + n, t.tenant_id * 1000 + 1 + (n * 7) % 10,
       (ARRAY['paid','shipped','delivered','delivered','cancelled'])[1 + (n + t.tenant_id) % 5],
       timestamptz '2024-01-01 08:00:00+00'
           + interval '1 day' * ((n * 11 + t.tenant_id * 5) % 180)
           + interval '1 minute' * ((n * 37 + t.tenant_id * 13) % 720)
FROM tenants t
CROSS JOIN generate_series(1, 15) AS n
ON CONFLICT DO NOTHING;

-- One to three lines per order, priced as the product is.
INSERT INTO order_items (tenant_id, order_id, line_no, product_id, quantity, unit_price)
SELECT o.tenant_id, o.order_id, line, p.product_id, 1 + (o.order_id + line) % 3, p.price
FROM orders o
CROSS JOIN LATERAL generate_series(1, 1 + o.order_id % 3) AS line
JOIN products p ON p.tenant_id = o.tenant_id
               AND p.product_id = o.tenant_id * 1000 + 1 + (o.order_id + line * 3) % 8
ON CONFLICT DO NOTHING;

-- Twenty events per tenant, spread over January to June 2024: event_id = tenant_id * 1000 + n.
INSERT INTO events (tenant_id, event_id, occurred_at, kind, customer_id, payload)
SELECT t.tenant_id, t.tenant_id * 1000 + n,
       timestamptz '2024-01-01 00:00:00+00'
           + interval '1 hour' * ((n * 211 + t.tenant_id * 97) % 4344),
       k.kind,
       CASE WHEN k.kind = 'page_view' THEN NULL ELSE t.tenant_id * 1000 + 1 + n % 10 END,
       jsonb_build_object('path', '/p/' || (t.tenant_id * 1000 + 1 + n % 8))
FROM tenants t
CROSS JOIN generate_series(1, 20) AS n
CROSS JOIN LATERAL (SELECT (ARRAY['page_view','page_view','signup','add_to_cart','checkout',
                                  'refund'])[1 + (n * 5 + t.tenant_id) % 6] AS kind) k
ON CONFLICT DO NOTHING;

COMMIT;
"""


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
        _load_sample_data(clusters[0])
        config = _write_config(base, port, clusters)
        _serve(config)
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


def _load_sample_data(cluster: PostgresCluster) -> None:
    names = ", ".join(f"'{t}'" for t in SAMPLE_TABLES)
    try:
        present = cluster.sql(
            "SELECT count(*) FROM pg_catalog.pg_tables "
            f"WHERE schemaname = 'public' AND tablename IN ({names})",
            DEMO_DATABASE,
        )
        if present == str(len(SAMPLE_TABLES)):
            _say(f"sample data already loaded ({cluster.name}, database {DEMO_DATABASE})")
            return
        _say(f"loading the sample shop data into {cluster.name}, database {DEMO_DATABASE}...")
        cluster.sql(SAMPLE_SQL, DEMO_DATABASE)
    except PsqlError as e:
        raise DemoError(f"could not load the sample data: {e}") from None


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
    }
    path = base / CONFIG_FILE
    text = _CONFIG_HEADER + "\n" + yaml.safe_dump(tree, sort_keys=False)
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


def _serve(config: Config) -> None:
    from .proxy.server import Proxy, install_uvloop, run

    def ready(proxy: Proxy) -> None:
        address = f"{DEMO_USER}:{DEMO_PASSWORD}@{config.listen.host}:{proxy.port}"
        print(f"shardwire demo ready: psql postgresql://{address}/{config.database}  "
              f"(admin console: psql postgresql://{address}/{config.admin_database})",
              flush=True)
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
