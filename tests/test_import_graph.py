"""No import circles among the project's modules, counting imports inside function bodies too
(a deferred import hides a circle from Python at start-up, not from the design)."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("trainers", "datasets", "figures")
TOP_LEVEL_MODULES = ("train.py", "rada_plugin.py")


def module_files(root, packages=PACKAGES, top_level=TOP_LEVEL_MODULES):
    """{dotted module name: file} of the packages (a package's __init__.py under the package's name)."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    for name in top_level:
        if (root / name).is_file():
            found[name[:-3]] = root / name
    return found


def imported_modules(name, path, modules):
    """The project modules that module `name` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in modules else base)
    return {target for target in targets if target in modules and target != name}


def import_circles(modules):
    """The strongly connected groups of more than one module in the import graph (Tarjan)."""
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node):
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
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return circles


def test_the_project_has_no_import_circle():
    modules = module_files(REPO)
    assert "trainers.model.backbones" in modules and "trainers.runs.checkpoint" in modules
    assert import_circles(modules) == []


def test_a_circle_through_a_deferred_relative_import_is_found(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from .low import thing\n")
    (package / "sub" / "low.py").write_text("def thing():\n    from ..high import other\n    return other\n")
    (package / "high.py").write_text("from .sub import thing\n\ndef other():\n    return thing\n")
    (package / "alone.py").write_text("import pkg.high\n")
    circles = import_circles(module_files(tmp_path, packages=("pkg",), top_level=()))
    assert circles == [["pkg.high", "pkg.sub", "pkg.sub.low"]]
