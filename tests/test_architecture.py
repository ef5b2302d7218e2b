"""The import direction of the house (docs/architecture.md): ``common`` at the bottom, entry points on top.

Walks every Python module of the repository with ``ast`` (late imports inside functions count
too) and fails on:

- an import cycle between top-level packages (``sidecar`` -> ``otel`` -> ``sidecar``, or longer),
- ``common`` importing any project package (it is the bottom),
- anything outside ``kernelgate/``, ``tests/``, ``bench/``, ``scripts/`` importing ``kernelgate``
  (the entry points: nothing runs back up to them).

The checks are plain functions over {module: source}, so their failures are tested too.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from tests.procs import ROOT

# Runtime packages of the project (what pyproject installs).
PROJECT_PACKAGES = frozenset({"common", "kernelgate", "sidecar", "inference", "otel"})
# Trees that may import the entry-point package.
MAY_IMPORT_KERNELGATE = frozenset({"kernelgate", "tests", "bench", "scripts"})
SKIP_DIRS = frozenset({".git", ".venv", "venv", "build", "dist", "node_modules", "__pycache__", ".gpu"})


def repo_modules(root: Path = ROOT) -> dict[str, str]:
    """{dotted module name: source} of every .py file under ``root``."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS or part.startswith(".") for part in rel.parts[:-1]):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts:
            modules[".".join(parts)] = path.read_text(encoding="utf-8")
    return modules


def imported_modules(module: str, source: str, is_package: bool = False) -> set[str]:
    """Absolute names of every module ``module`` imports (relative imports resolved)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.add(prefix)
            # ``from pkg import module`` imports pkg.module when it is one
            names.update(f"{prefix}.{alias.name}" for alias in node.names)
    return {n for n in names if n}


def package_edges(modules: Mapping[str, str], packages: Iterable[str] = PROJECT_PACKAGES,
                  packages_of_files: Mapping[str, bool] | None = None) -> dict[tuple[str, str], list[str]]:
    """{(importing top-level package, imported top-level package): [module -> imported, ...]}."""
    packages = frozenset(packages)
    edges: dict[tuple[str, str], list[str]] = {}
    for module, source in modules.items():
        is_package = bool(packages_of_files and packages_of_files.get(module))
        top = module.split(".")[0]
        for name in sorted(imported_modules(module, source, is_package)):
            target = name.split(".")[0]
            if target in packages and target != top:
                edges.setdefault((top, target), []).append(f"{module} -> {name}")
    return edges


def package_cycles(edges: Mapping[tuple[str, str], list[str]]) -> list[list[str]]:
    """Each group of packages that import each other in a circle (strongly connected components of size > 1)."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
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
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def violations(modules: Mapping[str, str], packages_of_files: Mapping[str, bool] | None = None) -> list[str]:
    """Every breach of the import direction, as lines a person can act on; empty when the house is sound."""
    everything = PROJECT_PACKAGES | {m.split(".")[0] for m in modules}
    edges = package_edges(modules, everything, packages_of_files)
    found = []
    for cycle in package_cycles({e: w for e, w in edges.items() if set(e) <= PROJECT_PACKAGES}):
        where = [w for (a, b), ws in edges.items() if a in cycle and b in cycle for w in ws[:2]]
        found.append(f"import cycle among packages {', '.join(cycle)}: {'; '.join(where)}")
    for (a, b), where in sorted(edges.items()):
        if a == "common" and b in PROJECT_PACKAGES:
            found.append(f"common imports project package {b} (common is the bottom): {'; '.join(where)}")
        if b == "kernelgate" and a not in MAY_IMPORT_KERNELGATE:
            found.append(f"{a} imports the entry-point package kernelgate: {'; '.join(where)}")
    return found


# --- the checks themselves fail when they should ---------------------------------------------------


def test_a_cycle_between_packages_is_found():
    modules = {"sidecar.a": "from otel.b import x\n", "otel.b": "def f():\n    import sidecar.a\n",
               "inference.c": "import common.d\n", "common.d": ""}
    found = violations(modules)
    assert len(found) == 1 and found[0].startswith("import cycle among packages otel, sidecar: ")
    assert "sidecar.a -> otel.b" in found[0] and "otel.b -> sidecar.a" in found[0]


def test_a_longer_cycle_is_found_once():
    modules = {"sidecar.a": "import otel.b\n", "otel.b": "import inference.c\n",
               "inference.c": "from sidecar import a\n"}
    assert [v.split(":")[0] for v in violations(modules)] == [
        "import cycle among packages inference, otel, sidecar"]


def test_common_importing_a_project_package_is_found():
    found = violations({"common.util": "from sidecar.config import SidecarConfig\n", "sidecar.config": ""})
    assert found == ["common imports project package sidecar (common is the bottom): "
                     "common.util -> sidecar.config; common.util -> sidecar.config.SidecarConfig"]


def test_importing_kernelgate_from_below_is_found_even_late_and_relative():
    modules = {"inference.server": "def main():\n    from kernelgate.config import load\n",
               "otel.setup": "from kernelgate import __version__\n",
               "kernelgate.cli": "from . import config\n", "kernelgate.config": "import common.settings\n",
               "tests.test_x": "import kernelgate.cli\n", "bench.b": "from kernelgate import cli\n"}
    found = violations(modules, {"kernelgate": True})
    assert [v.split(":")[0] for v in found] == ["inference imports the entry-point package kernelgate",
                                                "otel imports the entry-point package kernelgate"]


def test_relative_imports_resolve_to_their_package():
    assert imported_modules("sidecar.ratelimit.memory", "from .base import Budget\nfrom .. import config\n") == {
        "sidecar.ratelimit.base", "sidecar.ratelimit.base.Budget", "sidecar", "sidecar.config"}
    assert imported_modules("sidecar.ratelimit", "from .base import Budget\n", is_package=True) == {
        "sidecar.ratelimit.base", "sidecar.ratelimit.base.Budget"}


# --- the repository --------------------------------------------------------------------------------


def test_the_repository_keeps_the_import_direction():
    modules = repo_modules()
    assert {"common.settings", "kernelgate.cli", "sidecar.server", "inference.server", "otel.setup"} <= set(modules)
    packages_of_files = {m: (ROOT / m.replace(".", "/") / "__init__.py").exists() for m in modules}
    assert violations(modules, packages_of_files) == []


def layers_of_the_picture(text: str) -> set[tuple[str, str]]:
    """The ``a --> b`` edges of the first mermaid block of docs/architecture.md."""
    block = text.split("```mermaid", 1)[1].split("```", 1)[0]
    return {(m[1], m[2]) for m in re.finditer(r"^\s*(\w+) --> (\w+)\s*$", block, re.MULTILINE)}


def test_the_runtime_packages_form_the_layers_of_the_picture():
    """The edges between packages are the arrows of docs/architecture.md's picture (the picture is the rule).

    The sidecar and the inference server are peers that talk over HTTP headers, never through
    imports; what both need (a name, a default) goes in ``common`` (or ``otel`` for tracing).
    A new edge is a design change: draw it in the picture first.
    """
    allowed = layers_of_the_picture((ROOT / "docs" / "architecture.md").read_text(encoding="utf-8"))
    assert ("kernelgate", "common") in allowed and not any(a == "common" for a, _ in allowed)
    modules = {m: s for m, s in repo_modules().items() if m.split(".")[0] in PROJECT_PACKAGES}
    edges = package_edges(modules)
    assert not set(edges) - allowed, [w for e in sorted(set(edges) - allowed) for w in edges[e]]


def test_the_sidecar_and_the_config_loader_start_without_torch():
    """The authz container has no torch: loading the whole config (inference section included) must not import it."""
    script = ("import sys, kernelgate.config, kernelgate.cli, sidecar.server; "
              "kernelgate.config.load(None); print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_inference_server_and_the_config_loader_start_without_the_sidecars_dependencies():
    """The GPU image carries no Envoy protos, httptools, redis, hiredis, pyjwt or wasmtime: the inference server's
    start (the one config loader, the CLI, the server module) must not import them. It once did, through
    the Envoy config writer importing the HTTP ext_authz transport, and every GPU server failed to start."""
    sidecar_only = ["envoy", "httptools", "redis", "hiredis", "jwt", "wasmtime", "opa_wasm", "xds", "validate", "udpa"]
    script = ("import sys, kernelgate.config, kernelgate.cli, inference.server; kernelgate.config.load(None); "
              f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sidecar_only!r}))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
