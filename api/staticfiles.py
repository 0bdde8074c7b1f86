"""Static files the app serves itself (Swagger UI under /docs/assets, the dashboard under /ui)."""

from __future__ import annotations

from fastapi.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send


class WholeFiles(StaticFiles):
    """Static files served whole: a `Range` header is ignored, so a malformed or unsatisfiable
    one cannot answer Starlette's plain-text 400 or 416 outside the error envelope."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = [(k, v) for k, v in scope["headers"] if k not in (b"range", b"if-range")]
            scope = {**scope, "headers": headers}
        await super().__call__(scope, receive, send)
