"""dvc.yaml tells the truth: each stage's code deps are exactly the minibert modules its script imports.

Computed from the source (ast, nothing imported), transitively within `minibert/`, so a new import
that dvc.yaml does not list, or a listed module the stage no longer uses, fails here instead of
leaving a stage silently stale or rerunning it for nothing.
"""
import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())

# Plumbing that cannot change a stage's numbers or output bytes: left out of the deps on purpose, so
# editing it does not rerun the pipeline. Each entry says why it is safe.
PLUMBING = {
    "minibert/__init__.py": "empty package marker",
    "minibert/config.py": "parses params.yaml; the values a stage reads are its `params:` keys, tracked by DVC",
    "minibert/errors.py": "exception classes and the one-line error printer",
    "minibert/artifacts.py": "temp file then rename, sha256: writes the callers' bytes unchanged",
    "minibert/progress.py": "progress bars on stderr",
    "minibert/training/heap.py": "glibc malloc settings: speed and memory, never values",
    "minibert/layout.py": "default paths; dvc.yaml spells them out itself (test_layout.py), so a move shows there",
    "minibert/tracking/view.py": "the MLflow UI's saved view (experiment tags) and its URL: nothing a stage writes to disk",
}


# The C++ sources minibert/model/kernels/build.py compiles (and the header they share): code a stage runs
# without importing it, found by listing the folder so a new kernel file cannot be forgotten.
NATIVE_SOURCES = {p.relative_to(ROOT).as_posix() for p in (ROOT / "minibert/model/kernels/csrc").iterdir()
                  if p.suffix in (".cpp", ".h")}


def imported_modules(path: Path) -> set[str]:
    """minibert modules `path` imports (at any depth of its code, lazy imports included), as file paths."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]  # `from minibert import x`
        for name in names:
            if name == "minibert" or name.startswith("minibert."):
                file = ROOT / (name.replace(".", "/") + ".py")
                if file.is_file():
                    found.add(file.relative_to(ROOT).as_posix())
    return found


def transitive(script: str) -> set[str]:
    seen, todo = set(), [script]
    while todo:
        for mod in imported_modules(ROOT / todo.pop()):
            if mod not in seen:
                seen.add(mod)
                todo.append(mod)
    return seen


def test_imports_are_found_in_every_form(tmp_path, monkeypatch):
    src = tmp_path / "s.py"
    src.write_text("import minibert.model.bert as mm\nfrom minibert.training import checkpoint\nfrom minibert import plots\n"
                   "from minibert.data.vocab import Vocab\ndef f():\n    from minibert.model.ops import dropout\n")
    assert imported_modules(src) == {"minibert/model/bert.py", "minibert/training/checkpoint.py", "minibert/plots.py",
                                     "minibert/data/vocab.py", "minibert/model/ops.py"}


@pytest.mark.parametrize("name", sorted(DVC["stages"]))
def test_stage_code_deps_are_exactly_its_imports(name):
    stage = DVC["stages"][name]
    script = f"stages/{name}.py"
    assert stage["cmd"].startswith(f"python -m stages.{name} "), stage["cmd"]
    code = {d for d in stage["deps"] if isinstance(d, str) and (d.endswith(".py") or d.startswith("minibert/"))}
    want = {script} | (transitive(script) - set(PLUMBING))
    if "minibert/model/kernels/build.py" in want:  # it compiles every C++ source the kernels are built from
        want |= NATIVE_SOURCES
    assert code == want, (f"dvc.yaml stage {name}: add {sorted(want - code)}, "
                          f"remove {sorted(code - want)}")


def test_plumbing_entries_exist():
    assert all((ROOT / f).is_file() for f in PLUMBING)
