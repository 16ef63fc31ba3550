"""The configuration as frozen dataclasses.

Dicts live only at the YAML edge (`shardwire.config.load`); everything past it works with
these types. Durations are seconds as floats.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import cast

from shardwire.router.shardmap import ShardMap


class PoolMode(enum.Enum):
    TRANSACTION = "transaction"
    SESSION = "session"


class AuthMethod(enum.Enum):
    SCRAM_SHA_256 = "scram-sha-256"
    TRUST = "trust"


@dataclass(frozen=True, slots=True)
class ServerAddress:
    """One PostgreSQL server, parsed from a `postgresql://` connection string."""

    host: str
    port: int
    database: str
    user: str
    password: str | None = None
    sslmode: str = "disable"  # disable | prefer | require
    dsn: str = ""  # the string as written, password masked, for SHOW SHARDS and errors


@dataclass(frozen=True, slots=True)
class Shard:
    name: str
    primary: ServerAddress
    replicas: tuple[ServerAddress, ...] = ()


@dataclass(frozen=True, slots=True)
class User:
    name: str
    # A SCRAM verifier in PostgreSQL's format: SCRAM-SHA-256$<iter>:<salt>$<stored>:<server>.
    # A plaintext `password` from the file (usually `${ENV_VAR}`) is turned into one at load.
    scram_verifier: str | None = None
    admin: bool = False
    pool_mode: PoolMode | None = None  # None: the pool's default mode


@dataclass(frozen=True, slots=True)
class Tls:
    cert_file: str
    key_file: str


@dataclass(frozen=True, slots=True)
class Listen:
    host: str = "127.0.0.1"
    port: int = 6432
    max_client_connections: int = 1000


@dataclass(frozen=True, slots=True)
class PoolSettings:
    size: int = 20  # server connections per shard server
    mode: PoolMode = PoolMode.TRANSACTION
    checkout_timeout: float = 5.0  # a client waiting longer for a server gets 57014
    max_waiting_clients: int = 1000  # beyond this, new waiters get 53300 at once
    connect_timeout: float = 5.0
    idle_timeout: float = 600.0  # idle server connections older than this are closed
    max_prepared_statements: int = 200  # per server connection (0 disables the tracking)
    server_reset_query: str = "DISCARD ALL"  # run when a session-mode client leaves


@dataclass(frozen=True, slots=True)
class TransactionSettings:
    """Two-phase commit and its recovery (docs/transactions.md)."""

    decision_timeout: float = 5.0  # a commit decision not recorded by then: rolled back
    recovery_interval: float = 30.0  # seconds between passes over the shards' prepared ones
    recovery_min_age: float = 60.0  # an undecided prepared transaction younger is left alone


@dataclass(frozen=True, slots=True)
class RebalanceSettings:
    """Heat statistics for the rebalancer (docs/rebalancing.md)."""

    heat_flush_interval: float = 60.0  # seconds per heat window written to the catalog
    heat_top_keys: int = 100  # keys per rule kept by each space-saving sketch
    heat_retention: float = 86400.0  # windows older than this are deleted from the catalog
    fence_timeout: float = 15.0  # a write held by a move's fence fails after this (55P03)
    # Bytes a shard's database may hold (pg_database_size) after a move; 0: not checked.
    max_shard_bytes: int = 0


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """Admission control (docs/operations.md): how many transactions may run at once per user
    and per database, the queue in front of them, and a per-tenant statement rate. 0: no
    limit. With every limit at 0 the proxy does not look at them at all."""

    max_transactions_per_user: int = 0
    max_transactions_per_database: int = 0
    max_waiting_transactions: int = 100  # per limit; beyond this, new work gets 53300 at once
    wait_timeout: float = 5.0  # work waiting longer for a limit gets 57014
    tenant_statements_per_second: int = 0  # per key value of a sharding rule (token bucket)
    tenant_burst: int = 0  # the bucket's size; 0: one second's worth

    @property
    def any(self) -> bool:
        return bool(self.max_transactions_per_user or self.max_transactions_per_database
                    or self.tenant_statements_per_second)


class ReadTarget(enum.Enum):
    """Where a session's plain reads go when its shard has replicas (docs/operations.md)."""

    REPLICA = "replica"  # a healthy replica within replicas.max_lag, else the primary
    PRIMARY = "primary"  # everything to the primary
    ANY = "any"  # the primary and the healthy replicas in one rotation


@dataclass(frozen=True, slots=True)
class ReplicaSettings:
    """The read/write split over each shard's replicas (docs/operations.md)."""

    max_lag: float = 10.0  # a replica whose replay lag exceeds this gets no reads
    read_your_writes: float = 0.0  # after a write, the session reads from primaries this long
    target: ReadTarget = ReadTarget.REPLICA  # a session's default shardwire.target


@dataclass(frozen=True, slots=True)
class HealthSettings:
    """Health checks of every shard server (docs/operations.md)."""

    interval: float = 2.0  # seconds between checks of a healthy server
    timeout: float = 2.0  # a check (connect, log in, query) slower than this fails
    max_backoff: float = 30.0  # a failed server is retried after 0.5s, doubling up to this


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """The Prometheus endpoint (docs/metrics.md); present only when the file has `metrics`."""

    port: int
    host: str = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class Config:
    """A whole Shardwire configuration."""

    database: str  # the database name clients connect to
    shards: dict[str, Shard]
    default_shard: str
    users: dict[str, User]
    listen: Listen = field(default_factory=Listen)
    tls: Tls | None = None
    auth_method: AuthMethod = AuthMethod.SCRAM_SHA_256
    pool: PoolSettings = field(default_factory=PoolSettings)
    transactions: TransactionSettings = field(default_factory=TransactionSettings)
    rebalance: RebalanceSettings = field(default_factory=RebalanceSettings)
    metrics: MetricsSettings | None = None  # None: no metrics endpoint
    replicas: ReplicaSettings = field(default_factory=ReplicaSettings)
    health: HealthSettings = field(default_factory=HealthSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    # SIGTERM: seconds running transactions get to finish before their clients are closed.
    shutdown_timeout: float = 20.0
    catalog: ServerAddress | None = None
    admin_database: str = "shardwire"
    path: str | None = None  # the file it was loaded from, for RELOAD
    # Where rows live. Never None once built: without a `sharding` section (or when a Config
    # is made by hand) it is a map with no rules, every table on the default shard.
    sharding: ShardMap = field(default=cast(ShardMap, None))

    def __post_init__(self) -> None:
        if self.sharding is None:
            object.__setattr__(self, "sharding", ShardMap(tuple(self.shards), self.default_shard))
