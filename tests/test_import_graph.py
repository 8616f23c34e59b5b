"""The shape of reidscale's imports, read from the source (no Ray, nothing imported).

Issue 14: train/ was a circle (loop → config → clipreid → loop) held together by imports
inside functions. These tests keep it gone: no module-level import cycle runs through
reidscale.train, and a function-level import in train/ is one of a short list, each with
its reason, rather than a way round a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "reidscale"
TRAIN = PACKAGE / "train"

# (file in train/, function) -> {imported module (or its prefix): why it stays inside the function}
LAZY_IMPORTS = {
    ("checkpoint.py", "use_safe_loading"): {
        "torch": "checkpoint.py is also read by the driver (recovery.find_resume_point), which needs no torch",
        "deepspeed": "DeepSpeed is slow to import and probes accelerators: only a worker building an engine pays",
    },
    ("engine.py", "initialize_deepspeed"): {
        "deepspeed": "slow import, workers only (every engine, stage 1's too; the driver and tests use the helpers)",
    },
    ("engine.py", "export_from_engine"): {"deepspeed": "only ZeRO-3 needs it, to gather the partitioned weights"},
    ("loop.py", "_epoch_centres"): {"deepspeed": "only ZeRO-3 needs it, to gather the classifier's rows"},
    ("job.py", "build_trainer"): {
        "ray.train": "the driver's checks and --help run without loading Ray Train; only fitting needs it",
        "reidscale.train.trainer": "it subclasses Ray Train's TorchTrainer at import: only fitting needs it",
    },
    ("job.py", "_loop_entry"): {
        "reidscale.train.loop": "keeps DeepSpeed and the worker's modules out of the driver (Ray pickles _loop_entry)",
    },
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").is_file() or (PACKAGE.parent / rel / "__init__.py").is_file()


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _module_level_imports(tree: ast.AST):
    """Import statements that run when the module is imported (not in a function, not TYPE_CHECKING)."""
    todo = list(ast.iter_child_nodes(tree))
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or _is_type_checking(node):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        todo.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    """reidscale module -> the reidscale modules its module-level imports load."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        targets: set[str] = set()
        for node in _module_level_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
                continue
            base = _absolute(node, name, path.name == "__init__.py")
            targets.add(base)
            targets.update(f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}"))
        # a package's __init__ runs before its submodules: not an edge back to the importer
        graph[name] = {t for t in targets if t.split(".")[0] == "reidscale" and _is_module(t) and t != name
                       and not name.startswith(t + ".")}
    return graph


def _cycles_through(graph: dict[str, set[str]], prefix: str) -> list[list[str]]:
    """One cycle (as a path) per strongly connected component of several modules that touches ``prefix``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph is a few dozen modules, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [c for c in components if any(m == prefix or m.startswith(prefix + ".") for m in c)]


def test_no_module_level_import_cycle_runs_through_train():
    graph = import_graph()
    assert "reidscale.train.loop" in graph and "reidscale.train.config" in graph["reidscale.train.loop"]
    assert _cycles_through(graph, "reidscale.train") == []


def test_the_cycle_check_sees_a_cycle():
    graph = {"reidscale.train.a": {"reidscale.train.b"}, "reidscale.train.b": {"reidscale.train.a"},
             "reidscale.data.c": {"reidscale.data.d"}, "reidscale.data.d": {"reidscale.data.c"}}
    assert _cycles_through(graph, "reidscale.train") == [["reidscale.train.a", "reidscale.train.b"]]


def _function_level_imports(path: Path):
    """(outermost function, imported module) for every import inside a function of ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    for top in ast.walk(tree):
        if not isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(top):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield top.name, alias.name
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, _module_name(path), path.name == "__init__.py")
                for alias in node.names:  # `from reidscale import tracking` is reidscale.tracking
                    yield top.name, f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}") else base


def _allowed(file: str, function: str, module: str) -> bool:
    reasons = LAZY_IMPORTS.get((file, function), {})
    return any(module == prefix or module.startswith(prefix + ".") for prefix in reasons)


def test_train_has_no_function_level_imports_beyond_the_listed_ones():
    found = {(path.name, fn, module) for path in sorted(TRAIN.glob("*.py")) for fn, module in _function_level_imports(path)}
    unlisted = sorted(f"train/{f}:{fn} imports {m}" for f, fn, m in found if not _allowed(f, fn, m))
    assert not unlisted, "move these to the module's top, or list them in LAZY_IMPORTS with the reason:\n" + "\n".join(unlisted)
    # an entry whose import has gone is dropped from the list, so the list stays the truth
    stale = sorted(f"{f}:{fn} {prefix}" for (f, fn), reasons in LAZY_IMPORTS.items() for prefix in reasons
                   if not any(ff == f and ffn == fn and (m == prefix or m.startswith(prefix + "."))
                              for ff, ffn, m in found))
    assert not stale, f"LAZY_IMPORTS lists imports train/ no longer has: {stale}"
