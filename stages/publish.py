"""publish: the pretrained model into MLflow for serving, in pretrain's run.

Logs the encoder (`mlflow.pytorch`), the text model (`mlflow models serve`) registered as a new version
of `tracking.registered_model`, then moves the `champion` alias by evaluate's held-out MLM loss. It
retrains nothing: editing the serving code reruns this stage alone. With tracking off, or no
MLflow run recorded by pretrain, there is nothing to publish. Writes metrics/publish.json (what was
published: the model file's sha256 and the registered name, no store-specific version number), so the
stage has an output and DVC's run cache can serve it: a CI rerun of the same commit publishes nothing
again.
"""
import json
from pathlib import Path

import typer

from minibert import layout
from minibert.artifacts import sha256_file, write_json
from minibert.config import load_config
from minibert.data.pairs import load_pairs
from minibert.errors import stage_errors
from minibert.tracking.publish import encoder_example, publish_model
from minibert.tracking.runs import pretrain_run

app = typer.Typer(add_completion=False)


@app.command()
def main(params: Path = typer.Option(layout.PARAMS, help="params file"),
         models: Path = typer.Option(layout.MODELS, help="folder with bert.safetensors and bert.json"),
         vocab: Path = typer.Option(layout.VOCAB, help="vocabulary the model was trained with"),
         pairs: Path = typer.Option(layout.VALID_PAIRS, help="held-out pairs evaluate scored"),
         train_metrics: Path = typer.Option(layout.TRAIN_METRICS, help="pretrain metrics (MLflow run id)"),
         eval_metrics: Path = typer.Option(layout.EVAL_METRICS, help="evaluate metrics (held-out MLM loss)"),
         out: Path = typer.Option(layout.PUBLISH_METRICS, help="what was published (JSON)")) -> None:
    with stage_errors("publish"):
        cfg = load_config(params)
        with pretrain_run(cfg.tracking, train_metrics) as tracker:
            record = {"published": tracker.run_id is not None, "model_sha256": sha256_file(models / "bert.safetensors"),
                      "registered_model": cfg.tracking.registered_model if tracker.run_id else ""}
            if tracker.run_id is None:
                write_json(out, record)
                print("publish: tracking is off or pretrain recorded no MLflow run; nothing to publish")
                return
            loss = json.loads(eval_metrics.read_text())["mlm_loss"]
            version, champion = publish_model(tracker, models, vocab, cfg.tracking.registered_model,
                                              encoder_example(load_pairs(pairs)[0]), sha256_file(pairs), loss)
        write_json(out, record)
        print(f"publish: MLflow run {tracker.run_id}"
              + (f"; {cfg.tracking.registered_model} version {version}" if version else "")
              + (f"; {cfg.tracking.registered_model}@champion = version {champion}" if champion else ""))


if __name__ == "__main__":
    app()
