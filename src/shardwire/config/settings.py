"""Every scalar setting, declared once: its key, type, default and whether RELOAD applies it.

Loading (`shardwire.config.load`) validates against this table, the admin console's
`SHOW CONFIG` renders it, and RELOAD uses `changed_settings` to tell what it can apply.
The collections `users` and `shards`, and the shard map `sharding`, are entries rather than
settings; `SECTIONS` says whether RELOAD applies them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from typing import Any

from shardwire.config.model import (
    AuthMethod,
    Config,
    HealthSettings,
    LimitSettings,
    Listen,
    PoolMode,
    PoolSettings,
    ReadTarget,
    RebalanceSettings,
    ReplicaSettings,
    ServerAddress,
    TransactionSettings,
)

_LISTEN = Listen()
_POOL = PoolSettings()
_TX = TransactionSettings()
_REBALANCE = RebalanceSettings()
_REPLICAS = ReplicaSettings()
_HEALTH = HealthSettings()
_LIMITS = LimitSettings()
_CONFIG_DEFAULTS: dict[str, object] = {f.name: f.default for f in fields(Config)}


@dataclass(frozen=True, slots=True)
class Setting:
    """One scalar setting.

    `path` is the key as written in the YAML file (`pool.size`); `attribute` is where the
    value lives on `Config` when that differs (`auth.method` is `Config.auth_method`).
    Bounds are inclusive, except that `positive` excludes zero. Strings must not be empty
    unless `may_be_empty`.
    """

    path: str
    type: type[Any]  # str, int, float (seconds), an Enum, or ServerAddress (a connection string)
    default: object
    reloadable: bool
    doc: str
    required: bool = False
    minimum: int | None = None
    maximum: int | None = None
    positive: bool = False
    may_be_empty: bool = False
    attribute: str = ""

    @property
    def section(self) -> str | None:
        """The YAML mapping the key sits in (`pool`), or None for a top-level key."""
        head, dot, _ = self.path.partition(".")
        return head if dot else None

    @property
    def key(self) -> str:
        """The key inside its section (`size` for `pool.size`)."""
        return self.path.rpartition(".")[2]

    @property
    def type_name(self) -> str:
        if issubclass(self.type, enum.Enum):
            return " | ".join(str(member.value) for member in self.type)
        return _TYPE_NAMES[self.type]


_TYPE_NAMES: dict[type[Any], str] = {
    str: "string",
    int: "integer",
    float: "seconds",
    ServerAddress: "connection string",
}


SETTINGS: tuple[Setting, ...] = (
    Setting("listen.host", str, _LISTEN.host, False,
            "Address the proxy listens on; 0.0.0.0 or :: for all interfaces."),
    Setting("listen.port", int, _LISTEN.port, False,
            "TCP port the proxy listens on.", minimum=1, maximum=65535),
    Setting("listen.max_client_connections", int, _LISTEN.max_client_connections, True,
            "Client connections beyond this are refused with SQLSTATE 53300.", minimum=1),
    Setting("tls.cert_file", str, None, True,
            "Server certificate (PEM). With the key, clients may use TLS; "
            "without the tls section an SSLRequest is answered 'N'."),
    Setting("tls.key_file", str, None, True, "Private key (PEM) for tls.cert_file."),
    Setting("auth.method", AuthMethod, _CONFIG_DEFAULTS["auth_method"], True,
            "How clients authenticate to Shardwire; trust accepts anyone listed in users.",
            attribute="auth_method"),
    Setting("database", str, None, False,
            "The database name clients connect to.", required=True),
    Setting("admin_database", str, _CONFIG_DEFAULTS["admin_database"], False,
            "Connecting to this database name opens the admin console (admin users only)."),
    Setting("default_shard", str, None, False,
            "The shard that holds tables no rule distributes.", required=True),
    Setting("catalog", ServerAddress, _CONFIG_DEFAULTS["catalog"], False,
            "Where Shardwire keeps its own metadata."),
    Setting("pool.size", int, _POOL.size, True,
            "Server connections per shard server.", minimum=1),
    Setting("pool.mode", PoolMode, _POOL.mode, True,
            "transaction: a client holds a server connection for one transaction; "
            "session: for its whole session. Applies to clients that connect afterwards."),
    Setting("pool.checkout_timeout", float, _POOL.checkout_timeout, True,
            "A client waiting longer than this for a server connection gets SQLSTATE 57014.",
            positive=True),
    Setting("pool.max_waiting_clients", int, _POOL.max_waiting_clients, True,
            "Beyond this many waiting clients, a new waiter gets SQLSTATE 53300 at once.",
            minimum=1),
    Setting("pool.connect_timeout", float, _POOL.connect_timeout, True,
            "Time allowed to open and authenticate a server connection.", positive=True),
    Setting("pool.idle_timeout", float, _POOL.idle_timeout, True,
            "Idle server connections older than this are closed.", positive=True),
    Setting("pool.max_prepared_statements", int, _POOL.max_prepared_statements, True,
            "Prepared statements kept per server connection; 0 disables the tracking.",
            minimum=0),
    Setting("pool.server_reset_query", str, _POOL.server_reset_query, True,
            "Run on a server connection when a session-mode client leaves; empty for none.",
            may_be_empty=True),
    Setting("transactions.decision_timeout", float, _TX.decision_timeout, False,
            "A two-phase commit whose decision is not recorded in this time is rolled back.",
            positive=True),
    Setting("transactions.recovery_interval", float, _TX.recovery_interval, False,
            "Seconds between passes that finish the shards' prepared transactions.",
            positive=True),
    Setting("transactions.recovery_min_age", float, _TX.recovery_min_age, False,
            "A prepared transaction with no decision is rolled back once this old (another "
            "proxy may be committing a younger one).", minimum=0),
    Setting("rebalance.heat_flush_interval", float, _REBALANCE.heat_flush_interval, True,
            "Seconds per heat window: each proxy writes its heat statistics to the catalog "
            "this often.", positive=True),
    Setting("rebalance.heat_top_keys", int, _REBALANCE.heat_top_keys, True,
            "Hot keys tracked per sharding rule (space-saving top-K); applies from the next "
            "window.", minimum=1, maximum=100_000),
    Setting("rebalance.heat_retention", float, _REBALANCE.heat_retention, True,
            "Heat windows older than this are deleted from the catalog.", positive=True),
    Setting("rebalance.fence_timeout", float, _REBALANCE.fence_timeout, True,
            "Seconds a write to keys being moved waits for the move's fence before it fails "
            "with SQLSTATE 55P03.", positive=True),
    Setting("rebalance.max_shard_bytes", int, _REBALANCE.max_shard_bytes, True,
            "Bytes a shard's database may hold: rebalance plan proposes no move, and apply "
            "refuses one, that would take the target's pg_database_size above it. 0: not "
            "checked.", minimum=0),
    Setting("limits.max_transactions_per_user", int, _LIMITS.max_transactions_per_user, True,
            "Transactions one user may run at once (a statement outside BEGIN is one); more "
            "wait in a queue. 0: no limit.", minimum=0),
    Setting("limits.max_transactions_per_database", int, _LIMITS.max_transactions_per_database,
            True, "Transactions all clients of one database may run at once; more wait in a "
            "queue. 0: no limit.", minimum=0),
    Setting("limits.max_waiting_transactions", int, _LIMITS.max_waiting_transactions, True,
            "Work queued for each limit above; beyond this, new work gets SQLSTATE 53300 at "
            "once.", minimum=1),
    Setting("limits.wait_timeout", float, _LIMITS.wait_timeout, True,
            "Work queued for a limit longer than this gets SQLSTATE 57014.", positive=True),
    Setting("limits.tenant_statements_per_second", int, _LIMITS.tenant_statements_per_second,
            True, "Statements per second routed by one key value of a sharding rule (a "
            "tenant); more get SQLSTATE 53400. 0: no limit.", minimum=0),
    Setting("limits.tenant_burst", int, _LIMITS.tenant_burst, True,
            "Statements one key value may run in a burst above its rate; 0: one second's "
            "worth.", minimum=0),
    Setting("shutdown_timeout", float, _CONFIG_DEFAULTS["shutdown_timeout"], True,
            "After SIGTERM, transactions running get this long to finish before their clients "
            "are closed with SQLSTATE 57P01.", positive=True),
    Setting("replicas.max_lag", float, _REPLICAS.max_lag, True,
            "A replica whose replay lag (measured on it by the health check) exceeds this "
            "gets no reads until it catches up.", positive=True),
    Setting("replicas.read_your_writes", float, _REPLICAS.read_your_writes, True,
            "For this long after a session sent a shard anything but a plain read, its "
            "reads go to primaries; 0 turns it off. A rule's own read_your_writes takes its "
            "place for reads routed by one key of that rule.", minimum=0),
    Setting("replicas.target", ReadTarget, _REPLICAS.target, True,
            "Where plain reads outside read-write transactions go (a session changes it with "
            "SET shardwire.target): replica, primary, or any (primary and replicas in turn)."),
    Setting("health.interval", float, _HEALTH.interval, True,
            "Seconds between health checks of each shard server.", positive=True),
    Setting("health.timeout", float, _HEALTH.timeout, True,
            "A health check (connect, log in, query) slower than this fails.", positive=True),
    Setting("health.max_backoff", float, _HEALTH.max_backoff, True,
            "A failed server is checked again after 0.5s, then twice as long each time, up "
            "to this many seconds.", positive=True),
    # No defaults: without a `metrics` section there is no endpoint (docs/metrics.md).
    Setting("metrics.host", str, None, False,
            "Address the Prometheus endpoint listens on (127.0.0.1 when the section is set)."),
    Setting("metrics.port", int, None, False,
            "TCP port of the Prometheus endpoint (HTTP, /metrics); required in the metrics "
            "section.", minimum=1, maximum=65535),
)

SETTINGS_BY_PATH: dict[str, Setting] = {s.path: s for s in SETTINGS}


@dataclass(frozen=True, slots=True)
class Section:
    """A collection of named entries in the file."""

    path: str
    reloadable: bool
    doc: str


SECTIONS: tuple[Section, ...] = (
    Section("users", True,
            "Who may connect; RELOAD adds, removes and changes users for new connections."),
    Section("shards", False,
            "The shard servers. RELOAD applies a changed primary or replica list (after a "
            "failover: docs/operations.md); adding or removing shards moves no data (that is "
            "the rebalancer's job)."),
    Section("sharding", True,
            "Where rows live: sharding rules and reference tables (docs/sharding.md); "
            "RELOAD routes new statements by the new map."),
)


def setting_value(config: Config, setting: Setting) -> object:
    """The value `config` has for `setting` (None when its section is absent)."""
    value: object = config
    for name in (setting.attribute or setting.path).split("."):
        if value is None:
            return None
        value = getattr(value, name)
    return value


def format_value(value: object) -> str:
    """A setting's value as text, passwords masked (`SHOW CONFIG`, docs)."""
    match value:
        case None:
            return ""
        case enum.Enum():
            return str(value.value)
        case ServerAddress():
            return value.dsn
        case float() if value.is_integer():
            return str(int(value))
        case _:
            return str(value)


def config_rows(config: Config) -> list[tuple[str, str, str, str]]:
    """(key, value, default, reloadable) for every setting, as `SHOW CONFIG` shows them."""
    return [
        (
            s.path,
            format_value(setting_value(config, s)),
            format_value(s.default),
            "yes" if s.reloadable else "no",
        )
        for s in SETTINGS
    ]


def changed_settings(old: Config, new: Config) -> list[Setting]:
    """The settings whose value differs between two configurations, for RELOAD."""
    return [s for s in SETTINGS if setting_value(old, s) != setting_value(new, s)]


def section_names() -> list[str]:
    """The mappings that hold settings, in table order (`listen`, `tls`, `auth`, `pool`)."""
    return list(dict.fromkeys(s.section for s in SETTINGS if s.section is not None))
