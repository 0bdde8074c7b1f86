"""The safety policy: effective checks and what weakens the fleet default, table by table."""

from __future__ import annotations

import pytest

from services.safety import SafetyDefaults, effective_safety

DEFAULTS = SafetyDefaults(require_stationary=True, min_battery_percent=30)


@pytest.mark.parametrize(
    ("stationary", "battery", "effective", "weakened"),
    [
        (None, None, (True, 30), ()),
        (True, 50, (True, 50), ()),
        (False, None, (False, 30), ("requireStationary",)),
        (None, 29, (True, 29), ("minBatteryPercent",)),
        (False, 0, (False, 0), ("requireStationary", "minBatteryPercent")),
    ],
)
def test_effective_safety(
    stationary: bool | None,
    battery: int | None,
    effective: tuple[bool, int],
    weakened: tuple[str, ...],
) -> None:
    out = effective_safety(
        defaults=DEFAULTS, require_stationary=stationary, min_battery_percent=battery
    )
    assert (out.require_stationary, out.min_battery_percent) == effective
    assert out.weakened == weakened


def test_nothing_is_weaker_than_a_lax_default() -> None:
    lax = SafetyDefaults(require_stationary=False, min_battery_percent=0)
    out = effective_safety(defaults=lax, require_stationary=False, min_battery_percent=0)
    assert out.weakened == ()
