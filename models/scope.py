"""A caller's scope: which regions, models and orgs it may see (None = all of them). What it
lets the caller read and write is decided in `services/scope.py`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scope:
    regions: tuple[str, ...] | None = None
    models: tuple[str, ...] | None = None
    orgs: tuple[str, ...] | None = None

    @property
    def unrestricted(self) -> bool:
        return self.regions is None and self.models is None and self.orgs is None


UNRESTRICTED = Scope()
