"""Fixtures of the oracle: one reference PostgreSQL, the three shards, and a proxy over them.

One setup serves the whole directory (session scope):

- the shards are the clusters of `pg_clusters` (tests/conftest.py; already running when the
  integration tests ran first), and the reference server is one more throwaway cluster
  (`shardwire.testing.PostgresCluster`), started in a thread at the same time;
- the database `oracle` is created afresh on all four servers, with the tables of `data.py`
  and the same seeded rows: all of them on the reference server, each row on the shard
  Shardwire's own map puts its key on (reference tables on every shard);
- a Shardwire proxy (`shardwire.testing.proxy.ProxyProcess`) serves `oracle` over the shards
  with the map of `data.SHARD_MAP`.

`SHARDWIRE_TEST_DIR` keeps the reference cluster next to the shards, as it keeps those.
A failed test shows the tail of the proxy's log and of the reference server's log.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from shardwire.testing import PostgresCluster, stop_clusters
from shardwire.testing.proxy import ProxyProcess

from .data import (
    DATABASE,
    OracleSetup,
    generate_rows,
    load,
    proxy_config,
    recreate_database,
    shard_map,
)
from .rig import Rig, Tally

ORACLE_DIR = Path(__file__).parent
REFERENCE_NAME = "oracle-reference"

_tally_key = pytest.StashKey[Tally]()
_logs_key = pytest.StashKey[list[Path]]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "oracle: differential tests against a reference server (tests/oracle)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(ORACLE_DIR):
            item.add_marker(pytest.mark.oracle)
            item.add_marker(pytest.mark.integration)


def _base_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bool]:
    """Where the reference cluster lives, and whether it is kept after the session."""
    configured = os.environ.get("SHARDWIRE_TEST_DIR")
    if configured:
        base = Path(configured)
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        return (base / worker if worker else base), True
    return tmp_path_factory.mktemp("oracle", numbered=False), False


@pytest.fixture(scope="session")
def oracle_reference_start(tmp_path_factory: pytest.TempPathFactory,
                           request: pytest.FixtureRequest) -> Iterator[Future[PostgresCluster]]:
    """The reference server, starting in the background (requested before `pg_clusters`, so
    that both start at once)."""
    base, keep = _base_dir(tmp_path_factory)
    reference = PostgresCluster(base / REFERENCE_NAME, name=REFERENCE_NAME)

    def start() -> PostgresCluster:
        reference.init()
        reference.start()
        return reference

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="oracle-ref") as pool:
        future = pool.submit(start)
        try:
            yield future
        finally:
            future.exception()  # wait for the start to end, however it ended
            stop_clusters([reference])
            if not keep and request.session.testsfailed == 0:
                shutil.rmtree(reference.data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def oracle(oracle_reference_start: Future[PostgresCluster], pg_clusters: list[PostgresCluster],
           tmp_path_factory: pytest.TempPathFactory,
           request: pytest.FixtureRequest) -> Iterator[OracleSetup]:
    reference = oracle_reference_start.result()
    servers = [reference, *pg_clusters]
    with ThreadPoolExecutor(max_workers=len(servers)) as pool:
        list(pool.map(recreate_database, servers))
    smap = shard_map()
    counts = load(reference, pg_clusters, generate_rows(), smap)
    proxy = ProxyProcess(proxy_config([c.dsn(DATABASE) for c in pg_clusters]),
                         tmp_path_factory.mktemp("oracle-proxy"))
    request.config.stash[_logs_key] = [proxy.log_path, reference.log_path]
    proxy.start()
    try:
        yield OracleSetup(reference, list(pg_clusters), proxy, smap, counts)
    finally:
        proxy.stop()


@pytest.fixture(scope="session")
def oracle_tally(request: pytest.FixtureRequest) -> Tally:
    """The counts of every run in the session, printed at the end."""
    tally = Tally()
    request.config.stash[_tally_key] = tally
    return tally


@pytest.fixture(scope="session")
def rig(oracle: OracleSetup) -> Iterator[Rig]:
    rig = Rig(oracle.reference_dsn, oracle.proxy_dsn, oracle.smap)
    try:
        yield rig
    finally:
        rig.close()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config
                            ) -> None:
    tally = config.stash.get(_tally_key, None)
    if tally is not None and tally.queries:
        terminalreporter.write_sep("-", "shardwire oracle")
        terminalreporter.write_line(tally.summary())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and item.path.is_relative_to(ORACLE_DIR):
        for path in item.config.stash.get(_logs_key, []):
            try:
                lines = path.read_text(errors="replace").splitlines()[-30:]
            except OSError:
                continue
            report.sections.append((f"last lines of {path}", "\n".join(lines)))
    return report
