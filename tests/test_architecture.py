"""The package's shape: no import cycles, no private name imported across modules, and the method
interface used through ``fastdit.methods.Method`` only (no duck typing outside ``methods/``)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fastdit"


def _modules() -> dict[str, ast.Module]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = (path, ast.parse(path.read_text()))
    return modules


def _imports(name: str, path: Path, tree: ast.Module, modules) -> list[tuple[str, str]]:
    """(imported module, imported name or '') for every import of a fastdit module in ``tree``,
    at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
            if not target or not target.startswith("fastdit"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub, "") if sub in modules else (target, alias.name))
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.startswith("fastdit.")]
    return found


def test_no_import_cycles():
    modules = _modules()
    packages = {name for name, (path, _) in modules.items() if path.name == "__init__.py"}
    graph = {
        name: {target for target, _ in _imports(name, path, tree, modules)
               if target in modules and target not in packages and target != name}
        for name, (path, tree) in modules.items()
    }
    cycles = []

    def visit(node, stack, done):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in done:
            return
        for target in sorted(graph[node]):
            visit(target, stack + [node], done)
        done.add(node)

    done: set[str] = set()
    for name in sorted(graph):
        visit(name, [], done)
    assert not cycles, f"import cycles (module-level or in functions): {cycles}"


def test_no_private_name_imported_across_modules():
    modules = _modules()
    private = [
        f"{name} imports {target}.{imported}"
        for name, (path, tree) in modules.items()
        for target, imported in _imports(name, path, tree, modules)
        if imported.startswith("_") and not imported.startswith("__") and target != name
    ]
    assert not private, private


def test_method_interface_is_not_duck_typed_outside_methods():
    offending = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "methods" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
                continue
            first = ast.unparse(node.args[0]) if node.args else ""
            if node.func.id in ("getattr", "hasattr") and first.split(".")[-1] == "method":
                offending.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
            if node.func.id == "isinstance" and len(node.args) == 2 and "Dense" in ast.unparse(node.args[1]):
                offending.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert not offending, offending


def test_the_library_does_not_import_the_command_line_or_the_test_pipelines():
    """``fastdit.cli`` (the ``fastdit`` command and its tools) and ``fastdit.testing`` (the embedded
    tiny pipelines) sit on top of the library: nothing else but ``__main__`` imports them, so
    ``import fastdit`` never loads them."""
    modules = _modules()
    above = (["fastdit", "cli"], ["fastdit", "testing"])
    offending = [
        f"{name} imports {target}"
        for name, (path, tree) in modules.items()
        if name.split(".")[:2] not in above and name != "fastdit.__main__"
        for target, _ in _imports(name, path, tree, modules)
        if target.split(".")[:2] in above
    ]
    assert not offending, offending


def test_benchmarks_share_the_harness_and_import_nothing_through_sys_path():
    """Benchmark scripts import each other as the package ``benchmarks`` (``python -m
    benchmarks.<script>``), never by putting a folder on ``sys.path``."""
    folder = PACKAGE.parent / "benchmarks"
    scripts = {path.stem for path in folder.glob("*.py")}
    offending = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("sys.path.insert", "sys.path.append"):
                offending.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
            if isinstance(node, ast.ImportFrom) and not node.level and node.module in scripts:
                offending.append(f"{path.name}:{node.lineno}: from {node.module} import ...")
            if isinstance(node, ast.Import):
                offending += [f"{path.name}:{node.lineno}: import {alias.name}"
                              for alias in node.names if alias.name in scripts]
    assert not offending, offending
