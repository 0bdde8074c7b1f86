"""The README documents every setting and leads with the two commands."""

from __future__ import annotations

from pathlib import Path

from core.settings import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_in_the_readme() -> None:
    missing = [
        f"MOTORCADE_{name.upper()}"
        for name in Settings.model_fields
        if f"`MOTORCADE_{name.upper()}`" not in README
    ]
    assert missing == []


def test_the_two_commands_come_first() -> None:
    first_block = README.split("## ", 2)[1]
    assert "make dev" in first_block and "make test" in first_block
