"""The import rules of the layout, checked on the source: who may import whom, and no cycles."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("protocol", "sandbox", "agents", "coordinator")
THIRD_PARTY_FOR = {
    # the contracts: pure code, no sockets, no torch
    "protocol": {"msgpack", "blake3", "structlog"},
    "sandbox": set(),
}


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports_of(path: Path, *, top_level_only: bool = False) -> set[str]:
    """Every module a file imports (at any depth, or only at module level)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def ours(name: str, known: dict[str, Path]) -> str | None:
    """The project module an import names, if any (`from protocol import link` names protocol.link)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


# Outside the running coordinator: the launcher, the experiments and the report (a reader of
# finished runs' records).
NOT_SERVICE = ("coordinator.launch", "coordinator.lab", "coordinator.report")


def is_service(module: str) -> bool:
    return module.startswith("coordinator") and not module.startswith(NOT_SERVICE)


def test_agents_never_import_the_coordinator() -> None:
    for module, path in modules().items():
        if module.startswith("agents"):
            bad = {name for name in imports_of(path) if name.split(".")[0] == "coordinator"}
            assert not bad, f"{module} imports {sorted(bad)}"


def test_the_service_never_imports_the_launcher_the_experiments_or_the_report() -> None:
    for module, path in modules().items():
        if is_service(module):
            bad = {n for n in imports_of(path) if n.startswith(NOT_SERVICE)}
            assert not bad, f"{module} imports {sorted(bad)}"


def test_the_report_reads_records_without_torch_or_the_launcher() -> None:
    for module, path in modules().items():
        if module.startswith("coordinator.report"):
            bad = {n for n in imports_of(path) if n.split(".")[0] in ("torch", "transformers")}
            bad |= {n for n in imports_of(path) if n.startswith(("coordinator.launch", "coordinator.lab"))}
            assert not bad, f"{module} imports {sorted(bad)}"


def test_the_service_never_imports_agents() -> None:
    for module, path in modules().items():
        if is_service(module):
            bad = {n for n in imports_of(path) if n.split(".")[0] == "agents"}
            assert not bad, f"{module} imports {sorted(bad)}"


def test_the_launcher_never_imports_the_experiments_but_the_cli_dispatches_to_both() -> None:
    for module, path in modules().items():
        if module.startswith("coordinator.launch") and module != "coordinator.launch.cli":
            bad = {n for n in imports_of(path) if n.startswith("coordinator.lab")}
            assert not bad, f"{module} imports {sorted(bad)}"


@pytest.mark.parametrize("package", sorted(THIRD_PARTY_FOR))
def test_contracts_import_only_the_stdlib_their_lower_layers_and_allowed_libraries(package: str) -> None:
    below = {"protocol": set(), "sandbox": {"protocol"}}[package] | {package}
    for module, path in modules().items():
        if module.split(".")[0] != package:
            continue
        for name in imports_of(path):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top == "__future__":
                continue
            assert top in below | THIRD_PARTY_FOR[package], f"{module} imports {name}"


def test_agents_start_without_torch() -> None:
    for module, path in modules().items():
        if module.startswith("agents"):
            heavy = {n for n in imports_of(path) if n.split(".")[0] in ("torch", "transformers", "safetensors")}
            assert not heavy, f"{module} imports {sorted(heavy)}"


def test_there_are_no_import_cycles() -> None:
    known = modules()
    graph = {
        module: {m for name in imports_of(path, top_level_only=True) if (m := ours(name, known)) and m != module}
        for module, path in known.items()
    }
    # A package's __init__ is imported by its children; that edge is not a cycle of ours.
    for module in graph:
        graph[module] = {m for m in graph[module] if not module.startswith(m + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
