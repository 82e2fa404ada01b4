"""probe: encode the probe sentences of params.yaml with the pretrained model.

Writes the per-token table (parquet + CSV), metrics/probe.json (shapes, norms, the cross-context
similarity of shared words) and a token-by-token cosine similarity heatmap; all of it also goes
into the pretrain stage's MLflow run. Word similarity: Spearman rho against SimLex-999 / WordSim-353 for
the trained model and, as the control, its untrained initialisation.
"""
import sys
import warnings
from pathlib import Path

import typer

from minibert import layout
from minibert.artifacts import atomic_path, write_json
from minibert.config import load_config
from minibert.data.vocab import Vocab
from minibert.errors import stage_errors
from minibert.evaluation.inference import load_for_inference
from minibert.evaluation.probes import flat_metrics, run_probes
from minibert.evaluation.similarity import word_similarity
from minibert.model.bert import build_model
from minibert.plots import similarity_heatmap
from minibert.tracking.runs import pretrain_run

app = typer.Typer(add_completion=False)


@app.command()
def main(params: Path = typer.Option(layout.PARAMS, help="params file"),
         models: Path = typer.Option(layout.MODELS, help="folder with bert.safetensors and bert.json"),
         vocab: Path = typer.Option(layout.VOCAB, help="vocabulary"),
         train_metrics: Path = typer.Option(layout.TRAIN_METRICS, help="pretrain metrics (MLflow run id)"),
         table: Path = typer.Option(layout.PROBE_TABLE, help="probe table (a .csv is written beside it)"),
         heatmap: Path = typer.Option(layout.PROBE_HEATMAP, help="similarity heatmap"),
         out: Path = typer.Option(layout.PROBE_METRICS, help="output metrics file")) -> None:
    with stage_errors("probe"):
        cfg = load_config(params)
        voc = Vocab.load(vocab)
        model, meta, device = load_for_inference(models, {vocab: voc.sha256}, device=cfg.eval.device, key="eval.device")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            df, metrics, sim, labels = run_probes(model, voc, cfg.probe, device)
        # the control: the initialisation the pretrain stage started from (its seed, this architecture)
        untrained = build_model(model.cfg, len(voc), seed=cfg.train.seed).to(device)
        metrics["word_similarity"] = word_similarity(model, untrained, voc, cfg.probe.word_similarity)
        for w in caught:  # one line per probe, not Python's two-line warning format
            print(f"warning: probe: {w.message}", file=sys.stderr)
        csv = table.with_suffix(".csv")
        with atomic_path(table) as tmp:
            df.to_parquet(tmp, index=False)
        with atomic_path(csv) as tmp:
            df.to_csv(tmp, index=False)
        arch = meta["model"]  # the title names the run and its model, so heatmaps of two runs can be told apart
        similarity_heatmap(sim, labels, heatmap, f"run {(meta.get('mlflow_run_id') or '-')[:8]}, "
                           f"{arch['num_layers']} layers x {arch['hidden']}, step {meta.get('step', '?')}: "
                           "cosine similarity of token encodings")
        write_json(out, metrics)
        with pretrain_run(cfg.tracking, train_metrics) as tracker:
            tracker.log_metrics(flat_metrics(metrics))
            for f in (table, csv, heatmap, out):
                tracker.log_artifact(f, "probe")
        shapes = ", ".join(f"{n} {tuple(e['shape'])}" for n, e in metrics["probes"].items())
        sims = ", ".join(f"{k} {v:.3f}" for k, v in metrics["similarity"].items()) or "-"
        rho = ", ".join(f"{n} rho {w['trained'].get('spearman_embedding', float('nan')):.3f} embedding / "
                        f"{w['trained'].get('spearman_context', float('nan')):.3f} context "
                        f"(untrained {w['untrained'].get('spearman_embedding', float('nan')):.3f}, "
                        f"{w['trained']['pairs']} of {w['trained']['total']} pairs)"
                        for n, w in metrics["word_similarity"].items()) or "-"
        print(f"probe: {shapes}; similarity {sims}; {rho}; MLflow run {tracker.run_id or '-'}")


if __name__ == "__main__":
    app()
