"""docs/openapi.yaml is generated from the app (`make openapi`); a test keeps them identical."""

from __future__ import annotations

from typing import Any

import yaml

from core.settings import Settings


def openapi_document() -> dict[str, Any]:
    from api.app import create_app

    # The document does not depend on configuration; fixed settings keep it reproducible.
    settings = Settings(
        env="test",
        database_url="postgresql://postgres@127.0.0.1:5432/motorcade",
        _env_file=None,  # type: ignore[call-arg]
    )
    return create_app(settings).openapi()


def render_openapi_yaml() -> str:
    return yaml.safe_dump(openapi_document(), sort_keys=False, allow_unicode=True, width=100)
