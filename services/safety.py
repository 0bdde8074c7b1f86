"""The fleet's default safety policy and the rule that weakening it needs an acknowledgement.

Pure functions: used by rollout creation and direct desired states alike.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SafetyDefaults:
    require_stationary: bool
    min_battery_percent: int


@dataclass(frozen=True)
class EffectiveSafety:
    require_stationary: bool
    min_battery_percent: int
    weakened: tuple[str, ...]


def effective_safety(
    *,
    defaults: SafetyDefaults,
    require_stationary: bool | None,
    min_battery_percent: int | None,
) -> EffectiveSafety:
    """Fill unset checks from the defaults and list each check that is weaker than them."""
    stationary = defaults.require_stationary if require_stationary is None else require_stationary
    battery = defaults.min_battery_percent if min_battery_percent is None else min_battery_percent
    weakened: list[str] = []
    if defaults.require_stationary and not stationary:
        weakened.append("requireStationary")
    if battery < defaults.min_battery_percent:
        weakened.append("minBatteryPercent")
    return EffectiveSafety(stationary, battery, tuple(weakened))
