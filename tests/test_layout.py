"""The package's architecture, kept by tests: no import cycles, dependencies that point one way,
and a light `import peftkit`.

Every `import` statement counts, also those inside functions and under `if TYPE_CHECKING:`:
a lazy import that only dodges a cycle is still a cycle.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("peftkit", "variants")

# Floors, lowest first: a module may import its own floor and those below it, never above.
FLOORS = ["core", "quant", "training", "compare", "cli"]
# What each subsystem alone imports; a plain `import peftkit` pulls in none of it (transformers
# imports YAML). Finding the registered methods imports the built-in variants, which use transformers.
SUBSYSTEM_ONLY = ["bitsandbytes", "accelerate", "matplotlib", "sacrebleu"]
HEAVY = SUBSYSTEM_ONLY + ["yaml", "transformers"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules that `path` imports anywhere in its body."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from . import x` is in `package`, each further dot one level up
                parents = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parents + ([base] if base else []))
            # `from a import b` imports the submodule a.b when there is one, else names from a.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


# The 4-bit settings import no bitsandbytes and only the core; methods name them in their contract
# (`AdapterMethod.base_quantization`), so they stand on the core's floor.
CORE_IN_SUBPACKAGES = {"peftkit.quant.config"}


def _floor(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "variants":
        return "variants"
    if module in CORE_IN_SUBPACKAGES:
        return "core"
    if len(parts) > 1 and parts[1] in ("quant", "training", "compare", "cli", "__main__"):
        return "cli" if parts[1] == "__main__" else parts[1]
    return "core"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path `a -> b -> ... -> a`, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_graph_sees_function_level_imports() -> None:
    graph = _graph()
    # peftkit.cli imports its subcommands inside functions only.
    assert {"peftkit.training.config", "peftkit.compare", "peftkit.loading"} <= graph["peftkit.cli"]
    assert "peftkit.weights" in graph["peftkit.quant.codec"]


def test_no_import_cycle() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_dependencies_point_down_the_floors() -> None:
    upward = []
    for module, imported in _graph().items():
        floor = _floor(module)
        for target in imported:
            if floor == "variants":
                allowed = _floor(target) in ("core", "quant", "variants")
            else:
                allowed = _floor(target) != "variants" and FLOORS.index(_floor(target)) <= FLOORS.index(floor)
            if not allowed:
                upward.append(f"{module} ({floor}) -> {target} ({_floor(target)})")
    assert not upward, "imports against the floors cli -> compare -> training -> quant -> core:\n" + "\n".join(upward)


@pytest.mark.parametrize(
    ("command", "forbidden"),
    [("import peftkit", HEAVY), ("import peftkit; peftkit.available_methods()", SUBSYSTEM_ONLY)],
)
def test_import_peftkit_stays_light(command: str, forbidden: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", command], capture_output=True, text=True, check=True, cwd=ROOT
    )
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
    assert "peftkit" in imported
    assert sorted(imported & set(forbidden)) == []


# What a method may import, as a third-party plugin must: the package's faces and their `__all__`.
AUTHOR_FACES = ("peftkit", "peftkit.authoring", "peftkit.quant")


def _variant_imports() -> list[tuple[str, str, str]]:
    """(variant module, imported module, name) for every `from peftkit... import name` in variants/."""
    found = []
    for path in sorted((ROOT / "variants").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "peftkit":
                found += [(path.stem, node.module, alias.name) for alias in node.names]
            elif isinstance(node, ast.Import):
                found += [(path.stem, alias.name, "") for alias in node.names if alias.name.startswith("peftkit")]
    return found


def test_variants_import_only_public_names_as_a_plugin_would() -> None:
    imports = _variant_imports()
    assert {module for _, module, _ in imports} <= set(AUTHOR_FACES)
    private = [
        f"{variant}: {name} from {module}"
        for variant, module, name in imports
        if name not in importlib.import_module(module).__all__
    ]
    assert not private, "variants/ imports names the faces do not export:\n" + "\n".join(private)
    assert any(module == "peftkit.authoring" for _, module, _ in imports)  # the check reads real imports


def test_public_names_are_sorted() -> None:
    for face in AUTHOR_FACES:
        names = importlib.import_module(face).__all__
        assert names == sorted(names), face
