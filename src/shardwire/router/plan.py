"""What the router decides for one statement: a plan. Pure data."""

from __future__ import annotations

from dataclasses import dataclass

from .shardmap import KeyValue


@dataclass(frozen=True, slots=True)
class SingleShard:
    """Run the statement on one shard, as the client wrote it (or as `sql`, rewritten)."""

    shard: str
    reason: str
    sql: bytes | None = None


@dataclass(frozen=True, slots=True)
class AnyShard:
    """The statement touches no table (SELECT 1, SET, BEGIN...): any shard may run it; the
    proxy uses the one the session already holds, else the default shard."""

    reason: str


@dataclass(frozen=True, slots=True)
class MultiShard:
    """Run on several shards: a read to merge, or a write that needs a distributed
    transaction."""

    shards: tuple[str, ...]
    write: bool
    reason: str
    sql: dict[str, bytes] | None = None  # per-shard statements, where they differ
    # A multi-row INSERT ... VALUES: the shard of each row, in order (split by shard).
    rows: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class EachStatement:
    """A query string whose statements need different shards (or one needs several): each
    runs where its own plan says, in order, all of them in one transaction across the shards,
    as one server runs a query string in one implicit transaction."""

    plans: tuple[SingleShard | AnyShard | MultiShard, ...]  # one per statement
    shards: tuple[str, ...]  # every shard a statement needs, in the map's order
    begin: bool = False  # the string opens with BEGIN and ends with COMMIT, its first and
    # last statements


@dataclass(frozen=True, slots=True)
class Refusal:
    """The statement cannot be run exactly right: the client gets this error."""

    sqlstate: str
    message: str
    hint: str | None = None


@dataclass(frozen=True, slots=True)
class NeedLookup:
    """A lookup rule's directory must be read for these keys before routing again."""

    rule: str
    keys: tuple[KeyValue, ...]
    assign: bool = False  # an INSERT: keys not in the directory get a shard now


Plan = SingleShard | AnyShard | MultiShard | EachStatement | Refusal | NeedLookup


def describe(plan: Plan) -> dict[str, object]:
    """The plan as plain data, for EXPLAIN-style output and `shardwire explain --json`."""
    match plan:
        case SingleShard(shard=shard, reason=reason, sql=sql):
            out: dict[str, object] = {"route": "single", "shards": [shard], "reason": reason}
            if sql is not None:
                out["sql"] = {shard: sql.decode("utf-8", "replace")}
            return out
        case AnyShard(reason=reason):
            return {"route": "any", "shards": [], "reason": reason}
        case MultiShard(shards=shards, write=write, reason=reason, sql=sql, rows=rows):
            out = {"route": "multi", "shards": list(shards), "write": write, "reason": reason}
            if rows is not None:
                out["rows"] = list(rows)
            if sql is not None:
                out["sql"] = {k: v.decode("utf-8", "replace") for k, v in sql.items()}
            return out
        case EachStatement(plans=plans, shards=shards):
            return {"route": "each statement", "shards": list(shards),
                    "reason": "the statements need different shards: one transaction across "
                    "them", "statements": [describe(p) for p in plans]}
        case Refusal(sqlstate=sqlstate, message=message, hint=hint):
            return {"route": "refused", "sqlstate": sqlstate, "message": message, "hint": hint}
        case NeedLookup(rule=rule, keys=keys, assign=assign):
            return {"route": "lookup", "rule": rule, "keys": [str(k) for k in keys],
                    "assign": assign}
    raise AssertionError(plan)
