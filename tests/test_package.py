"""The package's shape: the public names at its root, the parts' layering, no import cycles."""

import ast
import functools
import importlib
from pathlib import Path

import pytest

import nai_fast

PACKAGE = Path(nai_fast.__file__).parent

# Each part may import the parts before it in this order, never the ones after it. Two leaves sit
# below every part: files.py (atomic writes, standard library only) and safe_load.py (every weight
# file is read through it; text/ reads embeddings, below models/).
LAYERS = ["files", "safe_load", "kernels", "data", "text", "models", "hypernetworks", "engine", "demo", "cli", "info"]
SAME_LAYER = {"cli": {"info"}}  # `nai-fast info` prints what info.py gathers
# Shipped JSON and its one-function reader: any part may read the SD 1.x configs (kernels/shapes
# derives attention shapes from the U-Net's).
READ_BY_ALL = {"nai_fast.models.configs"}


@functools.cache
def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported_modules(name: str, path: Path) -> set[str]:
    """Every nai_fast module ``name`` imports, at the top or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        imported |= {target for target in targets if target in modules()}
    return imported - {name}


def part(module: str) -> str | None:
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else None


def test_every_root_export_resolves_to_its_owner():
    for name, owner in nai_fast._EXPORTS.items():
        assert getattr(nai_fast, name) is getattr(importlib.import_module(owner), name), name
    assert set(nai_fast.__all__) == {"__version__", *nai_fast._EXPORTS}
    with pytest.raises(AttributeError):
        nai_fast.no_such_name


def test_parts_import_only_lower_parts():
    found = modules()
    assert {part(module) for module in found if part(module)} == set(LAYERS), "a part is missing from LAYERS"
    wrong = []
    for module, path in found.items():
        here = part(module)
        if here is None:
            continue  # the root exports by name, lazily
        for target in imported_modules(module, path):
            there = part(target)
            allowed = there is None or there == here or LAYERS.index(there) < LAYERS.index(here) or target in READ_BY_ALL
            if not allowed and there not in SAME_LAYER.get(here, ()):
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    found = modules()
    graph = {module: imported_modules(module, path) for module, path in found.items()}
    # A package's __init__ is imported with each of its modules: not an edge back to them.
    graph = {module: {t for t in targets if not module.startswith(t + ".")} for module, targets in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target) :] + [target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)
