"""The data flow holds in the imports: a module imports only from its own layer or the layers below it, and no
two modules import each other (directly or through others). Function-level imports count too.

Layers, lowest first (docs/architecture.md): core, models, data, augment (with the top-level `stages/`), curate,
attacks, train, evaluation, study, commands.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["core", "models", "data", "augment", "curate", "attacks", "train", "evaluation", "study", "commands"]


def layer_of(module: str) -> int:
    parts = module.split(".")
    if parts[0] == "stages":
        return LAYERS.index("augment")
    if len(parts) == 1 or parts[1] in ("__main__",):
        return len(LAYERS)  # the package itself and `python -m pipeline`: above every layer
    return LAYERS.index(parts[1])


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in ("pipeline", "stages"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules a file imports (for `from a.b import c`, the module a.b.c when it is one, else a.b)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def test_every_package_is_a_known_layer():
    for module in project_modules():
        layer_of(module)  # raises ValueError for a package that is not in LAYERS


def test_no_module_imports_a_higher_layer():
    graph = import_graph()
    back_edges = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))
    assert back_edges == [], "imports against the data flow:\n" + "\n".join(back_edges)


def test_no_import_cycles():
    graph = import_graph()
    # Tarjan's strongly connected components: any component with more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert cycles == [], f"modules that import each other: {cycles}"


def test_the_check_sees_a_back_edge(tmp_path, monkeypatch):
    """The checker itself: a core module importing a command module is reported."""
    fake = tmp_path / "pipeline" / "core"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    from pipeline.commands.cli import main\n")
    modules = {"pipeline.core.bad": fake / "bad.py", "pipeline.commands.cli": ROOT / "pipeline/commands/cli.py"}
    targets = imports_of(fake / "bad.py", modules)
    assert targets == {"pipeline.commands.cli"}
    assert layer_of("pipeline.commands.cli") > layer_of("pipeline.core.bad")
