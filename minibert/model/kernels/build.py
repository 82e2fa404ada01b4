"""Build and load minibert's C++ CPU kernels (csrc/*.cpp) as the torch op library `torch.ops.minibert`.

`make install` builds them once (`python -m minibert.model.kernels.build`, ~30 s); a process that finds
no build for its exact sources, torch version, compiler flags and CPU builds it on first use. Builds
live outside the project (DVC never sees them): $MINIBERT_KERNEL_CACHE, else
~/.cache/minibert/kernels/<key>. `-march=native` because the build happens on the machine that runs
it; the CPU's flags are part of the key, so a copied cache on another CPU kind rebuilds.
The build compiles the cache folder's own copy of the sources (src/), not the checkout's files: ninja's
build file names source paths, so building from each checkout's path made every other checkout of the
same sources (DVC's temp copies under `dvc exp run --temp` and `dvc queue`) rebuild the shared cache
on first use (~20 s) and the next one rebuild it back. Another virtual environment (a CI clone's) has
its own key: torch's install folder is part of it.
When no C++ compiler is found, `available()` is False and the callers use their plain-torch
reference (same random bits, slower), after one warning.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "dropout.cpp", CSRC / "addnorm.cpp", CSRC / "softmax_xent.cpp", CSRC / "attention.cpp")
HEADERS = (CSRC / "bits.h",)
# -fno-trapping-math: the kernels never read the FP exception flags, and without it GCC keeps the
# branches of a float compare-and-select (fast_exp's clamps, the dropout keep/drop choice) on CPUs
# without AVX-512's mask registers: on an AVX2-only CPU the softmax passes ran scalar (vroundss, no
# ymm), 3.6x slower. It changes no value: no reassociation, no flush-to-zero.
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-trapping-math", "-std=c++17")
_STALE_LOCK_S = 600  # a build lock older than this was left by a killed build

_state: dict = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return os.uname().machine


def build_key() -> str:
    """Hash of everything the binary depends on: sources, torch (version and install folder: ninja's build
    file names its header paths, so two virtual environments sharing one key would rebuild each other's
    library), flags, the CPU it is built for."""
    h = hashlib.sha256()
    for path in SOURCES + HEADERS:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    torch_dir = Path(torch.__file__).resolve().parent
    h.update(f"{torch.__version__}|{torch_dir}|{sys.version_info[:2]}|{' '.join(CFLAGS)}|{_cpu_flags()}".encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    root = os.environ.get("MINIBERT_KERNEL_CACHE") or Path.home() / ".cache" / "minibert" / "kernels"
    return Path(root) / build_key()


def stable_sources(out: Path) -> list[Path]:
    """The sources and headers copied into `out`/src (once per key: same key, same bytes), as build inputs."""
    src = out / "src"
    src.mkdir(parents=True, exist_ok=True)
    for path in SOURCES + HEADERS:
        dest = src / path.name
        data = path.read_bytes()
        if not dest.is_file() or dest.read_bytes() != data:
            tmp = src / f".{path.name}.{os.getpid()}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, dest)  # atomic: a concurrent build sees the old or the new file, never half
    return [src / p.name for p in SOURCES]


def load(verbose: bool = False) -> bool:
    """Build (if needed) and load the library; True when torch.ops.minibert is usable."""
    if "ok" in _state:
        return _state["ok"]
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        _state["ok"] = False
        _state["why"] = "no C++ compiler (c++) on PATH; install g++ to get the fast CPU kernels"
        return False
    from torch.utils import cpp_extension  # imported here: it pulls in setuptools

    out = cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    lock = out / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
        lock.unlink(missing_ok=True)  # torch's FileBaton would wait for it forever
    try:
        cpp_extension.load(name=f"minibert_kernels_{build_key()}", sources=[str(s) for s in stable_sources(out)],
                           extra_cflags=list(CFLAGS), extra_ldflags=["-fopenmp"], build_directory=str(out),
                           is_python_module=False, verbose=verbose)
        _state["ok"] = True
    except Exception as e:  # noqa: BLE001 - any build failure means: use the reference path
        _state["ok"] = False
        _state["why"] = f"building the CPU kernels failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    return _state["ok"]


def available() -> bool:
    """True when the kernels are loaded; warns once (naming why) when they cannot be."""
    ok = load()
    if not ok and not _state.get("warned"):
        _state["warned"] = True
        warnings.warn(f"minibert: {_state['why']}; using the plain-torch reference kernels (slower, "
                      "same random bits)", RuntimeWarning, stacklevel=3)
    return ok


if __name__ == "__main__":  # `make install`: build now, fail loudly
    t0 = time.perf_counter()
    if not load(verbose="-v" in sys.argv):
        print(f"error: kernels: {_state['why']}", file=sys.stderr)
        sys.exit(1)
    print(f"minibert kernels ready in {cache_dir()} ({time.perf_counter() - t0:.1f} s)")
