"""``shardwire demo-data``: load ``shardwire demo``'s sample shop onto servers that already run;
``shardwire demo-load``: drive the sample shop's traffic through the proxy (below).

``shardwire demo`` starts its own servers and loads the sample shop onto them; Docker compose
(docker/compose.yaml) starts the servers itself. This command loads the same data, with the
demo's own loader, onto the primaries and the catalog that a config names:

- the config's shard map must be the demo's for its shards (``_sharding_yaml`` in
  ``shardwire.demo``): each row goes where that map puts it;
- each shard's primary database gets the sample tables and ``shardwire_next_id()``; the
  catalog database gets the users' directory. The databases must exist.

Like the demo, it leaves data that is already loaded (for the same number of shards) alone,
so it can run at every start. It runs ``psql``, as the demo does.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI imports this module for every command: keep it light
    from .config.model import Config, ServerAddress

__all__ = ["ConfiguredServer", "add_load_parser", "add_parser", "demo_data_command",
           "demo_load_command", "demo_map_problem"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    load = sub.add_parser(
        "demo-data", help="load the demo's sample shop onto the servers of a config",
        description="Load `shardwire demo`'s sample shop onto the shard primaries and the "
        "catalog of a config whose shard map is the demo's (as in docker/shardwire.yaml). "
        "The databases must exist. Leaves data already loaded alone. Uses psql.")
    load.add_argument("--config", required=True, metavar="FILE", help="the YAML config")


def demo_data_command(args: argparse.Namespace) -> int:
    from .cli import load_or_report
    from .demo import DemoError, _load_sample_data
    config = load_or_report(args.config)
    if config is None:
        return 1
    problem = demo_map_problem(config)
    if problem:
        print(f"{args.config}: {problem}", file=sys.stderr)
        return 1
    try:
        servers = [ConfiguredServer(name, config) for name in config.shards]
        _load_sample_data(servers, config)
    except (DemoError, OSError) as e:
        print(f"shardwire demo-data: {e}", file=sys.stderr)
        return 1
    print(f"sample data loaded on {', '.join(config.shards)} (catalog: "
          f"{config.catalog.dsn if config.catalog else '-'})", flush=True)
    return 0


def demo_map_problem(config: Config) -> str | None:
    """Why the demo's loader cannot fill this config's servers, or None."""
    import yaml

    from .config.load import parse_config
    from .demo import _sharding_yaml
    if config.catalog is None:
        return "needs a catalog: the users' directory is kept there"
    names = list(config.shards)
    tree: dict[str, Any] = {
        "database": "demo", "users": {"demo": {"password": "demo"}},
        "shards": {n: {"primary": f"postgresql://demo@{n}/demo"} for n in names},
        "default_shard": config.default_shard, "catalog": "postgresql://demo@catalog/catalog",
    }
    expected = parse_config(yaml.safe_dump(tree) + _sharding_yaml(names), env={}).sharding
    if config.sharding != expected:
        return (f"the shard map is not the demo's for the shards {', '.join(names)}: the "
                "sample rows would land where the map does not look for them (write the "
                "map that `shardwire demo` writes, as docker/shardwire.yaml does)")
    return None


class ConfiguredServer:
    """A shard of the config, seen as the demo's loader sees its servers: a name and psql.

    The loader asks for the demo's two databases by name: ``demo`` stands for the shard
    primary's database and ``shardwire_catalog`` for the config's catalog.
    """

    def __init__(self, name: str, config: Config) -> None:
        self.name = name
        self.primary = config.shards[name].primary
        self.catalog = config.catalog

    def sql(self, query: str, dbname: str = "demo") -> str:
        from .demo import CATALOG_DATABASE, DEMO_DATABASE, DemoError
        from .testing import PsqlError
        if dbname == DEMO_DATABASE:
            server = self.primary
        elif dbname == CATALOG_DATABASE and self.catalog is not None:
            server = self.catalog
        else:
            raise DemoError(f"{self.name}: no server for the database {dbname!r}")
        args = [_psql(), "-X", "-A", "-t", "-q", "-w", "-v", "ON_ERROR_STOP=1",
                "-d", _conninfo(server), "-f", "-"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(PGCONNECT_TIMEOUT="10", PGAPPNAME="shardwire demo-data")
        if server.password is not None:
            env["PGPASSWORD"] = server.password  # not in the arguments, where ps shows them
        result = subprocess.run(args, input=query, env=env, capture_output=True, text=True,
                                encoding="utf-8", errors="replace", timeout=300)
        if result.returncode != 0:
            # The same error as the demo's own servers give, so its loader reports it alike.
            raise PsqlError(self.name, query, result.returncode, args, result.stdout,
                            result.stderr)
        return result.stdout.removesuffix("\n")


def _conninfo(server: ServerAddress) -> str:
    def quoted(value: object) -> str:
        return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"

    parts = {"host": server.host, "port": server.port, "user": server.user,
             "dbname": server.database, "sslmode": server.sslmode}
    return " ".join(f"{k}={quoted(v)}" for k, v in parts.items())


def _psql() -> str:
    found = shutil.which("psql")
    if found:
        return found
    from .testing import ClusterError, pg_bindir
    try:
        candidate = pg_bindir() / "psql"
    except ClusterError:
        candidate = None
    if candidate is not None and candidate.exists():
        return str(candidate)
    from .demo import DemoError
    raise DemoError("psql not found: install PostgreSQL's client programs (on Debian: "
                    "apt-get install -y postgresql-client)")


# --- shardwire demo-load -------------------------------------------------------------------
#
# The sample shop's application, as far as the rebalancer can tell: keyed reads and writes of
# the shops' orders through the proxy, with some shops (the hot tenants) taking most of the
# traffic. It also plays the part of the application that must not lose a write while a
# tenant moves: it remembers every write the proxy acknowledged and, when it stops, reads
# them back through the proxy.
#
# Every statement names one tenant and is its own transaction. A transaction that wrote a
# moving key and then writes it again would wait on the move's fence while the move waits for
# it (docs/rebalancing.md, What clients see), so the load has none.

DEMO_URL = "postgresql://demo:demo@127.0.0.1:6432/demo"
_FIRST_LOAD_ORDER = 100_000  # order numbers from here on are the load's own new orders


def add_load_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    load = sub.add_parser(
        "demo-load", help="drive shop traffic at `shardwire demo` through the proxy",
        description="Run the sample shop's application against `shardwire demo`: keyed reads, "
        "updates and new orders of the shops (tenants) through the proxy, most of them at the "
        "--hot-tenant shops if given. Prints the rate, errors and the slowest write every few "
        "seconds. On Ctrl-C (or after --seconds) it reads every write the proxy acknowledged "
        "back through the proxy and exits 1 if one is missing or applied twice. "
        "See docs/rebalancing.md, walk-through.")
    load.add_argument("--url", default=DEMO_URL,
                      help=f"the proxy, as the demo's ready line prints it (default {DEMO_URL})")
    load.add_argument("--hot-tenant", action="append", default=[], metavar="ID[,ID...]",
                      help="a tenant that gets most of the traffic (repeatable)")
    load.add_argument("--hot-share", type=float, default=0.9, metavar="X",
                      help="the hot tenants' share of the statements, split evenly between "
                      "them (default 0.9); the other tenants share the rest")
    load.add_argument("--rate", type=float, default=100.0, metavar="N",
                      help="statements per second, over all clients (default 100)")
    load.add_argument("--clients", type=int, default=4, metavar="N",
                      help="connections to the proxy (default 4)")
    load.add_argument("--seconds", type=float, default=0.0, metavar="S",
                      help="stop after S seconds (default: run until Ctrl-C)")
    load.add_argument("--report-every", type=float, default=5.0, metavar="S",
                      help="seconds between progress lines (default 5)")


def demo_load_command(args: argparse.Namespace) -> int:
    from .demo import TENANTS
    try:
        hot = sorted({int(t) for item in args.hot_tenant for t in item.split(",") if t.strip()})
    except ValueError:
        print("--hot-tenant takes tenant ids (numbers), e.g. --hot-tenant 1,3", file=sys.stderr)
        return 2
    known = [t for t, *_ in TENANTS]
    unknown = [t for t in hot if t not in known]
    problems = ([f"--hot-tenant: the sample shop has tenants {known[0]} to {known[-1]}, not "
                 f"{', '.join(map(str, unknown))}"] if unknown else [])
    if not 0 < args.hot_share < 1:
        problems.append("--hot-share must be between 0 and 1 (exclusive)")
    if args.rate <= 0 or args.clients < 1 or args.seconds < 0 or args.report_every <= 0:
        problems.append("--rate, --clients and --report-every must be positive, --seconds "
                        "not negative")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    weights = {t: (args.hot_share / len(hot) if t in hot else
                   (1 - args.hot_share) / (len(known) - len(hot))) if hot else 1 / len(known)
               for t in known}
    load = ShopLoad(args.url, weights, rate=args.rate, clients=args.clients)
    return load.run(seconds=args.seconds, report_every=args.report_every, hot=hot)


class ShopLoad:
    """Clients (threads, one connection each) that run keyed statements at a steady rate and
    keep the tally of what the proxy acknowledged."""

    def __init__(self, url: str, weights: dict[int, float], *, rate: float,
                 clients: int) -> None:
        import threading
        self.url = url
        self.weights = weights
        self.rate = rate
        self.clients = clients
        self.lock = threading.Lock()
        self.stop = threading.Event()
        # Per tenant: the order items' quantities at the start, the new orders' numbers.
        self.items: dict[int, dict[tuple[int, int], int]] = {}
        self.customer: dict[int, int] = {}
        self.order_nos: dict[int, list[int]] = {}
        self.next_order_no: dict[int, int] = {}
        self.first_order_no: dict[int, int] = {}
        # What the proxy acknowledged, and writes whose outcome is unknown (the connection
        # broke before the answer): either way is right for those.
        self.new_orders: dict[int, set[int]] = {t: set() for t in weights}
        self.maybe_orders: dict[int, set[int]] = {t: set() for t in weights}
        self.increments: dict[int, dict[tuple[int, int], int]] = {t: {} for t in weights}
        self.maybe_increments: dict[int, dict[tuple[int, int], int]] = {t: {} for t in weights}
        self.reads = 0
        self.errors: dict[str, int] = {}
        self.statements = 0
        self.slowest_write = 0.0
        self.first_error: str | None = None

    # -- running

    def run(self, *, seconds: float, report_every: float, hot: list[int]) -> int:
        import signal
        import threading
        import time

        import psycopg

        def interrupt(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        # Both explicitly: a shell starts a background job with SIGINT ignored.
        signal.signal(signal.SIGINT, interrupt)
        signal.signal(signal.SIGTERM, interrupt)
        try:
            self._prepare()
        except psycopg.Error as e:
            print(f"shardwire demo-load: cannot read the sample shop through {self.url}: "
                  f"{e} (is `shardwire demo` running?)", file=sys.stderr)
            return 1
        shares = (", ".join(map(str, hot)) + f" get {sum(self.weights[t] for t in hot):.0%} "
                  "of the statements" if hot else "every tenant gets the same share")
        print(f"demo-load: {self.clients} clients, {self.rate:g} statements/s, hot tenants: "
              f"{shares}; Ctrl-C stops and checks every acknowledged write", flush=True)
        threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                   for i in range(self.clients)]
        started = time.monotonic()
        for t in threads:
            t.start()
        last, last_count = started, 0
        try:
            while not self.stop.is_set():
                left = started + seconds - time.monotonic() if seconds else report_every
                if left <= 0:
                    break
                self.stop.wait(min(report_every - (time.monotonic() - last), left))
                now = time.monotonic()
                if now - last >= report_every - 1e-3:
                    with self.lock:
                        count, slowest, errors = self.statements, self.slowest_write, \
                            dict(self.errors)
                        self.slowest_write = 0.0
                    print(f"{now - started:6.0f}s  {(count - last_count) / (now - last):5.0f} "
                          f"statements/s  slowest write {slowest * 1000:5.0f} ms  errors "
                          f"{sum(errors.values())}"
                          + (" (" + ", ".join(f"{k}: {v}" for k, v in sorted(errors.items()))
                             + ")" if errors else ""), flush=True)
                    last, last_count = now, count
        except KeyboardInterrupt:
            pass
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the check below runs to its end
        self.stop.set()
        for t in threads:
            t.join(30)
        return self._check()

    def _connect(self) -> Any:
        import psycopg
        return psycopg.connect(self.url, autocommit=True, connect_timeout=10,
                               application_name="shardwire demo-load")

    def _prepare(self) -> None:
        """Read, tenant by tenant (keyed reads: they work while a tenant moves), the order
        items the load updates and where its new orders' numbers start."""
        with self._connect() as conn:
            for t in self.weights:
                rows = conn.execute("SELECT order_id, line_no, quantity FROM order_items "
                                    "WHERE tenant_id = %s", (t,)).fetchall()
                self.items[t] = {(o, n): q for o, n, q in rows}
                row = conn.execute("SELECT min(customer_id) FROM customers WHERE tenant_id = %s",
                                   (t,)).fetchone()
                self.customer[t] = row[0] if row and row[0] is not None else 0
                nos = [n for (n,) in conn.execute(
                    "SELECT order_no FROM orders WHERE tenant_id = %s ORDER BY order_no",
                    (t,)).fetchall()]
                self.order_nos[t] = [n for n in nos if n < _FIRST_LOAD_ORDER] or [0]
                self.next_order_no[t] = max([_FIRST_LOAD_ORDER - 1, *nos]) + 1
                self.first_order_no[t] = self.next_order_no[t]

    def _client(self, number: int) -> None:
        import random
        import time

        import psycopg
        rnd = random.Random(number)
        tenants = list(self.weights)
        weights = [self.weights[t] for t in tenants]
        interval = self.clients / self.rate
        due = time.monotonic() + rnd.random() * interval
        conn = None
        while not self.stop.is_set():
            wait = due - time.monotonic()
            if wait > 0 and self.stop.wait(wait):
                break
            due = max(due + interval, time.monotonic() - interval)
            tenant = rnd.choices(tenants, weights)[0]
            try:
                if conn is None or conn.closed:
                    conn = self._connect()
                self._statement(conn, tenant, rnd)
            except psycopg.Error as e:
                code = e.sqlstate or "connection"
                with self.lock:
                    self.errors[code] = self.errors.get(code, 0) + 1
                    if self.first_error is None:
                        self.first_error = f"{code}: {e}"
                if e.sqlstate is None and conn is not None:
                    conn.close()
        if conn is not None:
            conn.close()

    def _statement(self, conn: Any, tenant: int, rnd: Any) -> None:
        """One statement for `tenant`: a read (60%), an update of an order item (25%) or a
        new order (15%)."""
        import time

        import psycopg
        pick = rnd.random()
        started = time.monotonic()
        if pick < 0.6:
            # One table: the heat statistics name the key of `key = value` on one table
            # (a join on the key is routed to the key's shard too, but counted as the
            # shard's, not the key's).
            conn.execute("SELECT order_no, status, ordered_at FROM orders WHERE tenant_id = %s "
                         "AND order_no = %s", (tenant, rnd.choice(self.order_nos[tenant]))
                         ).fetchall()
            with self.lock:
                self.reads += 1
                self.statements += 1
            return
        if pick < 0.85 and self.items[tenant]:
            item = rnd.choice(list(self.items[tenant]))
            try:
                cur = conn.execute("UPDATE order_items SET quantity = quantity + 1 WHERE "
                                   "tenant_id = %s AND order_id = %s AND line_no = %s",
                                   (tenant, *item))
            except psycopg.Error as e:
                if e.sqlstate is None:  # no answer: it may have been applied
                    with self.lock:
                        maybe = self.maybe_increments[tenant]
                        maybe[item] = maybe.get(item, 0) + 1
                raise
            with self.lock:
                self.statements += 1
                self.slowest_write = max(self.slowest_write, time.monotonic() - started)
                if cur.rowcount == 1:
                    done = self.increments[tenant]
                    done[item] = done.get(item, 0) + 1
                else:
                    self.errors["rowcount"] = self.errors.get("rowcount", 0) + 1
                    if self.first_error is None:
                        self.first_error = (f"an UPDATE of tenant {tenant}'s order item {item} "
                                            f"changed {cur.rowcount} rows, not 1")
            return
        with self.lock:
            order_no = self.next_order_no[tenant]
            self.next_order_no[tenant] = order_no + 1
        try:
            conn.execute("INSERT INTO orders (tenant_id, order_no, customer_id, status, "
                         "ordered_at) VALUES (%s, %s, %s, 'paid', now())",
                         (tenant, order_no, self.customer[tenant]))
        except psycopg.Error as e:
            if e.sqlstate is None:
                with self.lock:
                    self.maybe_orders[tenant].add(order_no)
            raise
        with self.lock:
            self.statements += 1
            self.slowest_write = max(self.slowest_write, time.monotonic() - started)
            self.new_orders[tenant].add(order_no)

    # -- checking

    def _check(self) -> int:
        """Read back, through the proxy and tenant by tenant, every acknowledged write."""
        import psycopg
        problems: list[str] = []
        lines = []
        try:
            with self._connect() as conn:
                for t in self.weights:
                    found = [n for (n,) in conn.execute(
                        "SELECT order_no FROM orders WHERE tenant_id = %s AND order_no >= %s",
                        (t, self.first_order_no[t])).fetchall()]
                    acked, maybe = self.new_orders[t], self.maybe_orders[t]
                    missing = sorted(acked - set(found))
                    extra = sorted(set(found) - acked - maybe)
                    twice = len(found) - len(set(found))
                    if missing:
                        problems.append(f"tenant {t}: acknowledged new orders missing: "
                                        f"order_no {_few(missing)}")
                    if extra or twice:
                        problems.append(f"tenant {t}: orders that were never acknowledged or "
                                        f"are there twice: {_few(extra)} ({twice} twice)")
                    now = {(o, n): q for o, n, q in conn.execute(
                        "SELECT order_id, line_no, quantity FROM order_items "
                        "WHERE tenant_id = %s", (t,)).fetchall()}
                    for item, start in self.items[t].items():
                        done = self.increments[t].get(item, 0)
                        unsure = self.maybe_increments[t].get(item, 0)
                        got = now.get(item)
                        if got is None or not start + done <= got <= start + done + unsure:
                            problems.append(
                                f"tenant {t}: order item {item}: quantity {got}, expected "
                                f"{start + done}" + (f" to {start + done + unsure}"
                                                     if unsure else "")
                                + f" ({done} acknowledged updates)")
                    lines.append(f"tenant {t}: {len(acked)} new orders, "
                                 f"{sum(self.increments[t].values())} updates acknowledged")
        except psycopg.Error as e:
            print(f"shardwire demo-load: cannot check the writes through {self.url}: {e}",
                  file=sys.stderr)
            return 1
        orders = sum(len(v) for v in self.new_orders.values())
        updates = sum(sum(v.values()) for v in self.increments.values())
        errors = sum(self.errors.values())
        for line in lines:
            print(line)
        print(f"acknowledged: {orders} new orders, {updates} updates, {self.reads} reads; "
              f"errors: {errors}" + (f" (first: {self.first_error})" if self.first_error
                                     else ""))
        if problems:
            for p in problems:
                print(p)
            print(f"checked through the proxy: {len(problems)} problem(s)", flush=True)
            return 1
        print("checked through the proxy: every acknowledged write is there, once", flush=True)
        return 0


def _few(values: list[int]) -> str:
    return ", ".join(map(str, values[:10])) + (f" and {len(values) - 10} more"
                                               if len(values) > 10 else "")
