"""The `motorcade` command's dev subcommands: `token` and `simulate` sign with
MOTORCADE_DEV_KEY when set, else with the key `make dev` wrote in the state directory, and stop
with exit code 2 when there is neither; `simulate` turns its options into the simulator's
configuration; and the roles never import devtools/."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from joserfc import jwt
from joserfc.jwk import OctKey

from core.auth import generate_dev_key
from core.cli import main
from devtools import localservers, simulate
from devtools.devkey import load_or_create_dev_key
from devtools.simulate import SimConfig

ROOT = Path(__file__).resolve().parents[2]
NO_KEY = "no dev key: set MOTORCADE_DEV_KEY or run `make dev` once"


@pytest.fixture(autouse=True)
def no_key_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOTORCADE_DEV_KEY", raising=False)
    monkeypatch.setenv("MOTORCADE_ENV", "dev")


def claims_of(token: str, key: str) -> dict:
    return dict(jwt.decode(token, OctKey.import_key(key)).claims)


def test_the_dev_key_file_is_created_once_and_private(tmp_path: Path) -> None:
    key = load_or_create_dev_key(tmp_path / "state")
    assert (tmp_path / "state" / "dev-key").stat().st_mode & 0o777 == 0o600
    assert load_or_create_dev_key(tmp_path / "state") == key


def test_token_signs_with_the_key_make_dev_wrote(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = load_or_create_dev_key(tmp_path)
    assert main(["token", "--role", "operator", "--state-dir", str(tmp_path)]) == 0
    claims = claims_of(capsys.readouterr().out.strip(), key)
    assert claims["role"] == "operator" and claims["sub"] == "dev-operator"


def test_token_prefers_the_configured_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    load_or_create_dev_key(tmp_path)
    configured = generate_dev_key()
    monkeypatch.setenv("MOTORCADE_DEV_KEY", configured)
    argv = ["token", "--role", "device", "--vehicle", "V-1", "--state-dir", str(tmp_path)]
    assert main(argv) == 0
    assert claims_of(capsys.readouterr().out.strip(), configured)["vehicleId"] == "V-1"


def test_token_scopes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = load_or_create_dev_key(tmp_path)
    argv = ["token", "--role", "viewer", "--state-dir", str(tmp_path)]
    argv += ["--scope", "region=eu-west,us-east", "--scope", "org=acme", "--scope", "model=atlas"]
    assert main(argv) == 0
    claims = claims_of(capsys.readouterr().out.strip(), key)
    assert (claims["regions"], claims["orgs"], claims["models"]) == (
        ["eu-west", "us-east"],
        ["acme"],
        ["atlas"],
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--scope", "region"], "--scope takes NAME=VALUE, not 'region'"),
        (["--scope", "region="], "--scope takes NAME=VALUE, not 'region='"),
        (["--role", "device"], "a device token needs --vehicle ID"),
    ],
)
def test_token_refuses(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    load_or_create_dev_key(tmp_path)
    assert main(["token", "--role", "viewer", "--state-dir", str(tmp_path), *extra]) == 2
    assert capsys.readouterr().err.strip() == message


def test_the_state_directory_defaults_to_the_local_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --state-dir: MOTORCADE_STATE_DIR, else .motorcade/ (devtools.localservers)."""
    monkeypatch.setattr(localservers, "STATE_DIR", tmp_path)
    key = load_or_create_dev_key(tmp_path)
    assert main(["token", "--role", "viewer"]) == 0
    assert claims_of(capsys.readouterr().out.strip(), key)["role"] == "viewer"


@pytest.mark.parametrize("argv", [["token", "--role", "viewer"], ["simulate"]])
def test_without_a_dev_key_the_command_says_so(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--state-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == NO_KEY


@pytest.fixture
def simulated(monkeypatch: pytest.MonkeyPatch) -> list[tuple[SimConfig, str, str]]:
    """What `motorcade simulate` would run: the simulator's arguments, instead of running it."""
    calls: list[tuple[SimConfig, str, str]] = []

    async def record(config: SimConfig, dev_key: str, *, audience: str = "motorcade") -> None:
        calls.append((config, dev_key, audience))

    monkeypatch.setattr(simulate, "simulate", record)
    return calls


# What `motorcade simulate` runs with when given no option (written out: the values it has
# always had), with MOTORCADE_API_HOST=127.0.0.1, MOTORCADE_API_PORT=8123 and
# MOTORCADE_SAFETY_MIN_BATTERY_PERCENT=40.
DEFAULT_SIMULATION = SimConfig(
    api="http://127.0.0.1:8123",
    vehicles=None,
    id_prefix=None,
    failure_rate=0.05,
    release_failure_rates={},
    low_battery_rate=0.03,
    moving_rate=0.05,
    network_loss_rate=0.01,
    offline_rate=0.002,
    heartbeat_seconds=60.0,
    poll_seconds=30.0,
    apply_seconds=20.0,
    min_battery_percent=40,
    duration=None,
    seed=None,
)
EVERY_OPTION = [
    *("--api", "http://api:9000", "--vehicles", "12", "--prefix", "SIM-", "--seed", "3"),
    *("--duration", "5", "--failure-rate", "0.2", "--release-failure-rate", "2.0=0.5"),
    *("--release-failure-rate", "2.1=1", "--low-battery-rate", "0", "--moving-rate", "0"),
    *("--network-loss-rate", "0.1", "--offline-rate", "0.3", "--heartbeat-seconds", "1"),
    *("--poll-seconds", "2", "--apply-seconds", "0.5"),
]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ([], DEFAULT_SIMULATION),
        (
            EVERY_OPTION,
            replace(
                DEFAULT_SIMULATION,
                api="http://api:9000",
                vehicles=12,
                id_prefix="SIM-",
                failure_rate=0.2,
                release_failure_rates={"2.0": 0.5, "2.1": 1.0},
                low_battery_rate=0.0,
                moving_rate=0.0,
                network_loss_rate=0.1,
                offline_rate=0.3,
                heartbeat_seconds=1.0,
                poll_seconds=2.0,
                apply_seconds=0.5,
                duration=5.0,
                seed=3,
            ),
        ),
    ],
    ids=["defaults", "every-option"],
)
def test_simulate_configuration(
    options: list[str],
    expected: SimConfig,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    simulated: list[tuple[SimConfig, str, str]],
) -> None:
    key = load_or_create_dev_key(tmp_path)
    monkeypatch.setenv("MOTORCADE_API_HOST", "127.0.0.1")
    monkeypatch.setenv("MOTORCADE_API_PORT", "8123")
    monkeypatch.setenv("MOTORCADE_SAFETY_MIN_BATTERY_PERCENT", "40")
    assert main(["simulate", "--state-dir", str(tmp_path), *options]) == 0
    assert simulated == [(expected, key, "motorcade")]


@pytest.mark.parametrize("item", ["2.0", "2.0="])
def test_simulate_refuses_a_malformed_release_rate(
    item: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], simulated: list
) -> None:
    load_or_create_dev_key(tmp_path)
    argv = ["simulate", "--state-dir", str(tmp_path), "--release-failure-rate", item]
    assert main(argv) == 2
    assert f"--release-failure-rate takes VERSION=RATE, not {item!r}" in capsys.readouterr().err
    assert simulated == []


@pytest.mark.parametrize(
    ("item", "said"),
    [("2.0=often", "'often' is not a number"), ("2.0=1.5", "'1.5' is not between 0 and 1")],
)
def test_simulate_refuses_a_release_rate_that_is_no_probability(
    item: str, said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], simulated: list
) -> None:
    load_or_create_dev_key(tmp_path)
    argv = ["simulate", "--state-dir", str(tmp_path), "--release-failure-rate", item]
    assert main(argv) == 2
    assert f"--release-failure-rate: {said}" in capsys.readouterr().err
    assert simulated == []


@pytest.mark.parametrize("option", ["--failure-rate", "--moving-rate", "--offline-rate"])
def test_simulate_refuses_a_rate_above_one(
    option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], simulated: list
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["simulate", "--state-dir", str(tmp_path), option, "1.5"])
    assert exited.value.code == 2
    assert "'1.5' is not between 0 and 1" in capsys.readouterr().err
    assert simulated == []


def test_the_roles_never_import_dev_tooling() -> None:
    """The CLI, with its parser built, and every role's entry point leave devtools/ alone: it
    is imported by the dev subcommands only, when they run."""
    code = (
        "import sys, core.cli, core.healthcheck, api.app, worker.main\n"
        "core.cli.build_parser()\n"
        "print(sorted(m for m in sys.modules if m.partition('.')[0] == 'devtools'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.strip() == "[]"
