"""A caller's scope: which regions, models and orgs it may see (None = all of them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Scope:
    regions: tuple[str, ...] | None = None
    models: tuple[str, ...] | None = None
    orgs: tuple[str, ...] | None = None

    @property
    def unrestricted(self) -> bool:
        return self.regions is None and self.models is None and self.orgs is None

    def allows(self, *, region: str | None, model: str | None, org: str | None) -> bool:
        return (
            (self.regions is None or region in self.regions)
            and (self.models is None or model in self.models)
            and (self.orgs is None or org in self.orgs)
        )

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) for k, v in vars(self).items() if v is not None}


UNRESTRICTED = Scope()
