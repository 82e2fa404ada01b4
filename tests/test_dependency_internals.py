"""The private parts of MLflow and DVC minibert relies on, named one by one.

pyproject.toml bounds mlflow and dvc below their next major version because of these. Each test checks
that the installed version still has the internal and that it still does what minibert needs, so an
upgrade that moves one fails here, naming it, instead of somewhere deep in a pipeline run.

| internal | used by | for |
|---|---|---|
| `mlflow.tracking._tracking_service.utils._tracking_uri` | tracking/store.py `fluent_uris` | put the fluent API's URI back after one call |
| `mlflow.tracking._model_registry.utils._registry_uri` | tracking/store.py `fluent_uris` | the same for the registry URI |
| `Repo.stage_cache._load_cache`, `._create_stage`, `.cache_dir` | ci/runcache.py | push the objects a run-cache entry names |
| the UI bundle's saved-view keys (`server/js/build/static/js`) | tracking/view.py | the saved view (tests/test_view.py) |
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
INTERNALS = {"_tracking_service", "_model_registry", "_tracking_uri", "_registry_uri", "_load_cache",
             "_create_stage"}


def test_fluent_uri_globals_exist_and_fluent_uris_restores_them(tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import _model_registry, _tracking_service

    from minibert.tracking.store import fluent_uris

    assert hasattr(_tracking_service.utils, "_tracking_uri") and hasattr(_model_registry.utils, "_registry_uri")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    before = mlflow.get_tracking_uri()
    inside = f"sqlite:///{tmp_path}/inside.db"
    with fluent_uris(inside):
        assert mlflow.get_tracking_uri() == inside and mlflow.get_registry_uri() == inside
    assert mlflow.get_tracking_uri() == before  # the private global really is what the getter reads


def test_dvc_stage_cache_internals_exist(tmp_path):
    import subprocess

    from dvc.repo import Repo

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, check=True)
    with Repo(str(tmp_path)) as repo:
        cache = repo.stage_cache
        assert callable(cache._load_cache) and callable(cache._create_stage) and isinstance(cache.cache_dir, str)


def test_the_mlflow_ui_bundle_is_where_the_view_reads_it():
    import mlflow

    bundle = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    assert any(bundle.glob("*.js")), f"no UI bundle under {bundle}"


def test_the_code_uses_exactly_the_named_internals_and_pyproject_bounds_both():
    """The private MLflow/DVC names the code touches are the table's (a new one must be added there, a
    dropped one removed), and both packages are bounded below their next major version."""
    imported = re.compile(r"from (?:mlflow|dvc)[\w.]* import ([^\n]+)")
    touched = re.compile(r"\.(_[a-z]\w*)\b")
    used = set()
    for path in [*(ROOT / "minibert").rglob("*.py"), *(ROOT / "ci").glob("*.py")]:
        text = path.read_text()
        for m in imported.finditer(text):
            used |= {n.strip() for n in m.group(1).split(",") if n.strip().startswith("_")}
        used |= {n for n in touched.findall(text) if n in INTERNALS}
    assert used == INTERNALS, f"add to the table: {sorted(used - INTERNALS)}; remove: {sorted(INTERNALS - used)}"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for name in ("mlflow", "dvc"):
        (spec,) = [d for d in deps if re.match(rf"{name}(?![-\w])", d)]
        assert "<4" in spec, f"pyproject: {spec!r} needs an upper bound (<4): minibert uses its internals"


@pytest.mark.parametrize("name", ["mlflow", "dvc"])
def test_installed_versions_are_inside_the_bounds(name):
    from importlib.metadata import version

    assert int(version(name).split(".")[0]) == 3
