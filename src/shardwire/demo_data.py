"""``shardwire demo-data``: load ``shardwire demo``'s sample shop onto servers that already run.

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

__all__ = ["ConfiguredServer", "add_parser", "demo_data_command", "demo_map_problem"]


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
