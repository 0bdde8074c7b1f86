"""A rollout's strategy as the API validates it (`models.api.Strategy`, the model that
`POST /rollouts` runs): table-driven. Each refused strategy names where its problem is."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from models.api import Strategy

CANARY = {"size": 1}
GOOD_WAVES = [{"percent": 25, "bakeSeconds": 60}, {"percent": 100, "bakeSeconds": 0}]


@pytest.mark.parametrize(
    "strategy",
    [
        {"canary": {"size": 5, "bakeSeconds": 3600}, "waves": GOOD_WAVES},
        {"canary": {"percent": 1.5, "size": None, "bakeSeconds": 0}, "waves": GOOD_WAVES},
        {"canary": CANARY, "waves": [{"percent": 100}]},
        # fractional percents
        {"canary": CANARY, "waves": [{"percent": 33.3}, {"percent": 100.0}]},
    ],
)
def test_a_valid_strategy(strategy: dict[str, Any]) -> None:
    Strategy.model_validate(strategy)


@pytest.mark.parametrize(
    ("strategy", "where", "message"),
    [
        ("nope", (), "valid dictionary"),
        # a rollout always has a canary
        ({"waves": [{"percent": 100}]}, ("canary",), "Field required"),
        ({"canary": None, "waves": [{"percent": 100}]}, ("canary",), "valid dictionary"),
        ({"canary": {"size": 5}}, ("waves",), "Field required"),
        ({"canary": CANARY, "waves": []}, ("waves",), "at least 1 item"),
        (
            {"canary": CANARY, "waves": [{"percent": 50}, {"percent": 50}, {"percent": 100}]},
            ("waves",),
            "cumulative and must increase",
        ),
        (
            {"canary": CANARY, "waves": [{"percent": 60}, {"percent": 40}, {"percent": 100}]},
            ("waves",),
            "cumulative and must increase",
        ),
        (
            {"canary": CANARY, "waves": [{"percent": 50}, {"percent": 90}]},
            ("waves",),
            "the last wave must reach 100 percent",
        ),
        (
            {"canary": CANARY, "waves": [{"percent": 0}, {"percent": 100}]},
            ("waves", 0, "percent"),
            "greater than 0",
        ),
        (
            {"canary": CANARY, "waves": [{"percent": 50}, {"percent": 150}]},
            ("waves", 1, "percent"),
            "less than or equal to 100",
        ),
        (
            {"canary": CANARY, "waves": [{"percent": 100, "bakeSeconds": -1}]},
            ("waves", 0, "bakeSeconds"),
            "greater than or equal to 0",
        ),
        (
            {"canary": {"size": 5, "percent": 10}, "waves": GOOD_WAVES},
            ("canary",),
            "give exactly one of size or percent",
        ),
        (
            {"canary": {"bakeSeconds": 10}, "waves": GOOD_WAVES},
            ("canary",),
            "give exactly one of size or percent",
        ),
        (
            {"canary": {"size": 0}, "waves": GOOD_WAVES},
            ("canary", "size"),
            "greater than or equal to 1",
        ),
        (
            {"canary": {"size": 2.5}, "waves": GOOD_WAVES},
            ("canary", "size"),
            "valid integer",
        ),
        (
            {"canary": {"percent": 101}, "waves": GOOD_WAVES},
            ("canary", "percent"),
            "less than or equal to 100",
        ),
        (
            {"canary": {"size": 1, "bakeSeconds": -5}, "waves": GOOD_WAVES},
            ("canary", "bakeSeconds"),
            "greater than or equal to 0",
        ),
    ],
)
def test_an_invalid_strategy(strategy: Any, where: tuple[Any, ...], message: str) -> None:
    with pytest.raises(ValidationError) as refused:
        Strategy.model_validate(strategy)
    assert [(e["loc"], message in e["msg"]) for e in refused.value.errors()] == [(where, True)]


def test_every_field_with_a_problem_is_reported() -> None:
    with pytest.raises(ValidationError) as refused:
        Strategy.model_validate(
            {"canary": {"size": 1, "percent": 1, "bakeSeconds": -1}, "waves": [{"percent": 120}]}
        )
    assert [e["loc"] for e in refused.value.errors()] == [
        ("canary", "bakeSeconds"),
        ("waves", 0, "percent"),
    ]
