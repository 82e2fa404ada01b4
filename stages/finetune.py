"""finetune: does pretraining transfer? Fine-tune the pretrained encoder on a labelled task.

Beside it, on the same test split and with the same recipe (dev-based early stopping): the same
architecture from random initialisation, a bag-of-words linear classifier and the majority class; every
seed of `finetune.seeds` and every labels-per-class count of `finetune.label_counts`. Writes
metrics/finetune.json (mean ± std per system), the per-seed table, the per-epoch dev curves, the
label-efficiency table and the pretrained model's confusion matrix; all of it also goes into the
pretrain stage's MLflow run, so the compare view shows downstream accuracy beside `valid_mlm_loss`.
"""
from pathlib import Path

import typer

from minibert import layout
from minibert.artifacts import atomic_path, write_json
from minibert.config import load_config
from minibert.data.vocab import Vocab
from minibert.downstream.finetune import flat_metrics, load_task, metrics, run
from minibert.errors import stage_errors
from minibert.evaluation.inference import load_for_inference
from minibert.plots import confusion_matrix
from minibert.tracking.runs import pretrain_run

app = typer.Typer(add_completion=False)


@app.command()
def main(params: Path = typer.Option(layout.PARAMS, help="params file"),
         models: Path = typer.Option(layout.MODELS, help="folder with bert.safetensors and bert.json"),
         vocab: Path = typer.Option(layout.VOCAB, help="vocabulary"),
         train_metrics: Path = typer.Option(layout.TRAIN_METRICS, help="pretrain metrics (MLflow run id)"),
         per_seed: Path = typer.Option(layout.FINETUNE_SEEDS, help="per-seed, per-system scores (CSV)"),
         curves: Path = typer.Option(layout.FINETUNE_CURVES, help="per-epoch dev curves (CSV)"),
         labels: Path = typer.Option(layout.FINETUNE_LABELS, help="accuracy against labels per class (CSV)"),
         confusion: Path = typer.Option(layout.FINETUNE_CONFUSION, help="confusion matrix (PNG)"),
         out: Path = typer.Option(layout.FINETUNE_METRICS, help="output metrics file")) -> None:
    with stage_errors("finetune"):
        cfg = load_config(params)
        voc = Vocab.load(vocab)
        train_df, test_df, origin = load_task(cfg.finetune)
        fresh = lambda: load_for_inference(models, {vocab: voc.sha256}, cfg.finetune.device, "finetune.device")[0]  # noqa: E731
        result = run(cfg.finetune, fresh, voc, train_df, test_df, origin)
        m = metrics(result, cfg.finetune, origin)
        seconds_free = result.per_seed.drop(columns="train_s")  # same params, same bytes: no wall times here
        for path, df in ((per_seed, seconds_free), (curves, result.curves), (labels, result.label_curve())):
            with atomic_path(path) as tmp:
                df.to_csv(tmp, index=False, float_format="%.6g")
        confusion_matrix(result.confusion, result.classes, confusion,
                         f"{cfg.finetune.task}: pretrained + fine-tuned, {len(cfg.finetune.seeds)} seeds summed")
        write_json(out, m)
        with pretrain_run(cfg.tracking, train_metrics) as tracker:
            tracker.log_metrics(flat_metrics(m))
            for f in (out, per_seed, curves, labels, confusion):
                tracker.log_artifact(f, "finetune")
        rows = [("all", m["systems"])] if m["systems"] else []
        print(f"finetune: {cfg.finetune.task} ({origin}), {m['train_examples']} train / {m['dev_examples']} dev / "
              f"{m['test_examples']} test, accuracy over {len(cfg.finetune.seeds)} seeds: " + " | ".join(
                  f"{n} labels: " + "; ".join(f"{k} {v['accuracy']:.3f} ± {v['accuracy_std']:.3f}" for k, v in s.items())
                  for n, s in rows + list(m["labels_per_class"].items())) + f"; MLflow run {tracker.run_id or '-'}")


if __name__ == "__main__":
    app()
