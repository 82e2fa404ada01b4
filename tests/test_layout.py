"""minibert/layout.py is the one home of the stage paths: the stage scripts' defaults come from it (no
path literals anywhere else) and every path dvc.yaml gives a stage is one of that stage's defaults."""
import ast
from pathlib import Path

import pytest
import yaml

from minibert import layout

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PATHS = {v for v in vars(layout).values() if isinstance(v, Path)}
NOT_IN_DVC = {layout.PARAMS: "DVC reads it through each stage's `params:` keys",
              layout.CHECKPOINTS: "resumable state, deliberately outside DVC's outputs (DVC deletes outputs)"}


def option_defaults(script: Path) -> dict[str, Path]:
    """Each typer option of the script's `main` and the layout constant it defaults to (ast; nothing imported)."""
    main = next(n for n in ast.parse(script.read_text()).body if isinstance(n, ast.FunctionDef) and n.name == "main")
    out = {}
    for arg, default in zip(main.args.args[-len(main.args.defaults):], main.args.defaults):
        first = default.args[0]
        assert (isinstance(first, ast.Attribute) and isinstance(first.value, ast.Name)
                and first.value.id == "layout"), f"{script.name}: --{arg.arg} default is not a layout constant"
        out[arg.arg] = getattr(layout, first.attr)
    return out


def stage_paths(stage: dict) -> set[Path]:
    """The data paths dvc.yaml names for a stage: deps other than code (Python, and the C++ sources
    under minibert/ that test_dag.py checks), outs, metrics, plots."""
    found = set()
    for key in ("deps", "outs", "metrics", "plots"):
        for entry in stage.get(key, []):
            path = entry if isinstance(entry, str) else next(iter(entry))
            if not (path.endswith(".py") or path.startswith("minibert/")):
                found.add(Path(path))
    return found


def covers(default: Path, path: Path) -> bool:
    """`path` is the default, lies in the default folder, or is written beside it (probe_table.csv)."""
    return path == default or default in path.parents or (path.parent == default.parent and path.stem == default.stem)


@pytest.mark.parametrize("name", sorted(DVC["stages"]))
def test_dvc_paths_are_the_stage_defaults(name):
    defaults = option_defaults(ROOT / f"stages/{name}.py")
    named = stage_paths(DVC["stages"][name])
    for path in named:
        assert any(covers(d, path) for d in defaults.values()), f"dvc.yaml {name}: {path} is no default of the script"
    for arg, d in defaults.items():
        assert d in NOT_IN_DVC or any(covers(d, p) for p in named), f"stage {name}: --{arg} {d} is not in dvc.yaml"


# Literals that equal a layout path but are no path: (file, value) -> why.
NOT_PATHS = {("bench/export.py", "models"): "the `mlflow models serve` subcommand",
             ("minibert/tracking/serving.py", "models"): "the `mlflow models serve` subcommand",
             ("bench/queue.py", "metrics"): "a key of `dvc exp show --json`, beside `params`"}


def test_no_stage_path_literals_outside_layout():
    values = {str(p) for p in PATHS}
    files = [f for d in ("minibert", "stages", "bench") for f in sorted((ROOT / d).rglob("*.py"))]
    hits = [f"{f.relative_to(ROOT)}:{n.lineno} {n.value!r}" for f in files if f.name != "layout.py"
            for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.Constant) and n.value in values
            and (f.relative_to(ROOT).as_posix(), n.value) not in NOT_PATHS]
    assert not hits, hits


def test_pretrain_paths_default_to_the_layout():
    from minibert.training.pretrain import Paths

    assert {Paths().pairs, Paths().vocab, Paths().metrics, Paths().checkpoints} <= PATHS


def test_dvc_plots_read_the_layout_curve():
    assert layout.TRAIN_CURVE_CSV.as_posix() in {f for p in DVC["plots"] if isinstance(p, dict)
                                                 for spec in p.values() for f in spec.get("y", {})}
