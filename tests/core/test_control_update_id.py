"""The id of a control Update (core.temporal.control_update_id): the same Idempotency-Key
gives the same Update (Temporal answers a retry with the first outcome, applied once); no key
gives a new Update every time, so a client that reuses an X-Request-ID never has a second
pause answered with the first one's outcome."""

from __future__ import annotations

from typing import Any

from core.temporal import control_update_id


def test_the_same_key_is_the_same_update_scoped_to_caller_action_and_rollout() -> None:
    base: dict[str, Any] = {
        "action": "pause",
        "rollout_id": 7,
        "caller": "alice",
        "idempotency_key": "k1",
    }
    assert control_update_id(**base) == control_update_id(**base)
    change: dict[str, Any]
    for change in (
        {"action": "resume"},
        {"rollout_id": 8},
        {"caller": "bob"},
        {"idempotency_key": "k2"},
    ):
        assert control_update_id(**{**base, **change}) != control_update_id(**base), change
    assert "k1" not in control_update_id(**base)  # hashed: the key is no label


def test_without_a_key_every_request_is_a_new_update() -> None:
    ids = {
        control_update_id(action="pause", rollout_id=7, caller="alice", idempotency_key=None)
        for _ in range(3)
    }
    assert len(ids) == 3
