"""bench.numerics (one recipe under other numerics: thread count, precision, another CPU kind's GEMM code,
the kernels off) run as a subprocess in its smoke mode. What it reports must follow from what it ran: a
variant takes the GEMM code it names (read from oneDNN's and MKL's own verbose output), the same variant
repeats to the last digit, another seed differs from the first step, and the table's "first step ≠ base"
is where the per-step losses it wrote part."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = 9


def run_bench(out: Path, variants: str) -> tuple[list[dict], str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")}
    p = subprocess.run([sys.executable, "-m", "bench.numerics", "--smoke", "--recipe", f"budget:{STEPS}",
                        "--variants", variants, "--jobs", "2", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=1200, env={**env, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    return rows, (out / "table.md").read_text()


def table_rows(table: str) -> dict[str, list[str]]:
    """variant -> its cells (the last row wins for a repeated variant)."""
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")]
    return {c[0]: c for c in cells[1:]}


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[list[dict], str]:
    """One run of the bench for the tests below (each child loads torch: seconds apiece)."""
    return run_bench(tmp_path_factory.mktemp("numerics"), "base,base,seed=1,threads=1,isa=AVX512_CORE_BF16,mkl=AVX2")


def test_a_variant_repeats_to_the_last_digit_and_another_seed_parts_at_step_1(bench):
    rows, table = bench
    assert [len(r["mlm"]) for r in rows] == [STEPS] * 6
    assert rows[0]["mlm"] == rows[1]["mlm"] and rows[0]["heldout_mlm_loss"] == rows[1]["heldout_mlm_loss"]
    assert rows[2]["seed"] == 1 and rows[2]["mlm"][0] != rows[0]["mlm"][0]
    assert rows[3]["threads"] == 1
    cells = table_rows(table)
    assert cells["base"][2] == "never"  # the repeat, compared with the first base
    assert cells["seed=1"][2] == "1"
    # the threads=1 row's first differing step, worked out here from the losses the bench wrote
    differ = [i + 1 for i, (a, b) in enumerate(zip(rows[0]["mlm"], rows[3]["mlm"])) if abs(a - b) > 1e-6]
    assert cells["threads=1"][2] == (str(differ[0]) if differ else "never")


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and "avx512_bf16" in cpu_flags()),
                    reason="oneDNN's AVX512-BF16 kernels need a CPU with avx512_bf16 (the project's kinds have it)")
def test_each_variant_takes_the_gemm_code_it_names(bench):
    rows, _ = bench
    base, isa, mkl = rows[0]["gemm"], rows[4]["gemm"], rows[5]["gemm"]
    assert "brg_matmul:avx512_core_bf16" in isa, isa
    assert "MKL AVX2" in mkl and "brg_matmul" in base
    assert rows[4]["env"] == {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}


def test_an_unknown_variant_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "bench.numerics", "--smoke", "--variants", "base,threads=two",
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert p.stderr.strip().count("\n") == 0 and "threads=two" in p.stderr
    assert not (tmp_path / "rows.jsonl").exists()
