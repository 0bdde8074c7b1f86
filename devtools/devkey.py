"""The dev key file, `<state dir>/dev-key`: the HS256 key of dev tokens (core/auth.py), which
`make dev` creates once (mode 0600) and `motorcade token` and `motorcade simulate` read when
MOTORCADE_DEV_KEY is not set."""

from __future__ import annotations

import os
from pathlib import Path

from core.auth import generate_dev_key
from core.settings import Settings


def dev_key_file(state_dir: Path) -> Path:
    return state_dir / "dev-key"


def load_or_create_dev_key(state_dir: Path) -> str:
    """The key in `state_dir`, written there first (readable by its owner only) if missing."""
    path = dev_key_file(state_dir)
    if path.exists():
        return path.read_text().strip()
    state_dir.mkdir(parents=True, exist_ok=True)
    key = generate_dev_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return key


def configured_dev_key(settings: Settings, state_dir: Path) -> str | None:
    """MOTORCADE_DEV_KEY when it is set, else the key `make dev` wrote in `state_dir`, else
    None."""
    if settings.dev_key is not None:
        return settings.dev_key.get_secret_value()
    if dev_key_file(state_dir).exists():
        return dev_key_file(state_dir).read_text().strip()
    return None
