"""The Docker files, checked without a Docker engine: what `docker build` and `docker compose up`
would trip over first (a missing file, a wrong name, a stage that does not exist), and the
compose setup's config as Shardwire itself reads it."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from shardwire.config import load_config
from shardwire.config.load import parse_config
from shardwire.demo_data import demo_map_problem

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE_ENV = {"POSTGRES_PASSWORD": "pg-secret", "DEMO_PASSWORD": "demo-secret"}


# --- the Dockerfile --------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) in order, continuation lines joined, comments dropped."""
    out = []
    pending = ""
    for line in (DOCKER / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def stages() -> list[tuple[str | None, list[tuple[str, str]]]]:
    """(stage name, instructions) per FROM."""
    found: list[tuple[str | None, list[tuple[str, str]]]] = []
    for word, rest in dockerfile():
        if word == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert m, f"cannot read FROM {rest}"
            found.append((m.group(2), [(word, rest)]))
        elif word != "ARG" or found:
            assert found, f"{word} before the first FROM"
            found[-1][1].append((word, rest))
    return found


def final_stage_instructions() -> list[tuple[str, str]]:
    """What the default target (the last stage) runs with, following FROM <stage> back."""
    by_name = {name: body for name, body in stages() if name}

    def chain(body: list[tuple[str, str]]) -> list[tuple[str, str]]:
        base = body[0][1].split()[0]
        return (chain(by_name[base]) if base in by_name else []) + body[1:]

    return chain(stages()[-1][1])


def test_dockerfile_builds_from_python_slim_in_stages() -> None:
    all_stages = stages()
    bases = [body[0][1].split()[0] for _, body in all_stages]
    assert bases[0].startswith("python:") and bases[0].endswith("-slim")
    names = [name for name, _ in all_stages]
    assert {"build", "runtime", "demo-data"} <= set(names)
    # The runtime image takes only the virtual environment from the build stage.
    runtime = dict(all_stages)["runtime"]
    assert runtime[0][1].split()[0].startswith("python:")
    copies_from_build = [rest for word, rest in runtime
                         if word == "COPY" and "--from=build" in rest]
    assert copies_from_build == ["--from=build /opt/shardwire /opt/shardwire"]
    build = " ".join(rest for _, rest in dict(all_stages)["build"])
    assert "pip wheel" in build and "venv /opt/shardwire" in build


def test_dockerfile_copies_only_files_that_exist_and_are_not_ignored() -> None:
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for word, rest in dockerfile():
        if word != "COPY" or "--from=" in rest:
            continue
        *sources, _dest = shlex.split(rest)
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the build context"
            top = source.split("/")[0]
            assert top not in ignored, f"COPY {source}: excluded by .dockerignore"


def test_default_image_runs_the_entrypoint_as_non_root_with_a_healthcheck() -> None:
    final = final_stage_instructions()
    users = [rest for word, rest in final if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    entrypoint = [rest for word, rest in final if word == "ENTRYPOINT"][-1]
    assert yaml.safe_load(entrypoint) == ["shardwire-entrypoint"]
    assert ("COPY", "docker/entrypoint.sh /usr/local/bin/shardwire-entrypoint") in final
    assert yaml.safe_load([rest for word, rest in final if word == "CMD"][-1]) == ["serve"]
    healthcheck = [rest for word, rest in final if word == "HEALTHCHECK"][-1]
    command = yaml.safe_load(healthcheck.split(" CMD ", 1)[1])
    assert command[:2] == ["shardwire-entrypoint", "health"]
    exposed = {int(p.split("/")[0]) for word, rest in final if word == "EXPOSE"
               for p in rest.split()}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in COMPOSE_ENV.items():
            mp.setenv(k, v)
        config = load_config(DOCKER / "shardwire.yaml")
    assert config.listen.port in exposed


def test_health_command_of_the_image_parses() -> None:
    healthcheck = next(rest for word, rest in final_stage_instructions() if word == "HEALTHCHECK")
    command = yaml.safe_load(healthcheck.split(" CMD ", 1)[1])
    # The entrypoint adds --config; the rest must be options `shardwire health` takes.
    from shardwire.cli import main
    with pytest.raises(SystemExit) as exc:
        main([*command[1:], "--help"])
    assert exc.value.code == 0


# --- docker/compose.yaml ---------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_has_the_proxy_three_shards_a_replica_the_catalog_and_the_demo_data() -> None:
    services = compose()["services"]
    assert {"shardwire", "shard1", "shard2", "shard3", "shard2-replica", "catalog",
            "demo-data"} <= set(services)
    for name in ("shard1", "shard2", "shard3", "shard2-replica", "catalog"):
        assert services[name]["image"] == "postgres:15", name
        settings = dict(arg.split("=", 1) for arg in services[name]["command"] if "=" in arg)
        assert int(settings["max_prepared_transactions"]) > 0, name  # two-phase commit
        assert settings["wal_level"] == "logical", name
        assert "healthcheck" in services[name], name
    replica = services["shard2-replica"]
    assert replica["environment"]["PRIMARY_HOST"] == "shard2"
    assert replica["depends_on"]["shard2"]["condition"] == "service_healthy"
    proxy = services["shardwire"]
    assert proxy["depends_on"]["demo-data"]["condition"] == "service_completed_successfully"
    assert proxy["ports"] == ["6432:6432"]


def test_compose_references_files_that_exist() -> None:
    data = compose()
    stage_names = {name for name, _ in stages()}
    for name, service in data["services"].items():
        build = service.get("build")
        if build:
            context = (DOCKER / build["context"]).resolve()
            assert context == ROOT, name
            assert (context / build["dockerfile"]).is_file(), name
            assert build.get("target") in stage_names | {None}, name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                path = DOCKER / source
                assert path.exists(), f"{name}: {volume}: no such file"
                if "/docker-entrypoint-initdb.d/" in volume or path.suffix == ".sh":
                    assert path.stat().st_mode & 0o111, f"{name}: {source} is not executable"
            else:
                assert source in data["volumes"], f"{name}: volume {source} is not declared"
        entrypoint = service.get("entrypoint")
        if entrypoint:
            mounted = [v.split(":")[1] for v in service.get("volumes", [])]
            assert entrypoint[0] in mounted, f"{name}: entrypoint {entrypoint[0]} is not mounted"
        for dependency in service.get("depends_on", {}):
            assert dependency in data["services"], f"{name} depends on unknown {dependency}"


def test_scripts_are_valid_shell() -> None:
    for script in [DOCKER / "entrypoint.sh", *sorted((DOCKER / "postgres").glob("*.sh"))]:
        result = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"
        assert script.read_text().startswith("#!/bin/sh\n"), script


# --- docker/shardwire.yaml -------------------------------------------------------------------


def docker_config_text() -> str:
    return (DOCKER / "shardwire.yaml").read_text()


def test_config_loads_and_points_at_the_compose_services() -> None:
    config = parse_config(docker_config_text(), path=DOCKER / "shardwire.yaml", env=COMPOSE_ENV)
    services = compose()["services"]
    assert config.listen.host == "0.0.0.0"  # reachable through the published port
    assert list(config.shards) == ["shard1", "shard2", "shard3"]
    servers = [s for shard in config.shards.values() for s in (shard.primary, *shard.replicas)]
    assert config.catalog is not None
    for server in [*servers, config.catalog]:
        assert server.host in services, f"{server.dsn}: {server.host} is not a compose service"
        assert server.password == COMPOSE_ENV["POSTGRES_PASSWORD"]
        image_db = services[server.host]["environment"]["POSTGRES_DB"]
        assert server.database == image_db, server.dsn
    assert [r.host for r in config.shards["shard2"].replicas] == ["shard2-replica"]
    # The shard map is the demo's, so that `shardwire demo-data` loads rows where it looks.
    assert demo_map_problem(config) is None


def test_every_variable_of_the_config_is_set_for_the_proxy_and_the_loader() -> None:
    wanted = set(re.findall(r"\$\{(\w+)\}", docker_config_text()))
    assert wanted == set(COMPOSE_ENV)
    for name in ("shardwire", "demo-data"):
        environment = compose()["services"][name]["environment"]
        assert wanted <= set(environment), name
        assert environment["SHARDWIRE_CONFIG"] == "/etc/shardwire/shardwire.yaml"
    passwords = {v for k, v in compose()["services"]["shard1"]["environment"].items()
                 if k == "POSTGRES_PASSWORD"}
    assert passwords == {compose()["services"]["shardwire"]["environment"]["POSTGRES_PASSWORD"]}


def test_config_without_its_passwords_is_rejected_with_the_variables_named() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shardwire.cli", "check", "--config",
         str(DOCKER / "shardwire.yaml")],
        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert "users.demo.password: environment variable DEMO_PASSWORD is not set" in result.stderr
    assert "catalog: environment variable POSTGRES_PASSWORD is not set" in result.stderr


def test_demo_data_refuses_a_map_that_is_not_the_demos() -> None:
    text = docker_config_text().replace("4: shard1, 5: shard2", "4: shard2, 5: shard1")
    config = parse_config(text, env=COMPOSE_ENV)
    problem = demo_map_problem(config)
    assert problem is not None and "not the demo's" in problem
    no_catalog = parse_config(re.sub(r"(?m)^catalog:.*$", "", docker_config_text())
                              .replace("kind: lookup", "kind: hash").replace(
                                  "new_keys: least_loaded  # the shard with the fewest users",
                                  ""), env=COMPOSE_ENV)
    assert demo_map_problem(no_catalog) == "needs a catalog: the users' directory is kept there"


def test_compose_hosts_in_the_config_are_resolvable_names() -> None:
    # Service names double as host names on the compose network: they must be valid ones.
    for name in compose()["services"]:
        assert re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", name), name
    for url in re.findall(r'"(postgresql://[^"]+)"', docker_config_text()):
        assert urlsplit(url.replace("${POSTGRES_PASSWORD}", "x")).port == 5432
