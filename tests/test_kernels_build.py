"""minibert.model.kernels.build: the build key follows the sources, and without a compiler the model runs
the plain-torch references (one warning) with the very same dropout bits."""
from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from minibert.model.kernels import build
from minibert.model.kernels.dropout import dropout

pytestmark = pytest.mark.skipif(not build.load(), reason="C++ kernels unavailable (no compiler)")


def test_build_key_follows_every_source(tmp_path, monkeypatch):
    copies = []
    for src in build.SOURCES + build.HEADERS:
        shutil.copy(src, tmp_path / src.name)
        copies.append(tmp_path / src.name)
    monkeypatch.setattr(build, "SOURCES", tuple(copies[:len(build.SOURCES)]))
    monkeypatch.setattr(build, "HEADERS", tuple(copies[len(build.SOURCES):]))
    keys = {build.build_key()}
    for f in copies:
        f.write_text(f.read_text() + "\n// edited\n")
        keys.add(build.build_key())
    assert len(keys) == len(copies) + 1


def test_build_key_follows_the_torch_install_folder(tmp_path, monkeypatch):
    """Two virtual environments with the same torch version get two keys: ninja's build file names
    torch's header folder, so one shared build would be rebuilt by each in turn."""
    here = build.build_key()
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "other-venv" / "torch" / "__init__.py"))
    assert build.build_key() != here


def test_without_a_compiler_the_references_run_with_the_same_bits(monkeypatch):
    x = torch.randn(13, 99, dtype=torch.bfloat16)
    fast = dropout(x, 0.2, seed=123)
    monkeypatch.setattr(build, "_state", {})
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert not build.available()
        slow = dropout(x, 0.2, seed=123)
        dropout(x, 0.2, seed=124)
    msgs = [str(w.message) for w in seen]
    assert len(msgs) == 1 and "no C++ compiler" in msgs[0] and "reference" in msgs[0], msgs
    assert torch.equal(fast, slow)


@pytest.mark.slow
def test_a_second_checkout_of_the_same_sources_reuses_the_build(tmp_path):
    """DVC's temp copies (`dvc exp run --temp`, `dvc queue`) and CI clones are other paths with the same
    sources: they must load the cached library, not rebuild it (ninja's build file names source paths)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    package = Path(build.__file__).resolve().parents[2]  # minibert/ (build.py is minibert/model/kernels/build.py)
    env = {**os.environ, "MINIBERT_KERNEL_CACHE": str(tmp_path / "cache")}
    probe = ("import minibert, sys; from minibert.model.kernels import build; "
             "assert minibert.__file__.startswith(sys.argv[1]), minibert.__file__; "
             "assert build.load(), build._state; print(build.cache_dir())")

    def load_from(checkout: Path) -> Path:
        shutil.copytree(package, checkout / "minibert", ignore=shutil.ignore_patterns("__pycache__"))
        out = subprocess.run([sys.executable, "-c", probe, str(checkout)], cwd=checkout, env=env, check=True,
                             capture_output=True, text=True, timeout=600).stdout
        return Path(out.strip().splitlines()[-1])

    first = load_from(tmp_path / "a")
    libs = {p: p.stat().st_mtime_ns for p in first.glob("*.so")}
    assert libs, list(first.iterdir())
    second = load_from(tmp_path / "b")
    assert second == first  # same sources, same key
    assert {p: p.stat().st_mtime_ns for p in second.glob("*.so")} == libs  # not rebuilt
