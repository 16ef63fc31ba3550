"""Read a YAML configuration into `Config`, reporting every problem at once.

Dicts live only here. The file is read in three passes: YAML into plain values, then
`${VAR}` substitution over every string (noting duplicate keys on the way, since YAML
silently keeps the last), then validation against the settings table and the rules for
users and shards. Problems are collected with the key path they concern and raised
together as one `ConfigError`.
"""

from __future__ import annotations

import difflib
import enum
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import yaml

from shardwire.config.model import (
    AuthMethod,
    Config,
    HealthSettings,
    LimitSettings,
    Listen,
    MetricsSettings,
    PoolMode,
    PoolSettings,
    RebalanceSettings,
    ReplicaSettings,
    ServerAddress,
    Shard,
    Tls,
    TransactionSettings,
    User,
)
from shardwire.config.settings import SECTIONS, SETTINGS, Setting, section_names
from shardwire.config.sharding import parse_sharding
from shardwire.proxy.protocol.auth import make_scram_verifier, parse_scram_verifier
from shardwire.router.shardmap import RuleKind, ShardMap

DSN_FORM = "postgresql://user[:password]@host[:port]/database"
SSLMODES = ("disable", "prefer", "require")
VERIFIER_FORM = "SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>"
USER_KEYS = ("password", "scram_verifier", "admin", "pool_mode")
SHARD_KEYS = ("primary", "replicas")

_SHARD_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# `${NAME}`, or `$${` for a literal `${`; an unclosed `${` matches with an empty group 3.
_REFERENCE = re.compile(r"\$(\$?)\{([^}]*)(\}?)")


class ConfigError(Exception):
    """The configuration cannot be used; `problems` says why, one `key.path: message` each."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the configuration file at `path`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{path}: cannot read the configuration file: {e.strerror}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not UTF-8 text ({e.reason} at byte {e.start})"]) from None
    return parse_config(text, path=path)


def parse_config(
    text: str,
    *,
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Validate configuration `text`.

    `path` is where the text came from: relative file names in it are resolved against its
    directory (else the working directory), and `Config.path` keeps it for RELOAD. `env`
    supplies `${VAR}` values; it defaults to the process environment.
    """
    try:
        raw = yaml.load(text, Loader=_Loader)  # a SafeLoader: no Python objects
    except yaml.YAMLError as e:
        raise ConfigError([_yaml_problem(e)]) from None
    file = Path(path).absolute() if path is not None else None
    reader = _Reader(os.environ if env is None else env, file.parent if file else Path.cwd())
    config = reader.read(raw, None if file is None else str(file))
    if reader.problems or config is None:
        raise ConfigError(reader.problems)
    return config


def parse_dsn(s: str) -> ServerAddress:
    """Parse a `postgresql://` (or `postgres://`) connection string.

    >>> a = parse_dsn("postgresql://app:s%40cret@[::1]/app?sslmode=require")
    >>> a.host, a.port, a.database, a.password, a.sslmode, a.dsn
    ('::1', 5432, 'app', 's@cret', 'require', 'postgresql://app:***@[::1]/app?sslmode=require')

    Raises ValueError saying what is wrong; the message never contains the password.
    """
    scheme, sep, rest = s.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        raise _dsn_error("it must start with postgresql://")
    # The user information ends at the last '@', so a password substituted from the
    # environment may contain '/', '?', '#', ':' or '@' without percent-encoding.
    userinfo, at, rest = rest.rpartition("@")
    if "#" in rest:
        raise _dsn_error("'#' must be percent-encoded as %23")
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    hostport, after = rest[:end], rest[end:]
    raw_user, _, raw_password = userinfo.partition(":")
    user = unquote(raw_user)
    if not at or not user:
        raise _dsn_error("the user name is missing")
    password = unquote(raw_password) or None

    if hostport.startswith("["):
        close = hostport.find("]")
        if close < 0:
            raise _dsn_error("an IPv6 address is missing its closing ']'")
        host, port_part = hostport[1:close], hostport[close + 1 :]
        if port_part and not port_part.startswith(":"):
            raise _dsn_error("expected ':port' after the IPv6 address")
        raw_port = port_part[1:]
    elif hostport.count(":") > 1:
        raise _dsn_error("an IPv6 address must be in brackets, as in [::1]")
    else:
        host, _, raw_port = hostport.partition(":")
        host = unquote(host)
    if not host:
        raise _dsn_error("the host is missing")
    if "," in host:
        raise _dsn_error("give one host per connection string")
    port = 5432
    if raw_port:
        if not raw_port.isascii() or not raw_port.isdigit() or not 1 <= int(raw_port) <= 65535:
            raise _dsn_error(f"port {raw_port!r} is not a number from 1 to 65535")
        port = int(raw_port)

    if after.startswith("/"):
        database_part, _, query = after[1:].partition("?")
    else:
        database_part, query = "", after[1:]
    database = unquote(database_part)
    if not database:
        raise _dsn_error("the database name is missing")
    sslmode = "disable"
    for item in query.split("&"):
        if not item:
            continue
        key, _, value = (unquote(part) for part in item.partition("="))
        if key != "sslmode":
            raise ValueError(f"connection parameter {key!r} is not supported (only sslmode is)")
        if value not in SSLMODES:
            raise ValueError(f"sslmode must be one of {', '.join(SSLMODES)}, got {value!r}")
        sslmode = value

    dsn = f"{scheme}://{raw_user}:***@{hostport}{after}" if password is not None else s
    return ServerAddress(host, port, database, user, password, sslmode, dsn)


def _dsn_error(reason: str) -> ValueError:
    return ValueError(f"not a valid connection string: {reason} (expected {DSN_FORM})")


# --- YAML --------------------------------------------------------------------------------


class _Mapping(dict[Any, Any]):
    """A YAML mapping that remembers the keys written twice in it."""

    duplicates: list[Any]

    def __init__(self) -> None:
        super().__init__()
        self.duplicates = []


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> Iterator[_Mapping]:
    data = _Mapping()
    yield data
    seen: set[str] = set()
    for key_node, _ in node.value:
        # Merge keys (`<<`) may legitimately be overridden; only the written keys count.
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            if key_node.value in seen:
                data.duplicates.append(key_node.value)
            seen.add(key_node.value)
    data.update(loader.construct_mapping(node))


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)


def _yaml_problem(e: yaml.YAMLError) -> str:
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark = e.problem_mark
        context = f"{e.context}: " if e.context else ""
        return f"line {mark.line + 1}, column {mark.column + 1}: {context}{e.problem}"
    return f"not valid YAML: {e}"


# --- environment substitution ------------------------------------------------------------


class _FromEnv(str):
    """A string that got its text from the environment: numbers and booleans may be parsed
    from it, since `port: ${PORT}` cannot be written as a YAML integer."""


class _Unresolved:
    """A value whose `${VAR}` could not be substituted; its problem is already reported."""


_UNRESOLVED = _Unresolved()


def _expand(text: str, env: Mapping[str, str]) -> tuple[str, bool, list[str]]:
    """Substitute `${VAR}` in `text`: (result, whether a variable was used, problems)."""
    problems: list[str] = []
    used = False

    def replace(m: re.Match[str]) -> str:
        nonlocal used
        escaped, name, closed = m.groups()
        if escaped:
            return "${" + name + closed
        if not closed:
            problems.append("'${' is not closed with '}' (write '$${' for a literal '${')")
        elif not _VARIABLE_NAME.fullmatch(name):
            problems.append(f"'${{{name}}}' is not a valid environment variable reference")
        elif name not in env:
            problems.append(f"environment variable {name} is not set")
        else:
            used = True
            return env[name]
        return m.group(0)

    return _REFERENCE.sub(replace, text), used, problems


def _has_unresolved(node: object) -> bool:
    if isinstance(node, dict):
        return any(_has_unresolved(value) for value in node.values())
    if isinstance(node, list):
        return any(_has_unresolved(item) for item in node)
    return node is _UNRESOLVED


# --- validation --------------------------------------------------------------------------


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _describe(value: object, *, secret: bool = False) -> str:
    """`value`'s YAML type, and the value itself unless it may be a secret."""
    match value:
        case None:
            return "nothing"
        case bool():
            kind = "a boolean"
        case int():
            kind = "an integer"
        case float():
            kind = "a number"
        case str():
            kind = "a string"
        case list():
            return "a list"
        case dict():
            return "a mapping"
        case _:
            return f"a {type(value).__name__}"
    shown = str(value).lower() if isinstance(value, bool) else repr(value)
    return kind if secret else f"{kind} ({shown})"


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _top_level_aliases() -> dict[str, str]:
    """Section keys written at the top level (`port`, `pool_size`) and where they belong."""
    aliases: dict[str, str] = {}
    for s in SETTINGS:
        if s.section is not None:
            where = f"{s.section}: {{{s.key}: ...}}"
            aliases.setdefault(s.key, where)  # `port` is listen's before metrics'
            aliases[s.path.replace(".", "_")] = where
    return aliases


_TOP_LEVEL_KEYS = (
    *section_names(),
    *(s.path for s in SETTINGS if s.section is None),
    *(section.path for section in SECTIONS),
)
_TOP_LEVEL_ALIASES = _top_level_aliases()


class _Reader:
    """Turns the YAML values into a `Config`, collecting every problem on the way."""

    def __init__(self, env: Mapping[str, str], base_dir: Path) -> None:
        self.env = env
        self.base_dir = base_dir
        self.problems: list[str] = []
        self.failed: set[str] = set()  # setting paths whose value was rejected

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def read(self, raw: object, file: str | None) -> Config | None:
        tree = self.substitute(raw, "")
        if tree is None:
            tree = {}
        if not isinstance(tree, dict):
            self.problem("(file)", f"expected a mapping of settings, got {_describe(tree)}")
            return None
        self.check_keys(tree, "", _TOP_LEVEL_KEYS)
        sections = {name: self.mapping(tree, name) for name in section_names()}
        for name, mapping in sections.items():
            if mapping is not None:
                self.check_keys(mapping, name, [s.key for s in SETTINGS if s.section == name])
        values = {s.path: self.setting(s, sections, tree) for s in SETTINGS}
        tls = self.tls(sections["tls"], values)
        metrics = self.metrics(sections["metrics"], values)
        auth_method: AuthMethod = values["auth.method"]
        users = self.users(tree.get("users"), auth_method)
        shards, shard_names = self.shards(tree.get("shards"))

        default_shard = values["default_shard"]
        if "default_shard" not in self.failed and shard_names and default_shard not in shard_names:
            self.problem(
                "default_shard",
                f"{default_shard!r} is not one of the shards ({', '.join(shard_names)})"
                + _did_you_mean(default_shard, shard_names),
            )
        if not {"database", "admin_database"} & self.failed and (
            values["database"] == values["admin_database"]
        ):
            self.problem(
                "admin_database",
                f"must differ from database ({values['database']!r}), or clients could not "
                "reach the shards",
            )
        sharding = self.sharding(tree.get("sharding"), shard_names, default_shard)
        lookups = [rule.name for rule in sharding.rules.values()
                   if rule.kind is RuleKind.LOOKUP] if sharding else []
        if lookups and values["catalog"] is None and "catalog" not in self.failed:
            self.problem("catalog", f"required by the lookup rule sharding.rules.{lookups[0]} "
                                    "(its directory is a table in the catalog database)")
        if self.problems or sharding is None:
            return None

        def settings_in(name: str) -> dict[str, Any]:
            return {s.key: values[s.path] for s in SETTINGS if s.section == name}

        return Config(
            database=values["database"],
            shards=shards,
            default_shard=default_shard,
            users=users,
            listen=Listen(**settings_in("listen")),
            tls=tls,
            auth_method=auth_method,
            pool=PoolSettings(**settings_in("pool")),
            transactions=TransactionSettings(**settings_in("transactions")),
            rebalance=RebalanceSettings(**settings_in("rebalance")),
            metrics=metrics,
            replicas=ReplicaSettings(**settings_in("replicas")),
            health=HealthSettings(**settings_in("health")),
            limits=LimitSettings(**settings_in("limits")),
            shutdown_timeout=values["shutdown_timeout"],
            catalog=values["catalog"],
            admin_database=values["admin_database"],
            path=file,
            sharding=sharding,
        )

    # -- generic ----------------------------------------------------------------------

    def substitute(self, node: object, path: str) -> object:
        """`node` with `${VAR}` substituted in every string; duplicate keys reported."""
        if isinstance(node, dict):
            for key in getattr(node, "duplicates", ()):
                self.problem(_join(path, key), "written more than once in the same mapping")
            return {key: self.substitute(value, _join(path, key)) for key, value in node.items()}
        if isinstance(node, list):
            return [self.substitute(item, f"{path}[{i}]") for i, item in enumerate(node)]
        if isinstance(node, str):
            text, used, problems = _expand(node, self.env)
            for message in problems:
                self.problem(path, message)
            if problems:
                return _UNRESOLVED
            return _FromEnv(text) if used else text
        return node

    def check_keys(self, mapping: dict[Any, Any], path: str, allowed: Sequence[str]) -> None:
        for key in mapping:
            if key in allowed:
                continue
            name = str(key)
            if not path and name in _TOP_LEVEL_ALIASES:
                hint = f"; did you mean {_TOP_LEVEL_ALIASES[name]}?"
            else:
                hint = _did_you_mean(name, allowed)
            self.problem(_join(path, key), f"unknown key (allowed: {', '.join(allowed)}){hint}")

    def mapping(self, tree: dict[Any, Any], key: str) -> dict[Any, Any] | None:
        """`tree[key]` if it is a mapping; None if it is absent, null or not a mapping."""
        value = tree.get(key)
        if value is None or value is _UNRESOLVED:
            return None
        if not isinstance(value, dict):
            self.problem(key, f"expected a mapping, got {_describe(value)}")
            return None
        return value

    def setting(
        self, s: Setting, sections: dict[str, dict[Any, Any] | None], tree: dict[Any, Any]
    ) -> Any:
        """The validated value of `s`, or its default (with a problem) when it is wrong."""
        parent = tree if s.section is None else sections[s.section]
        raw = None if parent is None else parent.get(s.key)
        if raw is None:
            if s.required:
                self.problem(s.path, f"required ({s.doc[0].lower()}{s.doc[1:].rstrip('.')})")
                self.failed.add(s.path)
            return s.default
        value = self.value(s.path, raw, s.type)
        if value is not None:
            bound = self.out_of_bounds(s, value)
            if bound:
                self.problem(s.path, bound)
                value = None
        if value is None:
            self.failed.add(s.path)
            return s.default
        return value

    def value(self, path: str, raw: object, kind: type[Any], *, secret: bool = False) -> Any:
        """`raw` as a `kind`, or None with a problem reported."""
        if raw is _UNRESOLVED:
            return None
        if kind is ServerAddress:
            return self.dsn(path, raw)
        if issubclass(kind, enum.Enum):
            allowed = [str(member.value) for member in kind]
            if isinstance(raw, str) and raw in allowed:
                return kind(raw)
            got = f"got {raw!r}" if isinstance(raw, str) else f"got {_describe(raw)}"
            hint = _did_you_mean(raw.lower(), allowed) if isinstance(raw, str) else ""
            self.problem(path, f"must be one of {', '.join(allowed)}, {got}{hint}")
            return None
        if kind is str:
            if isinstance(raw, str):
                return str(raw)  # a plain str, not _FromEnv
            quote = " (quote it)" if isinstance(raw, int | float | bool) else ""
            self.problem(path, f"expected a string, got {_describe(raw, secret=secret)}{quote}")
            return None
        if isinstance(raw, _FromEnv):
            return self.value_from_env(path, raw, kind)
        ok = {
            bool: isinstance(raw, bool),
            int: isinstance(raw, int) and not isinstance(raw, bool),
            float: isinstance(raw, int | float) and not isinstance(raw, bool),
        }[kind]
        if not ok:
            noun = {bool: "true or false", int: "an integer", float: "a number"}[kind]
            self.problem(path, f"expected {noun}, got {_describe(raw)}")
            return None
        return float(raw) if isinstance(raw, int | float) and kind is float else raw

    def value_from_env(self, path: str, raw: str, kind: type[Any]) -> Any:
        text = raw.strip()
        try:
            if kind is bool:
                if text.lower() in ("true", "false"):
                    return text.lower() == "true"
                raise ValueError
            return kind(text)
        except ValueError:
            noun = {bool: "true or false", int: "an integer", float: "a number"}[kind]
            self.problem(path, f"expected {noun}, got {raw!r} from the environment")
            return None

    def out_of_bounds(self, s: Setting, value: object) -> str | None:
        if isinstance(value, str):
            return "must not be empty" if not value and not s.may_be_empty else None
        if not isinstance(value, int | float):
            return None
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        if s.positive and value <= 0:
            return f"must be greater than 0, got {value:g}"
        low, high = s.minimum, s.maximum
        if (low is not None and value < low) or (high is not None and value > high):
            if low is not None and high is not None:
                return f"must be from {low} to {high}, got {value:g}"
            if low is not None:
                return f"must be at least {low}, got {value:g}"
            return f"must be at most {high}, got {value:g}"
        return None

    def dsn(self, path: str, raw: object) -> ServerAddress | None:
        if raw is _UNRESOLVED:
            return None
        if not isinstance(raw, str):
            self.problem(path, f"expected a connection string, got {_describe(raw)}")
            return None
        try:
            return parse_dsn(raw)
        except ValueError as e:
            self.problem(path, str(e))
            return None

    # -- sections with rules of their own ------------------------------------------------

    def tls(self, section: dict[Any, Any] | None, values: dict[str, Any]) -> Tls | None:
        if section is None:
            return None
        files: dict[str, str] = {}
        for key in ("cert_file", "key_file"):
            path = f"tls.{key}"
            if path in self.failed:
                continue
            name = values[path]
            if name is None:
                self.problem(path, "required when tls is set")
                continue
            file = Path(name).expanduser()
            file = file if file.is_absolute() else self.base_dir / file
            if not file.is_file():
                self.problem(path, f"file not found: {file}")
                continue
            files[key] = str(file)
        return Tls(**files) if len(files) == 2 else None

    def metrics(self, section: dict[Any, Any] | None, values: dict[str, Any]
                ) -> MetricsSettings | None:
        """The Prometheus endpoint: on when the file has a `metrics` mapping."""
        if section is None or "metrics.port" in self.failed or "metrics.host" in self.failed:
            return None
        port = values["metrics.port"]
        if port is None:
            self.problem("metrics.port", "required when metrics is set (the TCP port of the "
                                         "Prometheus endpoint, e.g. 9187)")
            return None
        if port == values["listen.port"] and "listen.port" not in self.failed:
            self.problem("metrics.port", f"must differ from listen.port ({port})")
            return None
        return MetricsSettings(port, values["metrics.host"] or "127.0.0.1")

    def sharding(self, raw: object, shard_names: list[str], default_shard: str | None
                 ) -> ShardMap | None:
        """The shard map (docs/sharding.md); one with no rules when the section is absent."""
        if _has_unresolved(raw):
            # The variable's problem is reported; the value it left behind is not worth a
            # second one.
            return None
        return parse_sharding(raw, shards=shard_names, default_shard=default_shard or "",
                              problems=self.problems)

    def users(self, raw: object, auth_method: AuthMethod) -> dict[str, User]:
        entries = self.named_entries("users", raw, "a mapping of user name to settings")
        users: dict[str, User] = {}
        for name, entry in entries.items():
            path = _join("users", name)
            if not isinstance(name, str):
                self.problem("users", f"user name {name} must be written as a string: '{name}'")
                continue
            if not name.strip():
                self.problem("users", f"user name {name!r} is empty")
                continue
            if entry is None:
                entry = {}
            if not isinstance(entry, dict):
                self.problem(path, f"expected a mapping (password, admin, ...), got "
                                   f"{_describe(entry, secret=True)}")
                continue
            self.check_keys(entry, path, USER_KEYS)
            admin = self.optional(entry, "admin", path, bool)
            pool_mode = self.optional(entry, "pool_mode", path, PoolMode)
            verifier = self.credentials(entry, path, auth_method)
            users[name] = User(name, verifier, bool(admin), pool_mode)
        return users

    def optional(self, entry: dict[Any, Any], key: str, path: str, kind: type[Any]) -> Any:
        raw = entry.get(key)
        return None if raw is None else self.value(_join(path, key), raw, kind)

    def credentials(self, entry: dict[Any, Any], path: str, auth: AuthMethod) -> str | None:
        """The user's SCRAM verifier, made from `password` or checked from `scram_verifier`."""
        given = [key for key in ("password", "scram_verifier") if entry.get(key) is not None]
        if len(given) == 2:
            self.problem(path, "give either password or scram_verifier, not both")
            return None
        if not given:
            if auth is not AuthMethod.TRUST and "auth.method" not in self.failed:
                self.problem(path, "needs a password or a scram_verifier "
                                   "(or auth: {method: trust})")
            return None
        key = given[0]
        secret = self.value(_join(path, key), entry[key], str, secret=True)
        if secret is None:
            return None
        if key == "password":
            if not secret:
                self.problem(_join(path, key), "is empty")
                return None
            return make_scram_verifier(secret)
        problem = _verifier_problem(secret)
        if problem:
            self.problem(_join(path, key), problem)
            return None
        return secret

    def shards(self, raw: object) -> tuple[dict[str, Shard], list[str]]:
        """The valid shards, and the names of all shards written (for default_shard)."""
        entries = self.named_entries("shards", raw, "a mapping of shard name to servers")
        shards: dict[str, Shard] = {}
        servers: dict[tuple[str, int, str], str] = {}  # (host, port, database) -> key path
        names: list[str] = []
        for name, entry in entries.items():
            path = _join("shards", name)
            if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name):
                shown = repr(name) if isinstance(name, str) else str(name)
                self.problem("shards", f"shard name {shown} must be made of lower case letters, "
                                       "digits and _, not starting with a digit")
                continue
            names.append(name)
            if not isinstance(entry, dict):
                self.problem(path, "expected a mapping with primary (and optionally replicas), "
                                   f"got {_describe(entry, secret=True)}")
                continue
            self.check_keys(entry, path, SHARD_KEYS)
            primary = None
            if entry.get("primary") is None:
                self.problem(_join(path, "primary"), "required (the shard's connection string)")
            else:
                primary = self.dsn(_join(path, "primary"), entry["primary"])
            replicas = self.replicas(entry.get("replicas"), _join(path, "replicas"))
            for server_path, server in [(_join(path, "primary"), primary), *replicas]:
                if server is not None:
                    self.unique_server(server, server_path, servers)
            valid_replicas = tuple(r for _, r in replicas if r is not None)
            if primary is not None and len(valid_replicas) == len(replicas):
                shards[name] = Shard(name, primary, valid_replicas)
        return shards, names

    def replicas(self, raw: object, path: str) -> list[tuple[str, ServerAddress | None]]:
        if raw is None or raw is _UNRESOLVED:
            return []
        if not isinstance(raw, list):
            self.problem(path, f"expected a list of connection strings, got {_describe(raw)}")
            return [(path, None)]
        return [(f"{path}[{i}]", self.dsn(f"{path}[{i}]", item)) for i, item in enumerate(raw)]

    def unique_server(
        self, server: ServerAddress, path: str, seen: dict[tuple[str, int, str], str]
    ) -> None:
        key = (server.host, server.port, server.database)
        if key in seen:
            self.problem(path, f"the same database as {seen[key]} "
                               f"({server.host}:{server.port}/{server.database})")
        else:
            seen[key] = path

    def named_entries(self, key: str, raw: object, expected: str) -> dict[Any, Any]:
        if raw is _UNRESOLVED:
            return {}
        if raw is not None and not isinstance(raw, dict):
            self.problem(key, f"expected {expected}, got {_describe(raw)}")
            return {}
        if not raw:
            self.problem(key, f"at least one is required ({expected})")
            return {}
        return raw


# --- SCRAM verifiers (made and parsed by the proxy's own SCRAM code) ---------------------


def _verifier_problem(verifier: str) -> str | None:
    """What is wrong with a SCRAM-SHA-256 verifier, or None if the proxy can use it."""
    if verifier.startswith("md5"):
        return ("is an MD5 hash; Shardwire needs a SCRAM-SHA-256 verifier (set "
                "password_encryption = scram-sha-256 in PostgreSQL and set the password again)")
    try:
        parse_scram_verifier(verifier)
    except ValueError:
        # Not the parser's reason: it may quote part of the text, which could be a password
        # pasted into the wrong key.
        return f"not a valid SCRAM-SHA-256 verifier (expected {VERIFIER_FORM})"
    return None
