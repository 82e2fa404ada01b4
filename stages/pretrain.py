"""pretrain: train the BERT on the train pairs; write models/, metrics/train.json, plots/train_loss.*.

One process trains in-process. With `train.devices` > 1 or `train.nodes` > 1 the stage re-runs
itself under `python -m torch.distributed.run` (torch's own launcher); started by `torchrun`
directly, it joins the process group from the environment.
"""
import sys
from pathlib import Path

import typer

from minibert import layout
from minibert.config import flatten, load_config
from minibert.errors import stage_errors
from minibert.training import distributed
from minibert.training.pretrain import Paths, run_pretrain

app = typer.Typer(add_completion=False)


@app.command()
def main(params: Path = typer.Option(layout.PARAMS, help="params file"),
         pairs: Path = typer.Option(layout.TRAIN_PAIRS, help="train pairs"),
         valid_pairs: Path = typer.Option(layout.VALID_PAIRS, help="held-out pairs (train.eval_every)"),
         vocab: Path = typer.Option(layout.VOCAB, help="vocabulary"),
         models: Path = typer.Option(layout.MODELS, help="output folder for bert.safetensors/bert.json"),
         metrics: Path = typer.Option(layout.METRICS, help="metrics folder"),
         plots: Path = typer.Option(layout.PLOTS, help="plots folder"),
         checkpoints: Path = typer.Option(layout.CHECKPOINTS,
                                          help="resumable state (kept until a run completes)")) -> None:
    with stage_errors("pretrain"):
        cfg = load_config(params)
        cmd = distributed.launch_command(cfg.train, __spec__.name, sys.argv[1:])  # re-run this very script
        if cmd:
            print("pretrain: launching " + " ".join(cmd[1:]), flush=True)
            raise SystemExit(distributed.relaunch(cmd))
        paths = Paths(Path("."), pairs, vocab, models, metrics / layout.TRAIN_METRICS.name,
                      plots / layout.TRAIN_CURVE_CSV.name, plots / layout.TRAIN_CURVE_PNG.name, checkpoints, params,
                      valid_pairs=valid_pairs, valid_curve=plots / layout.VALID_CURVE_CSV.name)
        m = run_pretrain(cfg.model, cfg.train, cfg.tracking, flatten(cfg), paths, eval_cfg=cfg.eval)
        if m:
            print(f"pretrain: {m['steps']} steps on {m['device']} ({m['precision']}): MLM loss {m['mlm_loss_avg']:.3f}, "
                  f"NSP loss {m['nsp_loss_avg']:.3f} (mean over steps), {m['pairs_per_sec']:.1f} sentence pairs/sec; "
                  f"MLflow run {m['mlflow_run_id'] or '-'}")


if __name__ == "__main__":
    app()
