"""The layers hold (import-linter's contracts of pyproject.toml, as `make lint` runs them),
and no module imports itself through others. Each check is also shown to fail on an import
that breaks it, so a contract that cannot fail would be caught here."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import grimp
import pytest
from importlinter import configuration
from importlinter.application.use_cases import read_user_options
from importlinter.contracts.forbidden import ForbiddenContract
from importlinter.contracts.layers import LayersContract

ROOT = Path(__file__).resolve().parent.parent
CONTRACT_TYPES = {"layers": LayersContract, "forbidden": ForbiddenContract}


@pytest.fixture(scope="module")
def options() -> Any:
    configuration.configure()  # what the lint-imports command does first
    return read_user_options(str(ROOT / "pyproject.toml"))


def _graph(options: Any) -> grimp.ImportGraph:
    session = options.session_options
    return grimp.build_graph(
        *session["root_packages"], include_external_packages=session["include_external_packages"]
    )


def _contract(options: Any, name_starts: str) -> Any:
    raw = next(c for c in options.contracts_options if c["name"].startswith(name_starts))
    kind = CONTRACT_TYPES[raw["type"]]
    settings = {k: v for k, v in raw.items() if k not in ("name", "type", "id")}
    return kind(
        name=raw["name"], session_options=options.session_options, contract_options=settings
    )


def test_lint_imports_keeps_every_contract() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    run = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


@pytest.mark.parametrize(
    ("contract", "importer", "imported"),
    [
        ("Layers", "services.audit", "api.deps"),  # a service reaching up into the API
        ("Layers", "models.tables", "services.audit"),  # a data shape with logic behind it
        ("Layers", "workflows.policy", "services.rollouts.queries"),
        ("Layers", "api.routes.rollouts", "activities.rollouts"),  # siblings stay apart
        ("core is runtime plumbing", "core.db", "services.audit"),
        ("Workflows do no I/O", "workflows.rollout", "core.db"),
        ("Services import neither", "services.audit", "temporalio"),
    ],
)
def test_each_contract_breaks_on_an_import_it_forbids(
    options: Any, contract: str, importer: str, imported: str
) -> None:
    graph = _graph(options)
    checked = _contract(options, contract)
    assert checked.check(graph, verbose=False).kept
    graph = _graph(options)  # a check may leave its ignored imports removed from the graph
    graph.add_import(importer=importer, imported=imported)
    assert not checked.check(graph, verbose=False).kept


def cycles(imports: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or through others (strongly
    connected components of more than one module, Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in imports.get(module, ()):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            group = []
            while True:
                top = stack.pop()
                group.append(top)
                if top == module:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(imports):
        if module not in index:
            visit(module)
    return found


def test_no_module_imports_itself_through_others(options: Any) -> None:
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    graph = grimp.build_graph(*options.session_options["root_packages"])
    imports = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    assert cycles(imports) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    imports = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(imports) == [["a", "b", "c"]]


# Python 3.11's asyncio.wait_for can swallow a caller's cancellation (core/aio.py): never here.
WAIT_FOR = re.compile(r"\bwait_for\(")
PROJECT_CODE = (
    "activities api bench core devtools migrations models services tests worker workflows"
)


def uses_of_wait_for(root: Path) -> list[str]:
    """`file:line` of every `wait_for` call in the project's Python code under `root`."""
    found = []
    for folder in PROJECT_CODE.split():
        for path in sorted((root / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                code = line.split("#", 1)[0]
                if WAIT_FOR.search(code):
                    found.append(f"{path.relative_to(root)}:{number}")
    return found


def test_no_asyncio_wait_for() -> None:
    assert uses_of_wait_for(ROOT) == [], "use asyncio.timeout or core.aio.wait_event"


def test_the_wait_for_check_finds_one(tmp_path: Path) -> None:
    (tmp_path / "core").mkdir()
    call = "wait_for"  # not spelled as a call here: this file is checked too
    (tmp_path / "core" / "x.py").write_text(f"async def f(e):\n    await asyncio.{call}(e, 1)\n")
    assert uses_of_wait_for(tmp_path) == ["core/x.py:2"]
