"""The README leads with the two commands and links the generated configuration document
instead of repeating it (tests/devtools/test_configuration_doc.py checks that document lists
every setting and is up to date)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_the_readme_links_the_configuration_doc() -> None:
    targets = re.findall(r"\]\(([^)\s]+)\)", README)
    assert "docs/configuration.md" in targets
    assert (ROOT / "docs" / "configuration.md").is_file()


def test_the_readme_does_not_repeat_the_settings_table() -> None:
    assert not re.search(r"^\| `MOTORCADE_[A-Z_]+` \|", README, re.MULTILINE)


def test_the_two_commands_come_first() -> None:
    first_block = README.split("## ", 2)[1]
    assert "make dev" in first_block and "make test" in first_block
