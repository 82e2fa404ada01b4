"""evaluate: score the pretrained model on the fixed valid pairs; write metrics/eval.json.

Beside the model's figures stand the trivial baselines (`baseline_*`: the train pairs' most frequent
masked word, NSP's majority class) scored on the same pairs. Everything also goes into the pretrain
stage's MLflow run (its id is in metrics/train.json): the model's figures prefixed `valid_` at the
model's last step, so they end the held-out curve pretrain logged on a subset and, logged last, are
the values the runs table shows.
"""
from pathlib import Path

import typer

from minibert import layout
from minibert.artifacts import write_json
from minibert.config import load_config
from minibert.errors import stage_errors
from minibert.evaluation.heldout import baselines, evaluate, load_pairs
from minibert.evaluation.inference import load_for_inference
from minibert.tracking.runs import pretrain_run

app = typer.Typer(add_completion=False)


@app.command()
def main(params: Path = typer.Option(layout.PARAMS, help="params file"),
         models: Path = typer.Option(layout.MODELS, help="folder with bert.safetensors and bert.json"),
         pairs: Path = typer.Option(layout.VALID_PAIRS, help="held-out pairs"),
         train_pairs: Path = typer.Option(layout.TRAIN_PAIRS, help="train pairs (the baselines)"),
         train_metrics: Path = typer.Option(layout.TRAIN_METRICS, help="pretrain metrics (MLflow run id)"),
         out: Path = typer.Option(layout.EVAL_METRICS, help="output metrics file")) -> None:
    with stage_errors("evaluate"):
        cfg = load_config(params)
        arrays, pairs_meta = load_pairs(pairs)
        train_arrays, train_meta = load_pairs(train_pairs)
        model, meta, device = load_for_inference(models, {pairs: pairs_meta.get("vocab_sha256"),
                                                          train_pairs: train_meta.get("vocab_sha256")},
                                                 device=cfg.eval.device, key="eval.device")
        m = evaluate(model, arrays, cfg.eval.batch_size, device)
        base = baselines(train_arrays, arrays, meta["vocab_size"])
        m = {k: round(v, 6) if isinstance(v, float) else v for k, v in {**m, **base}.items()}
        write_json(out, m)
        with pretrain_run(cfg.tracking, train_metrics) as tracker:
            tracker.log_metrics({f"valid_{k}": v for k, v in m.items() if k not in base}, step=meta.get("step"))
            tracker.log_metrics({k: m[k] for k in base})
            tracker.log_artifact(out)
        print(f"evaluate: {m['examples']} valid pairs: MLM loss {m['mlm_loss']:.3f} (ppl {m['mlm_perplexity']:.1f}), "
              f"MLM acc {m['mlm_accuracy']:.1%}, NSP loss {m['nsp_loss']:.3f}, NSP acc {m['nsp_accuracy']:.1%} "
              f"(baselines: unigram MLM {m['baseline_unigram_mlm_loss']:.3f} / {m['baseline_unigram_mlm_accuracy']:.1%}, "
              f"majority NSP {m['baseline_majority_nsp_accuracy']:.1%}); "
              f"MLflow run {tracker.run_id or '-'}")


if __name__ == "__main__":
    app()
