"""The layers import only downwards (docs/architecture.md), checked on the source itself.

domain  <  adapters/qemu  <  the other driven adapters  <  projections  <  service  <  workers
< the CLI. An import of a higher layer — at module level, inside a function or under
TYPE_CHECKING — fails this test, and so does any cycle between modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("domain", "adapters", "projections", "service", "workers")

# Longest prefix wins.
LAYERS: dict[str, int] = {
    "domain": 0,
    "adapters.qemu": 1,
    "adapters": 2,
    "projections": 3,
    "service": 4,
    "workers": 5,
    "adapters.cli": 6,
}


def layer(module: str) -> tuple[int, str]:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best], best


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _walk(tree: ast.AST, typing_too: bool) -> list[ast.AST]:
    out: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        if not typing_too and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        out.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return out


def imports(path: Path, module: str, typing_too: bool = True) -> set[str]:
    """Project modules `module` imports (every import statement anywhere in the file; with
    `typing_too=False` not those only type checkers see)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in _walk(tree, typing_too):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] in PACKAGES}


def graph(typing_too: bool = True) -> dict[str, set[str]]:
    mods = modules()
    return {m: {i for i in imports(p, m, typing_too) if i in mods and i != m} for m, p in mods.items()}


def test_no_module_imports_a_higher_layer() -> None:
    upward = []
    for module, deps in graph().items():
        mine = layer(module)
        for dep in deps:
            theirs = layer(dep)
            if theirs[0] > mine[0]:
                upward.append(f"{module} ({mine[1]}) imports {dep} ({theirs[1]})")
    assert upward == [], "imports that go up:\n" + "\n".join(sorted(upward))


def test_no_import_cycles() -> None:
    """No two modules need each other to load (annotations for type checkers aside)."""
    g = graph(typing_too=False)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in g:
        if v not in index:
            visit(v)
    assert cycles == [], f"import cycles: {cycles}"


def test_only_adapters_speak_qmp() -> None:
    speakers = []
    for module, path in modules().items():
        if layer(module)[1] == "adapters.qemu":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "qemu.qmp" or n.startswith("qemu.qmp.") for n in names):
                speakers.append(module)
            if isinstance(node, ast.Attribute) and node.attr == "qmp":
                speakers.append(f"{module}:{node.lineno}")
    assert speakers == []


def test_the_domain_imports_nothing_of_the_outside() -> None:
    outside = [(m, d) for m, deps in graph().items() if layer(m)[1] == "domain"
               for d in deps if layer(d)[1] != "domain"]
    assert outside == []
