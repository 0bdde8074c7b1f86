"""docs/configuration.md documents every setting: it is generated from core/settings.py by
devtools/configdoc.py, and a setting added without regenerating it fails here."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.settings import Settings
from devtools import configdoc

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
REGENERATE = "python -m devtools.configdoc --write docs/configuration.md"


def test_every_setting_is_documented() -> None:
    doc = DOC_PATH.read_text()
    missing = [
        configdoc.env_name(name)
        for name in Settings.model_fields
        if f"| `{configdoc.env_name(name)}` |" not in doc
    ]
    assert missing == [], f"undocumented settings {missing}: run {REGENERATE}"


def test_the_document_is_up_to_date() -> None:
    assert DOC_PATH.read_text() == configdoc.render(), f"stale: run {REGENERATE}"


def test_each_row_gives_the_default_and_the_meaning() -> None:
    rendered = configdoc.render()
    for name, field in Settings.model_fields.items():
        row = next(
            line
            for line in rendered.splitlines()
            if line.startswith(f"| `{configdoc.env_name(name)}` |")
        )
        cells = [cell.strip() for cell in row.strip("|").split(" | ")]
        assert cells[1] == configdoc.default_text(field)
        assert cells[3], f"{name} has no meaning"
    assert "| `MOTORCADE_INGEST_WRITERS` | `1` | integer, ≥ 1 and ≤ 32 |" in rendered
    assert "| `MOTORCADE_OIDC_ALGORITHMS` | `RS256,ES256,EdDSA` |" in rendered
    assert "| `MOTORCADE_OIDC_ISSUER` | (unset) |" in rendered


def test_a_new_setting_without_docs_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above is not vacuous: a field the document lacks is reported."""
    from pydantic import Field, create_model

    extended = create_model(
        "ExtendedSettings",
        __base__=Settings,
        brand_new_knob=(int, Field(7, description="A knob nobody documented.")),
    )
    monkeypatch.setattr(configdoc, "Settings", extended)
    rendered = configdoc.render()
    assert "| `MOTORCADE_BRAND_NEW_KNOB` | `7` | integer | A knob nobody documented. |" in rendered
    assert DOC_PATH.read_text() != rendered


def test_check_command(tmp_path: Path) -> None:
    target = tmp_path / "configuration.md"
    assert configdoc.main(["--write", str(target)]) == 0
    assert configdoc.main(["--check", str(target)]) == 0
    target.write_text(target.read_text().replace("MOTORCADE_LOG_LEVEL", "MOTORCADE_LOG_LVL"))
    assert configdoc.main(["--check", str(target)]) == 1
