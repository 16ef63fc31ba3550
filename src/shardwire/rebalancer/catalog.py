"""The rebalancer's tables in the catalog database, shared by `rebalance apply` and the proxies.

- `shardwire_proxies`: every running proxy with a catalog registers its instance id here and
  renews `seen_at` every few seconds; `apply` waits for the acknowledgements of the proxies seen
  recently (a proxy not seen for `LIVE_SECONDS` is taken to be gone).
- `shardwire_moves`: one row per move, with the step reached and when each step was reached,
  so that `apply` resumes (or `abort` undoes) a move after a crash.
- `shardwire_fences`: the keys whose writes every proxy holds while a move flips the map.
- `shardwire_map_versions`: one row per map change made by a move.
- `shardwire_acks`: a proxy's acknowledgement of a fence (`kind` = fence) or of a map version
  (`kind` = map), with whether it succeeded.

Changes are announced with NOTIFY on `CHANNEL`: `fence:<id>`, `release:<id>`, `map:<version>`.
"""

from __future__ import annotations

from typing import Any

import asyncpg

CHANNEL = "shardwire_rebalance"
LIVE_SECONDS = 15.0  # a proxy seen more recently than this must acknowledge
HEARTBEAT_SECONDS = 2.0  # how often a proxy renews seen_at

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS shardwire_proxies ("
    " instance text PRIMARY KEY, host text NOT NULL DEFAULT '', pid integer,"
    " started_at timestamptz NOT NULL DEFAULT now(),"
    " seen_at timestamptz NOT NULL DEFAULT now())",
    "CREATE TABLE IF NOT EXISTS shardwire_moves ("
    " id bigserial PRIMARY KEY, plan_move integer, rule text NOT NULL, kind text NOT NULL,"
    " keys jsonb NOT NULL, source text NOT NULL, target text NOT NULL,"
    " config text NOT NULL DEFAULT '',"
    " state text NOT NULL DEFAULT 'running',"  # running, done, aborted, failed
    " step text NOT NULL,"
    " steps jsonb NOT NULL DEFAULT '{}',"  # step -> when it was reached
    " created_tables jsonb NOT NULL DEFAULT '[]',"  # tables this move created on the target
    " detail text NOT NULL DEFAULT '',"
    " started_at timestamptz NOT NULL DEFAULT now(),"
    " updated_at timestamptz NOT NULL DEFAULT now(), finished_at timestamptz)",
    "CREATE TABLE IF NOT EXISTS shardwire_fences ("
    " id bigserial PRIMARY KEY, move_id bigint NOT NULL, rule text NOT NULL,"
    " keys jsonb NOT NULL, source text NOT NULL, target text NOT NULL,"
    " created_at timestamptz NOT NULL DEFAULT now(), released_at timestamptz)",
    "CREATE TABLE IF NOT EXISTS shardwire_map_versions ("
    " version bigserial PRIMARY KEY, move_id bigint NOT NULL, config text NOT NULL,"
    " yaml_before text NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),"
    " reverted boolean NOT NULL DEFAULT false)",
    "CREATE TABLE IF NOT EXISTS shardwire_acks ("
    " kind text NOT NULL, id bigint NOT NULL, instance text NOT NULL,"
    " ok boolean NOT NULL, detail text NOT NULL DEFAULT '',"
    " acked_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (kind, id, instance))",
)


async def ensure_schema(conn: Any) -> None:
    """Create the tables if missing; several proxies may start at once."""
    found = await conn.fetchval(
        "SELECT count(*) FROM pg_class WHERE relname = ANY($1::text[]) AND relkind = 'r' "
        "AND pg_table_is_visible(oid)",
        ["shardwire_proxies", "shardwire_moves", "shardwire_fences", "shardwire_map_versions",
         "shardwire_acks"])
    if found == len(_SCHEMA):
        return
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('shardwire_rebalance'))")
            for statement in _SCHEMA:
                await conn.execute(statement)
    except (asyncpg.UniqueViolationError, asyncpg.DuplicateTableError):
        pass  # created by another process at the same moment


async def live_proxies(conn: Any) -> set[str]:
    rows = await conn.fetch(
        "SELECT instance FROM shardwire_proxies WHERE seen_at > now() - make_interval(secs => $1)",
        LIVE_SECONDS)
    return {r["instance"] for r in rows}


async def acks(conn: Any, kind: str, ident: int) -> dict[str, tuple[bool, str]]:
    rows = await conn.fetch("SELECT instance, ok, detail FROM shardwire_acks "
                            "WHERE kind = $1 AND id = $2", kind, ident)
    return {r["instance"]: (r["ok"], r["detail"]) for r in rows}
