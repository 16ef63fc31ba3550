"""The configuration layer: YAML in, frozen dataclasses or a list of every problem out."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from shardwire.config import (
    AuthMethod,
    Config,
    ConfigError,
    Listen,
    PoolMode,
    PoolSettings,
    ServerAddress,
    Shard,
    Tls,
    User,
    load_config,
    parse_config,
    parse_dsn,
)
from shardwire.config.settings import (
    SETTINGS,
    changed_settings,
    config_rows,
    format_value,
    setting_value,
)
from shardwire.proxy.protocol.auth import make_scram_verifier

ROOT = Path(__file__).resolve().parents[2]

# Made by PostgreSQL 15 (password_encryption = scram-sha-256) and read from pg_authid.
PG_VERIFIERS = {
    "pencil": "SCRAM-SHA-256$4096:ta+HK8SFoNkW+b8R8L7osA==$56pAN6YpjcGVNdn2d5Mq5cQQmJCNDEwSyLMJ"
    "J7xbAYI=:bO604BpyKqEhdQBjQT1WkyfVtrXi9Ku8xYaEzbQuICg=",
    "pässwörd": "SCRAM-SHA-256$4096:+YZRowejZ7JW15/IsZAiQg==$HYz1YbQwKVTzDVfiOMdBILolxKRSaUx"
    "VTiimiCvrmnI=:ETtWTtLLMkow5fB17+d108gdVbNUotdCQB3hNXRl0UQ=",
    # soft hyphen (mapped to nothing) and narrow no-break space (mapped to a space)
    "I\u00adX\u202fy": "SCRAM-SHA-256$4096:R69x39EPfbsRcvnjMzUYUQ==$rVf/vS20T8wTu/1815ezwA5wH3"
    "3bo9U93RD1azt1BPs=:y3AWZ6eFjaINlgdhMgYMxJ4tMk0gXNT9lDXdtneGoUM=",
    # a control character: SASLprep refuses it, so the raw bytes are hashed
    "x\x07y": "SCRAM-SHA-256$4096:OmTLcDVS/nTfAi4ZEhQWvw==$jzn9wDaa8XdCkGBG7S6HjKRtrsw0PSp1Jnlp"
    "tsHDfRU=:zTTznacAFM+dlZ75pojJ8lYNg+UZmowcIYU0UIKcO1o=",
}
OPS_VERIFIER = PG_VERIFIERS["pencil"]

ENV = {"APP_PASSWORD": "app-secret", "PG_PASSWORD": "pg/secret@1", "OPS_VERIFIER": OPS_VERIFIER}

FULL = """
listen: {host: 0.0.0.0, port: 7432, max_client_connections: 50}
auth: {method: scram-sha-256}
database: app
admin_database: console
users:
  app:   {password: "${APP_PASSWORD}"}
  ops:   {scram_verifier: "${OPS_VERIFIER}", admin: true, pool_mode: session}
shards:
  s1: {primary: "postgresql://postgres@127.0.0.1:5433/app",
       replicas: ["postgresql://postgres@127.0.0.1:5435/app"]}
  s2: {primary: "postgresql://postgres:${PG_PASSWORD}@10.0.0.2/app?sslmode=require"}
default_shard: s1
catalog: "postgresql://postgres@127.0.0.1:5433/shardwire_catalog"
pool: {size: 7, mode: session, checkout_timeout: 2.5, max_waiting_clients: 9,
       connect_timeout: 3, idle_timeout: 60, max_prepared_statements: 0,
       server_reset_query: ""}
"""

BASE: dict[str, Any] = {
    "database": "app",
    "users": {"app": {"password": "secret"}},
    "shards": {
        "s1": {"primary": "postgresql://postgres@127.0.0.1:5433/app"},
        "s2": {"primary": "postgresql://postgres@127.0.0.1:5434/app"},
    },
    "default_shard": "s1",
}


def config_text(**changes: Any) -> str:
    """BASE as YAML, with top-level keys replaced (a value of ... removes the key)."""
    data = copy.deepcopy(BASE)
    for key, value in changes.items():
        if value is ...:
            del data[key]
        else:
            data[key] = value
    return yaml.safe_dump(data, sort_keys=False)


def problems(text: str, env: dict[str, str] | None = None, **kwargs: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, env=env if env is not None else ENV, **kwargs)
    return info.value.problems


def only_problem(text: str, env: dict[str, str] | None = None, **kwargs: Any) -> str:
    found = problems(text, env, **kwargs)
    assert len(found) == 1, found
    return found[0]


def verifies(verifier: str, password: str) -> bool:
    """Whether `password` matches `verifier` (ASCII passwords only: no SASLprep here)."""
    m = re.fullmatch(r"SCRAM-SHA-256\$(\d+):([^$]+)\$([^:]+):(.+)", verifier)
    assert m is not None
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(m[2]), int(m[1]))
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    return (base64.b64decode(m[3]), base64.b64decode(m[4])) == (
        hashlib.sha256(client_key).digest(),
        server_key,
    )


# --- a valid file ------------------------------------------------------------------------


def test_full_file_becomes_the_right_dataclasses() -> None:
    config = parse_config(FULL, env=ENV)

    assert config.listen == Listen(host="0.0.0.0", port=7432, max_client_connections=50)
    assert config.auth_method is AuthMethod.SCRAM_SHA_256
    assert config.database == "app"
    assert config.admin_database == "console"
    assert config.default_shard == "s1"
    assert config.tls is None
    assert config.path is None
    assert config.pool == PoolSettings(
        size=7,
        mode=PoolMode.SESSION,
        checkout_timeout=2.5,
        max_waiting_clients=9,
        connect_timeout=3.0,
        idle_timeout=60.0,
        max_prepared_statements=0,
        server_reset_query="",
    )
    assert config.shards == {
        "s1": Shard(
            "s1",
            ServerAddress("127.0.0.1", 5433, "app", "postgres", None, "disable",
                          "postgresql://postgres@127.0.0.1:5433/app"),
            (ServerAddress("127.0.0.1", 5435, "app", "postgres", None, "disable",
                           "postgresql://postgres@127.0.0.1:5435/app"),),
        ),
        "s2": Shard(
            "s2",
            ServerAddress("10.0.0.2", 5432, "app", "postgres", "pg/secret@1", "require",
                          "postgresql://postgres:***@10.0.0.2/app?sslmode=require"),
        ),
    }
    assert config.catalog == ServerAddress(
        "127.0.0.1", 5433, "shardwire_catalog", "postgres", None, "disable",
        "postgresql://postgres@127.0.0.1:5433/shardwire_catalog",
    )
    assert list(config.users) == ["app", "ops"]
    assert config.users["ops"] == User("ops", OPS_VERIFIER, admin=True, pool_mode=PoolMode.SESSION)
    app = config.users["app"]
    assert (app.admin, app.pool_mode) == (False, None)
    assert app.scram_verifier is not None and verifies(app.scram_verifier, "app-secret")


def test_minimal_file_takes_every_default() -> None:
    config = parse_config(config_text(), env={})
    assert config.listen == Listen()
    assert config.pool == PoolSettings()
    assert config.auth_method is AuthMethod.SCRAM_SHA_256
    assert config.admin_database == "shardwire"
    assert config.catalog is None and config.tls is None


def test_null_values_take_their_defaults() -> None:
    text = config_text(listen={"port": None}, pool=None, tls=None, catalog=None)
    config = parse_config(text, env={})
    assert config.listen.port == 6432 and config.pool == PoolSettings() and config.tls is None


def test_trust_needs_no_passwords() -> None:
    config = parse_config(config_text(auth={"method": "trust"}, users={"app": None}), env={})
    assert config.auth_method is AuthMethod.TRUST
    assert config.users["app"] == User("app")


def test_load_config_reads_a_file_and_remembers_its_path(tmp_path: Path) -> None:
    file = tmp_path / "shardwire.yaml"
    file.write_text(config_text())
    config = load_config(file)
    assert config.path == str(file)
    assert config.database == "app"


def test_load_config_reports_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert info.value.problems == [
        f"{tmp_path / 'nope.yaml'}: cannot read the configuration file: No such file or directory"
    ]


# --- the settings table ------------------------------------------------------------------


def test_settings_defaults_equal_the_dataclass_defaults() -> None:
    config = parse_config(config_text(), env={})
    for s in SETTINGS:
        if not s.required:
            assert setting_value(config, s) == s.default, s.path


def test_settings_table_covers_every_scalar_field() -> None:
    paths = {s.path for s in SETTINGS}
    listen = {f"listen.{name}" for name in Listen.__dataclass_fields__}
    pool = {f"pool.{name}" for name in PoolSettings.__dataclass_fields__}
    tls = {f"tls.{name}" for name in Tls.__dataclass_fields__}
    assert listen | pool | tls <= paths
    assert {"auth.method", "database", "default_shard", "admin_database", "catalog"} <= paths
    assert all(s.doc for s in SETTINGS)


def test_config_rows_show_values_defaults_and_reloadability_with_passwords_masked() -> None:
    text = config_text(catalog="postgresql://sw:hunter2@db/catalog", pool={"size": 3})
    rows = {row[0]: row[1:] for row in config_rows(parse_config(text, env={}))}
    assert [row[0] for row in config_rows(parse_config(text, env={}))] == [
        s.path for s in SETTINGS
    ]
    assert rows["pool.size"] == ("3", "20", "yes")
    assert rows["listen.port"] == ("6432", "6432", "no")
    assert rows["pool.checkout_timeout"] == ("5", "5", "yes")
    assert rows["pool.mode"] == ("transaction", "transaction", "yes")
    assert rows["catalog"] == ("postgresql://sw:***@db/catalog", "", "no")
    assert rows["tls.cert_file"] == ("", "", "yes")
    assert not any("hunter2" in cell for row in rows.values() for cell in row)


def test_changed_settings_names_what_differs() -> None:
    old = parse_config(config_text(), env={})
    new = parse_config(config_text(pool={"size": 5}, listen={"port": 7000}), env={})
    assert [s.path for s in changed_settings(old, new)] == ["listen.port", "pool.size"]


# --- problems, each with its key path ----------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"listen": {"prot": 1}},
         "listen.prot: unknown key (allowed: host, port, max_client_connections); "
         "did you mean 'port'?"),
        ({"shard": {}}, "shard: unknown key (allowed: "),
        ({"shard": {}}, "did you mean 'shards'?"),
        ({"port": 5}, "port: unknown key (allowed: listen, tls, auth, pool, transactions, "
                      "rebalance, limits, replicas, health, metrics, database, admin_database, "
                      "default_shard, catalog, shutdown_timeout, users, shards, sharding); "
                      "did you mean listen: {port: ...}?"),
        ({"auth_method": "trust"}, "auth_method: unknown key (allowed: listen, tls, auth, pool, "
                                   "transactions, rebalance, limits, replicas, health, "
                                   "metrics, database, admin_database, default_shard, "
                                   "catalog, shutdown_timeout, users, shards, sharding); "
                                   "did you mean auth: "
                                   "{method: ...}?"),
        ({"users": {"app": {"pasword": "x"}}},
         "users.app.pasword: unknown key (allowed: password, scram_verifier, admin, pool_mode); "
         "did you mean 'password'?"),
        ({"shards": {"s1": {"primary": "postgresql://u@h/d", "replica": []}}},
         "shards.s1.replica: unknown key (allowed: primary, replicas); did you mean 'replicas'?"),
        ({"listen": {"port": "abc"}}, "listen.port: expected an integer, got a string ('abc')"),
        ({"listen": {"port": 6432.5}}, "listen.port: expected an integer, got a number (6432.5)"),
        ({"pool": {"size": True}}, "pool.size: expected an integer, got a boolean (true)"),
        ({"pool": {"checkout_timeout": "5s"}},
         "pool.checkout_timeout: expected a number, got a string ('5s')"),
        ({"database": 42}, "database: expected a string, got an integer (42) (quote it)"),
        ({"database": ""}, "database: must not be empty"),
        ({"listen": [6432]}, "listen: expected a mapping, got a list"),
        ({"listen": {"port": 0}}, "listen.port: must be from 1 to 65535, got 0"),
        ({"listen": {"port": 70000}}, "listen.port: must be from 1 to 65535, got 70000"),
        ({"listen": {"max_client_connections": 0}},
         "listen.max_client_connections: must be at least 1, got 0"),
        ({"pool": {"size": 0}}, "pool.size: must be at least 1, got 0"),
        ({"pool": {"max_waiting_clients": -3}},
         "pool.max_waiting_clients: must be at least 1, got -3"),
        ({"pool": {"max_prepared_statements": -1}},
         "pool.max_prepared_statements: must be at least 0, got -1"),
        ({"pool": {"idle_timeout": 0}}, "pool.idle_timeout: must be greater than 0, got 0"),
        ({"pool": {"connect_timeout": float("inf")}},
         "pool.connect_timeout: must be a finite number, got inf"),
        ({"pool": {"mode": "sesion"}},
         "pool.mode: must be one of transaction, session, got 'sesion'; did you mean 'session'?"),
        ({"auth": {"method": "md5"}},
         "auth.method: must be one of scram-sha-256, trust, got 'md5'"),
        ({"auth": {"method": "Trust"}}, "did you mean 'trust'?"),
        ({"users": {"app": {"password": "x", "pool_mode": "statement"}}},
         "users.app.pool_mode: must be one of transaction, session, got 'statement'"),
        ({"users": {"app": {"password": "x", "admin": "yes"}}},
         "users.app.admin: expected true or false, got a string ('yes')"),
        ({"default_shard": "s3"}, "default_shard: 's3' is not one of the shards (s1, s2)"),
        ({"default_shard": "s_1"}, "did you mean 's1'?"),
        ({"default_shard": ...}, "default_shard: required (the shard that holds tables no rule "
                                 "distributes)"),
        ({"database": ...}, "database: required (the database name clients connect to)"),
        ({"shards": ...}, "shards: at least one is required (a mapping of shard name to servers)"),
        ({"shards": {}}, "shards: at least one is required"),
        ({"shards": ["postgresql://u@h/d"]},
         "shards: expected a mapping of shard name to servers, got a list"),
        ({"users": ...}, "users: at least one is required (a mapping of user name to settings)"),
        ({"users": {}}, "users: at least one is required"),
        ({"users": {"": {"password": "x"}}}, "users: user name '' is empty"),
        ({"users": {7: {"password": "x"}}}, "users: user name 7 must be written as a string: '7'"),
        ({"shards": {1: {"primary": "postgresql://u@h/d"}}}, "shards: shard name 1 must be"),
        ({"users": {"app": {}}},
         "users.app: needs a password or a scram_verifier (or auth: {method: trust})"),
        ({"users": {"app": {"password": "x", "scram_verifier": OPS_VERIFIER}}},
         "users.app: give either password or scram_verifier, not both"),
        ({"users": {"app": {"password": 1234}}},
         "users.app.password: expected a string, got an integer (quote it)"),
        ({"users": {"app": {"password": ""}}}, "users.app.password: is empty"),
        ({"users": {"app": "secret"}},
         "users.app: expected a mapping (password, admin, ...), got a string"),
        ({"users": {"app": {"scram_verifier": "md5" + "0" * 32}}},
         "users.app.scram_verifier: is an MD5 hash; Shardwire needs a SCRAM-SHA-256 verifier"),
        ({"users": {"app": {"scram_verifier": "SCRAM-SHA-256$4096:abc"}}},
         "users.app.scram_verifier: not a valid SCRAM-SHA-256 verifier (expected "
         "SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>)"),
        ({"users": {"app": {"scram_verifier": OPS_VERIFIER.replace("=:", "A=:")}}},
         "users.app.scram_verifier: not a valid SCRAM-SHA-256 verifier"),
        ({"users": {"app": {"scram_verifier": OPS_VERIFIER.replace("$4096:", "$0:")}}},
         "users.app.scram_verifier: not a valid SCRAM-SHA-256 verifier"),
        ({"shards": {"S1": {"primary": "postgresql://u@h/d"}}, "default_shard": "S1"},
         "shards: shard name 'S1' must be made of lower case letters, digits and _, not starting "
         "with a digit"),
        ({"shards": {"1st": {"primary": "postgresql://u@h/d"}}}, "shard name '1st' must be"),
        ({"shards": {"s-1": {"primary": "postgresql://u@h/d"}}}, "shard name 's-1' must be"),
        ({"shards": {"s1": {"replicas": []}}},
         "shards.s1.primary: required (the shard's connection string)"),
        ({"shards": {"s1": "postgresql://u@h/d"}},
         "shards.s1: expected a mapping with primary (and optionally replicas), got a string"),
        ({"shards": {"s1": {"primary": "postgresql://u@h/d", "replicas": "postgresql://u@r/d"}}},
         "shards.s1.replicas: expected a list of connection strings, got a string"),
        ({"shards": {"s1": {"primary": "postgresql://u@h/d", "replicas": ["mysql://u@r/d"]}}},
         "shards.s1.replicas[0]: not a valid connection string: it must start with "
         "postgresql:// (expected postgresql://user[:password]@host[:port]/database)"),
        ({"shards": {"s1": {"primary": "postgresql://u@10.0.0.2"}}},
         "shards.s1.primary: not a valid connection string: the database name is missing "
         "(expected postgresql://user[:password]@host[:port]/database)"),
        ({"shards": {"s1": {"primary": 5432}}},
         "shards.s1.primary: expected a connection string, got an integer (5432)"),
        ({"shards": {"s1": {"primary": "postgresql://u@h:5432/d"},
                     "s2": {"primary": "postgresql://other@h/d"}}},
         "shards.s2.primary: the same database as shards.s1.primary (h:5432/d)"),
        ({"shards": {"s1": {"primary": "postgresql://u@h/d", "replicas": ["postgresql://u@h/d"]}}},
         "shards.s1.replicas[0]: the same database as shards.s1.primary (h:5432/d)"),
        ({"catalog": "postgresql://u@h/"}, "catalog: not a valid connection string: the database"),
        ({"admin_database": "app"},
         "admin_database: must differ from database ('app'), or clients could not reach the "
         "shards"),
        ({"tls": {"cert_file": "server.crt"}}, "tls.key_file: required when tls is set"),
        ({"tls": {"cert_file": "c", "key_file": "k", "ca_file": "x"}},
         "tls.ca_file: unknown key (allowed: cert_file, key_file)"),
    ],
)
def test_a_problem_names_its_key_path(changes: dict[str, Any], expected: str) -> None:
    found = problems(config_text(**changes))
    assert any(expected in p for p in found), found


def test_duplicate_keys_are_reported() -> None:
    text = """
database: app
users:
  app: {password: a}
  app: {password: b}
shards:
  s1: {primary: "postgresql://u@h/d1"}
  s1: {primary: "postgresql://u@h/d2"}
default_shard: s1
"""
    assert problems(text) == [
        "users.app: written more than once in the same mapping",
        "shards.s1: written more than once in the same mapping",
    ]


def test_yaml_merge_keys_are_not_duplicates() -> None:
    text = """
database: app
users: {app: {password: a}}
x-server: &server {primary: "postgresql://u@h/d1"}
shards:
  s1: {<<: *server, primary: "postgresql://u@h/d2"}
default_shard: s1
"""
    # only the unknown key, not a duplicate
    assert problems(text) == [
        "x-server: unknown key (allowed: listen, tls, auth, pool, transactions, rebalance, "
        "limits, replicas, health, metrics, database, admin_database, default_shard, catalog, "
        "shutdown_timeout, users, shards, sharding)"
    ]


def test_several_problems_are_reported_at_once() -> None:
    text = config_text(
        listen={"port": 99999, "hots": "x"},
        pool={"size": 0, "mode": "statement"},
        users={"app": {}},
        shards={"s1": {"primary": "postgresql://u@h"}, "Bad": {"primary": "postgresql://u@h/d"}},
        default_shard="s9",
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, env={})
    assert info.value.problems == [
        "listen.hots: unknown key (allowed: host, port, max_client_connections); "
        "did you mean 'host'?",
        "listen.port: must be from 1 to 65535, got 99999",
        "pool.size: must be at least 1, got 0",
        "pool.mode: must be one of transaction, session, got 'statement'",
        "users.app: needs a password or a scram_verifier (or auth: {method: trust})",
        "shards.s1.primary: not a valid connection string: the database name is missing "
        "(expected postgresql://user[:password]@host[:port]/database)",
        "shards: shard name 'Bad' must be made of lower case letters, digits and _, not "
        "starting with a digit",
        "default_shard: 's9' is not one of the shards (s1)",
    ]
    assert str(info.value) == "\n".join(info.value.problems)


def test_yaml_syntax_errors_give_the_line() -> None:
    problem = only_problem("database: app\nusers: {app: {password: x}\nshards: x\n")
    assert problem.startswith("line 3, column ")


def test_a_file_that_is_not_a_mapping() -> None:
    assert only_problem("- database\n") == "(file): expected a mapping of settings, got a list"


def test_an_empty_file_lists_what_is_required() -> None:
    assert problems("") == [
        "database: required (the database name clients connect to)",
        "default_shard: required (the shard that holds tables no rule distributes)",
        "users: at least one is required (a mapping of user name to settings)",
        "shards: at least one is required (a mapping of shard name to servers)",
    ]


def test_secrets_never_appear_in_problems() -> None:
    text = config_text(
        users={
            "app": {"password": "hunter2", "scram_verifier": "hunter3"},
            "ops": {"scram_verifier": "hunter$5$x:y"},
            "dba": {"password": 12345},
        },
        shards={"s1": {"primary": "postgresql://u:hunter4@h:99999/d"}},
    )
    message = str(problems(text))
    assert "hunter" not in message
    assert "12345" not in message


# --- TLS files ---------------------------------------------------------------------------


def test_tls_files_are_resolved_against_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "server.crt").write_text("cert")
    key = tmp_path / "server.key"
    key.write_text("key")
    file = tmp_path / "shardwire.yaml"
    file.write_text(config_text(tls={"cert_file": "certs/server.crt", "key_file": str(key)}))
    assert load_config(file).tls == Tls(str(tmp_path / "certs" / "server.crt"), str(key))


def test_missing_tls_files_are_reported_with_their_resolved_path(tmp_path: Path) -> None:
    text = config_text(tls={"cert_file": "server.crt", "key_file": "/nonexistent/server.key"})
    assert problems(text, path=tmp_path / "shardwire.yaml") == [
        f"tls.cert_file: file not found: {tmp_path / 'server.crt'}",
        "tls.key_file: file not found: /nonexistent/server.key",
    ]


# --- environment variables ---------------------------------------------------------------


def test_env_substitution_in_any_string() -> None:
    text = config_text(
        database="${DB}",
        admin_database="${DB}_admin",
        shards={"s1": {"primary": "postgresql://${PGUSER}@${PGHOST}:5433/${DB}",
                       "replicas": ["postgresql://${PGUSER}@replica/${DB}"]}},
    )
    env = {"DB": "shop", "PGUSER": "sw", "PGHOST": "db1"}
    config = parse_config(text, env=env)
    assert config.database == "shop" and config.admin_database == "shop_admin"
    assert config.shards["s1"].primary.host == "db1"
    assert config.shards["s1"].replicas[0].user == "sw"


def test_numbers_and_booleans_can_come_from_the_environment() -> None:
    text = config_text(
        listen={"port": "${PORT}"},
        pool={"checkout_timeout": "${WAIT}"},
        users={"app": {"password": "x", "admin": "${ADMIN}"}},
    )
    config = parse_config(text, env={"PORT": "7000", "WAIT": "0.5", "ADMIN": "true"})
    assert (config.listen.port, config.pool.checkout_timeout) == (7000, 0.5)
    assert config.users["app"].admin is True


def test_a_bad_number_from_the_environment() -> None:
    text = config_text(listen={"port": "${PORT}"})
    assert only_problem(text, env={"PORT": "64x"}) == (
        "listen.port: expected an integer, got '64x' from the environment"
    )


def test_a_missing_variable_names_the_key_and_the_variable_once() -> None:
    text = config_text(shards={"s1": {"primary": "postgresql://u:${PG_PASS}@h/d",
                                      "replicas": ["postgresql://u:${PG_PASS}@r/d"]}})
    assert problems(text, env={}) == [
        "shards.s1.primary: environment variable PG_PASS is not set",
        "shards.s1.replicas[0]: environment variable PG_PASS is not set",
    ]


def test_a_missing_password_variable_is_the_only_problem() -> None:
    text = config_text(users={"app": {"password": "${APP_PASSWORD}"}})
    assert problems(text, env={}) == [
        "users.app.password: environment variable APP_PASSWORD is not set"
    ]


def test_dollar_dollar_brace_escapes() -> None:
    config = parse_config(config_text(pool={"server_reset_query": "SELECT '$${X}'"}), env={})
    assert config.pool.server_reset_query == "SELECT '${X}'"


def test_a_dollar_without_brace_is_left_alone() -> None:
    config = parse_config(config_text(users={"app": {"password": "pa$$word$X"}}), env={})
    verifier = config.users["app"].scram_verifier
    assert verifier is not None and verifies(verifier, "pa$$word$X")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("${1X}", "database: '${1X}' is not a valid environment variable reference"),
        ("${X:-app}", "database: '${X:-app}' is not a valid environment variable reference"),
        ("${DB", "database: '${' is not closed with '}' (write '$${' for a literal '${')"),
    ],
)
def test_bad_variable_references(value: str, expected: str) -> None:
    assert only_problem(config_text(database=value), env={"DB": "app"}) == expected


# --- SCRAM verifiers ---------------------------------------------------------------------


@pytest.mark.parametrize("password", list(PG_VERIFIERS))
def test_verifier_from_a_password_matches_postgresql(password: str) -> None:
    expected = PG_VERIFIERS[password]
    salt = base64.b64decode(expected.split("$")[1].split(":")[1])
    assert make_scram_verifier(password, salt=salt) == expected


def test_each_load_salts_afresh() -> None:
    first = parse_config(config_text(), env={}).users["app"].scram_verifier
    second = parse_config(config_text(), env={}).users["app"].scram_verifier
    assert first != second


# --- connection strings ------------------------------------------------------------------


def test_dsn_defaults() -> None:
    assert parse_dsn("postgresql://postgres@localhost/app") == ServerAddress(
        host="localhost", port=5432, database="app", user="postgres", password=None,
        sslmode="disable", dsn="postgresql://postgres@localhost/app",
    )


def test_dsn_postgres_scheme_and_port() -> None:
    address = parse_dsn("postgres://u@db.example.com:6000/d")
    assert (address.host, address.port, address.database) == ("db.example.com", 6000, "d")


def test_dsn_ipv6_host_in_brackets() -> None:
    address = parse_dsn("postgresql://u:pw@[2001:db8::1]:5433/app")
    assert (address.host, address.port) == ("2001:db8::1", 5433)
    assert address.dsn == "postgresql://u:***@[2001:db8::1]:5433/app"
    assert parse_dsn("postgresql://u@[::1]/app").port == 5432


def test_dsn_percent_encoded_parts() -> None:
    address = parse_dsn("postgresql://us%65r:p%40ss%3Aw%2Fd@h/my%20db?sslmode=prefer")
    assert (address.user, address.password, address.database) == ("user", "p@ss:w/d", "my db")
    assert address.sslmode == "prefer"
    assert address.dsn == "postgresql://us%65r:***@h/my%20db?sslmode=prefer"


def test_dsn_password_with_unencoded_reserved_characters() -> None:
    # as when a password from the environment is put into a connection string
    address = parse_dsn("postgresql://u:p@s/s?#:w@h:5433/d?sslmode=require")
    assert (address.user, address.password) == ("u", "p@s/s?#:w")
    assert (address.host, address.port, address.database) == ("h", 5433, "d")
    assert address.dsn == "postgresql://u:***@h:5433/d?sslmode=require"


def test_dsn_empty_password_is_none() -> None:
    assert parse_dsn("postgresql://u:@h/d").password is None


@pytest.mark.parametrize(
    ("dsn", "reason"),
    [
        ("postgresql://u@h", "the database name is missing"),
        ("postgresql://u@h/", "the database name is missing"),
        ("postgresql://u@h?sslmode=require", "the database name is missing"),
        ("postgresql://h/d", "the user name is missing"),
        ("postgresql://:pw@h/d", "the user name is missing"),
        ("postgresql://u@/d", "the host is missing"),
        ("postgresql://u@:5432/d", "the host is missing"),
        ("postgresql://u@h1,h2/d", "give one host per connection string"),
        ("postgresql://u@::1/d", "an IPv6 address must be in brackets, as in [::1]"),
        ("postgresql://u@[::1/d", "an IPv6 address is missing its closing ']'"),
        ("postgresql://u@[::1]5432/d", "expected ':port' after the IPv6 address"),
        ("postgresql://u@h:0/d", "port '0' is not a number from 1 to 65535"),
        ("postgresql://u@h:65536/d", "port '65536' is not a number from 1 to 65535"),
        ("postgresql://u@h:x/d", "port 'x' is not a number from 1 to 65535"),
        ("mysql://u@h/d", "it must start with postgresql://"),
        ("u@h/d", "it must start with postgresql://"),
        ("postgresql://u@h/d#x", "'#' must be percent-encoded as %23"),
    ],
)
def test_invalid_dsn(dsn: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_dsn(dsn)
    assert str(info.value) == (
        f"not a valid connection string: {reason} "
        "(expected postgresql://user[:password]@host[:port]/database)"
    )


@pytest.mark.parametrize(
    ("dsn", "message"),
    [
        ("postgresql://u@h/d?sslmode=verify-full",
         "sslmode must be one of disable, prefer, require, got 'verify-full'"),
        ("postgresql://u@h/d?application_name=x",
         "connection parameter 'application_name' is not supported (only sslmode is)"),
    ],
)
def test_dsn_parameters(dsn: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_dsn(dsn)


def test_dsn_errors_do_not_show_the_password() -> None:
    with pytest.raises(ValueError) as info:
        parse_dsn("postgresql://u:hunter2@h:99999/d")
    assert "hunter2" not in str(info.value)


# --- examples and docs -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["shardwire.yaml", "minimal.yaml"])
def test_examples_load(name: str) -> None:
    env = {
        "APP_PASSWORD": "app",
        "REPORTING_PASSWORD": "reporting",
        "PG_PASSWORD": "pg",
        "OPS_SCRAM_VERIFIER": OPS_VERIFIER,
    }
    path = ROOT / "examples" / name
    config = parse_config(path.read_text(), path=path, env=env)
    assert isinstance(config, Config)
    assert config.default_shard in config.shards


def test_docs_give_every_setting_its_default_and_reloadability() -> None:
    docs = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    rows = {
        cells[0].strip("`"): cells
        for line in docs.splitlines()
        if line.startswith("| `")
        for cells in [[cell.strip() for cell in line.strip("|").split("|")]]
    }
    for s in SETTINGS:
        default = "required" if s.required else format_value(s.default) or "—"
        assert rows[s.path][2:4] == [default, "yes" if s.reloadable else "no"], s.path
