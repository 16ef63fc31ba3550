"""Shardwire: a PostgreSQL sharding proxy."""

__version__ = "0.1.0"
