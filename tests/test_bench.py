"""bench/train.py and bench/quality.py: the FLOP count against torch's counter, the data loader, and
smoke runs of both scripts on real WikiText-2 (a few steps; no assertion on speed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import load_splits
from bench.train import cpu_kind, forward_flops, matmul_peak, runnable_precisions
from minibert.artifacts import save_arrays
from minibert.config import ModelConfig, PairsConfig, TrainConfig
from minibert.data.batches import batch_indices, gather_batch, to_tensors
from minibert.data.pairs import make_pairs
from minibert.data.vocab import build_vocab, encode_paragraphs
from minibert.model.bert import build_model
from minibert.training.loop import make_optimizer, train_step
from tests.test_loop import cpu_flags

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def tiny_pairs(n: int = 13, T: int = 13, P: int = 3, V: int = 37, seed: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    valid = rng.integers(5, T - 1, n)  # shorter than T: gather_batch() trims, the attention term sees the trimmed T
    return {"token_ids": rng.integers(5, V, (n, T)),
            "segments": (np.arange(T)[None] >= valid[:, None] // 2).astype(int),
            "valid_lens": valid, "pred_positions": np.sort(rng.integers(1, 5, (n, P)), 1),
            "mlm_weights": (rng.random((n, P)) < 0.7).astype(np.float32),
            "mlm_labels": rng.integers(5, V, (n, P)), "nsp_labels": rng.integers(0, 2, n)}


def test_forward_flops_match_torch_flop_counter_over_a_train_step(monkeypatch):
    import minibert.model.bert
    import minibert.model.loss

    # No row padding: at this size rounding 9 MLM slots up to 128 would swamp the count (at the
    # book's size it is < 1 % of a step).
    monkeypatch.setattr(minibert.model.loss, "GRAIN", 1)
    monkeypatch.setattr(minibert.model.bert, "SLOT_BUCKET", 1)
    cfg, V = ModelConfig(num_layers=2, hidden=14, heads=2, ffn_hidden=13, max_len=13), 37
    batch = gather_batch(to_tensors(tiny_pairs(V=V), CPU), np.arange(13))
    model = build_model(cfg, V, seed=0).train()
    opt = make_optimizer(model.parameters(), TrainConfig())
    with FlopCounterMode(display=False) as counter:
        train_step(model, opt, None, batch, 1.0, 1.0, None, CPU)
    counted, analytic = counter.get_total_flops(), 3 * forward_flops(batch, cfg, V)
    # the analytic count is what the model must do; an implementation may recompute a little, never skip
    assert analytic <= counted <= analytic * 1.05, (analytic, counted)


def test_load_splits_prefers_the_pipeline_files(tmp_path):
    paragraphs = [[["the", "cat", "sat"], ["a", "dog", "ran", "far"], ["the", "end"]]] * 7
    vocab = build_vocab(paragraphs, 1)
    pairs = make_pairs(encode_paragraphs(paragraphs, vocab), PairsConfig(max_len=13), len(vocab),
                       np.random.default_rng(99))
    save_arrays(tmp_path / "pairs" / "train.safetensors", pairs)
    vocab.save(tmp_path / "tokens" / "vocab.txt")
    splits, vocab_size, source = load_splits(("train",), str(tmp_path / "no-raw-data"), tmp_path / "pairs")
    assert vocab_size == len(vocab) and source == str(tmp_path / "pairs")
    for k, v in pairs.items():
        np.testing.assert_array_equal(splits["train"][k], v)


def test_matmul_peak_is_the_best_figure_and_reports_its_spread():
    pk = matmul_peak(torch.float32, sizes=(13, 37), rounds=3, repeats=2)
    assert pk["gflops"] == max(pk["by_size"].values()) == pk["by_size"][pk["size"]]
    assert 0 < pk["min_gflops"] <= pk["median_gflops"] <= pk["gflops"]
    assert pk["rounds"] == 3 and pk["dtype"] == "float32"


def test_matmul_peak_figures_stay_positive_and_ordered_on_a_slow_machine(monkeypatch):
    """A loaded machine, made deterministic: a clock on which every matmul takes 1 ms (13x13: 4394
    flops -> 0.0044 GFLOP/s) or, for the 37x37 size, 3 ms. Hand-worked: 2 * 37**3 / 3e-3 / 1e9 =
    0.0338 GFLOP/s is the best size; every reported figure is > 0 and keeps its order."""
    import bench.train as bt

    ticks = iter(range(10**6))
    sizes_timed = []

    class Clock:  # perf_counter advances by the matmul's fake duration between its two readings
        now = 0.0

        @classmethod
        def perf_counter(cls):
            k = next(ticks)
            if k % 2 == 1:  # the reading after a matmul
                cls.now += 1e-3 if sizes_timed[-1] == 13 else 3e-3
            return cls.now

    real_matmul = torch.matmul

    def matmul(a, b):
        sizes_timed.append(a.shape[0])
        return real_matmul(a, b)

    monkeypatch.setattr(bt, "time", Clock)
    monkeypatch.setattr(bt.torch, "matmul", matmul)
    pk = matmul_peak(torch.float32, sizes=(13, 37), rounds=3, repeats=2)
    assert pk["size"] == 37 and pk["by_size"] == {13: 0.00439, 37: 0.0338}
    assert 0 < pk["min_gflops"] == pk["median_gflops"] == pk["gflops"] == 0.0338


def run_bench(module: str, *args: str) -> list[dict]:
    src = os.environ.get("MINIBERT_DATA")
    if not src:
        pytest.skip("MINIBERT_DATA unset: set it to wikitext-2-v1.zip or its folder to run real-data benches")
    out = subprocess.run([sys.executable, "-m", module, "--data", src, "--pairs", "/nonexistent/pairs", *args],
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def assert_positive(row: dict, keys: tuple[str, ...]) -> None:
    for k in keys:
        assert isinstance(row[k], (int, float)) and row[k] > 0, (k, row)


@pytest.mark.slow
@pytest.mark.parametrize("vendor,family,model,want", [
    # family/model numbers as AMD and Intel publish them (EPYC 9004 "Genoa" = 25/17, 9005 "Turin" = 26/2)
    ("AuthenticAMD", 25, 17, "AMD Zen 4"), ("AuthenticAMD", 25, 1, "AMD Zen 3"), ("AuthenticAMD", 26, 2, "AMD Zen 5"),
    ("GenuineIntel", 6, 143, "Intel Sapphire Rapids"), ("GenuineIntel", 6, 207, "Intel Emerald Rapids"),
    ("GenuineIntel", 6, 999, "Intel"),
])
def test_cpu_kind_names_the_microarchitecture_from_family_and_model(vendor, family, model, want):
    cpuinfo = (f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\n"
               "model name\t: AMD EPYC\n\nprocessor\t: 1\nvendor_id\t: x\ncpu family\t: 1\nmodel\t\t: 1\n")
    assert cpu_kind(cpuinfo) == f"{want} (family {family} model {model})"  # the first CPU's fields


@pytest.mark.parametrize("family,model,flags,want", [
    (25, 17, "fpu avx avx2 fma", "AMD Zen 4 (family 25 model 17, AVX-512 hidden)"),  # a masking hypervisor
    (25, 17, "fpu avx2 avx512f avx512_bf16", "AMD Zen 4 (family 25 model 17)"),
    (25, 1, "fpu avx avx2 fma", "AMD Zen 3 (family 25 model 1)"),  # Zen 3 never had AVX-512: nothing hidden
])
def test_cpu_kind_says_when_a_hypervisor_hides_the_chips_avx512(family, model, flags, want):
    cpuinfo = (f"processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\nmodel\t\t: {model}\n"
               f"flags\t\t: {flags}\n")
    assert cpu_kind(cpuinfo) == want


def test_train_bench_reports_every_figure_per_precision():
    rows = run_bench("bench.train", "--steps", "1", "--warmup", "1", "--precision", "fp32,bf16",
                     "--micro-batches", "2,auto,1")
    assert rows[0]["machine"]["cores"] >= 1 and rows[0]["machine"]["torch"] == torch.__version__
    assert "family" in rows[0]["machine"]["cpu_kind"]
    cpuinfo = Path("/proc/cpuinfo").read_text().split()
    assert ("avx512_bf16" in rows[0]["machine"]["flags"]) == ("avx512_bf16" in cpuinfo)
    peaks = {r["precision"]: r["gflops"] for r in rows if r.get("bench") == "matmul_peak"}
    runs = [r for r in rows if r.get("impl") == "minibert"]
    native_bf16 = bool({"avx512_bf16", "amx_bf16"} & set(cpuinfo))  # else bf16 is emulated: skipped, said why
    # auto is 4 for fp32 and 1 for bf16 (loop.resolve_micro_batches): bf16's auto and 1 are one run, the default
    want_runs = [("fp32", 2, False), ("fp32", 4, True), ("fp32", 1, False)] + (
        [("bf16", 2, False), ("bf16", 1, True)] if native_bf16 else [])
    assert [(r["precision"], r["micro_batches"], r["default"]) for r in runs] == want_runs
    assert [r["precision"] for r in rows if r.get("bench") == "skipped"] == ([] if native_bf16 else ["bf16"])
    assert all(r["matmul_peak_gflops"] == peaks[r["precision"]] for r in runs)  # one peak per run and precision
    for r in runs:
        assert_positive(r, ("pairs_per_s", "tokens_per_s", "ms_forward", "ms_backward", "ms_optimizer", "ms_step",
                            "peak_rss_mb", "gflop_per_step", "achieved_gflops", "matmul_peak_gflops", "mfu"))
        assert r["tokens_per_s"] > r["pairs_per_s"]  # several real tokens per pair
        # resident now (statm) minus resident after warm-up: both at most the kernel's own peak (ru_maxrss)
        assert -r["peak_rss_mb"] < r["rss_growth_mb"] < r["peak_rss_mb"]
        assert 1 <= r["distinct_widths"] <= r["micro_batches"] * r["steps"]
        assert r["rss_drift_mb"] is None  # 2 steps: step 20 never came
        # the GEMMs captured from a real step do at least the analytic FLOPs (real tokens and slots only) and
        # not much more (filler rows to 1024-row and 128-slot grains): two independent counts of one step
        assert r["gemm_step_gflop"] <= r["gemm_gflop"] <= 1.25 * r["gemm_step_gflop"]
        assert r["gemm_ms"] > 0 and r["gemm_bound_mfu"] > 0 and r["gemm_shapes"]
        assert r["ms_step"] >= r["ms_forward"] + r["ms_backward"] + r["ms_optimizer"] - 0.2  # rounding
        # the ceiling is the same FLOPs at the peak: above the achieved rate, and exactly pairs/s at MFU 1
        batch_gflop_per_pair = r["gflop_per_step"] / r["batch_size"]
        want = r["matmul_peak_gflops"] / batch_gflop_per_pair
        assert r["pairs_per_s"] < r["ceiling_pairs_per_s"] == pytest.approx(want, rel=0.02)


@pytest.mark.slow
def test_quality_bench_evaluates_each_step_count_on_one_run():
    rows = run_bench("bench.quality", "--steps", "2,1", "--seeds", "3", "--precision", "fp32",
                     "--micro-batches", "auto,1")
    evals = [r for r in rows if r["bench"] == "quality"]
    # fp32's auto is 4 passes (loop.resolve_micro_batches), then the 1-pass run
    assert [(r["seed"], r["micro_batches"], r["steps"]) for r in evals] == [(3, 4, 1), (3, 4, 2), (3, 1, 1), (3, 1, 2)]
    assert evals[0]["mlm_loss"] != evals[1]["mlm_loss"]  # the model moved between the two evaluations
    assert evals[1]["mlm_loss"] != evals[3]["mlm_loss"]  # passes draw their own dropout: two runs, not one
    cells = [r for r in rows if r["bench"] == "quality_summary"]
    assert [(c["precision"], c["micro_batches"], c["steps"]) for c in cells] == [("fp32", 1, 1), ("fp32", 4, 1),
                                                                                  ("fp32", 1, 2), ("fp32", 4, 2)]
    for c in cells:
        assert_positive(c, ("mlm_loss_mean", "nsp_accuracy_mean"))
        assert 0.0 <= c["mlm_accuracy_mean"] <= 1.0  # may well be 0 after one step
        assert c["mlm_loss_std"] == 0.0  # one seed


def test_scaling_corpus_is_k_shuffled_copies_not_verbatim_repeats(tmp_path):
    from collections import Counter

    from bench.scaling import build_corpus

    src = tmp_path / "src"
    src.mkdir()
    lines = [f" line {i} . of text . \n" for i in range(37)] + [" \n"] * 5
    (src / "wiki.train.tokens").write_text("".join(lines))
    for split in ("valid", "test"):
        (src / f"wiki.{split}.tokens").write_text(f" {split} . x . \n")
    build_corpus(src, tmp_path / "raw", 3)
    out = (tmp_path / "raw/wiki.train.tokens").read_text().splitlines(keepends=True)
    assert Counter(out) == Counter(lines * 3)  # every line exactly k times
    copies = [out[i * len(lines):(i + 1) * len(lines)] for i in range(3)]
    assert all(Counter(c) == Counter(lines) for c in copies) and len({tuple(c) for c in copies} | {tuple(lines)}) == 4
    assert (tmp_path / "raw/wiki.valid.tokens").read_text() == " valid . x . \n"


def test_bench_runs_bf16_only_where_the_cpu_has_bf16_instructions():
    """Zen 3 (AVX2 only) emulates bf16 matmuls ~80x slower than fp32: the bench skips bf16 there."""
    assert runnable_precisions(["bf16", "fp32"], False) == (["fp32"], ["bf16"])
    assert runnable_precisions(["fp32", "bf16"], True) == (["fp32", "bf16"], [])
    assert runnable_precisions(["bf16"], False) == ([], ["bf16"])


def test_kernels_bench_decoder_variants_compute_the_same_gradients():
    """The lever bench compares like with like: the ones-column decoder and the K = 128 one give the
    same dL/dh, dL/dW and dL/db (to bf16 rounding), checked against a float64 plain-torch decoder."""
    from bench.kernels import H, V, decoder
    g = torch.Generator().manual_seed(5)
    M = 13
    h = torch.nn.functional.layer_norm(torch.randn(M, H, generator=g), (H,))
    weight, bias = torch.randn(V, H, generator=g) * 0.05, torch.randn(V, generator=g) * 2  # a bias that matters
    labels = torch.randint(0, V, (M,), generator=g)
    p = torch.softmax(h.double() @ weight.double().t() + bias.double(), -1)
    p[torch.arange(M), labels] -= 1  # d(sum of losses)/d logits
    want = (p @ weight.double(), p.t() @ h.double(), p.sum(0))
    for ones_column in (True, False):
        for got, ref in zip(decoder(h, weight, bias, labels, ones_column), want):
            assert (got.double() - ref).abs().max() <= 1e-2 * ref.abs().max()  # bf16 GEMMs: ~3 digits


def test_kernels_bench_runs_every_lever():
    out = subprocess.run([sys.executable, "-m", "bench.kernels", "--rounds", "1", "--micro-batches", "16"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(rows) == 5 and all(r["new_ms"] > 0 and r["before_ms"] > 0 for r in rows)


def test_split_bench_times_both_splits_on_fits_batches():
    """bench.split's micro-batch widths, recomputed here from the batches' valid lengths with plain numpy:
    interleaved rows j::4 (each as long as its longest), sorted lengths cut into 4 runs."""
    rows = run_bench("bench.split", "--batches", "2", "--rounds", "1", "--precision", "fp32")
    by = {r["split"]: r for r in rows if r["bench"] == "split"}
    lens = load_splits(("train",), os.environ["MINIBERT_DATA"], Path("/nonexistent/pairs"))[0]["train"]["valid_lens"]
    for s in range(2):
        batch = lens[batch_indices(s, len(lens), 512, 0)]
        assert by["interleaved"]["widths"][s] == [int(batch[j::4].max()) for j in range(4)]
        assert by["sorted"]["widths"][s] == [int(run.max()) for run in np.array_split(np.sort(batch), 4)]
    assert by["sorted"]["attention_area_vs_interleaved"] < 0.9 and by["interleaved"]["ms_step"] > 0


def test_ab_bench_times_each_checkout_in_its_own_process(tmp_path):
    """Two checkouts: each child imports its own minibert (the child asserts it), and the summary's ratios
    are per round against the first; a folder that is no checkout is one clear error."""
    out = subprocess.run([sys.executable, "-m", "bench.ab", "--code", str(ROOT), str(ROOT), "--rounds", "1",
                          "--steps", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    runs = [r for r in rows if r["bench"] == "ab"]
    summary = [r for r in rows if r["bench"] == "ab_summary"]
    assert len(runs) == 2 and all(r["median_ms"] > 0 for r in runs)
    assert runs[0]["mlm_last"] == runs[1]["mlm_last"]  # same code, data, seed: same loss on CPU
    assert len(summary) == 2 and summary[0]["ratio_to_first_median"] == 1.0
    assert summary[1]["ratio_to_first_median"] == pytest.approx(runs[1]["median_ms"] / runs[0]["median_ms"], abs=1e-3)
    bad = subprocess.run([sys.executable, "-m", "bench.ab", "--code", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "not a minibert checkout" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_ab_bench_trains_in_the_precision_asked_for():
    """--precision reaches the child: fp32 and auto train the same bits on a CPU without bf16 instructions
    (auto picks fp32 there) and different ones where the CPU multiplies bf16 (auto picks bf16)."""
    native_bf16 = bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    last = {}
    for precision in ("fp32", "auto"):
        out = subprocess.run([sys.executable, "-m", "bench.ab", "--rounds", "1", "--steps", "1", "--precision",
                              precision], cwd=ROOT, capture_output=True, text=True, timeout=600, check=True).stdout
        last[precision] = next(json.loads(line) for line in out.splitlines() if '"ab"' in line)["mlm_last"]
    assert (last["fp32"] != last["auto"]) == native_bf16


def test_outage_bench_runs_the_stage_against_a_real_server_killed_mid_run():
    """bench.outage builds its own workspace (train and valid pairs: the stage's held-out curve reads
    both) and runs the real pretrain stage twice, the server SIGKILLed in the second run."""
    out = subprocess.run([sys.executable, "-m", "bench.outage", "--steps", "6", "--rounds", "1", "--skip", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["mode"] for r in rows[:-1]] == ["normal", "outage"]
    assert rows[-1]["bench"] == "outage" and rows[-1]["normal_pairs_per_s"] > 0 and rows[-1]["outage_pairs_per_s"] > 0


def test_gemms_capture_every_matmul_of_forward_and_backward_with_its_layout():
    """A Linear(13 -> 7) on 99 rows trained one step, a bmm and an mm(out=): the calls and FLOPs worked by hand."""
    from bench import gemms

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(13, 7)
    x = torch.randn(99, 13, generator=g, requires_grad=True)
    a, b = torch.randn(37, 5, 3, generator=g), torch.randn(37, 3, 11, generator=g)
    out = torch.empty(5, 11)

    def step():
        (lin(x).sum() + torch.bmm(a, b).sum()).backward()
        torch.mm(a[0], b[0], out=out)

    calls = gemms.capture(step)
    got = sorted((f.__name__.split(".")[0],) + gemms._mats(f, specs) for f, specs in calls)
    assert got == sorted([("addmm", (99, 13), (13, 7)),    # forward: bias + x @ W.T
                          ("mm", (99, 7), (7, 13)),        # dL/dx = dy @ W
                          ("mm", (7, 99), (99, 13)),       # dL/dW = dy.T @ x
                          ("bmm", (37, 5, 3), (37, 3, 11)),
                          ("mm", (5, 3), (3, 11))])        # the out= form, replayed as mm
    forward = next(specs for f, specs in calls if f.__name__.startswith("addmm"))
    assert forward[2][1] == (1, 13)  # W.T is a transposed view of (7, 13) W, and is captured as one
    res = gemms.replay(calls, repeats=1)
    want = 2 * (3 * 99 * 13 * 7 + 37 * 5 * 3 * 11 + 5 * 3 * 11)
    assert res["calls"] == 5 and res["gemm_gflop"] == round(want / 1e9, 2) and res["gemm_ms"] > 0
    assert sum(gemms.flops(f, s) for f, s in calls) == want
