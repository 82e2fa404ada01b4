"""Pictures: fixed, comparable axes and titles that name the run, read from the matplotlib figures."""
import math

import numpy as np
import pytest

from minibert import plots


def history(steps=37, eval_every=7):
    rows = [{"step": s, "mlm_loss": 9.0 - 0.05 * s, "nsp_loss": 0.70 - 0.001 * s, "pairs_per_sec": 99.0}
            for s in range(1, steps + 1)]
    for r in rows:
        if r["step"] % eval_every == 0 or r["step"] == steps:
            r.update(valid_mlm_loss=r["mlm_loss"] + 0.3, valid_nsp_loss=0.69)
    return rows


def test_loss_axes_are_fixed_by_vocabulary_and_steps_not_by_the_data():
    fig = plots.loss_figure(history(), "lr=0.002 steps=37\nrecipe", vocab_size=99, max_steps=37)
    try:
        mlm, nsp = fig.axes
        assert mlm.get_xlim() == nsp.get_xlim() == (0, 37)
        assert mlm.get_ylim() == pytest.approx((0.0, 1.05 * math.log(99)))  # a uniform guess: ln V = 4.595
        assert nsp.get_ylim() == pytest.approx((0.0, 1.25 * math.log(2)))   # a coin: ln 2, plus a margin
        assert fig._suptitle.get_text() == "lr=0.002 steps=37\nrecipe"
        # the held-out curve is drawn on the MLM panel at the evaluated steps (7, 14, ..., 35, 37)
        held = [line for line in mlm.get_lines() if line.get_label() == "held-out"]
        assert len(held) == 1 and list(held[0].get_xdata()) == [7, 14, 21, 28, 35, 37]
        assert list(held[0].get_ydata()) == pytest.approx([9.0 - 0.05 * s + 0.3 for s in (7, 14, 21, 28, 35, 37)])
    finally:
        plots._pyplot().close(fig)
    # a run with other losses and another vocabulary keeps the same kind of axes: the task sets them
    fig = plots.loss_figure(history(13, 100), "t", vocab_size=20256, max_steps=50)
    try:
        assert fig.axes[0].get_ylim() == pytest.approx((0.0, 1.05 * math.log(20256)))
        assert fig.axes[0].get_xlim() == (0, 50)
        assert [line.get_label() for line in fig.axes[0].get_lines()].count("held-out") == 1  # last step only
    finally:
        plots._pyplot().close(fig)


def test_run_title_names_the_run_and_the_recipe():
    model = {"num_layers": 2, "hidden": 128, "norm": "post", "dropout": 0.2}
    train = {"lr": 0.002, "schedule": "constant", "batch_size": 512, "max_steps": 20, "seed": 0}
    title = plots.run_title("lr=0.002 steps=20", model, train)
    assert title.splitlines()[0] == "lr=0.002 steps=20"
    for part in ("2 layers x 128", "post-LN", "dropout 0.2", "lr 0.002 constant", "batch 512", "20 steps"):
        assert part in title.splitlines()[1], part
    assert plots.run_title(None, model, train).splitlines()[0] == "minibert pretraining"


def test_heatmap_colour_scale_spans_the_off_diagonal_data(tmp_path):
    sim = np.array([[1.0, 0.91, 0.83], [0.91, 1.0, 0.97], [0.83, 0.97, 1.0]])
    fig = plots.similarity_figure(sim, ["a:x", "a:y", "b:x"], "run abc")
    try:
        assert fig.axes[0].get_images()[0].get_clim() == pytest.approx((0.83, 0.97))
        assert fig.axes[0].get_title() == "run abc"
    finally:
        plots._pyplot().close(fig)
    assert plots.similarity_limits(np.ones((3, 3))) == pytest.approx((0.95, 1.05))  # flat data: still a range
    plots.similarity_heatmap(sim, ["a:x", "a:y", "b:x"], tmp_path / "h.png", "t")
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
