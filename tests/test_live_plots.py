"""The plot CSVs grow while training runs, never show a torn row, and end as the end-of-run writer's bytes."""
import os
import threading
import time

import pandas as pd
from test_pretrain import run_in_process
from tiny_project import make_workspace

from minibert.training import pretrain
from minibert.training.live_plots import TRAIN_COLUMNS, VALID_COLUMNS, LiveCurve, LiveCurves


def test_live_files_are_the_end_of_run_writers_bytes(tmp_path, monkeypatch):
    """Snapshot the live CSVs when training is over (write_outputs is called), then let the final
    writer (today's pandas frame of the whole history) overwrite them: same bytes."""
    root = make_workspace(tmp_path, train={"max_steps": 13, "log_every": 3, "eval_every": 5})
    seen, real = {}, pretrain.write_outputs

    def snapshot_then_write(model, history, metrics, vocab, data_sha, paths, title="t"):
        seen.update({p.name: p.read_bytes() for p in (paths.curve_csv, paths.valid_curve)})
        real(model, history, metrics, vocab, data_sha, paths, title)

    monkeypatch.setattr(pretrain, "write_outputs", snapshot_then_write)
    run_in_process(root, monkeypatch)
    train, valid = (root / "plots/train_loss.csv").read_bytes(), (root / "plots/valid_curve.csv").read_bytes()
    assert seen == {"train_loss.csv": train, "valid_curve.csv": valid}
    assert len(train.splitlines()) == 1 + 13 and len(valid.splitlines()) == 1 + 3  # steps 5, 10, 13


def test_resume_rewrites_what_the_checkpoint_holds_then_appends(tmp_path):
    rows = [{"step": s, "mlm_loss": 4.5 - s / 7, "nsp_loss": 0.69, "pairs_per_sec": 99.0 + s} for s in range(1, 8)]
    rows[3].update({f"valid_{k}": 0.25 * s for s, k in enumerate(("mlm_loss", "mlm_accuracy", "nsp_loss",
                                                                   "nsp_accuracy"))})
    curves = LiveCurves(tmp_path / "t.csv", tmp_path / "v.csv")
    (tmp_path / "t.csv").write_text("stale,rows\nfrom,an earlier run\n")
    curves.start(rows[:3])
    curves.append(rows[3:5])
    curves.append(rows[5:])
    # the reference: the pandas call pretrain.write_outputs makes over the whole history
    assert (tmp_path / "t.csv").read_text() == pd.DataFrame(rows, columns=TRAIN_COLUMNS).to_csv(index=False)
    held = [r for r in rows if "valid_mlm_loss" in r]
    assert (tmp_path / "v.csv").read_text() == pd.DataFrame(held, columns=VALID_COLUMNS).to_csv(index=False)


def test_disabled_curves_touch_nothing(tmp_path):
    curves = LiveCurves(tmp_path / "t.csv", tmp_path / "v.csv", enabled=False)
    curves.start([])
    curves.append([{"step": 1, "mlm_loss": 1.0, "nsp_loss": 1.0, "pairs_per_sec": 1.0}])
    assert list(tmp_path.iterdir()) == []


def test_an_append_never_straddles_a_page(tmp_path, monkeypatch):
    """Linux publishes appended bytes page by page: a row written in place across a 4096-byte
    boundary could be read half. Every in-place append must end in the page it starts in; a row
    that would cross is written by renaming a whole new file (a new inode)."""
    path = tmp_path / "t.csv"
    curve = LiveCurve(path, TRAIN_COLUMNS)
    curve.start([])
    crossings = in_place = 0
    for s in range(1, 700):
        before = os.stat(path)
        curve.append([{"step": s, "mlm_loss": 1 / s, "nsp_loss": 0.5, "pairs_per_sec": 1234.5}])
        after = os.stat(path)
        if after.st_ino == before.st_ino:
            in_place += 1
            assert before.st_size // 4096 == (after.st_size - 1) // 4096, f"step {s} straddles a page"
        else:
            crossings += 1
    assert path.stat().st_size > 3 * 4096 and crossings >= 3 and in_place > 600


def test_a_reader_during_training_never_sees_a_torn_row(tmp_path, monkeypatch):
    """A thread reads the growing CSV as fast as it can while a real (tiny) training appends to it:
    every read is whole lines, each with the header's number of fields and numbers in them."""
    root = make_workspace(tmp_path, train={"max_steps": 400, "log_every": 1, "checkpoint_every": 0})
    path, done, reads, bad = root / "plots/train_loss.csv", threading.Event(), [0], []

    def reader():
        while not done.is_set():
            try:
                text = path.read_text()
            except FileNotFoundError:
                continue
            finally:
                time.sleep(0.001)  # hand the GIL back: a spinning reader slowed training 100-fold
            reads[0] += 1
            if text and not text.endswith("\n"):
                bad.append(text[-80:])
            for line in text.splitlines()[1:]:
                fields = line.split(",")
                if len(fields) != 4 or not all(f.replace(".", "", 1).replace("e-", "").isdigit() for f in fields):
                    bad.append(line)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        run_in_process(root, monkeypatch)
    finally:
        done.set()
        t.join()
    assert reads[0] > 50 and bad == [], (reads, bad[:3])
    assert path.stat().st_size > 4096  # the run crossed pages: both kinds of append happened


def test_a_failed_run_puts_back_exactly_what_it_found(tmp_path):
    """A run that fails after some rows: a CSV that was not there before is gone again (no partial file
    left to read as an output), and one that was there holds its old bytes again."""
    rows = [{"step": s, "mlm_loss": 5.0 - s, "nsp_loss": 0.7, "pairs_per_sec": 10.0 * s} for s in range(1, 4)]
    rows[1].update({"valid_mlm_loss": 6.5, "valid_mlm_accuracy": 0.1, "valid_nsp_loss": 0.69, "valid_nsp_accuracy": 0.5})
    old_valid = b"step,valid_mlm_loss\n7,6.25\n"  # the previous run's held-out curve, any bytes
    (tmp_path / "v.csv").write_bytes(old_valid)
    curves = LiveCurves(tmp_path / "t.csv", tmp_path / "v.csv")
    curves.start([])
    curves.append(rows)
    assert (tmp_path / "t.csv").is_file() and (tmp_path / "v.csv").read_bytes() != old_valid  # rows were written
    curves.restore()  # the run failed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.csv"]
    assert (tmp_path / "v.csv").read_bytes() == old_valid
    lone = LiveCurve(tmp_path / "only.csv", TRAIN_COLUMNS)  # the single-file form too
    lone.start(rows[:1])
    lone.append(rows[1:])
    lone.restore()
    assert not (tmp_path / "only.csv").exists()
