"""The `motorcade` command's dev-key handling: `token` and `simulate` sign with
MOTORCADE_DEV_KEY when set, else with the key `make dev` wrote in the state directory, and
stop with exit code 2 when there is neither."""

from __future__ import annotations

from pathlib import Path

import pytest
from joserfc import jwt
from joserfc.jwk import OctKey

from core.auth import generate_dev_key
from core.cli import main
from devtools.devkey import load_or_create_dev_key

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


@pytest.mark.parametrize("argv", [["token", "--role", "viewer"], ["simulate"]])
def test_without_a_dev_key_the_command_says_so(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--state-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == NO_KEY
