"""The container deployment, checked without a Docker engine.

The Dockerfile, docker-compose.yml, .env.example and the systemd unit are read statically: every
setting the code reads is listed and passed, every command they run is a real command of the
CLI. deploy/deploy.sh runs end to end against a stub `docker` that records what it is asked to
do, and a stub readiness endpoint that fails for the version the test chooses.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from codex_gateway.cli.main import cli
from codex_gateway.config import environment_variables
from tests.conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
DOCKERFILE = (ROOT / "Dockerfile").read_text(encoding="utf-8")
ENV_EXAMPLE = (ROOT / ".env.example").read_text(encoding="utf-8")
UNIT = (ROOT / "deploy" / "codex-gateway.service").read_text(encoding="utf-8")
DEPLOY = ROOT / "deploy" / "deploy.sh"


def dockerfile_exec_form(instruction: str) -> list[str]:
    """The JSON argument list of the last ENTRYPOINT, CMD or HEALTHCHECK ... CMD."""
    joined = DOCKERFILE.replace("\\\n", " ")
    lines = [line for line in joined.splitlines() if line.startswith(instruction + " ")]
    assert lines, f"no {instruction} in the Dockerfile"
    text = lines[-1][len(instruction) :]
    if instruction == "HEALTHCHECK":
        text = text.split(" CMD ", 1)[1]
    return list(json.loads(text))


def assert_cli_command(args: list[str]) -> None:
    """`args` (without the program name) parse as a real codex-gateway command."""
    result = CliRunner().invoke(cli, [*args, "--help"])
    assert result.exit_code == 0, f"codex-gateway {' '.join(args)}: {result.output}"


# -- static checks -------------------------------------------------------------------------


def test_compose_has_the_gateway_postgres_redis_and_a_one_shot_migration() -> None:
    assert set(COMPOSE["services"]) == {"gateway", "postgres", "redis", "migrate"}
    assert COMPOSE["services"]["migrate"]["command"] == ["migrate"]
    assert COMPOSE["services"]["migrate"]["restart"] == "no"


def test_every_service_has_a_health_check_except_the_one_shot_migration() -> None:
    for name, service in COMPOSE["services"].items():
        if name != "migrate":
            assert service["healthcheck"]["test"], name


def test_the_gateway_waits_for_healthy_services_and_a_finished_migration() -> None:
    depends = COMPOSE["services"]["gateway"]["depends_on"]

    assert depends == {
        "postgres": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
        "migrate": {"condition": "service_completed_successfully"},
    }
    assert COMPOSE["services"]["migrate"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"}
    }


def test_data_lives_on_named_volumes() -> None:
    volumes = set(COMPOSE["volumes"])
    mounts = {
        name: [mount.split(":")[0] for mount in service.get("volumes", [])]
        for name, service in COMPOSE["services"].items()
    }

    assert mounts["postgres"] == ["postgres-data"]
    assert mounts["redis"] == ["redis-data"]
    assert mounts["gateway"] == ["gateway-data"]
    assert {m for ms in mounts.values() for m in ms} == volumes


@pytest.mark.parametrize("service", ["gateway", "migrate"])
def test_every_setting_the_code_reads_is_passed_to_the_container(service: str) -> None:
    environment = COMPOSE["services"][service]["environment"]

    assert set(environment) == set(environment_variables())
    for name, value in environment.items():
        assert "${" + name in value, f"{name} is not taken from .env"


def test_env_example_lists_every_setting_and_the_database_secrets() -> None:
    listed = set(re.findall(r"^([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE, re.MULTILINE))
    interpolated = set(
        re.findall(r"\$\{([A-Z][A-Z0-9_]*)", (ROOT / "docker-compose.yml").read_text())
    )

    assert set(environment_variables()) <= listed
    # every ${VAR} in compose can be set from .env, except what deploy.sh sets per deploy
    assert interpolated - listed == {"CODEX_GATEWAY_IMAGE_TAG", "GIT_COMMIT"}


def test_the_gateway_port_and_the_image_tag_are_set_from_outside() -> None:
    gateway = COMPOSE["services"]["gateway"]

    assert gateway["ports"] == ["${GATEWAY_BIND:-127.0.0.1}:${GATEWAY_PORT:-8787}:8787"]
    assert gateway["image"] == "codex-gateway:${CODEX_GATEWAY_IMAGE_TAG:-latest}"
    assert gateway["build"]["args"] == {"GIT_COMMIT": "${GIT_COMMIT:-unknown}"}


def test_compose_commands_and_health_checks_are_real_cli_commands() -> None:
    gateway = COMPOSE["services"]["gateway"]

    assert_cli_command(gateway["command"])
    assert_cli_command(COMPOSE["services"]["migrate"]["command"])
    check = gateway["healthcheck"]["test"]
    assert check[:2] == ["CMD", "codex-gateway"]
    assert_cli_command(check[2:])


def test_the_gateway_gets_longer_to_stop_than_its_drain_limit() -> None:
    gateway = COMPOSE["services"]["gateway"]
    grace = int(
        re.search(r":-(\d+)", gateway["environment"]["CODEX_GATEWAY_SHUTDOWN_GRACE_SECONDS"])[1]
    )

    assert int(gateway["stop_grace_period"].rstrip("s")) > grace


def test_dockerfile_is_multi_stage_slim_and_runs_as_an_unprivileged_user() -> None:
    stages = re.findall(r"^FROM (\S+)", DOCKERFILE, re.MULTILINE)
    users = re.findall(r"^USER (\S+)", DOCKERFILE, re.MULTILINE)

    assert len(stages) == 2
    assert all(stage.endswith("-slim") or stage.endswith("-slim AS build") for stage in stages)
    assert "COPY --from=build" in DOCKERFILE
    assert users == ["codex-gateway"]


def test_dockerfile_bakes_in_the_commit_that_version_and_healthz_show() -> None:
    assert "ARG GIT_COMMIT" in DOCKERFILE
    assert "CODEX_GATEWAY_BUILD_COMMIT=${GIT_COMMIT}" in DOCKERFILE


def test_dockerfile_entry_point_command_and_health_check_are_real_commands() -> None:
    entrypoint = dockerfile_exec_form("ENTRYPOINT")
    command = dockerfile_exec_form("CMD")
    health = dockerfile_exec_form("HEALTHCHECK")

    assert entrypoint == ["codex-gateway"]
    assert_cli_command(command)
    assert health[0] == "codex-gateway"
    assert_cli_command(health[1:])
    assert "EXPOSE 8787" in DOCKERFILE


def test_the_installed_entry_point_is_the_cli() -> None:
    result = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "codex-gateway"), "--help"]
        if (ROOT / ".venv" / "bin" / "codex-gateway").exists()
        else ["codex-gateway", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 0
    for command in ("serve", "migrate", "health", "config", "version"):
        assert command in result.stdout


def test_systemd_unit_checks_settings_migrates_then_serves() -> None:
    lines = dict(
        (key, value)
        for key, _, value in (line.partition("=") for line in UNIT.splitlines())
        if key in ("ExecStart", "User", "KillSignal", "TimeoutStopSec", "EnvironmentFile")
    )
    pre = [line.split("=", 1)[1] for line in UNIT.splitlines() if line.startswith("ExecStartPre=")]

    for command in [*pre, lines["ExecStart"]]:
        program, *args = shlex.split(command)
        assert program.endswith("/codex-gateway")
        assert_cli_command(args)
    assert [shlex.split(command)[1:] for command in pre] == [["config", "check"], ["migrate"]]
    assert lines["User"] == "codex-gateway"
    assert lines["KillSignal"] == "SIGTERM"
    assert int(lines["TimeoutStopSec"]) > 30


# -- deploy.sh against a stub docker -------------------------------------------------------

STUB_DOCKER = """#!/usr/bin/env bash
# Records each call with the image tag it was given; `compose up ... gateway` starts that tag.
echo "${CODEX_GATEWAY_IMAGE_TAG:-} $*" >> "$STUB_LOG"
if [ "$1 $2" = "compose up" ] && [ "${@: -1}" = gateway ]; then
  echo "$CODEX_GATEWAY_IMAGE_TAG" > "$STUB_RUNNING"
fi
"""


class Readiness(BaseHTTPRequestHandler):
    """/readyz answers 200 unless the running tag is the one told to fail."""

    running: Path
    failing: str = ""

    def do_GET(self) -> None:
        tag = self.running.read_text().strip() if self.running.exists() else ""
        ready = bool(tag) and tag != self.failing
        body = json.dumps({"status": "ok", "version": "0.1.0", "commit": tag}).encode()
        if self.path == "/readyz" and not ready:
            self.send_response(503)
        else:
            self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def stub_server(tmp_path: Path) -> Iterator[tuple[str, type[Readiness]]]:
    handler = type("StubReadiness", (Readiness,), {"running": tmp_path / "running"})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t.invalid"}
    env |= {"GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t.invalid"}
    result = subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True, timeout=30
    )
    return result.stdout.strip()


class Deployment:
    """A server checkout of an origin repository, a stub docker first on PATH, and deploy.sh."""

    def __init__(self, root: Path, ready_url: str):
        self.origin = root / "origin"
        self.checkout = root / "server"
        self.log = root / "docker-calls.log"
        bin_dir = root / "bin"
        bin_dir.mkdir()
        (bin_dir / "docker").write_text(STUB_DOCKER)
        (bin_dir / "docker").chmod(0o755)
        self.origin.mkdir()
        git(self.origin, "init", "-q", "-b", "main")
        for name in ("docker-compose.yml", ".env.example"):
            (self.origin / name).write_text((ROOT / name).read_text())
        self.commit("first version")
        git(root, "clone", "-q", str(self.origin), str(self.checkout))
        (self.checkout / ".env").write_text("POSTGRES_PASSWORD=secret\n")
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "DEPLOY_DIR": str(self.checkout),
            "DEPLOY_READY_URL": ready_url + "/readyz",
            "DEPLOY_READY_TIMEOUT": "3",
            "DEPLOY_POLL_SECONDS": "0.2",
            "STUB_LOG": str(self.log),
            "STUB_RUNNING": str(root / "running"),
        }

    def commit(self, message: str) -> str:
        (self.origin / "CHANGES").write_text(message)
        git(self.origin, "add", "-A")
        git(self.origin, "commit", "-q", "-m", message)
        return git(self.origin, "rev-parse", "--short=12", "HEAD")

    def deploy(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(DEPLOY)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def current(self) -> str:
        return (self.checkout / ".deploy" / "current").read_text().strip()


@pytest.fixture
def deployment(tmp_path: Path, stub_server: tuple[str, type[Readiness]]) -> Deployment:
    return Deployment(tmp_path, stub_server[0])


def deploy_calls(tag: str) -> list[str]:
    return [
        f"{tag} compose build gateway",
        f"{tag} compose up -d --wait postgres redis",
        f"{tag} compose run --rm migrate",
        f"{tag} compose up -d --no-deps --force-recreate gateway",
    ]


def test_deploy_pulls_builds_migrates_starts_and_reports_the_running_version(
    deployment: Deployment,
) -> None:
    first = git(deployment.origin, "rev-parse", "--short=12", "HEAD")

    result = deployment.deploy()

    assert result.returncode == 0, result.stderr
    assert deployment.calls() == [*deploy_calls(first), f"{first} compose ps"]
    assert deployment.current() == first
    assert f"commit {first} is ready" in result.stdout
    assert f'"commit": "{first}"' in result.stdout
    assert "first version" in result.stdout  # the checkout's `git log --oneline -1`


def test_deploy_twice_leaves_a_ready_version_alone(deployment: Deployment) -> None:
    deployment.deploy()
    calls = len(deployment.calls())

    again = deployment.deploy()

    assert again.returncode == 0, again.stderr
    assert "already running and ready; nothing to do" in again.stdout
    assert not [call for call in deployment.calls()[calls:] if "build" in call or " up " in call]


def test_a_new_version_that_never_gets_ready_is_rolled_back(
    deployment: Deployment, stub_server: tuple[str, type[Readiness]]
) -> None:
    first = git(deployment.origin, "rev-parse", "--short=12", "HEAD")
    deployment.deploy()
    calls = len(deployment.calls())
    second = deployment.commit("second version, broken")
    stub_server[1].failing = second

    result = deployment.deploy()

    assert result.returncode == 1
    assert deployment.calls()[calls:] == [
        *deploy_calls(second),
        f"{second} compose logs --tail 50 gateway",
        f"{first} compose up -d --no-deps --force-recreate gateway",
        f"{first} compose ps",
    ]
    assert deployment.current() == first
    assert f"rolling back to {first}" in result.stdout
    assert f"deploy of {second} failed; {first} is serving" in result.stderr
    assert f'"commit": "{first}"' in result.stdout


def test_a_first_deploy_that_never_gets_ready_fails_without_a_rollback(
    deployment: Deployment, stub_server: tuple[str, type[Readiness]]
) -> None:
    stub_server[1].failing = git(deployment.origin, "rev-parse", "--short=12", "HEAD")

    result = deployment.deploy()

    assert result.returncode == 1
    assert "no previous version to roll back to" in result.stderr
    assert not (deployment.checkout / ".deploy" / "current").exists()


def test_deploy_refuses_a_checkout_without_env(deployment: Deployment) -> None:
    (deployment.checkout / ".env").unlink()

    result = deployment.deploy()

    assert result.returncode == 1
    assert "copy .env.example to .env" in result.stderr
    assert deployment.calls() == []


def test_deploy_finds_the_gateway_port_in_env(deployment: Deployment) -> None:
    port = deployment.env.pop("DEPLOY_READY_URL").rsplit(":", 1)[1].split("/")[0]
    (deployment.checkout / ".env").write_text(f"POSTGRES_PASSWORD=secret\nGATEWAY_PORT={port}\n")

    result = deployment.deploy()

    assert result.returncode == 0, result.stderr
    assert "is ready" in result.stdout
