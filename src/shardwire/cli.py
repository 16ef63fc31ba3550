"""The `shardwire` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import __version__

if TYPE_CHECKING:
    from .config.model import Config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="shardwire",
        description="Shardwire: a PostgreSQL sharding proxy. Clients connect to it as to one "
        "PostgreSQL server; it runs their statements on the shards behind it.")
    parser.add_argument("--version", action="version", version=f"shardwire {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the proxy with a config file",
                           description="Run the proxy until SIGINT or SIGTERM. SIGHUP (or "
                           "RELOAD in the admin console) re-reads the config file.")
    serve.add_argument("--config", required=True, metavar="FILE", help="the YAML config")
    serve.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"])
    serve.add_argument("--workers", type=int, default=1, metavar="N",
                       help="run N proxy processes on the one port (SO_REUSEPORT); "
                       "docs/operations.md (default 1)")
    # The processes of --workers are started with these (proxy/workers.py).
    serve.add_argument("--worker-of", help=argparse.SUPPRESS)
    serve.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)

    check = sub.add_parser("check", help="validate a config file",
                           description="Load and validate a config file; print the problems "
                           "and exit 1 if there are any.")
    check.add_argument("--config", required=True, metavar="FILE")

    demo = sub.add_parser(
        "demo", help="start local PostgreSQL shards, sample data and the proxy",
        description="Start K local PostgreSQL servers (created in the data dir on first run, "
        "reused after), load a sample schema and data, write DIR/shardwire.yaml and run the "
        "proxy. Prints a line with 'ready' and the URL to connect to. Ctrl-C stops everything.")
    demo.add_argument("--port", type=int, default=6432, help="the proxy's port (default 6432)")
    demo.add_argument("--data-dir", default=".demo", metavar="DIR",
                      help="where the servers' data and the config live (default .demo)")
    demo.add_argument("--shards", type=int, default=2, metavar="K",
                      help="how many shard servers (default 2)")
    demo.add_argument("--log-level", default="warning",
                      choices=["debug", "info", "warning", "error"])

    explain = sub.add_parser(
        "explain", help="show where a statement goes and why",
        description="Route one statement (as a simple Query) by the config's shard map and "
        "print the shards it goes to and why, or the error a client would get. Lookup rules "
        "show the directory keys they need.")
    explain.add_argument("--config", required=True, metavar="FILE")
    explain.add_argument("--json", action="store_true", help="print JSON")
    explain.add_argument("sql", help="the statement")

    ids = sub.add_parser(
        "ids", help="install the global id function on every shard",
        description="Install shardwire_next_id() and its counter shardwire_id_seq on the "
        "primary of every shard, each numbered by its position in the config's shards (see "
        "docs/sharding.md, Global ids). Safe to run again; never resets the counter. Prints "
        "a line per shard; exits 1 if any shard failed.")
    ids.add_argument("--config", required=True, metavar="FILE", help="the YAML config")

    recover = sub.add_parser(
        "recover", help="finish two-phase commits a crash left prepared on the shards",
        description="Look for Shardwire's prepared transactions (shardwire:...) on the primary "
        "of every shard: commit those whose commit decision is in the catalog database, roll "
        "back those without one that are older than --min-age, leave younger ones (a proxy "
        "may be about to decide). Prints a line per transaction and a summary; exits 0 when "
        "nothing is left in doubt, 1 otherwise. Safe to run while proxies run (see "
        "docs/transactions.md).")
    recover.add_argument("--config", required=True, metavar="FILE", help="the YAML config")
    recover.add_argument("--dry-run", action="store_true",
                         help="only print what would be done")
    recover.add_argument("--min-age", type=float, default=60.0, metavar="SECONDS",
                         help="roll back undecided transactions only when prepared at least "
                         "this long ago (default 60)")

    rebalance = sub.add_parser(
        "rebalance", help="find hot shards and keys, plan moves to cooler shards, apply them",
        description="Read the heat statistics the proxies write to the catalog database and "
        "the sizes of the sharded tables on each shard (no proxy needs to run). `status` "
        "shows them; `plan` proposes moves that bring every shard's load under --threshold "
        "times the mean load (docs/rebalancing.md); `apply` moves tenants and category "
        "values online, `abort` undoes an unfinished move.")
    actions = rebalance.add_subparsers(dest="action", required=True, metavar="ACTION")
    status = actions.add_parser(
        "status", help="shards with their load, size and hottest keys, and the skew",
        description="A table of the shards with their load, size and hottest keys, and the "
        "skew: the hottest shard's load over the mean load.")
    plan = actions.add_parser(
        "plan", help="propose moves from hot shards to cool ones",
        description="Propose moves (a tenant, a category value, lookup keys, part of a range) "
        "that bring every shard's load under --threshold times the mean. Prints the plan as "
        "YAML, or writes it to --output and prints a summary. Exit status 0 when the plan "
        "brings every shard under the threshold, 1 otherwise.")
    for action in (status, plan):
        action.add_argument("--config", required=True, metavar="FILE", help="the YAML config")
        action.add_argument("--since", type=float, default=600.0, metavar="SECONDS",
                            help="use the heat windows that ended in the last SECONDS "
                            "(default 600)")
        action.add_argument("--metric", choices=["busy", "statements"], default="busy",
                            help="what load means: busy time on the shard (default) or "
                            "statements")
        action.add_argument("--threshold", type=float, default=1.2, metavar="X",
                            help="a shard is hot above X times the mean load (default 1.2)")
    status.add_argument("--json", action="store_true", help="print JSON")
    plan.add_argument("--output", metavar="FILE", help="write the plan to FILE")
    # rebalance apply / abort (rebalancer/apply.py)
    apply = actions.add_parser(
        "apply", help="move keys online, from a plan file or --move",
        description="Move the keys of each move online (docs/rebalancing.md): copy their rows "
        "to the target shard and stream later changes with logical replication, hold writes "
        "to them at every proxy for a moment, flip the shard map (the config file is "
        "rewritten, comments kept; the proxies reload it), verify, delete them from the "
        "source. Every step is recorded in the catalog database: after a crash, run apply "
        "again to resume. Tenant, category, lookup-key and range-split moves; a hash rule's "
        "keys cannot be moved one by one.")
    apply.add_argument("--config", required=True, metavar="FILE", help="the YAML config")
    what = apply.add_mutually_exclusive_group(required=True)
    what.add_argument("--plan", metavar="FILE", help="a plan file (`rebalance plan --output`)")
    what.add_argument("--move", action="append", metavar="RULE:KEY[,KEY...]:TO",
                      help="a move, e.g. by_tenant:42:s2, by_user:7,9:s2 (lookup keys), "
                      "by_id:500..:s2 or by_id:..500:s2 (a range's part from or below 500); "
                      "repeatable")
    abort = actions.add_parser(
        "abort", help="undo a move that has not flipped the map",
        description="Undo the unfinished move recorded in the catalog, if it has not flipped "
        "the map yet: release its fence, drop its subscription, slot and publication, delete "
        "the rows copied to the target. The source is left as it was.")
    abort.add_argument("--config", required=True, metavar="FILE", help="the YAML config")

    from . import demo_data, health
    health.add_parser(sub)
    demo_data.add_parser(sub)
    demo_data.add_load_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "health":
        return health.health_command(args)
    if args.command == "demo-data":
        return demo_data.demo_data_command(args)
    if args.command == "demo-load":
        return demo_data.demo_load_command(args)
    if args.command == "rebalance":
        return _rebalance(args)
    if args.command == "recover":
        return _recover(args.config, dry_run=args.dry_run, min_age=args.min_age)
    if args.command == "ids":
        from .ids import ids_command
        return ids_command(args.config)
    if args.command == "explain":
        return _explain(args.config, args.sql, as_json=args.json)
    if args.command == "check":
        return _check(args.config)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        return _serve(args.config, workers=args.workers, log_level=args.log_level,
                      worker_of=args.worker_of, worker_index=args.worker_index)
    if args.command == "demo":
        from .demo import run_demo
        return run_demo(port=args.port, data_dir=args.data_dir, shards=args.shards)
    return 2


def load_or_report(path: str) -> Config | None:
    """The config at `path`, or None after printing its problems to stderr."""
    from .config.load import ConfigError, load_config
    try:
        return load_config(path)
    except ConfigError as e:
        print(f"{path}: {len(e.problems)} problem(s):", file=sys.stderr)
        for problem in e.problems:
            print(f"  {problem}", file=sys.stderr)
    except OSError as e:
        print(f"{path}: {e.strerror}", file=sys.stderr)
    return None


def _check(path: str) -> int:
    config = load_or_report(path)
    if config is None:
        return 1
    print(f"{path}: ok ({len(config.shards)} shards, {len(config.users)} users)")
    return 0


def _explain(path: str, sql: str, *, as_json: bool) -> int:
    import json

    from .proxy.routing import StatementRouter
    from .router.plan import MultiShard, Refusal, describe
    from .router.route import RouteContext
    from .router.split import SplitError, with_split_sql
    config = load_or_report(path)
    if config is None:
        return 1
    plan = StatementRouter(config.sharding).plan_query(sql.encode(), RouteContext())
    if isinstance(plan, MultiShard) and plan.rows is not None:
        try:
            plan = with_split_sql(plan, sql.encode())
        except SplitError as e:
            plan = Refusal("0A000", f"cannot split the INSERT's text by row: {e}")
    out = describe(plan)
    if out.get("route") in ("single", "multi"):
        shards = out["shards"]
        assert isinstance(shards, list)
        given = out.get("sql") or {}
        assert isinstance(given, dict)
        out["sql"] = {shard: given.get(shard, sql) for shard in shards}
    if as_json:
        print(json.dumps(out, indent=2))
    else:
        for key, value in out.items():
            print(f"{key}: {value}")
    return 1 if isinstance(plan, Refusal) else 0


def _rebalance(args: argparse.Namespace) -> int:
    from .rebalancer.cli import rebalance_command
    config = load_or_report(args.config)
    if config is None:
        return 1
    if getattr(args, "threshold", 1) < 1:
        print("--threshold is a multiple of the mean load: at least 1", file=sys.stderr)
        return 2
    return rebalance_command(args, config)


def _recover(path: str, *, dry_run: bool, min_age: float) -> int:
    from .proxy.twophase import (
        DecisionLog,
        PreparedTransaction,
        Recovery,
        RecoveryReport,
        decision_address,
    )
    config = load_or_report(path)
    if config is None:
        return 1
    if min_age < 0:
        print("--min-age must not be negative", file=sys.stderr)
        return 2

    async def run() -> RecoveryReport:
        decisions = DecisionLog(decision_address(config), decided_by="shardwire recover")
        try:
            return await Recovery(config, decisions).run_once(min_age=min_age, dry_run=dry_run)
        finally:
            await decisions.close()

    report = asyncio.run(run())
    commit, rollback = ("would commit", "would roll back") if dry_run else (
        "committed", "rolled back")

    def line(t: PreparedTransaction, what: str) -> None:
        print(f"{t.shard}: {what} {t.gid} (prepared {t.age_seconds:.0f}s ago)", flush=True)

    for problem in report.problems:
        print(f"warning: {problem}", file=sys.stderr)
    if report.catalog_error:
        print(f"catalog: {report.catalog_error}", file=sys.stderr)
    for shard, why in report.unreachable:
        print(f"{shard}: unreachable: {why}", file=sys.stderr)
    for t in report.committed:
        line(t, commit)
    for t in report.rolled_back:
        line(t, rollback)
    for t in report.elsewhere:
        line(t, "finished by another session:")
    for t in report.left_young:
        line(t, f"left alone (no decision, younger than {min_age:g}s):")
    for t, why in report.failed:
        print(f"{t.shard}: could not finish {t.gid}: {why}", file=sys.stderr)
    if report.forgotten:
        print(f"forgot {len(report.forgotten)} finished decision(s)")

    def count(items: Sequence[PreparedTransaction]) -> int:
        return len({t.gid for t in items})

    left = count([*report.left_young, *(t for t, _ in report.failed)])
    if dry_run:
        left += count([*report.committed, *report.rolled_back])
    summary = [f"{count(report.committed)} {commit}", f"{count(report.rolled_back)} {rollback}",
               f"{left} left in doubt"]
    if report.unreachable:
        summary.append(f"{len(report.unreachable)} shard(s) not looked at")
    print("summary: " + ", ".join(summary) + (" (dry run)" if dry_run else ""), flush=True)
    return 0 if report.settled else 1


def _serve(path: str, *, workers: int = 1, log_level: str = "info",
           worker_of: str | None = None, worker_index: int = 0) -> int:
    from pathlib import Path

    from .proxy.server import install_uvloop, run
    from .proxy.workers import (
        WorkerRole,
        WorkerSupervisor,
        die_with_parent,
        worker_config,
        workers_problem,
    )
    config = load_or_report(path)
    if config is None:
        return 1
    problem = workers_problem(config, workers)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if workers > 1:
        return WorkerSupervisor(config, workers, log_level).run()
    role = None
    if worker_of is not None:
        die_with_parent()
        role = WorkerRole(worker_index, Path(worker_of))
        config = worker_config(config)
    install_uvloop()

    def ready(proxy: object) -> None:
        port = getattr(proxy, "port", config.listen.port)
        print(f"shardwire ready on {config.listen.host}:{port}", flush=True)

    try:
        asyncio.run(run(config, ready=ready, worker=role))
    except OSError as e:
        print(f"cannot listen on {config.listen.host}:{config.listen.port}: {e.strerror}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
