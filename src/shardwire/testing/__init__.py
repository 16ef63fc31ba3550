"""Throwaway real PostgreSQL clusters for the tests, the benchmarks and ``shardwire demo``."""

from shardwire.testing.cluster import (
    BASE_SETTINGS,
    HOST,
    MD5_PASSWORD,
    MD5_USER,
    SCRAM_PASSWORD,
    SCRAM_USER,
    ClusterError,
    PostgresCluster,
    PsqlError,
    free_port,
    pg_bindir,
    start_clusters,
    stop_clusters,
)

__all__ = [
    "BASE_SETTINGS",
    "HOST",
    "MD5_PASSWORD",
    "MD5_USER",
    "SCRAM_PASSWORD",
    "SCRAM_USER",
    "ClusterError",
    "PostgresCluster",
    "PsqlError",
    "free_port",
    "pg_bindir",
    "start_clusters",
    "stop_clusters",
]
