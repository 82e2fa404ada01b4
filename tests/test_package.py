"""The package's rooms keep their rules (issue 31), read from the source with ast, nothing imported:
no module imports another's private names, the module-level imports form no circle, a room's
__init__.py is a docstring only, only the tracking room imports mlflow, and the library never
imports the stage scripts."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted((ROOT / "minibert").rglob("*.py"))


def name_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool = False):
    """(module, imported names) per import statement; `top_level_only`: not those inside functions."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, [a.name for a in node.names]


def test_no_module_imports_another_modules_private_names():
    hits = [f"{p.relative_to(ROOT)}: from {mod} import {n}" for p in MODULES for mod, names in imports(p)
            if mod.startswith("minibert") for n in names if n.startswith("_")]
    assert not hits, hits


def test_module_level_imports_form_no_circle():
    known = {name_of(p) for p in MODULES}
    graph = {}
    for p in MODULES:
        deps = set()
        for mod, names in imports(p, top_level_only=True):
            deps |= {m for m in [mod, *(f"{mod}.{n}" for n in names)] if m in known and m != name_of(p)}
        graph[name_of(p)] = deps
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != "open", " -> ".join([*trail, node, nxt])
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_room_markers_hold_only_a_docstring():
    for init in (ROOT / "minibert").rglob("__init__.py"):
        body = ast.parse(init.read_text()).body
        if init.parent == ROOT / "minibert":
            # the package's own marker may also set a process-wide environment default before torch loads
            # (the OpenMP spin: minibert/__init__.py says why), but re-exports nothing of minibert's
            assert not any(isinstance(n, ast.ImportFrom) or (isinstance(n, ast.Import) and any(
                a.name.startswith("minibert") for a in n.names)) for n in body), init
            continue
        assert all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body), init


def test_only_the_tracking_room_imports_mlflow():
    room = ROOT / "minibert" / "tracking"
    hits = [str(p.relative_to(ROOT)) for p in MODULES if room not in p.parents
            for mod, _ in imports(p) if mod == "mlflow" or mod.startswith("mlflow.")]
    assert not hits, hits


def dynamic_imports(path: Path) -> list[str]:
    """The first arguments of import_module/__import__/run_module calls, as source text."""
    calls = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call) and n.args]
    return [ast.unparse(c.args[0]) for c in calls
            if getattr(c.func, "id", getattr(c.func, "attr", None)) in ("import_module", "__import__", "run_module")]


def test_the_library_never_imports_the_stage_scripts():
    hits = [str(p.relative_to(ROOT)) for p in MODULES
            if any(mod == "stages" or mod.startswith("stages.") for mod, _ in imports(p))
            or any("stages" in arg for arg in dynamic_imports(p))]
    assert not hits, hits
