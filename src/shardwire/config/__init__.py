"""Shardwire's configuration: frozen dataclasses, loaded from YAML and validated at once."""

from shardwire.config.load import ConfigError, load_config, parse_config, parse_dsn
from shardwire.config.model import (
    AuthMethod,
    Config,
    Listen,
    PoolMode,
    PoolSettings,
    ServerAddress,
    Shard,
    Tls,
    User,
)

__all__ = [
    "AuthMethod",
    "Config",
    "ConfigError",
    "Listen",
    "PoolMode",
    "PoolSettings",
    "ServerAddress",
    "Shard",
    "Tls",
    "User",
    "load_config",
    "parse_config",
    "parse_dsn",
]
