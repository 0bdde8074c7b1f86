"""Pure rollout rules: stage planning and strategy validation. No I/O, deterministic.

Called by the activities (planning a rollout), by the API (validating a request, `dryRun`)
and by the workflow (safe inside the sandbox: only the standard library and pydantic models).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

from models.workflows import StagePlan

CANARY = "canary"


def wave_name(number: int) -> str:
    """`wave-1`, `wave-2`, ... (1-based, as in SPEC.md)."""
    return f"wave-{number}"


def _exact(value: float | int) -> Fraction:
    # Through the decimal text, so 33.3 means 333/10 and not its binary approximation.
    return Fraction(Decimal(str(value)))


def _ceil_share(percent: float | int, total: int) -> int:
    return math.ceil(_exact(percent) * total / 100)


def plan_stages(
    targeted: int,
    canary_size: int | None,
    canary_percent: float | None,
    waves: Sequence[float],
    *,
    canary_bake_seconds: int = 0,
    wave_bake_seconds: Sequence[int] | None = None,
) -> list[StagePlan]:
    """Split `targeted` vehicles (ordered by rank) into cumulative, monotonic stages.

    - The canary (when `canary_size` or `canary_percent` is given) holds `canary_size`
      vehicles or `ceil(canary_percent% of targeted)`, at least 1 when targeted > 0, at most
      `targeted`.
    - Wave N ends at `ceil(waves[N]% of targeted)`, never before the previous stage's end
      (the canary counts inside the first waves' share); the last wave ends at `targeted`.
    - Stages may be empty (a small fleet); they keep their index and name so the stage numbers
      always match the strategy. Stage `index` is the position in the returned list.
    """
    if targeted < 0:
        raise ValueError("targeted must be >= 0")
    if not waves:
        raise ValueError("at least one wave is required")
    bakes = list(wave_bake_seconds) if wave_bake_seconds is not None else [0] * len(waves)
    if len(bakes) != len(waves):
        raise ValueError("wave_bake_seconds must have one entry per wave")

    stages: list[StagePlan] = []
    end = 0
    if canary_size is not None or canary_percent is not None:
        if canary_size is not None:
            size = max(0, canary_size)
        else:
            size = _ceil_share(canary_percent or 0, targeted)
        if targeted > 0:
            size = max(1, size)
        end = min(size, targeted)
        stages.append(
            StagePlan(
                index=0,
                name=CANARY,
                start_rank=0,
                end_rank=end,
                bake_seconds=max(0, canary_bake_seconds),
            )
        )
    for number, (percent, bake) in enumerate(zip(waves, bakes, strict=True), start=1):
        start = end
        if number == len(waves):
            end = targeted
        else:
            end = min(targeted, max(start, _ceil_share(percent, targeted)))
        stages.append(
            StagePlan(
                index=len(stages),
                name=wave_name(number),
                start_rank=start,
                end_rank=end,
                bake_seconds=max(0, bake),
            )
        )
    return stages


def plan_from_strategy(targeted: int, strategy: Mapping[str, Any]) -> list[StagePlan]:
    """`plan_stages` for a strategy as stored (camelCase JSON, validated by validate_strategy)."""
    canary = strategy.get("canary") or {}
    waves = strategy.get("waves") or []
    return plan_stages(
        targeted,
        canary.get("size"),
        canary.get("percent"),
        [float(w["percent"]) for w in waves],
        canary_bake_seconds=int(canary.get("bakeSeconds") or 0),
        wave_bake_seconds=[int(w.get("bakeSeconds") or 0) for w in waves],
    )


def stage_ends(stages: Sequence[StagePlan]) -> list[int]:
    """The cumulative end rank of each stage: a vehicle of rank r belongs to the first stage
    whose end is greater than r."""
    return [stage.end_rank for stage in stages]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _percent_problem(value: Any, where: str) -> str | None:
    if not _is_number(value):
        return f"{where}: must be a number"
    try:
        exact = _exact(value)
    except (InvalidOperation, ValueError):
        return f"{where}: must be a number"
    if not 0 < exact <= 100:
        return f"{where}: must be greater than 0 and at most 100"
    return None


def _bake_problem(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not _is_int(value):
        return f"{where}: must be an integer number of seconds"
    if value < 0:
        return f"{where}: must not be negative"
    return None


def validate_strategy(strategy: Any) -> list[str]:
    """Problems with a rollout strategy (camelCase JSON); empty when it is valid.

    Each problem names its field (`waves[1].percent: ...`), ready for an error's `details`.
    """
    problems: list[str] = []
    if not isinstance(strategy, Mapping):
        return ["strategy: must be an object"]

    canary = strategy.get("canary")
    if canary is not None:
        if not isinstance(canary, Mapping):
            problems.append("canary: must be an object")
        else:
            size, percent = canary.get("size"), canary.get("percent")
            if size is not None and percent is not None:
                problems.append("canary: give either size or percent, not both")
            elif size is None and percent is None:
                problems.append("canary: size or percent is required")
            if size is not None and (not _is_int(size) or size < 1):
                problems.append("canary.size: must be a positive integer")
            if percent is not None and (p := _percent_problem(percent, "canary.percent")):
                problems.append(p)
            if p := _bake_problem(canary.get("bakeSeconds"), "canary.bakeSeconds"):
                problems.append(p)

    waves = strategy.get("waves")
    if not isinstance(waves, list) or not waves:
        problems.append("waves: at least one wave is required")
        return problems
    previous: Fraction | None = None
    last_ok = True
    for i, wave in enumerate(waves):
        if not isinstance(wave, Mapping):
            problems.append(f"waves[{i}]: must be an object")
            last_ok = False
            continue
        percent = wave.get("percent")
        if p := _percent_problem(percent, f"waves[{i}].percent"):
            problems.append(p)
            last_ok = False
        else:
            exact = _exact(percent)  # type: ignore[arg-type]  # checked above
            if previous is not None and exact <= previous:
                problems.append(f"waves[{i}].percent: must be greater than the previous wave's")
            previous = exact
            last_ok = True
        if p := _bake_problem(wave.get("bakeSeconds"), f"waves[{i}].bakeSeconds"):
            problems.append(p)
    if last_ok and previous is not None and previous != 100:
        problems.append(f"waves[{len(waves) - 1}].percent: the last wave must be 100")
    return problems
