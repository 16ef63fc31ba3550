"""The read/write split: which statements may run on a shard's replicas, and which replica.

A replica is a PostgreSQL hot standby: it refuses every write (SQLSTATE 25006), and what it
returns may be a little behind the primary. So only statements that cannot write go there,
decided conservatively from the text alone (no parse, so the check costs microseconds and is
made only for shards that have replicas):

- a single statement starting with SELECT (not WITH: a data-modifying CTE writes),
- without a locking clause (FOR UPDATE / NO KEY UPDATE / SHARE / KEY SHARE: a standby
  cannot take row locks) and without SELECT ... INTO (which creates a table),
- whose function calls are all in `READ_ONLY_FUNCTIONS`, PostgreSQL built-ins that write
  nothing. Any other call (nextval, setval, pg_advisory_lock, set_config, txid_current, a
  user's function, anything schema-qualified or quoted) sends the statement to the primary,
  since a function may write.

Statements inside a transaction block go where the transaction's first statement went: to a
replica only when the transaction was opened READ ONLY.

Read-your-writes (`ClientConnection._pool_for` in server.py): for some seconds after a
session sent a shard with replicas anything but a plain read, its reads go to the primary. How
long is `replicas.read_your_writes`, or, for a read routed by one key of a rule that sets its
own `read_your_writes`, the rule's. Any such write of the session counts, whichever rule (if
any) routed it: from the text alone the proxy cannot tell which tables a write changed (a
trigger, a function or a data-modifying CTE may change another rule's rows on the same shard),
so counting only the rule's own writes could let a read miss the session's write.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config.model import ReadTarget
from .pool import Pool

# Built-in functions (and SQL keywords written like calls) that read only. Lower case.
READ_ONLY_FUNCTIONS = frozenset({
    # keywords followed by a parenthesis
    "select", "from", "join", "on", "in", "exists", "any", "all", "some", "and", "or", "not",
    "where", "as", "over", "filter", "within", "values", "using", "by", "having", "when",
    "then", "else", "lateral", "union", "intersect", "except", "distinct", "row", "array",
    "is", "like", "ilike", "between", "limit", "offset", "case", "with", "ordinality",
    "partition", "rows", "range", "groups", "cast", "extract", "position", "overlay",
    "substring", "trim", "collate", "nullif", "coalesce", "greatest", "least", "interval",
    "timestamp", "timestamptz", "date", "time", "numeric", "decimal", "varchar", "char",
    "character", "bit", "float", "double", "precision", "table", "only", "asc", "desc",
    "grouping", "cube", "rollup", "sets", "similar", "to", "escape", "at", "zone",
    # aggregates and window functions
    "count", "sum", "avg", "min", "max", "array_agg", "string_agg", "json_agg", "jsonb_agg",
    "json_object_agg", "jsonb_object_agg", "bool_and", "bool_or", "every", "bit_and",
    "bit_or", "stddev", "stddev_pop", "stddev_samp", "variance", "var_pop", "var_samp",
    "percentile_cont", "percentile_disc", "mode", "row_number", "rank", "dense_rank",
    "percent_rank", "cume_dist", "ntile", "lag", "lead", "first_value", "last_value",
    "nth_value", "corr", "covar_pop", "covar_samp", "regr_slope", "regr_intercept",
    # scalar functions
    "abs", "ceil", "ceiling", "floor", "round", "trunc", "sqrt", "power", "pow", "exp", "ln",
    "log", "mod", "sign", "div", "random", "width_bucket", "lower", "upper", "length",
    "char_length", "octet_length", "concat", "concat_ws", "replace", "split_part", "left",
    "right", "lpad", "rpad", "ltrim", "rtrim", "btrim", "strpos", "starts_with", "reverse",
    "repeat", "initcap", "md5", "format", "to_char", "to_date", "to_timestamp", "to_number",
    "now", "clock_timestamp", "statement_timestamp", "transaction_timestamp", "date_trunc",
    "date_part", "age", "make_date", "make_timestamp", "make_interval", "justify_interval",
    "regexp_replace", "regexp_match", "regexp_matches", "regexp_split_to_array",
    "string_to_array", "array_to_string", "array_length", "cardinality", "unnest",
    "array_position", "array_append", "array_cat", "generate_series", "jsonb_build_object",
    "json_build_object", "jsonb_build_array", "json_build_array", "to_json", "to_jsonb",
    "jsonb_array_length", "jsonb_extract_path", "jsonb_extract_path_text", "jsonb_typeof",
    "jsonb_each", "jsonb_array_elements", "jsonb_set", "row_to_json", "encode", "decode",
    "gen_random_uuid", "uuid_generate_v4", "host", "family", "hashtext", "current_setting",
    "version", "current_database", "current_schema", "current_user", "session_user",
    "pg_backend_pid", "inet_server_port", "inet_server_addr", "inet_client_addr",
    "pg_is_in_recovery", "pg_last_wal_replay_lsn", "pg_last_wal_receive_lsn",
    "pg_last_xact_replay_timestamp", "pg_is_wal_replay_paused", "pg_postmaster_start_time",
    "pg_typeof", "pg_size_pretty", "pg_relation_size", "pg_total_relation_size",
    "pg_database_size", "has_table_privilege", "format_type", "obj_description",
})

_CALL = re.compile(rb'("(?:[^"]|"")*"|[A-Za-z_][\w$]*)\s*\(')
_LOCKING = re.compile(
    rb"(?i)\bfor\s+(?:update|no\s+key\s+update|share|key\s+share)\b")
_INTO = re.compile(rb"(?i)\binto\b")
_READ_ONLY_BEGIN = re.compile(rb"(?i)\bread\s+only\b")
_TARGET = re.compile(
    rb"(?is)^\s*(set|reset|show)\s+(local\s+|session\s+)?shardwire\s*\.\s*target\b\s*"
    rb"(?:(?:=|to)\s*(.*?))?\s*;?\s*$")

_CACHE_LIMIT = 10_000
_plain: dict[bytes, bool] = {}


def plain_read(sql: bytes) -> bool:
    """Whether a statement text may run on a replica (see the module's docstring).

    >>> plain_read(b"select count(*) from orders where tenant_id = 4")
    True
    >>> plain_read(b"select nextval('orders_id_seq')"), plain_read(b"SELECT 1 FOR UPDATE")
    (False, False)
    >>> plain_read(b"with x as (delete from t returning *) select * from x")
    False
    """
    found = _plain.get(sql)
    if found is None:
        found = _classify(sql)
        if len(_plain) >= _CACHE_LIMIT:
            _plain.clear()
        _plain[sql] = found
    return found


def _classify(sql: bytes) -> bool:
    text = sql.strip().rstrip(b";").rstrip()
    if text[:6].lower() != b"select" or (text[6:7].isalnum() or text[6:7] == b"_"):
        return False
    if b";" in text or _LOCKING.search(text) or _INTO.search(text):
        return False  # several statements (or a ';' in a string: conservative), locks
    for match in _CALL.finditer(text):
        name = match.group(1)
        start = match.start()
        if name.startswith(b'"') or (start and text[start - 1:start] == b"."):
            return False  # quoted or schema-qualified: a user's function, maybe
        if name.decode("ascii", "replace").lower() not in READ_ONLY_FUNCTIONS:
            return False
    return True


def read_only_begin(sql: bytes | None) -> bool:
    """Whether a transaction's BEGIN opened it READ ONLY (then it may run on a replica)."""
    return sql is not None and _READ_ONLY_BEGIN.search(sql) is not None


@dataclass(frozen=True, slots=True)
class TargetSetting:
    """`SET [LOCAL] shardwire.target = v`, `RESET shardwire.target` or `SHOW shardwire.target`."""

    verb: str  # set | reset | show
    value: str  # '' for RESET or DEFAULT
    local: bool


def parse_target_setting(sql: bytes) -> TargetSetting | None:
    """The `shardwire.target` statement in `sql`, or None if it is something else."""
    found = _TARGET.match(sql)
    if found is None:
        return None
    verb = found.group(1).decode().lower()
    value = (found.group(3) or b"").decode("utf-8", "replace").strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    if verb == "reset" or value.lower() == "default":
        value = ""
    local = (found.group(2) or b"").strip().lower() == b"local"
    return TargetSetting(verb, value.lower(), local)


class ReplicaSet:
    """A shard with replicas: its primary's pool and its replicas' pools, and the choice of
    one for a read. Replicas that fail their health check, that are no longer standbys, or
    that lag more than `replicas.max_lag` are skipped; with none left, reads go to the
    primary."""

    __slots__ = ("shard", "primary", "replicas", "_turn")

    def __init__(self, shard: str, primary: Pool, replicas: list[Pool]) -> None:
        self.shard = shard
        self.primary = primary
        self.replicas = replicas
        self._turn = 0

    def for_read(self, target: ReadTarget, max_lag: float) -> Pool:
        """The pool a plain read goes to: the least busy of the eligible servers, taken in
        turn among equals (round robin)."""
        candidates = [p for p in self.replicas if p.serves_reads(max_lag)]
        if target is ReadTarget.ANY and self.primary.up:
            candidates.append(self.primary)
        if not candidates:
            return self.primary
        self._turn += 1
        count = len(candidates)
        best = candidates[self._turn % count]
        best_load = len(best.active) + len(best.waiters)
        for i in range(1, count):
            pool = candidates[(self._turn + i) % count]
            load = len(pool.active) + len(pool.waiters)
            if load < best_load:
                best, best_load = pool, load
        return best
