"""The training loop: schedule, seeded order, exact resume after kill -9 / SIGTERM, DDP equivalence."""
import json
import signal
import time

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.numpy import load_file as load_np
from safetensors.torch import load_file
from tiny_project import TINY_MODEL, make_workspace, popen_stage, stage

from minibert.config import ModelConfig, TrainConfig
from minibert.data.batches import batch_indices, split_batch
from minibert.data.pairs import FIELDS
from minibert.model.bert import build_model, load_pretrained
from minibert.training.loop import get_lr, resolve_precision, step_seed, train_step


def test_constant_and_linear_schedules():
    book = TrainConfig()
    assert [get_lr(s, book) for s in (0, 17, 49)] == [1e-3] * 3
    cfg = TrainConfig(lr=0.01, schedule="linear", warmup_steps=7, max_steps=37)
    lrs = [get_lr(s, cfg) for s in range(37)]
    assert lrs[6] == pytest.approx(0.01) and lrs[0] == pytest.approx(0.01 / 7)
    assert all(a < b for a, b in zip(lrs[:7], lrs[1:7])) and all(a > b for a, b in zip(lrs[7:], lrs[8:]))
    assert lrs[-1] > 0 and get_lr(37, cfg) == 0


def test_batches_cover_each_epoch_once_and_repeat_by_seed():
    n, b = 99, 13
    per_epoch = -(-n // b)
    epoch0 = np.concatenate([batch_indices(s, n, b, seed=3) for s in range(per_epoch)])
    assert sorted(epoch0) == list(range(n)) and len(batch_indices(per_epoch - 1, n, b, 3)) == n % b
    epoch1 = np.concatenate([batch_indices(s, n, b, 3) for s in range(per_epoch, 2 * per_epoch)])
    assert sorted(epoch1) == list(range(n)) and not np.array_equal(epoch0, epoch1)
    assert np.array_equal(batch_indices(5, n, b, 3), batch_indices(5, n, b, 3))
    assert not np.array_equal(batch_indices(5, n, b, 3), batch_indices(5, n, b, 4))


def test_step_seeds_differ_across_ranks_and_steps():
    seeds = {step_seed(0, r, s) for r in range(3) for s in range(37)}
    assert len(seeds) == 3 * 37


@pytest.mark.parametrize("parts", [2, 3, 7])
def test_micro_batches_give_the_one_pass_gradient_and_losses(parts):
    from tiny_project import tiny_batch

    torch.manual_seed(0)
    batch = dict(zip(FIELDS, tiny_batch([13, 5, 9, 7, 13, 6, 11], [3, 1, 2, 3, 2, 1, 3])))
    assert sum(len(p["nsp_labels"]) for p in split_batch(batch, parts)) == 7
    cfg = ModelConfig(num_layers=2, hidden=12, heads=3, ffn_hidden=37, dropout=0.0, max_len=13)
    got = []
    for k in (1, parts):
        model = build_model(cfg, 99, seed=1).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # keeps the weights; .grad holds the gradient
        mlm, nsp = train_step(model, opt, None, batch, 1.0, 1.0, None, torch.device("cpu"), micro_batches=k)
        got.append((torch.stack([mlm, nsp]), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l1, g1), (lk, gk) = got
    torch.testing.assert_close(l1, lk, atol=1e-6, rtol=1e-6)
    for n in g1:
        torch.testing.assert_close(g1[n], gk[n], atol=1e-6, rtol=1e-5, msg=n)


def test_micro_batches_hold_pairs_of_similar_length_each_trimmed_to_its_longest():
    from tiny_project import tiny_batch

    lens = [13, 5, 9, 7, 13, 6, 11]
    batch = dict(zip(FIELDS, tiny_batch(lens, [3, 1, 2, 3, 2, 1, 3])))
    parts = split_batch(batch, 3)
    # by hand: sorted 5 6 7 | 9 11 | 13 13 -> padded widths 7, 11, 13 (interleaved rows gave 13, 13, 13)
    assert [p["valid_lens"].tolist() for p in parts] == [[5, 6, 7], [9, 11], [13, 13]]
    assert [p["token_ids"].shape[1] for p in parts] == [7, 11, 13]
    assert [p["segments"].shape[1] for p in parts] == [7, 11, 13]
    # each row keeps its own tokens and labels (the 11-long pair is row 6 of the batch)
    torch.testing.assert_close(parts[1]["token_ids"][1], batch["token_ids"][6, :11])
    torch.testing.assert_close(parts[1]["mlm_labels"][1], batch["mlm_labels"][6])


def cpu_flags() -> set[str]:
    """The kernel's CPU feature flags, read independently of torch's probes."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo: cannot read the CPU flags independently")
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


def test_precision_resolution_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None and resolve_precision("bf16", cpu) == torch.bfloat16
    assert resolve_precision("fp16", cpu) == torch.float16
    # auto: bf16 exactly where the CPU multiplies bf16 natively (AVX512-BF16 or AMX), else fp32
    native_bf16 = bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    assert resolve_precision("auto", cpu) == (torch.bfloat16 if native_bf16 else None)


def weights(root):
    return load_file(str(root / "models/bert.safetensors"))


def curve(root):
    return pd.read_csv(root / "plots/train_loss.csv")[["step", "mlm_loss", "nsp_loss"]]


def assert_same_run(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # bit for bit
    pd.testing.assert_frame_equal(curve(a), curve(b), check_exact=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = make_workspace(tmp_path_factory.mktemp("full"), train={"max_steps": 150, "checkpoint_every": 10})
    stage(root, "pretrain")
    return root


def wait_for_checkpoint(root, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if list(root.glob("checkpoints/*/step-*/state.json")):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


def test_kill_9_then_rerun_resumes_bit_for_bit(uninterrupted, tmp_path):
    root = make_workspace(tmp_path, train={"max_steps": 150, "checkpoint_every": 10}, tracking=True)
    proc = popen_stage(root, "pretrain")
    wait_for_checkpoint(root, proc)
    time.sleep(float(np.random.default_rng().uniform(0, 0.3)))  # a random step after the first checkpoint
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    assert not (root / "models/bert.safetensors").exists()
    out = stage(root, "pretrain")
    assert "resuming from" in out.stdout
    assert_same_run(uninterrupted, root)
    assert not list(root.glob("checkpoints/*/step-*"))  # removed once complete
    # one MLflow run, every step logged exactly once
    import mlflow
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == json.loads((root / "metrics/train.json").read_text())["mlflow_run_id"]
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "mlm_loss")]
    assert sorted(steps) == list(range(1, 151))


def test_sigterm_checkpoints_and_resumes(uninterrupted, tmp_path):
    root = make_workspace(tmp_path, train={"max_steps": 150, "checkpoint_every": 1000})
    proc = popen_stage(root, "pretrain")
    # The signal goes out as soon as the progress line of step 15 (10 %) is read, inside the training
    # loop with its handler installed and 135 steps still to go: no sleep, and never a silent skip.
    while not (line := proc.stderr.readline()).startswith("pretrain: 15/150 steps"):
        assert line or proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, f"the run was not stopped by the signal (exit {proc.returncode}): signal too late?"
    assert "stopped by signal at step" in err and "rerun the stage to resume" in err
    assert 15 <= int(err.split("stopped by signal at step ")[1].split()[0]) < 150
    assert list(root.glob("checkpoints/*/step-*/state.safetensors"))
    stage(root, "pretrain")
    assert_same_run(uninterrupted, root)


def test_non_finite_loss_stops_with_step_and_keeps_checkpoint(tmp_path):
    root = make_workspace(tmp_path, train={"lr": 1e30, "max_steps": 20, "checkpoint_every": 1})
    proc = stage(root, "pretrain", check=False)
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert "loss is nan at step" in line or "loss is inf at step" in line
    bad_step = int(line.split(" at step ")[1].split(";")[0])
    kept = sorted(root.glob("checkpoints/*/step-*"))
    assert kept and int(kept[-1].name.split("-")[1]) == bad_step - 1
    assert not (root / "models/bert.safetensors").exists()


def test_fingerprint_changes_with_every_number_of_the_run():
    """Hand-listed settings that change the numbers must give another checkpoint folder; the
    bookkeeping ones (how often to log or checkpoint) must not, so a run resumes across them."""
    from minibert.training.pretrain import run_fingerprint

    model, train = ModelConfig(**TINY_MODEL), TrainConfig(device="cpu")
    base = run_fingerprint(model, train, "data", "vocab", 1)
    numeric = {"lr": 3e-3, "seed": 7, "batch_size": 13, "micro_batches": 3, "schedule": "linear",
               "warmup_steps": 7, "max_steps": 99, "precision": "bf16"}
    for key, value in numeric.items():
        assert run_fingerprint(model, TrainConfig(**{"device": "cpu", key: value}), "data", "vocab", 1) != base, key
    other_model = ModelConfig(**{**TINY_MODEL, "dropout": 0.3})
    assert len({base, run_fingerprint(other_model, train, "data", "vocab", 1),
                run_fingerprint(model, train, "data2", "vocab", 1), run_fingerprint(model, train, "data", "v2", 1),
                run_fingerprint(model, train, "data", "vocab", 2)}) == 5
    for key, value in {"log_every": 7, "checkpoint_every": 13}.items():
        assert run_fingerprint(model, TrainConfig(**{"device": "cpu", key: value}), "data", "vocab", 1) == base, key


def test_rerun_with_another_lr_starts_fresh_instead_of_resuming(tmp_path):
    """A run diverges (lr 1e30) and stops, keeping its last good checkpoint. The user lowers lr as the
    error says: the rerun must not resume that foreign state but train from step 1, ending bit for bit
    where a fresh run with the new lr ends."""
    import yaml

    root = make_workspace(tmp_path / "diverged", train={"lr": 1e30, "max_steps": 12, "checkpoint_every": 1})
    assert stage(root, "pretrain", check=False).returncode == 1
    assert list(root.glob("checkpoints/*/step-*/state.json"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["lr"] = 1e-3
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    out = stage(root, "pretrain")
    assert "resuming from" not in out.stdout and "training steps 1..12" in out.stdout
    fresh = make_workspace(tmp_path / "fresh", train={"lr": 1e-3, "max_steps": 12, "checkpoint_every": 1})
    stage(fresh, "pretrain")
    assert_same_run(fresh, root)


def test_two_gloo_ranks_train_disjoint_shards_like_one_process(tmp_path):
    """Fast DDP check: 2 real gloo ranks (spawned, no launcher) must end with the single-process
    weights. Ranks that trained on the same shard, or on overlapping ones, would average another
    gradient. Plain SGD, dropout 0, batch 13 (odd: the shards differ in size), 3 steps."""
    import socket

    import torch.multiprocessing as mp
    from tiny_project import ddp_rank, tiny_fit

    train = {"batch_size": 13, "max_steps": 3, "lr": 0.5, "micro_batches": 1}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(ddp_rank, args=(2, port, train, tmp_path / "ddp.safetensors"), nprocs=2)
    one, _ = tiny_fit(train)
    two = load_file(str(tmp_path / "ddp.safetensors"))
    init = build_model(ModelConfig(**{**TINY_MODEL, "dropout": 0.0}), 99, seed=0).state_dict()
    for k, v in one.state_dict().items():
        torch.testing.assert_close(two[k], v, atol=1e-6, rtol=0, msg=k)
    assert sum(not torch.equal(v, init[k]) for k, v in one.state_dict().items()) > 10  # it did train


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path):
    """Same global batch and order: 2 DDP ranks (launched by the stage through torch.distributed.run) == 1,
    with the ranks' batches split in micro-batches too."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = {"max_steps": 7, "batch_size": 13, "checkpoint_every": 0}
    one = make_workspace(tmp_path / "one", train={**common, "micro_batches": 1}, model={"dropout": 0.0})
    # ...and each rank in 2 micro-batches (DDP syncs gradients on the last one only)
    two = make_workspace(tmp_path / "two", train={**common, "devices": 2, "rdzv_endpoint": f"127.0.0.1:{port}",
                                                  "micro_batches": 2}, model={"dropout": 0.0})
    stage(one, "pretrain")
    out = stage(two, "pretrain")
    assert "torch.distributed.run" in out.stdout
    m = json.loads((two / "metrics/train.json").read_text())
    assert m["world_size"] == 2
    w1, w2 = weights(one), weights(two)
    h = TINY_MODEL["hidden"]
    for k in w1:
        if k.endswith("qkv.bias"):
            # The key bias adds q·b_k to a whole row of scores: softmax ignores it, so its gradient is
            # zero up to float noise, which Adam rescales to lr-sized steps. Compare Q and V parts
            # exactly; the K part must simply have no effect (checked through the outputs below).
            w1[k], w2[k] = torch.cat([w1[k][:h], w1[k][2 * h:]]), torch.cat([w2[k][:h], w2[k][2 * h:]])
        torch.testing.assert_close(w1[k], w2[k], atol=1e-5, rtol=0)
    np.testing.assert_allclose(curve(one)["mlm_loss"], curve(two)["mlm_loss"], atol=1e-5)
    (m1, _), (m2, _) = load_pretrained(one / "models"), load_pretrained(two / "models")
    batch = load_np(str(one / "data/pairs/valid.safetensors"))
    args = [torch.from_numpy(batch[k][:37]).long() for k in ("token_ids", "segments", "valid_lens")]
    with torch.no_grad():
        torch.testing.assert_close(m1.eval().encode(*args), m2.eval().encode(*args), atol=1e-5, rtol=0)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu(tmp_path, precision):
    from tiny_project import TINY_MODEL

    from minibert.artifacts import load_arrays
    from minibert.config import ModelConfig
    from minibert.data.batches import to_tensors
    from minibert.model.bert import build_model
    from minibert.training import distributed
    from minibert.training.loop import fit, make_optimizer

    root = make_workspace(tmp_path)
    cfg = TrainConfig(batch_size=16, max_steps=30, lr=3e-3, device="cpu", precision=precision, checkpoint_every=0)
    model = build_model(ModelConfig(**TINY_MODEL), 99, seed=0)
    opt = make_optimizer(model.parameters(), cfg)
    data = to_tensors(load_arrays(root / "data/pairs/train.safetensors"), torch.device("cpu"))
    res = fit(model, opt, cfg, data, torch.device("cpu"), distributed.Dist())
    assert len(res.history) == 30
    assert all(np.isfinite(r["mlm_loss"]) and np.isfinite(r["nsp_loss"]) for r in res.history)
    first, last = np.mean([r["mlm_loss"] for r in res.history[:5]]), np.mean([r["mlm_loss"] for r in res.history[-5:]])
    assert last < first  # it learns under autocast too
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def _fit_tiny(root, eval_every, hook):
    from minibert.artifacts import load_arrays
    from minibert.data.batches import to_tensors
    from minibert.training import distributed
    from minibert.training.loop import fit, make_optimizer

    cfg = TrainConfig(batch_size=13, max_steps=11, lr=3e-3, device="cpu", precision="fp32", checkpoint_every=0,
                      eval_every=eval_every, threads=1)
    model = build_model(ModelConfig(**TINY_MODEL), 99, seed=0)  # dropout 0.1: eval mode must not leak
    opt = make_optimizer(model.parameters(), cfg)
    data = to_tensors(load_arrays(root / "data/pairs/train.safetensors"), torch.device("cpu"))
    on_eval = hook(model) if hook else None
    res = fit(model, opt, cfg, data, torch.device("cpu"), distributed.Dist(), on_eval=on_eval)
    return res.history, model


def test_evaluation_hook_runs_at_its_steps_and_leaves_training_bit_for_bit(tmp_path):
    from minibert.artifacts import load_arrays
    from minibert.evaluation.heldout import evaluate, heldout_hook

    root = make_workspace(tmp_path)
    valid = load_arrays(root / "data/pairs/valid.safetensors")
    calls = []

    def hook(model):
        score = heldout_hook(model, valid, 7, "cpu")
        return lambda step: calls.append(step) or score(step)

    off, m_off = _fit_tiny(root, 0, None)
    on, m_on = _fit_tiny(root, 4, hook)
    assert calls == [4, 8, 11]  # every 4 steps, plus the last
    for a, b in zip(off, on):  # the training numbers are the same bits with and without evaluation
        assert (a["step"], a["mlm_loss"], a["nsp_loss"]) == (b["step"], b["mlm_loss"], b["nsp_loss"])
    w_off, w_on = m_off.state_dict(), m_on.state_dict()
    assert all(torch.equal(w_off[k], w_on[k]) for k in w_off)
    assert [r["step"] for r in on if "valid_mlm_loss" in r] == [4, 8, 11]
    final = evaluate(m_on, valid, 99, "cpu")  # the last row holds the final model's held-out figures
    assert on[-1]["valid_mlm_loss"] == pytest.approx(final["mlm_loss"], abs=1e-6)
    assert on[-1]["valid_nsp_accuracy"] == final["nsp_accuracy"]
    assert m_on.training  # handed back in train mode
    assert not any("valid_mlm_loss" in r for r in off)


@pytest.mark.slow
def test_two_gloo_ranks_with_evaluation_neither_hang_nor_change_training(tmp_path):
    """Rank 0 alone evaluates (the other waits at the next all-reduce): the run finishes, its losses and
    weights are those of the same 2-rank run without evaluation, and the held-out curve is written."""
    import socket
    curves = {}
    for eval_every in (0, 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        root = make_workspace(tmp_path / f"e{eval_every}", train={
            "max_steps": 5, "batch_size": 13, "checkpoint_every": 0, "devices": 2, "eval_every": eval_every,
            "log_every": 3,  # eval steps 2 and 4 are not log steps: every rank must still sync there
            "rdzv_endpoint": f"127.0.0.1:{port}"})
        stage(root, "pretrain", timeout=300)  # a deadlock fails here instead of hanging the suite
        curves[eval_every] = (curve(root), weights(root), pd.read_csv(root / "plots/valid_curve.csv"))
    (c0, w0, v0), (c2, w2, v2) = curves[0], curves[2]
    pd.testing.assert_frame_equal(c0, c2, check_exact=True)
    assert all(torch.equal(w0[k], w2[k]) for k in w0)
    assert v0.empty and list(v2["step"]) == [2, 4, 5]
    assert v2["valid_mlm_loss"].between(0, 10).all()


def test_pretrain_stage_logs_the_heldout_curve_to_csv_and_mlflow(tmp_path):
    import mlflow
    import yaml

    from minibert.artifacts import load_arrays
    from minibert.evaluation.heldout import evaluate, heldout_subset

    root = make_workspace(tmp_path, train={"eval_every": 5, "checkpoint_every": 0}, tracking=True)
    params = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump({**params, "eval": {"batch_size": 7, "subset_pairs": 37}}))
    stage(root, "pretrain")
    held = pd.read_csv(root / "plots/valid_curve.csv")
    assert list(held.columns) == ["step", "valid_mlm_loss", "valid_mlm_accuracy", "valid_nsp_loss",
                                  "valid_nsp_accuracy", "valid_wall_s"]
    assert list(held["step"]) == [5, 10, 12]  # every 5 steps of 12, plus the last
    model, _ = load_pretrained(root / "models")
    final = evaluate(model, heldout_subset(load_arrays(root / "data/pairs/valid.safetensors"), 37), 7, "cpu")
    assert held["valid_mlm_loss"].iloc[-1] == pytest.approx(final["mlm_loss"], abs=1e-6)
    assert final["examples"] == 37
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run_id = json.loads((root / "metrics/train.json").read_text())["mlflow_run_id"]
    for k in ("valid_mlm_loss", "valid_mlm_accuracy", "valid_nsp_accuracy"):
        points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, k))
        assert [s for s, _ in points] == [5, 10, 12], k
        assert [v for _, v in points] == pytest.approx(list(held[k])), k
    assert "valid_curve.csv" in {a.path for a in client.list_artifacts(run_id)}


def test_every_step_draws_its_own_dropout_masks():
    """One pair, so every step sees the same batch, and an optimizer that holds none of the model's
    weights, so they never change: the loss of step s then varies only through the dropout masks.
    Each step must draw fresh masks (all losses differ) from its own seed, step_seed(seed, 0, s)."""
    from tiny_project import synthetic_split

    from minibert.config import PairsConfig
    from minibert.data.batches import to_tensors
    from minibert.data.pairs import make_pairs
    from minibert.training import distributed
    from minibert.training.loop import fit

    pairs = make_pairs(synthetic_split(np.random.default_rng(5), n_para=7), PairsConfig(max_len=29), 99,
                       np.random.default_rng(5))
    data = to_tensors({k: v[:1] for k, v in pairs.items()}, torch.device("cpu"))
    model = build_model(ModelConfig(**{**TINY_MODEL, "dropout": 0.3}), 99, seed=0)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    bystander = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    cfg = TrainConfig(batch_size=13, max_steps=7, seed=3, device="cpu", checkpoint_every=0)
    hist = fit(model, bystander, cfg, data, torch.device("cpu"), distributed.Dist()).history
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items())
    losses = [(r["mlm_loss"], r["nsp_loss"]) for r in hist]
    assert len(set(losses)) == 7, losses
    batch = {k: v[:, :int(data["valid_lens"][0])] if v.dim() == 2 and k in ("token_ids", "segments") else v
             for k, v in data.items()}
    for s in (0, 4, 6):
        torch.manual_seed(step_seed(3, 0, s))
        with torch.no_grad():
            mlm, nsp = model.train()(*(batch[k] for k in FIELDS))
        assert (float(mlm), float(nsp)) == pytest.approx(losses[s], abs=1e-6), s


# ---------------------------------------------------------------------------- budget runs (issue 27)


def test_budget_schedule_hand_worked():
    """10 steps, warmup share 0.2 -> 2 warmup steps (0.5, 1.0), then 1 - k/8 for k = 0..7: 0 at step 10."""
    cfg = TrainConfig(lr=1.0, schedule="linear", warmup_share=0.2, max_steps=10)
    assert [get_lr(s, cfg) for s in range(11)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0])
    # the shape follows the budget: 20 steps -> 4 warmup steps, decay over 16
    long = TrainConfig(lr=1.0, schedule="linear", warmup_share=0.2, max_steps=20)
    assert [get_lr(s, long) for s in (0, 3, 4, 12, 19)] == pytest.approx([0.25, 1.0, 1.0, 0.5, 1 / 16])
    # half a step rounds up: 0.5 * 7 = 3.5 -> 4; 0.3 * 7 = 2.1 -> 2
    assert TrainConfig(warmup_share=0.5, max_steps=7).warmup == 4
    assert TrainConfig(warmup_share=0.3, max_steps=7).warmup == 2
    assert TrainConfig(warmup_steps=5, max_steps=7).warmup == 5


def test_adamw_decays_weight_matrices_only():
    """With zero gradients Adam's update is 0, so one AdamW step only multiplies each decayed parameter
    by (1 - lr * weight_decay); biases and LayerNorm parameters (vectors) stay exactly as they were."""
    from minibert.training.loop import make_optimizer

    model = build_model(ModelConfig(**TINY_MODEL), 99, seed=0)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = make_optimizer(model.parameters(), TrainConfig(optimizer="adamw", lr=0.5, weight_decay=0.1, beta2=0.98))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert [g["betas"] for g in opt.param_groups] == [(0.9, 0.98)] * 2
    for name, p in model.named_parameters():
        want = before[name] * (1 - 0.5 * 0.1) if p.ndim >= 2 else before[name]
        assert torch.allclose(p.detach(), want, rtol=1e-6, atol=0), name
    decayed = {n for n, p in model.named_parameters() if p.ndim >= 2}
    assert "token_embedding.weight" in decayed and not any("norm" in n or n.endswith(".bias") for n in decayed)


def test_gradient_clipping_caps_the_update_of_plain_sgd(tmp_path):
    """SGD with lr 1 moves the weights by exactly the (clipped) gradient: its global norm is the clip."""
    from minibert.artifacts import load_arrays
    from minibert.data.batches import gather_batch, to_tensors

    root = make_workspace(tmp_path)
    data = to_tensors(load_arrays(root / "data/pairs/train.safetensors"), torch.device("cpu"))
    batch = gather_batch(data, np.arange(13))
    norms = {}
    for clip in (0.0, 0.01):
        model = build_model(ModelConfig(**{**TINY_MODEL, "dropout": 0.0}), 99, seed=0)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        train_step(model, opt, None, batch, 1.0, 1.0, None, torch.device("cpu"), 1, grad_clip=clip)
        norms[clip] = float((torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm())
    assert norms[0.0] > 0.01 and norms[0.01] == pytest.approx(0.01, rel=1e-4)


BUDGET_TRAIN = {"lr": 3e-3, "schedule": "linear", "warmup_share": 0.2, "optimizer": "adamw", "beta2": 0.98,
                "weight_decay": 0.01, "grad_clip": 0.5, "masking": "dynamic", "mask_rate": 0.3}
BUDGET_MODEL = {"norm": "pre", "tie_decoder": True, "decoder_bias": False}  # dropout 0.1 kept: reseeded per step


class _Killed(Exception):
    pass


def _fit_budget(root, steps, train=None, stop_at=None, resume=None):
    from minibert.artifacts import load_arrays
    from minibert.data.batches import to_tensors
    from minibert.training import checkpoint, distributed
    from minibert.training.loop import fit, make_optimizer

    cfg = TrainConfig(**{"batch_size": 13, "max_steps": steps, "device": "cpu", "precision": "fp32",
                         "checkpoint_every": 1, "eval_every": 0, "threads": 1, **(train or BUDGET_TRAIN)})
    model = build_model(ModelConfig(**{**TINY_MODEL, **BUDGET_MODEL}), 99, seed=0)
    opt = make_optimizer(model.parameters(), cfg)
    meta = checkpoint.load(resume, model, opt) if resume else {}
    data = to_tensors(load_arrays(root / "data/pairs/train.safetensors"), torch.device("cpu"))

    def on_checkpoint(step, history, scaler_state):
        path = checkpoint.save(root / "ckpt", step, model, opt, {"history": history}, scaler_state)
        if step == stop_at:
            raise _Killed(path)
        return path

    res = fit(model, opt, cfg, data, torch.device("cpu"), distributed.Dist(), vocab_size=99,
              start_step=meta.get("step", 0), history=meta.get("history"), on_checkpoint=on_checkpoint)
    return res.history, model


def test_a_budget_run_resumed_mid_schedule_is_bit_for_bit_the_uninterrupted_one(tmp_path):
    """Every lever of the budget preset on (dynamic masks, AdamW, clipping, tied decoder, warmup share,
    linear decay): stopped after step 7 of 17 and resumed from its checkpoint, the losses and weights
    are the same bits as a run never stopped."""
    root = make_workspace(tmp_path)
    full, m_full = _fit_budget(root, 17)
    with pytest.raises(_Killed) as killed:
        _fit_budget(root, 17, stop_at=7)
    resumed, m_res = _fit_budget(root, 17, resume=killed.value.args[0])
    key = [(r["step"], r["mlm_loss"], r["nsp_loss"]) for r in full]
    assert key == [(r["step"], r["mlm_loss"], r["nsp_loss"]) for r in resumed]
    a, b = m_full.state_dict(), m_res.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the dynamic masks really differ from the static ones: the same run with static masks trains otherwise
    static, _ = _fit_budget(root, 3, train={**BUDGET_TRAIN, "masking": "static", "mask_rate": 0.15})
    assert static[0]["mlm_loss"] != full[0]["mlm_loss"]  # step 1: same weights and batch, other masks
    assert all(r["train_s"] > 0 for r in full) and [r["train_s"] for r in full] == sorted(r["train_s"] for r in full)


def test_budget_run_logs_heldout_curve_against_seconds_and_names_its_wall_time(tmp_path):
    """The pretrain stage with the budget levers (dynamic masks, tied decoder saved, exported and logged):
    the held-out points carry the training seconds so far (valid_wall_s, in the CSV and MLflow), and a
    run with train.budget_minutes is renamed at the end with recipe, budget and wall time."""
    import re

    import mlflow

    root = make_workspace(tmp_path, train={**BUDGET_TRAIN, "eval_every": 5, "checkpoint_every": 0,
                                           "budget_minutes": 0.5}, model=BUDGET_MODEL, tracking=True)
    stage(root, "pretrain")
    held = pd.read_csv(root / "plots/valid_curve.csv")
    train_s = pd.read_csv(root / "plots/train_loss.csv")  # no train_s column: the CSV's columns are fixed
    assert list(held["step"]) == [5, 10, 12] and "train_s" not in train_s.columns
    assert (held["valid_wall_s"] > 0).all() and held["valid_wall_s"].is_monotonic_increasing
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run_id = json.loads((root / "metrics/train.json").read_text())["mlflow_run_id"]
    points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "valid_wall_s"))
    assert [s for s, _ in points] == [5, 10, 12] and [v for _, v in points] == pytest.approx(list(held["valid_wall_s"]))
    run = client.get_run(run_id)
    assert re.search(r" \[book: 12 steps, 0.5 min budget, \d+ s\]$", run.info.run_name), run.info.run_name
    assert re.search(r"; trained in \d+ s wall \(\d+ s in steps\)$", run.data.tags["mlflow.note.content"])
    assert run.data.metrics["final_wall_s"] > 0


def test_dynamic_masks_are_drawn_at_train_mask_rate(tmp_path):
    """What the model sees: a forward pre-hook counts the masked slots (mlm_weights > 0) and the real
    tokens of every batch `fit` feeds it. Masks redrawn at 0.37 (an odd rate, so neither the book's 0.15
    nor the budget preset's 0.2) cover 0.37 of the tokens, within the per-pair rounding of
    max(1, round(0.37 * len)) (<= 0.5 / len, len ~10-29 here: under 0.03 on average)."""
    from minibert.artifacts import load_arrays
    from minibert.data.batches import to_tensors
    from minibert.training import distributed
    from minibert.training.loop import fit, make_optimizer

    root = make_workspace(tmp_path)
    data = to_tensors(load_arrays(root / "data/pairs/train.safetensors"), torch.device("cpu"))
    for rate in (0.37, 0.2):
        cfg = TrainConfig(batch_size=13, max_steps=4, device="cpu", precision="fp32", checkpoint_every=0,
                          eval_every=0, threads=1, masking="dynamic", mask_rate=rate)
        model = build_model(ModelConfig(**TINY_MODEL), 99, seed=0)
        seen = []  # (masked slots, real tokens) per forward

        def count(module, args, seen=seen):
            valid, positions, weights = args[2], args[3], args[4]
            assert bool((positions[weights > 0] < valid[:, None].expand_as(positions)[weights > 0]).all())
            seen.append((int((weights > 0).sum()), int(valid.sum())))

        model.register_forward_pre_hook(count)
        fit(model, make_optimizer(model.parameters(), cfg), cfg, data, torch.device("cpu"), distributed.Dist(),
            vocab_size=99)
        share = sum(m for m, _ in seen) / sum(n for _, n in seen)
        assert sum(n for _, n in seen) > 150 and abs(share - rate) < 0.03, (rate, share)
