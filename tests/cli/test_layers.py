"""The layers of DESIGN.md hold, read from the source's import statements (inside functions
too): ``arch`` is pure, the core reaches backends only through their registry, and nothing
below the commands imports a command."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "vmmarch_cli"


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str | None = None) -> Iterator[str]:
    """Every module ``path`` (module ``module``) imports, absolute; ``from X import Y`` yields
    X and X.Y."""
    module = module or _module(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _sources(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (PACKAGE / f).rglob("*.py"))


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("path", _sources("arch"), ids=lambda p: p.name)
def test_arch_imports_only_arch_and_the_neutral_interface(path: Path) -> None:
    allowed = ("vmmarch_cli.arch", "vmmarch_cli.vcpu", "vmmarch_cli.errors")
    ours = [i for i in _imports(path) if _within(i, "vmmarch_cli") and i != "vmmarch_cli"]
    assert [i for i in ours if not any(_within(i, a) for a in allowed)] == []


def test_the_core_reaches_backends_only_through_the_registry() -> None:
    core = [p for p in PACKAGE.rglob("*.py")
            if not _within(_module(p), "vmmarch_cli.backends")]
    reached = {(_module(p), i) for p in core for i in _imports(p)
               if _within(i, "vmmarch_cli.backends") and i != "vmmarch_cli.backends"}
    # `vmmarch_cli.backends` alone (the registry: resolve, open_backend, probe) is the door;
    # `engine` manages the emulate backend's CPU engine, which is that backend's own feature.
    assert {m for m, _ in reached} <= {"vmmarch_cli.commands.engine"}, reached


@pytest.mark.parametrize("layer", ["arch", "backends", "devices", "loader"])
def test_no_layer_below_the_commands_imports_the_cli(layer: str) -> None:
    for path in _sources(layer):
        bad = [i for i in _imports(path)
               if any(_within(i, top) for top in ("vmmarch_cli.commands", "vmmarch_cli.cli",
                                                  "vmmarch_cli.machine", "click"))]
        assert bad == [], (path, bad)


def test_the_layer_check_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    # A lazy import is how a backend would slip in (the backends import unicorn that way).
    (tmp_path / "m.py").write_text("def f():\n    from vmmarch_cli.backends import kvm\n"
                                   "from ..memory import MmapGuestMemory\n")
    found = set(_imports(tmp_path / "m.py", "vmmarch_cli.arch.m"))
    assert {"vmmarch_cli.backends.kvm", "vmmarch_cli.memory.MmapGuestMemory"} <= found
