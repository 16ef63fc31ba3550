"""Shared by unit and integration tests.

Nothing heavy is imported at module level: unit tests must not pay for the cluster harness.
Integration tests get the ``integration`` marker from their directory, and ``pg_clusters``
starts three real PostgreSQL clusters once per session.

``SHARDWIRE_TEST_DIR`` keeps the clusters in a fixed directory that later sessions reuse
(initdb is skipped, each cluster restarts on its stored port); by default they live in
pytest's temp directory and their data directories are removed after a session with no
failures (the logs stay).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from shardwire.testing import PostgresCluster

INTEGRATION_DIR = Path(__file__).parent / "integration"
SHARD_COUNT = 3

# The clusters of this session, for the failure report hook.
_session_clusters: list[PostgresCluster] = []
_log_positions = pytest.StashKey[dict[Path, int]]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: runs against real PostgreSQL clusters (tests/integration)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(INTEGRATION_DIR):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def pg_clusters(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[list[PostgresCluster]]:
    """Three running clusters named shard1, shard2, shard3 (see ``shardwire.testing``)."""
    from shardwire.testing import start_clusters, stop_clusters

    configured = os.environ.get("SHARDWIRE_TEST_DIR")
    if configured:
        base = Path(configured)
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        if worker:
            base = base / worker
    else:
        base = tmp_path_factory.mktemp("pg", numbered=False)
    clusters = start_clusters(base, SHARD_COUNT, prefix="shard")
    _session_clusters[:] = clusters
    try:
        yield clusters
    finally:
        _session_clusters.clear()
        stop_clusters(clusters)
        if not configured and request.session.testsfailed == 0:
            for cluster in clusters:
                shutil.rmtree(cluster.data_dir, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Remember where each log ends, so a failure shows what the servers said during this test.
    item.stash[_log_positions] = {c.log_path: c.log_position() for c in _session_clusters}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and "pg_clusters" in getattr(item, "fixturenames", ()):
        positions = item.stash.get(_log_positions, {})
        for cluster in _session_clusters:
            since = positions.get(cluster.log_path)
            scope = "since the test started" if since is not None else "last lines"
            text = cluster.log_tail(50, since=since) or "(nothing logged)"
            report.sections.append(
                (f"{cluster.name} server log, {scope}: {cluster.log_path}", text)
            )
    return report
