"""minibert.kernels.build: the build key follows the sources, and without a compiler the model runs
the plain-torch references (one warning) with the very same dropout bits."""
from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from minibert.kernels import build
from minibert.kernels.dropout import dropout

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
