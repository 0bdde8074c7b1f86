"""The production deployment files: docker-compose.yml, the Dockerfile, .env.example and the
container health checks.

This machine has no Docker engine, so nothing here starts a container. What can be checked
is: the compose file against the Compose specification (the `compose-spec` bindings of the
Rust `compose_spec` parser, after the same interpolation Compose does), its structure (health
checks, start order, secrets, pinned images, known settings), the Dockerfile's rules, the
shell scripts' syntax, and the health-check module against real servers (an HTTP server, a
Temporal dev server with a real worker polling). docs/deployment.md says what was validated
by hand besides (installing the package as the image does and migrating a fresh database).
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import secrets
import socket
import subprocess
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_spec import PyCompose
from temporalio import workflow
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from core import healthcheck
from core.settings import Settings
from devtools.configdoc import env_name
from tests.httpserver import QuietHandler, serve

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
COMPOSE_CODE = "\n".join(
    line for line in COMPOSE_TEXT.splitlines() if not line.lstrip().startswith("#")
)
COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_TEXT)
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
ENV_EXAMPLE = (ROOT / ".env.example").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETTINGS_VARIABLES = {env_name(name) for name in Settings.model_fields}

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
SECRET_KEY = re.compile(r"PASSWORD|PASSWD|PWD|SECRET|TOKEN|(^|_)KEY$", re.IGNORECASE)
MOTORCADE_ROLES = {"api", "ingest", "worker"}


def env_example_values() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name] = value
    return values


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation, as `docker compose config` does it (comments left out)."""

    def substitute(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        value = env.get(name)
        if value is not None and (value != "" or not (op or "").startswith(":")):
            return value
        if op in (":-", "-"):
            return arg or ""
        if op in (":?", "?"):
            raise KeyError(f"required variable {name} is not set: {arg}")
        return ""

    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return VARIABLE.sub(substitute, "\n".join(lines))


def resolved_compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(
        interpolate(COMPOSE_TEXT, env if env is not None else env_example_values())
    )
    return document


def validate_spec(document: dict[str, Any]) -> PyCompose:
    # YAML merge keys are resolved by PyYAML first (the Rust parser does not take `<<`).
    return PyCompose.from_json(json.dumps(document))


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    deps = service.get("depends_on") or {}
    assert isinstance(deps, dict), "depends_on must use the long form, with a condition"
    return deps


def one_shots() -> set[str]:
    """Services that run to completion: restart "no" and awaited with
    service_completed_successfully by another service."""
    awaited = {
        name
        for service in SERVICES.values()
        for name, dep in depends_on(service).items()
        if dep.get("condition") == "service_completed_successfully"
    }
    return {name for name in awaited if SERVICES.get(name, {}).get("restart") == "no"}


def motorcade_services() -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in SERVICES.items()
        if str(service.get("image", "")).find("motorcade") >= 0 or "build" in service
    }


# --- docker-compose.yml -----------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    parsed = validate_spec(resolved_compose())
    assert set(parsed.service_names()) == set(SERVICES)


def test_the_specification_check_can_fail() -> None:
    """The validator refuses what Compose would refuse: the check above is not vacuous."""
    document = resolved_compose()
    broken = copy.deepcopy(document)
    broken["services"]["api"]["depends_on"]["migrate"]["condition"] = "completed"
    with pytest.raises(ValueError, match="service_completed_successfully"):
        validate_spec(broken)
    broken = copy.deepcopy(document)
    broken["services"]["api"]["healthchek"] = broken["services"]["api"].pop("healthcheck")
    with pytest.raises(ValueError, match="healthchek"):
        validate_spec(broken)


def test_required_variables_stop_compose_when_missing() -> None:
    required = {m.group(1) for m in VARIABLE.finditer(COMPOSE_CODE) if m.group(2) == ":?"}
    assert {
        "POSTGRES_PASSWORD",
        "TEMPORAL_DB_PASSWORD",
        "MOTORCADE_OIDC_ISSUER",
        "MOTORCADE_STREAM_TICKET_SECRET",  # API replicas must share it
    } <= required
    example = env_example_values()
    assert required - set(example) == set(), ".env.example must document every required one"
    for name in required:
        env = {k: v for k, v in example.items() if k != name}
        with pytest.raises(KeyError, match=name):
            resolved_compose(env)


def test_every_service_has_a_healthcheck_or_is_a_one_shot() -> None:
    shots = one_shots()
    assert {"migrate", "temporal-schema", "temporal-namespace"} <= shots
    for name, service in SERVICES.items():
        if name in shots:
            assert "healthcheck" not in service or service["healthcheck"].get("disable")
            continue
        check = service.get("healthcheck")
        assert check and check.get("test"), f"{name} has no healthcheck"
        assert not check.get("disable"), f"{name} disables its healthcheck"


def test_depends_on_conditions_point_at_services_that_can_satisfy_them() -> None:
    shots = one_shots()
    for name, service in SERVICES.items():
        for target, dep in depends_on(service).items():
            assert target in SERVICES, f"{name} depends on unknown {target}"
            condition = dep.get("condition")
            if condition == "service_healthy":
                assert "healthcheck" in SERVICES[target], f"{name}: {target} has no healthcheck"
            elif condition == "service_completed_successfully":
                assert target in shots, f"{name}: {target} is not a one-shot"
            else:
                pytest.fail(f"{name} -> {target}: condition {condition!r} waits for nothing")


def test_migrate_runs_once_before_every_motorcade_role() -> None:
    assert SERVICES["migrate"]["command"] == ["migrate"]
    assert SERVICES["migrate"]["restart"] == "no"
    for role in MOTORCADE_ROLES:
        service = SERVICES[role]
        assert service["command"] == [role]
        assert depends_on(service)["migrate"]["condition"] == "service_completed_successfully"
    for role in ("api", "worker"):  # both need Temporal and its namespace
        deps = depends_on(SERVICES[role])
        assert deps["temporal"]["condition"] == "service_healthy"
        assert deps["temporal-namespace"]["condition"] == "service_completed_successfully"
    assert depends_on(SERVICES["temporal"])["temporal-schema"]["condition"] == (
        "service_completed_successfully"
    )


def test_motorcade_healthchecks_check_the_role_the_container_runs() -> None:
    for role in MOTORCADE_ROLES:
        test = SERVICES[role]["healthcheck"]["test"]
        assert test == ["CMD", "python", "-m", "core.healthcheck", role]


def test_postgres_healthchecks_use_pg_isready_and_keep_data_in_a_volume() -> None:
    for name in ("postgres", "temporal-postgres"):
        service = SERVICES[name]
        assert "pg_isready" in " ".join(service["healthcheck"]["test"])
        volume = service["volumes"][0].split(":")[0]
        assert volume in COMPOSE["volumes"], f"{name} data is not in a named volume"


def test_no_literal_secret_values() -> None:
    """Every secret-looking value is a required `${NAME:?...}` reference; URLs carry no literal
    password; no dev key anywhere."""
    literal_password_in_url = re.compile(r"://[^/:@\s]+:(?!\$\{)[^@\s]+@")
    assert "MOTORCADE_DEV_KEY" not in COMPOSE_TEXT
    for name, service in SERVICES.items():
        for key, value in environment_of(service).items():
            if SECRET_KEY.search(key):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]*\}", value), f"{name}.{key}={value}"
            assert not literal_password_in_url.search(value), f"{name}.{key} has a password"
    assert not literal_password_in_url.search(COMPOSE_TEXT)


def test_the_secret_check_catches_a_literal_password() -> None:
    leaked = COMPOSE_TEXT.replace(
        "POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set it}", "POSTGRES_PASSWORD: hunter2", 1
    )
    assert leaked != COMPOSE_TEXT
    values = environment_of(yaml.safe_load(leaked)["services"]["postgres"])
    assert not re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]*\}", values["POSTGRES_PASSWORD"])


def image_reference(value: str) -> str:
    """An image with `${VAR:-default}` parts resolved to their defaults."""
    return VARIABLE.sub(lambda m: m.group(3) or "", value)


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_images_are_pinned_to_a_version(service: str) -> None:
    image = image_reference(SERVICES[service]["image"])
    name, sep, tag = image.rpartition(":")
    assert sep and name and "/" not in tag, f"{service}: {image} has no tag"
    assert tag != "latest" and re.search(r"\d", tag), f"{service}: {image} is not a version"


def test_every_motorcade_variable_in_compose_and_env_example_is_a_setting() -> None:
    used: set[str] = set()
    for service in SERVICES.values():
        used |= {k for k in environment_of(service) if k.startswith("MOTORCADE_")}
    for text in (COMPOSE_TEXT, ENV_EXAMPLE):
        used |= set(re.findall(r"\bMOTORCADE_[A-Z0-9_]+", text))
    used.discard("MOTORCADE_IMAGE")  # the image name, for compose itself (not a setting)
    assert used - SETTINGS_VARIABLES == set()
    assert len(used) >= 10


def test_motorcade_roles_run_in_production_mode() -> None:
    for name in (*MOTORCADE_ROLES, "migrate"):
        env = environment_of(SERVICES[name])
        assert env["MOTORCADE_ENV"] == "production"
        assert env["MOTORCADE_DATABASE_URL"].startswith("postgresql://")
    # .env.example's placeholders are refused in production (a secret must be generated)...
    example = env_example_values()
    with pytest.raises(ValueError, match="placeholder"):
        settings_of(resolved_compose(example)["services"]["api"])
    # ...and with them filled in as its comments say, the API's settings validate.
    filled = {
        k: secrets.token_hex(32) if v.startswith("change-me") else v for k, v in example.items()
    }
    settings = settings_of(resolved_compose(filled)["services"]["api"])
    # The stream ticket secret left as shipped is refused by itself.
    ticket_left = filled | {
        "MOTORCADE_STREAM_TICKET_SECRET": example["MOTORCADE_STREAM_TICKET_SECRET"]
    }
    with pytest.raises(ValueError, match="MOTORCADE_STREAM_TICKET_SECRET is a placeholder"):
        settings_of(resolved_compose(ticket_left)["services"]["api"])
    assert settings.env == "production" and settings.oidc_issuer
    assert settings.metrics_token is not None


def settings_of(service: dict[str, Any]) -> Settings:
    env = environment_of(service)
    return Settings.model_validate({k[len("MOTORCADE_") :].lower(): v for k, v in env.items()})


def test_bind_mounted_files_exist_and_scripts_parse() -> None:
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).is_file(), f"{name} mounts missing {source}"
                if source.endswith(".sh"):
                    subprocess.run(["sh", "-n", str(ROOT / source)], check=True)
                if source.endswith((".yaml", ".yml")):
                    assert yaml.safe_load((ROOT / source).read_text())


# --- Dockerfile -------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_runs_as_an_unprivileged_user() -> None:
    users = [rest for keyword, rest in dockerfile_instructions() if keyword == "USER"]
    assert users, "no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    # the last stage switches user after its last RUN (nothing of the image runs as root)
    instructions = dockerfile_instructions()
    last_user = max(i for i, (k, _) in enumerate(instructions) if k == "USER")
    last_run = max(i for i, (k, _) in enumerate(instructions) if k == "RUN")
    assert last_user > last_run


def test_dockerfile_installs_from_the_lock_without_dev_extras() -> None:
    runs = " ".join(rest for keyword, rest in dockerfile_instructions() if keyword == "RUN")
    assert re.search(r"pip install -c constraints\.txt \.(\s|$)", runs)
    assert "[dev]" not in runs and " -e " not in runs


def test_dockerfile_base_images_are_pinned() -> None:
    args = dict(
        rest.split("=", 1)
        for keyword, rest in dockerfile_instructions()
        if keyword == "ARG" and "=" in rest
    )
    bases = [rest.split()[0] for keyword, rest in dockerfile_instructions() if keyword == "FROM"]
    assert len(bases) >= 2, "multi-stage: a build stage and a runtime stage"
    for base in bases:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
        _name, sep, tag = image.partition(":")
        assert sep and tag != "latest" and re.search(r"\d", tag), image


def test_dockerfile_copies_every_package_and_only_what_exists() -> None:
    copied: list[str] = []
    for keyword, rest in dockerfile_instructions():
        if keyword == "COPY" and "--from=" not in rest:
            parts = [p for p in rest.split() if not p.startswith("--")]
            copied += parts[:-1]
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: no such file"
    packages = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    for pattern in packages:
        assert pattern.rstrip("*") in copied, f"package {pattern} is not copied"
    for needed in ("pyproject.toml", "constraints.txt", "README.md"):
        assert needed in copied


def test_dockerfile_entrypoint_is_the_console_script() -> None:
    entry = [rest for keyword, rest in dockerfile_instructions() if keyword == "ENTRYPOINT"]
    assert json.loads(entry[-1]) == ["motorcade"]
    assert "motorcade" in PYPROJECT["project"]["scripts"]
    checks = [rest for keyword, rest in dockerfile_instructions() if keyword == "HEALTHCHECK"]
    assert checks and "core.healthcheck" in checks[-1]


def test_dockerignore_keeps_local_state_and_test_data_out() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", ".motorcade", "tests", "bench", ".env"} <= ignored
    copied = {
        p
        for keyword, rest in dockerfile_instructions()
        if keyword == "COPY" and "--from=" not in rest
        for p in rest.split()[:-1]
    }
    assert copied & ignored == set(), "the Dockerfile copies something .dockerignore drops"


def test_env_file_is_never_committed() -> None:
    result = subprocess.run(
        ["git", "check-ignore", "--quiet", ".env"], cwd=ROOT, check=False, capture_output=True
    )
    assert result.returncode == 0, ".env must be ignored by git"


# --- core.healthcheck against real servers ------------------------------------------------


def test_role_of_pid1(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cases = {
        b"/opt/motorcade/bin/python\0/opt/motorcade/bin/motorcade\0worker\0": "worker",
        b"/opt/motorcade/bin/motorcade\0ingest\0--processes\0": "ingest",
        b"python\0-m\0core.cli\0api\0": "api",
        b"postgres\0-c\0shared_buffers=2GB\0": None,
    }
    for raw, role in cases.items():
        cmdline.write_bytes(raw)
        assert healthcheck.role_of_pid1(cmdline) == role
    assert healthcheck.role_of_pid1(tmp_path / "missing") is None


@pytest.fixture
def http_server() -> Iterator[str]:
    class Handler(QuietHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/readyz" else 503)
            self.end_headers()

    with serve(Handler) as base:
        yield base


def test_http_check(http_server: str) -> None:
    assert healthcheck.check_http(f"{http_server}/readyz")[0] is True
    healthy, detail = healthcheck.check_http(f"{http_server}/other")
    assert healthy is False and "503" in detail
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    assert healthcheck.check_http(f"http://127.0.0.1:{closed}/readyz", timeout=2)[0] is False


def test_one_shot_roles_pass_and_main_reports(capsys: pytest.CaptureFixture[str]) -> None:
    assert healthcheck.main(["migrate"]) == 0
    assert "nothing to check" in capsys.readouterr().out


@workflow.defn(name="HealthcheckProbe", sandboxed=False)
class ProbeWorkflow:
    @workflow.run
    async def run(self) -> None:
        return None


async def test_worker_check_sees_this_hosts_poller(
    dev_server_env: WorkflowEnvironment, task_queue: str
) -> None:
    client = dev_server_env.client
    address = client.service_client.config.target_host
    host = socket.gethostname()
    before = await healthcheck.check_worker(
        address, client.namespace, task_queue=task_queue, hostname=host
    )
    assert before[0] is False and "no poller" in before[1]
    async with Worker(client, task_queue=task_queue, workflows=[ProbeWorkflow]):
        for _ in range(50):
            healthy, detail = await healthcheck.check_worker(
                address, client.namespace, task_queue=task_queue, hostname=host
            )
            if healthy:
                break
            await asyncio.sleep(0.1)
        assert healthy, detail
        other = await healthcheck.check_worker(
            address, client.namespace, task_queue=task_queue, hostname="another-host"
        )
        assert other[0] is False
        later = datetime.now(UTC) + healthcheck.WORKER_STALE + timedelta(seconds=30)
        stale = await healthcheck.check_worker(
            address, client.namespace, task_queue=task_queue, hostname=host, now=later
        )
        assert stale[0] is False and "stale" in stale[1]
    unreachable = await healthcheck.check_worker("127.0.0.1:1", "default", task_queue=task_queue)
    assert unreachable[0] is False
