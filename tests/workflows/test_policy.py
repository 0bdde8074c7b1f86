"""Stage planning: pure rules, table-driven (the strategy itself is validated by the API's
models: tests/models/test_strategy.py)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from workflows.policy import plan_from_strategy, plan_stages, stage_ends


def _shape(stages: Any) -> list[tuple[str, int, int]]:
    return [(s.name, s.start_rank, s.end_rank) for s in stages]


@pytest.mark.parametrize(
    ("targeted", "size", "percent", "waves", "expected"),
    [
        # canary by size, two waves
        (100, 5, None, [50, 100], [("canary", 0, 5), ("wave-1", 5, 50), ("wave-2", 50, 100)]),
        # canary by percent, rounded up
        (
            1000,
            None,
            1.5,
            [10, 50, 100],
            [("canary", 0, 15), ("wave-1", 15, 100), ("wave-2", 100, 500), ("wave-3", 500, 1000)],
        ),
        # a tiny canary percent still holds one vehicle
        (10, None, 0.1, [100], [("canary", 0, 1), ("wave-1", 1, 10)]),
        # no canary
        (10, None, None, [30, 100], [("wave-1", 0, 3), ("wave-2", 3, 10)]),
        # canary larger than the first wave's share: that wave is empty, never negative
        (20, 5, None, [10, 100], [("canary", 0, 5), ("wave-1", 5, 5), ("wave-2", 5, 20)]),
        # canary larger than the fleet: clamped
        (3, 10, None, [100], [("canary", 0, 3), ("wave-1", 3, 3)]),
        # nothing targeted: every stage empty, names and indices kept
        (0, 5, None, [50, 100], [("canary", 0, 0), ("wave-1", 0, 0), ("wave-2", 0, 0)]),
        # fractional percents are exact (33.3% of 1000 = 333 exactly, not 334)
        (
            1000,
            None,
            None,
            [33.3, 66.6, 100],
            [("wave-1", 0, 333), ("wave-2", 333, 666), ("wave-3", 666, 1000)],
        ),
        # rounding up inside waves
        (7, 1, None, [50, 100], [("canary", 0, 1), ("wave-1", 1, 4), ("wave-2", 4, 7)]),
        # one vehicle
        (1, None, 5, [50, 100], [("canary", 0, 1), ("wave-1", 1, 1), ("wave-2", 1, 1)]),
    ],
)
def test_plan_stages(
    targeted: int,
    size: int | None,
    percent: float | None,
    waves: list[float],
    expected: list[tuple[str, int, int]],
) -> None:
    stages = plan_stages(targeted, size, percent, waves)
    assert _shape(stages) == expected
    assert [s.index for s in stages] == list(range(len(stages)))
    # Cumulative and monotonic, covering exactly [0, targeted).
    assert stages[0].start_rank == 0
    assert stages[-1].end_rank == targeted
    for before, after in itertools.pairwise(stages):
        assert after.start_rank == before.end_rank <= after.end_rank
    assert sum(s.size for s in stages) == targeted


def test_plan_stages_is_deterministic_and_carries_bakes() -> None:
    args = (12345, None, 2.0, [10.0, 40.0, 100.0])
    kwargs = {"canary_bake_seconds": 3600, "wave_bake_seconds": [60, 120, 0]}
    first = plan_stages(*args, **kwargs)  # type: ignore[arg-type]
    assert first == plan_stages(*args, **kwargs)  # type: ignore[arg-type]
    assert [s.bake_seconds for s in first] == [3600, 60, 120, 0]


def test_plan_from_strategy_reads_the_stored_json() -> None:
    strategy = {
        "canary": {"size": 2, "percent": None, "bakeSeconds": 3600},
        "waves": [{"percent": 50, "bakeSeconds": 600}, {"percent": 100, "bakeSeconds": 0}],
    }
    stages = plan_from_strategy(10, strategy)
    assert _shape(stages) == [("canary", 0, 2), ("wave-1", 2, 5), ("wave-2", 5, 10)]
    assert [s.bake_seconds for s in stages] == [3600, 600, 0]
    assert stage_ends(stages) == [2, 5, 10]


@pytest.mark.parametrize(
    ("targeted", "waves", "error"),
    [(-1, [100], "targeted"), (10, [], "wave")],
)
def test_plan_stages_refuses_nonsense(targeted: int, waves: list[float], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        plan_stages(targeted, None, None, waves)
