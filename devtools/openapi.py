"""docs/openapi.yaml is generated from the app (`make openapi`); a test keeps them identical."""

from __future__ import annotations

from typing import Any, Literal

import yaml

from core.settings import Settings


def openapi_document(role: Literal["api", "ingest"] = "api") -> dict[str, Any]:
    """The document the app of this role serves (docs/openapi.yaml is the API's)."""
    from api.app import create_app

    # The document does not depend on configuration; fixed settings keep it reproducible.
    settings = Settings(
        env="test",
        database_url="postgresql://postgres@127.0.0.1:5432/motorcade",
        _env_file=None,  # type: ignore[call-arg]
    )
    return create_app(settings, role=role).openapi()


def render_openapi_yaml() -> str:
    return yaml.safe_dump(openapi_document(), sort_keys=False, allow_unicode=True, width=100)


# --- docs/asyncapi.yaml: the stream ----------------------------------------------------------

STREAM_PATH = "/api/v1/stream"
STREAM_DESCRIPTION = " ".join(
    """Live updates for the fleet dashboard: `GET /api/v1/stream` is a Server-Sent Events
    stream (`text/event-stream`). Each SSE event's `event` field names the message, its `data`
    is the message's JSON payload, and its `id` (every message but `resync`) is the
    change-feed id: reconnect with `Last-Event-ID` (or `?lastEventId=`) set to the last one
    seen and the stream resumes after it, missing nothing. A browser's EventSource
    authenticates with `?ticket=` (`POST /api/v1/stream/tickets`); other clients send a bearer
    token. `topics` selects `vehicles`, `rollouts` and `audit` (default all three). Comment
    lines (`: subscribed` first, then `: ping` every 15 s) carry no event. Every payload is a
    schema of docs/openapi.yaml, shared with the REST resource it changes: `rollout.updated`
    carries the fields of `Rollout` that move, named as `GET /api/v1/rollouts/{id}` names them.
    docs/api.md ("Live updates") is the guide.""".split()
)


def asyncapi_document() -> dict[str, Any]:
    """The stream as AsyncAPI 3.0, derived from the OpenAPI document's description of
    `GET /api/v1/stream` (one `oneOf` variant per event), so the two never disagree. Each
    message's payload is a `$ref` into docs/openapi.yaml."""
    from api.naming import camel

    openapi = openapi_document()
    described = openapi["paths"][STREAM_PATH]["get"]["responses"]["200"]["content"]
    messages: dict[str, Any] = {}
    for variant in described["text/event-stream"]["schema"]["oneOf"]:
        event = variant["properties"]["event"]["const"]
        payload_ref = variant["properties"]["data"]["contentSchema"]["$ref"]
        name = payload_ref.rsplit("/", 1)[1]
        message: dict[str, Any] = {
            "name": event,
            "title": event,
            "summary": openapi["components"]["schemas"][name].get("description", ""),
            "contentType": "application/json",
            "payload": {"$ref": f"./openapi.yaml{payload_ref}"},
        }
        if "id" in variant["required"]:
            message["headers"] = {
                "type": "object",
                "description": "The SSE fields besides `data`.",
                "properties": {"id": variant["properties"]["id"]},
                "required": ["id"],
            }
        messages[camel(event)] = message
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Motorcade live updates",
            "version": openapi["info"]["version"],
            "description": STREAM_DESCRIPTION,
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {
                "host": "127.0.0.1:8000",
                "protocol": "http",
                "description": "`make dev`",
                "security": [{"$ref": "#/components/securitySchemes/bearer"}],
            }
        },
        "channels": {
            "stream": {
                "address": STREAM_PATH,
                "title": "The change stream",
                "messages": messages,
            }
        },
        "operations": {
            "receiveStream": {
                "action": "receive",
                "channel": {"$ref": "#/channels/stream"},
                "summary": "Read the stream (GET /api/v1/stream, text/event-stream).",
                "messages": [{"$ref": f"#/channels/stream/messages/{key}"} for key in messages],
            }
        },
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "httpApiKey",
                    "name": "Authorization",
                    "in": "header",
                    "description": "`Bearer <JWT>`, or `?ticket=` from a browser's EventSource.",
                }
            }
        },
    }


def render_asyncapi_yaml() -> str:
    return yaml.safe_dump(asyncapi_document(), sort_keys=False, allow_unicode=True, width=100)
