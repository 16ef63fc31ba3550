"""Global ids: a SQL function on every shard that hands out ids no other shard ever gives.

Each shard's own sequence would count 1, 2, 3... on every shard, so rows inserted on two
shards would get the same ids. `shardwire_next_id()` returns a bigint made of::

    bit 63      0 (ids are positive)
    bits 62-22  41 bits: milliseconds since EPOCH (2026-01-01 00:00 UTC), until 2095-09-06
    bits 21-12  10 bits: the shard number, the shard's position in the config's `shards`
                mapping (0 for the first; at most 1024 shards)
    bits 11-0   12 bits: the low bits of a per-shard counter, `shardwire_id_seq`

The shard number makes ids of two shards differ; the time and the counter make ids of one
shard differ. Ids sort by the time they were made (to within the clock of each shard), and
one session's ids always increase.

Why the ids of one shard never repeat (docs/sharding.md, "Global ids", says it for users):
the counter's value n is drawn with nextval, which hands out every value once and in
increasing order; its low 12 bits go into the id, its high bits (n >> 12, the *block*) do
not. Two ids with the same low bits come from different blocks, so they differ if their
milliseconds differ. The function reads the clock (stamp t) *before* drawing n, and returns
only if it knows that n's block had already begun in a millisecond before t: learnt by this
session, which remembers the newest block it has seen and a millisecond by which it had begun
(the custom setting `shardwire.id_block`). Otherwise it learns that now, waits for the next
millisecond and draws again (the value it drew is skipped). Then for ids X < Y of two blocks,
X was drawn before Y's block began, so t_X <= that millisecond < t_Y: they differ. A session
waits up to a millisecond the first time it sees a block, that is once per 4096 ids drawn on
the shard; past 4096 ids per millisecond per shard the function waits rather than repeat.

This holds while the shard's clock does not go back (ids made after a clock step back can
repeat ids of the milliseconds it stepped over) and while the sequence only moves forward one
by one with no per-session cache (`install_sql` sets INCREMENT 1 CACHE 1 NO CYCLE; never
setval it backwards). A shard must keep its number for good: add shards at the end of the
`shards` mapping, never reorder or remove entries (a removed shard's number must not be
given to another).
"""

from __future__ import annotations

import asyncio
import datetime
import sys
from dataclasses import dataclass

from .config.model import Config, ServerAddress

__all__ = [
    "EPOCH",
    "MAX_SHARDS",
    "GlobalId",
    "IdInstallError",
    "decode_id",
    "ids_command",
    "install",
    "install_async",
    "install_sql",
    "shard_numbers",
]

EPOCH = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
EPOCH_MS = 1_767_225_600_000  # EPOCH in milliseconds since 1970-01-01 UTC
TIME_BITS = 41
SHARD_BITS = 10
SEQUENCE_BITS = 12
MAX_SHARDS = 1 << SHARD_BITS
SEQUENCE = "public.shardwire_id_seq"
FUNCTION = "public.shardwire_next_id()"
SESSION_SETTING = "shardwire.id_block"  # what this session knows: "seq oid:block:ms"

assert EPOCH_MS == int(EPOCH.timestamp()) * 1000


@dataclass(frozen=True, slots=True)
class GlobalId:
    """The parts of an id made by `shardwire_next_id()`."""

    made_at: datetime.datetime  # to the millisecond, UTC
    shard_number: int
    sequence: int  # the low 12 bits of the shard's counter


def decode_id(value: int) -> GlobalId:
    """The parts of a global id.

    >>> decode_id((1000 << 22) | (3 << 12) | 7)
    GlobalId(made_at=datetime.datetime(2026, 1, 1, 0, 0, 1, tzinfo=datetime.timezone.utc), \
shard_number=3, sequence=7)
    """
    if not 0 <= value < 1 << 63:
        raise ValueError(f"{value} is not a global id: ids are positive bigints")
    ms = value >> (SHARD_BITS + SEQUENCE_BITS)
    return GlobalId(EPOCH + datetime.timedelta(milliseconds=ms),
                    (value >> SEQUENCE_BITS) & (MAX_SHARDS - 1),
                    value & ((1 << SEQUENCE_BITS) - 1))


def shard_numbers(config: Config) -> dict[str, int]:
    """Each shard's number: its position in the config's `shards` mapping, from 0."""
    return {name: number for number, name in enumerate(config.shards)}


def install_sql(shard_number: int) -> str:
    """SQL that installs `shardwire_next_id()` for the shard with this number, in `public`.

    Idempotent: run it again (as `shardwire ids` does) to repair or update the function. It
    never resets the counter.
    """
    if not 0 <= shard_number < MAX_SHARDS:
        raise ValueError(f"shard number {shard_number} is out of range: at most {MAX_SHARDS} "
                         f"shards, numbered 0 to {MAX_SHARDS - 1}")
    # Milliseconds since the epoch, from the clock (the same expression everywhere below).
    now_ms = f"floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint - {EPOCH_MS}"
    low_mask = (1 << SEQUENCE_BITS) - 1
    return f"""\
DO $$BEGIN
    IF to_regclass('{SEQUENCE}') IS NULL THEN
        CREATE SEQUENCE {SEQUENCE} AS bigint;
    END IF;
END$$;
-- Values in order, one at a time, with no per-session cache: the function relies on it.
ALTER SEQUENCE {SEQUENCE} INCREMENT BY 1 CACHE 1 NO CYCLE;
COMMENT ON SEQUENCE {SEQUENCE} IS
    'Counter of shardwire_next_id(); never reset it or move it backwards';

CREATE OR REPLACE FUNCTION {FUNCTION} RETURNS bigint
    LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
AS $shardwire$
-- Installed by Shardwire for shard number {shard_number}. An id is 41 bits of milliseconds
-- since 2026-01-01 UTC, 10 bits of shard number and the low 12 bits of {SEQUENCE}.
-- See "Global ids" in Shardwire's docs/sharding.md.
DECLARE
    shard_number constant bigint := {shard_number};
    seq constant oid := '{SEQUENCE}'::regclass;
    known text[] := string_to_array(current_setting('{SESSION_SETTING}', true), ':');
    -- This session knows that block known_block of sequence known_seq had begun by the
    -- millisecond known_ms.
    known_seq oid;
    known_block bigint;
    known_ms bigint;
    stamp bigint;
    n bigint;
BEGIN
    IF cardinality(known) = 3 THEN
        known_seq := known[1]::oid;
        known_block := known[2]::bigint;
        known_ms := known[3]::bigint;
    END IF;
    LOOP
        stamp := {now_ms};  -- read before drawing n
        n := nextval(seq::regclass);
        -- n's block began before this millisecond: no earlier block shares the millisecond.
        EXIT WHEN known_seq = seq AND n >> {SEQUENCE_BITS} = known_block AND known_ms < stamp;
        IF known_seq IS DISTINCT FROM seq OR known_block IS DISTINCT FROM n >> {SEQUENCE_BITS}
        THEN
            -- A block new to this session: it had begun by now, since n is drawn.
            known_seq := seq;
            known_block := n >> {SEQUENCE_BITS};
            known_ms := {now_ms};
            PERFORM set_config('{SESSION_SETTING}',
                               concat_ws(':', known_seq, known_block, known_ms), false);
        END IF;
        -- Wait for a later millisecond (less than one) and draw again; n is skipped.
        WHILE {now_ms} <= known_ms LOOP
        END LOOP;
    END LOOP;
    IF stamp < 0 OR stamp >= (1::bigint << {TIME_BITS}) THEN
        RAISE EXCEPTION 'shardwire_next_id(): the clock (%) is outside the range of ids',
                        clock_timestamp()
            USING ERRCODE = '22008',
                  HINT = 'ids cover 2026-01-01 to 2095-09-06 UTC; check the server''s clock';
    END IF;
    RETURN (stamp << {SHARD_BITS + SEQUENCE_BITS}) | (shard_number << {SEQUENCE_BITS})
           | (n & {low_mask});
END
$shardwire$;
COMMENT ON FUNCTION {FUNCTION} IS
    'Global ids of shard number {shard_number}: (ms since 2026-01-01 UTC << 22) | (shard << 12)'
    ' | (counter & 4095)';
"""


class IdInstallError(Exception):
    """`shardwire_next_id()` could not be installed on some shards; `lines` says, per shard,
    what was done or what went wrong."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        super().__init__("\n".join(lines))


@dataclass(frozen=True, slots=True)
class _Outcome:
    line: str
    ok: bool


def install(config: Config) -> list[str]:
    """Install `shardwire_next_id()` on every shard's primary (replicas get it through
    replication); a line per shard says what was done. Raises `IdInstallError` when a shard
    fails, after trying all of them. Not for use inside a running event loop: see
    `install_async`."""
    return asyncio.run(install_async(config))


async def install_async(config: Config) -> list[str]:
    outcomes = await _install_all(config)
    lines = [o.line for o in outcomes]
    if not all(o.ok for o in outcomes):
        raise IdInstallError(lines)
    return lines


async def _install_all(config: Config) -> list[_Outcome]:
    numbers = shard_numbers(config)
    if len(numbers) > MAX_SHARDS:
        return [_Outcome(f"{len(numbers)} shards: global ids allow at most {MAX_SHARDS}",
                         False)]
    return list(await asyncio.gather(*(
        _install_one(name, numbers[name], shard.primary, config.pool.connect_timeout)
        for name, shard in config.shards.items())))


async def _install_one(name: str, number: int, server: ServerAddress,
                       timeout: float) -> _Outcome:
    import asyncpg

    where = f"database {server.database} on {server.host}:{server.port}"
    ssl: bool | str = False if server.sslmode == "disable" else server.sslmode
    try:
        conn = await asyncpg.connect(host=server.host, port=server.port, user=server.user,
                                     password=server.password, database=server.database,
                                     ssl=ssl, timeout=timeout)
    except (TimeoutError, OSError, asyncpg.PostgresError) as e:
        return _Outcome(f"{name}: cannot connect to {where}: {e}", False)
    try:
        async with conn.transaction():
            await conn.execute(install_sql(number))
        # Check it: one id, decoded back.
        made = decode_id(await conn.fetchval(f"SELECT {FUNCTION}"))
    except asyncpg.PostgresError as e:
        return _Outcome(f"{name}: could not install {FUNCTION} in {where}: "
                        f"{e.sqlstate} {e}", False)
    finally:
        await conn.close()
    if made.shard_number != number:
        return _Outcome(f"{name}: {FUNCTION} in {where} made an id of shard number "
                        f"{made.shard_number}, not {number}", False)
    return _Outcome(f"{name}: shard number {number}, {FUNCTION} installed in {where}", True)


def ids_command(config_path: str) -> int:
    """`shardwire ids --config FILE`: install the global id function on every shard."""
    from .cli import load_or_report

    config = load_or_report(config_path)
    if config is None:
        return 1
    outcomes = asyncio.run(_install_all(config))
    for outcome in outcomes:
        print(outcome.line, file=sys.stdout if outcome.ok else sys.stderr, flush=True)
    return 0 if all(o.ok for o in outcomes) else 1
