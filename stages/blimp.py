"""blimp: what pretraining taught the model, without fine-tuning. BLiMP's minimal pairs scored by
pseudo-log-likelihood, beside the untrained model and a unigram model of the training words.

Writes metrics/blimp.json (pairs scored of all; accuracy overall, per field and per linguistics_term,
for each system) and blimp/paradigms.csv (one row per paradigm); both go into the pretrain stage's
MLflow run (`blimp_accuracy.<system>`, `blimp_accuracy.<system>.<field>`).
"""
from pathlib import Path

import typer

from minibert import layout
from minibert.artifacts import atomic_path, write_json
from minibert.config import load_config
from minibert.data.pinned import locate
from minibert.data.vocab import Vocab
from minibert.errors import stage_errors
from minibert.evaluation.blimp import flat_metrics, read_blimp, score, word_counts
from minibert.evaluation.inference import load_for_inference
from minibert.model.bert import build_model
from minibert.tracking.runs import pretrain_run

app = typer.Typer(add_completion=False)


@app.command()
def main(params: Path = typer.Option(layout.PARAMS, help="params file"),
         models: Path = typer.Option(layout.MODELS, help="folder with bert.safetensors and bert.json"),
         vocab: Path = typer.Option(layout.VOCAB, help="vocabulary"),
         tokens: Path = typer.Option(layout.TRAIN_TOKENS, help="the training split's token ids (word counts)"),
         train_metrics: Path = typer.Option(layout.TRAIN_METRICS, help="pretrain metrics (MLflow run id)"),
         table: Path = typer.Option(layout.BLIMP_TABLE, help="per-paradigm table (CSV)"),
         out: Path = typer.Option(layout.BLIMP_METRICS, help="output metrics file")) -> None:
    with stage_errors("blimp"):
        cfg = load_config(params)
        voc = Vocab.load(vocab)
        model, _, device = load_for_inference(models, {vocab: voc.sha256}, device=cfg.eval.device, key="eval.device")
        pairs = read_blimp(locate("blimp"))
        if cfg.blimp.max_pairs:
            pairs = pairs.groupby("UID", sort=False).head(cfg.blimp.max_pairs).reset_index(drop=True)
        counts = word_counts(tokens, voc)
        untrained = build_model(model.cfg, len(voc), seed=cfg.train.seed).to(device)  # where pretraining started
        m, per_paradigm = score({"pretrained": model, "untrained": untrained}, counts, pairs, voc,
                                model.cfg.max_len, cfg.blimp.batch_size)
        with atomic_path(table) as tmp:
            per_paradigm.to_csv(tmp, index=False, float_format="%.6g")
        write_json(out, m)
        with pretrain_run(cfg.tracking, train_metrics) as tracker:
            tracker.log_metrics(flat_metrics(m))
            for f in (out, table):
                tracker.log_artifact(f, "blimp")
        print(f"blimp: {m['pairs']} of {m['total_pairs']} pairs in the vocabulary; accuracy "
              + ", ".join(f"{k} {m[k]['accuracy']:.3f}" for k in ("pretrained", "untrained", "unigram"))
              + f"; MLflow run {tracker.run_id or '-'}")


if __name__ == "__main__":
    app()
