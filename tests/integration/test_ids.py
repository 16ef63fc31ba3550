"""Global ids: `shardwire_next_id()` installed on the three test shards never repeats an id."""

from __future__ import annotations

import asyncio
import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from shardwire.config import Config, parse_config
from shardwire.ids import (
    IdInstallError,
    decode_id,
    ids_command,
    install,
    install_sql,
    shard_numbers,
)
from shardwire.testing import PostgresCluster, free_port

DATABASE = "ids"  # a database of its own: the function and its sequence stay out of `app`
PER_SESSION = 5_000
SESSIONS = 4  # per shard: 20k ids per shard, all shards at once


def config_tree(shards: list[PostgresCluster], *extra_dsns: str) -> dict[str, Any]:
    dsns = [c.dsn(DATABASE) for c in shards] + list(extra_dsns)
    return {
        "database": DATABASE,
        "users": {"app": {"password": "secret"}},
        "shards": {f"s{i + 1}": {"primary": dsn} for i, dsn in enumerate(dsns)},
        "default_shard": "s1",
    }


@pytest.fixture(scope="module")
def config(shards: list[PostgresCluster]) -> Config:
    for cluster in shards:
        cluster.create_database(DATABASE)
    config = parse_config(yaml.safe_dump(config_tree(shards), sort_keys=False))
    install(config)
    return config


async def draw(dsn: str, count: int) -> list[int]:
    """`count` ids from one session, in the order it made them."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT g, shardwire_next_id() AS id "
                                "FROM generate_series(1, $1) AS g ORDER BY g", count)
    finally:
        await conn.close()
    return [row["id"] for row in rows]


async def draw_everywhere(dsns: list[str], sessions: int, count: int) -> list[list[list[int]]]:
    """For each shard, for each of its sessions, the ids it made; all at the same time."""
    per_shard = [asyncio.gather(*(draw(dsn, count) for _ in range(sessions))) for dsn in dsns]
    return [list(ids) for ids in await asyncio.gather(*per_shard)]


def now_ms() -> int:
    return int(datetime.datetime.now(datetime.UTC).timestamp() * 1000)


def test_ids_from_all_shards_at_once_are_unique_and_name_their_shard(
        config: Config, shards: list[PostgresCluster]) -> None:
    numbers = shard_numbers(config)
    assert numbers == {"s1": 0, "s2": 1, "s3": 2}
    started = now_ms()
    made = asyncio.run(draw_everywhere([c.dsn(DATABASE) for c in shards], SESSIONS,
                                       PER_SESSION))
    finished = now_ms()

    every = [i for shard in made for session in shard for i in session]
    assert len(every) == len(shards) * SESSIONS * PER_SESSION
    assert len(set(every)) == len(every), "an id was given twice"
    for number, shard in enumerate(made):
        for session in shard:
            # One session's ids increase, even when other sessions draw from the same counter.
            assert all(a < b for a, b in zip(session, session[1:], strict=False))
            for value in (session[0], session[-1]):
                parts = decode_id(value)
                assert parts.shard_number == number
                # The time part is when it was made (the servers share this machine's clock).
                made_ms = int(parts.made_at.timestamp() * 1000)
                assert started - 5 <= made_ms <= finished + 5
            assert {decode_id(i).shard_number for i in session} == {number}


def test_more_than_4096_ids_per_millisecond_wait_instead_of_repeating(
        config: Config, shards: list[PostgresCluster]) -> None:
    # A counter that steps 64 at a time turns over its low 12 bits every 64 ids: as if ids
    # were asked for 64 times faster than they are. Eight sessions then make several
    # thousand ids per millisecond's worth of counter on one shard; a scheme that only took
    # the counter mod 4096 would repeat ids by the thousand here.
    shard = shards[1]
    shard.sql("ALTER SEQUENCE shardwire_id_seq INCREMENT BY 64", DATABASE)
    try:
        made = asyncio.run(draw_everywhere([shard.dsn(DATABASE)], 8, 500))[0]
    finally:
        # Installing again restores the counter's settings (and not its value).
        install(config)
    every = [i for session in made for i in session]
    assert len(set(every)) == len(every)
    for session in made:
        assert all(a < b for a, b in zip(session, session[1:], strict=False))
    assert shard.sql("SELECT increment_by FROM pg_sequences "
                     "WHERE sequencename = 'shardwire_id_seq'", DATABASE) == "1"


def test_installing_again_keeps_the_counter(config: Config,
                                            shards: list[PostgresCluster]) -> None:
    shard = shards[2]
    before = int(shard.sql("SELECT last_value FROM shardwire_id_seq", DATABASE))
    lines = install(config)
    assert [line.split(":")[0] for line in lines] == ["s1", "s2", "s3"]
    assert "shard number 2" in lines[2]
    after = int(shard.sql("SELECT last_value FROM shardwire_id_seq", DATABASE))
    assert after > before  # install draws one id to check it; it never resets the counter


def test_an_id_column_defaults_to_a_global_id(config: Config,
                                              shards: list[PostgresCluster]) -> None:
    for cluster in shards:
        cluster.sql("DROP TABLE IF EXISTS notes; "
                    "CREATE TABLE notes (id bigint PRIMARY KEY DEFAULT shardwire_next_id(), "
                    "body text NOT NULL)", DATABASE)
    ids = {}
    for number, cluster in enumerate(shards):
        ids[number] = int(cluster.sql("INSERT INTO notes (body) VALUES ('hello') RETURNING id",
                                      DATABASE))
    assert {decode_id(i).shard_number for i in ids.values()} == {0, 1, 2}
    assert len(set(ids.values())) == 3


def test_install_sql_refuses_a_shard_number_out_of_range() -> None:
    with pytest.raises(ValueError, match="at most 1024 shards"):
        install_sql(1024)
    assert "shard_number constant bigint := 1023;" in install_sql(1023)


def test_ids_command_prints_a_line_per_shard(config: Config, shards: list[PostgresCluster],
                                             tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "shardwire.yaml"
    path.write_text(yaml.safe_dump(config_tree(shards), sort_keys=False))
    assert ids_command(str(path)) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["s1", "s2", "s3"]
    assert all("shardwire_next_id() installed" in line for line in out)


def test_an_unreachable_shard_is_reported_after_the_others(
        config: Config, shards: list[PostgresCluster], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    nobody = f"postgresql://postgres@127.0.0.1:{free_port()}/{DATABASE}"
    path = tmp_path / "shardwire.yaml"
    path.write_text(yaml.safe_dump(config_tree(shards, nobody), sort_keys=False))
    assert ids_command(str(path)) == 1
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 3
    assert captured.err.startswith("s4: cannot connect to database ids on 127.0.0.1:")
    with pytest.raises(IdInstallError) as raised:
        install(parse_config(path.read_text()))
    assert len(raised.value.lines) == 4
