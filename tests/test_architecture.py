"""The package's layout is its architecture: imports only go down, no circles, no private names across
modules, one home per idea, small modules, and a test file for every module.

Built from the source with ``ast`` (nothing is imported), so a violation is reported before it can bite at
import time. The layers and their order are ``docs/architecture.md``'s.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ace_diffusers"
TESTS = ROOT / "tests"

# Each layer may import itself and the layers with a smaller number. The stack runs 0-6; the packages beside
# it (7-9) use the stack and never the other way round; the command line (10) may use everything.
LAYERS: dict[str, int] = {
    "ace_diffusers.errors": 0,
    "ace_diffusers._io": 0,
    "ace_diffusers.format": 0,
    "ace_diffusers.version": 0,
    "ace_diffusers._deprecated": 0,
    "ace_diffusers.stats": 0,
    "ace_diffusers.hub": 1,
    "ace_diffusers.core": 2,
    "ace_diffusers.integration": 3,
    "ace_diffusers.fitting": 4,
    "ace_diffusers.deploy": 5,
    "ace_diffusers.pipeline": 6,
    "ace_diffusers": 6,  # the package's __init__: the public face
    "ace_diffusers.shapes": 7,
    "ace_diffusers.testing": 7,
    "ace_diffusers.testing_transformers": 7,  # beside testing, and built on it
    "ace_diffusers.eval": 8,
    "ace_diffusers.bench": 9,
    "ace_diffusers.cli": 10,
    "ace_diffusers.__main__": 10,
}

# Old module paths kept for one release; each only forwards to its new home (tests/test_deprecated.py).
SHIMS = {
    "ace_diffusers.adapter",
    "ace_diffusers.processor",
    "ace_diffusers.attach",
    "ace_diffusers.compat",
    "ace_diffusers.text",
    "ace_diffusers.presets",
    "ace_diffusers.embedding_cache",
    "ace_diffusers.closed_form",
    "ace_diffusers.trainer",
    "ace_diffusers.fuse",
    "ace_diffusers.export",
    "ace_diffusers.cli_erase",
    "ace_diffusers.demo",
    "ace_diffusers.docs_figures",
    "ace_diffusers.bench.baselines",
}

MAX_MODULE_LINES = 420  # "about 400"
LEGACY_LONG_MODULES: set[str] = set()
MAX_FUNCTION_LINES = 60  # code lines, the docstring not counted
# Longer functions that are one straight computation (splitting them would scatter one formula).
STRAIGHT_COMPUTATIONS = {
    "ace_diffusers.fitting.clip_packing.encode_with_shared_prefixes",  # prefix pass, then packed tail passes
    "ace_diffusers.fitting.solvers.solve_text_map",  # one closed-form solve and its statistics
    "ace_diffusers.fitting.solvers.low_rank_edits",  # one shared sketch, then per-shape SVDs
    "ace_diffusers.fitting.solvers.minimize_lbfgs",  # the two-loop recursion with its line search
    "ace_diffusers.fitting.solvers.fit_gate",  # logistic regression, then its sharpening
}


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    lines: list[str]
    imports: list[tuple[str, int, bool]] = field(default_factory=list)  # (module, line, inside a function)
    private_imports: list[tuple[str, str, int]] = field(default_factory=list)  # (module, name, line)

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.name.split(".")
    base = base if module.is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _inside_function(tree: ast.Module) -> set[int]:
    """ids of the import nodes that sit inside a function body."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for child in ast.walk(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    inside.add(id(child))
    return inside


def load_modules() -> dict[str, Module]:
    names = set()
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        names.add(name)
        text = path.read_text(encoding="utf-8")
        modules[name] = Module(name, path, ast.parse(text), text.splitlines())
    for module in modules.values():
        nested = _inside_function(module.tree)
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    module.imports.append((alias.name, node.lineno, id(node) in nested))
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, node)
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    imported = sub if sub in names else target
                    module.imports.append((imported, node.lineno, id(node) in nested))
                    if imported == target and alias.name.startswith("_") and not alias.name.startswith("__"):
                        module.private_imports.append((target, alias.name, node.lineno))
    return modules


MODULES = load_modules()


def layer_of(name: str) -> int | None:
    best = None
    for prefix, rank in LAYERS.items():
        if name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, rank)
    return best[1] if best else None


def internal(name: str) -> bool:
    return name == "ace_diffusers" or name.startswith("ace_diffusers.")


def graph() -> dict[str, set[str]]:
    """Module-level import graph between the package's modules (shims left out)."""
    edges: dict[str, set[str]] = {}
    for name, module in MODULES.items():
        if name in SHIMS:
            continue
        edges[name] = {target for target, _, _ in module.imports if internal(target) and target in MODULES}
    return edges


def test_every_module_has_a_layer():
    missing = [name for name in MODULES if name not in SHIMS and layer_of(name) is None]
    assert not missing, (
        f"modules outside every layer (add them to LAYERS and docs/architecture.md): {missing}"
    )


def test_no_import_circles():
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert not circles, f"import circles: {circles}"


def test_imports_only_go_down():
    upward = []
    for name, module in MODULES.items():
        if name in SHIMS:
            continue
        mine = layer_of(name)
        for target, line, _ in module.imports:
            if not internal(target) or target in SHIMS and name not in SHIMS:
                if target in SHIMS:
                    upward.append(f"{name}:{line} imports the deprecated path {target}")
                continue
            theirs = layer_of(target)
            if theirs is not None and mine is not None and theirs > mine:
                upward.append(f"{name}:{line} (layer {mine}) imports {target} (layer {theirs})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_stack_never_imports_the_miniature_world():
    """No fitter, miner, preset or default may read the miniature world's vocabulary."""
    offenders = [
        f"{name}:{line} imports {target}"
        for name, module in MODULES.items()
        if layer_of(name) is not None and layer_of(name) <= LAYERS["ace_diffusers.pipeline"]
        for target, line, _ in module.imports
        if target == "ace_diffusers.shapes" or target.startswith("ace_diffusers.shapes.")
    ]
    assert not offenders, offenders


def test_no_private_names_cross_modules():
    defined: dict[str, set[str]] = {}
    for name, module in MODULES.items():
        names = set()
        for node in ast.walk(module.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
        defined[name] = {n for n in names if n.startswith("_") and not n.startswith("__")}
    everywhere = {n: {m for m, ns in defined.items() if n in ns} for ns in defined.values() for n in ns}
    crossing = [
        f"{name}:{line} imports {target}.{alias}"
        for name, module in MODULES.items()
        for target, alias, line in module.private_imports
    ]
    for name, module in MODULES.items():
        for node in ast.walk(module.tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                homes = everywhere.get(node.attr, set())
                if homes and name not in homes:
                    crossing.append(f"{name}:{node.lineno} uses {node.attr} of {sorted(homes)}")
    assert not crossing, "private names used across modules:\n" + "\n".join(crossing)


def _has_reason(module: Module, line: int) -> bool:
    here = module.lines[line - 1]
    before = module.lines[line - 2].strip() if line >= 2 else ""
    return "#" in here or before.startswith("#")


def test_imports_inside_functions_are_optional_dependencies_with_a_reason():
    bad = []
    for name, module in MODULES.items():
        for target, line, nested in module.imports:
            if not nested:
                continue
            if internal(target):
                bad.append(f"{name}:{line} imports {target} inside a function (import it at the top)")
            elif not _has_reason(module, line):
                bad.append(f"{name}:{line} imports {target} inside a function without a one-line reason")
    assert not bad, "\n".join(bad)


def test_no_module_mains_outside_the_command_line():
    offenders = [
        name
        for name, module in MODULES.items()
        if layer_of(name) != LAYERS["ace_diffusers.cli"]
        and '__name__ == "__main__"' in "\n".join(module.lines)
    ]
    assert not offenders, (
        f"`if __name__ == '__main__'` outside ace_diffusers/cli and __main__.py: {offenders}"
    )


def _docstring_lines(node: ast.AST) -> int:
    """Docstrings carry the math and the contract; they do not count against a function's length."""
    first = node.body[0] if node.body else None
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        return first.end_lineno - first.lineno + 1
    return 0


def test_modules_and_functions_stay_small():
    too_long = []
    for name, module in MODULES.items():
        if name in LEGACY_LONG_MODULES:
            continue
        if len(module.lines) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(module.lines)} lines (limit ~400)")
        for node in ast.walk(module.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1 - _docstring_lines(node)
                qualified = f"{name}.{node.name}"
                if length > MAX_FUNCTION_LINES and qualified not in STRAIGHT_COMPUTATIONS:
                    too_long.append(f"{qualified}: {length} lines (limit {MAX_FUNCTION_LINES})")
    assert not too_long, "\n".join(too_long)


def test_every_module_has_its_test_file():
    missing = []
    for name, module in MODULES.items():
        if name in SHIMS or module.is_package or module.path.name == "__main__.py":
            continue
        parts = name.split(".")[1:]
        expected = TESTS.joinpath(*parts[:-1], f"test_{parts[-1].lstrip('_')}.py")
        if not expected.is_file():
            missing.append(f"{name} -> {expected.relative_to(ROOT)}")
    assert not missing, "modules without a test file:\n" + "\n".join(missing)


# One home per idea: each of these was once written in several places.
ONE_HOME = {
    "the gate formula": (
        r"torch\.sigmoid\([^)]*@[^)]*gate|sigmoid\(context @",
        {"ace_diffusers/core/factors.py"},
    ),
    "the low-rank product (c Aᵀ) Bᵀ": (
        r"@ [a-z_.\[\]\"]*down[a-z_\[\]\"]*\.T\) @",
        {"ace_diffusers/core/factors.py"},
    ),
    "an atomic rename": (r"os\.replace\(|os\.rename\(", {"ace_diffusers/_io.py"}),
    "a template filled by str.replace": (r"\.replace\(\"\{\}\"", set()),
}


@pytest.mark.parametrize("idea", sorted(ONE_HOME))
def test_one_home_per_idea(idea):
    pattern, homes = ONE_HOME[idea]
    found = sorted(
        {
            str(path.relative_to(ROOT))
            for path in PACKAGE.rglob("*.py")
            if re.search(pattern, path.read_text(encoding="utf-8"))
        }
    )
    assert set(found) <= homes, f"{idea} is written outside {sorted(homes) or 'any module'}: {found}"
