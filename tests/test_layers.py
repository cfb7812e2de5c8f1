"""The runtime's three wings import one way: serve → core → backends → manifest; export never imports serve.

Read from the source (every `import` statement, at any depth, including those inside functions), so a
lazy import that crosses the wrong way fails here as surely as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

# The bottom layer: the manifest, and the errors every layer raises.
BASE = {"llmpack.runtime.manifest", "llmpack.runtime.errors", "llmpack.runtime"}


def module_name(path: Path) -> str:
    top, *rest = path.relative_to(REPO).with_suffix("").parts
    name = ".".join(["llmpack", top, *rest])
    return name.removesuffix(".__init__")


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from llmpack.runtime.serve import protocol` imports the submodule: name it.
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
            found.add(node.module)
    return {name for name in found if name.startswith("llmpack.")}


def wing(module: str) -> str:
    """Which layer a module belongs to: base, backends, core, serve, export or cli."""
    if module in BASE or module.startswith("llmpack.runtime.manifest"):
        return "base"
    for prefix, name in (("llmpack.runtime.backends", "backends"), ("llmpack.runtime.serve", "serve"),
                         ("llmpack.export", "export"), ("llmpack.cli", "cli")):
        if module == prefix or module.startswith(prefix + "."):
            return name
    if module.startswith("llmpack.runtime."):
        # `from llmpack.runtime.x import Name`: Name is a class or function of core module x
        return "core"
    return "other"


# What each layer may import (besides itself).
ALLOWED = {
    "base": {"base"},
    "backends": {"base"},
    "core": {"base", "backends"},
    "serve": {"base", "backends", "core"},
    "export": {"base", "backends", "core"},
    "cli": {"base", "backends", "core", "serve", "export"},
}


def crossings_of(path: Path, here: str) -> list[str]:
    """The imports in `path` (module `here`) that go against ALLOWED."""
    layer = wing(here)
    wrong = []
    for target in sorted(imported_modules(path)):
        other = wing(_owner(target))
        if other != layer and other not in ALLOWED[layer]:
            wrong.append(f"{here} ({layer}) imports {target} ({other})")
    return wrong


def crossings() -> list[str]:
    return [line for folder in ("runtime", "export", "cli") for path in sorted((REPO / folder).rglob("*.py"))
            for line in crossings_of(path, module_name(path))]


def _owner(target: str) -> str:
    """`llmpack.runtime.engine.Engine` → the module `llmpack.runtime.engine` (a file that exists)."""
    parts = target.split(".")
    for end in range(len(parts), 1, -1):
        candidate = ".".join(parts[:end])
        relative = Path(*({"runtime": ["runtime"], "export": ["export"], "cli": ["cli"]}[parts[1]]), *parts[2:end])
        if (REPO / relative).with_suffix(".py").is_file() or (REPO / relative / "__init__.py").is_file():
            return candidate
    return target


def test_imports_run_one_way_between_the_wings():
    assert crossings() == []


@pytest.mark.parametrize("module,expected", [
    ("llmpack.runtime.manifest", "base"), ("llmpack.runtime.backends.ort_fused", "backends"),
    ("llmpack.runtime.engine", "core"), ("llmpack.runtime.serve.server", "serve"),
    ("llmpack.export.build", "export"),
])
def test_each_wing_is_recognised(module, expected):
    assert wing(module) == expected


def test_a_wrong_way_import_is_caught(tmp_path):
    """The check can fail: a backend that imports the engine core, or core that imports serve, is reported."""
    probe = tmp_path / "probe.py"
    probe.write_text("from llmpack.runtime.generate import TokenStream\n"
                     "def later():\n    from llmpack.runtime.serve import protocol\n", encoding="utf-8")
    assert crossings_of(probe, "llmpack.runtime.backends.probe") == [
        "llmpack.runtime.backends.probe (backends) imports llmpack.runtime.generate (core)",
        "llmpack.runtime.backends.probe (backends) imports llmpack.runtime.generate.TokenStream (core)",
        "llmpack.runtime.backends.probe (backends) imports llmpack.runtime.serve (serve)",
        "llmpack.runtime.backends.probe (backends) imports llmpack.runtime.serve.protocol (serve)"]
    assert crossings_of(probe, "llmpack.runtime.engine") == [
        "llmpack.runtime.engine (core) imports llmpack.runtime.serve (serve)",
        "llmpack.runtime.engine (core) imports llmpack.runtime.serve.protocol (serve)"]
