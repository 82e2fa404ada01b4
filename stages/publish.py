"""publish: the pretrained model into MLflow for serving, in pretrain's run; writes no files.

Logs the encoder (`mlflow.pytorch`), the text model (`mlflow models serve`) registered as a new version
of `tracking.registered_model`, then moves the `champion` alias by evaluate's held-out MLM loss. It
retrains nothing: editing the serving code reruns this stage alone. With tracking off, or no
MLflow run recorded by pretrain, there is nothing to publish.
"""
import json
from pathlib import Path

import typer

from minibert import layout
from minibert.artifacts import sha256_file
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
         eval_metrics: Path = typer.Option(layout.EVAL_METRICS, help="evaluate metrics (held-out MLM loss)")) -> None:
    with stage_errors("publish"):
        cfg = load_config(params)
        with pretrain_run(cfg.tracking, train_metrics) as tracker:
            if tracker.run_id is None:
                print("publish: tracking is off or pretrain recorded no MLflow run; nothing to publish")
                return
            loss = json.loads(eval_metrics.read_text())["mlm_loss"]
            version, champion = publish_model(tracker, models, vocab, cfg.tracking.registered_model,
                                              encoder_example(load_pairs(pairs)[0]), sha256_file(pairs), loss)
        print(f"publish: MLflow run {tracker.run_id}"
              + (f"; {cfg.tracking.registered_model} version {version}" if version else "")
              + (f"; {cfg.tracking.registered_model}@champion = version {champion}" if champion else ""))


if __name__ == "__main__":
    app()
