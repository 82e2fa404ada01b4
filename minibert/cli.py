"""`minibert`: the pipeline's stages under one command, plus a look at models and MLflow runs.

    minibert pretrain --params params.yaml          # the very code `dvc repro` runs
    minibert encode "a crane is flying" --pair "he just left" [--run RUN_ID]
    minibert runs                                   # MLflow runs, newest first
    minibert runs --compare ID ID                   # params and metrics side by side
    minibert encode "a crane is flying" --model models:/minibert-encoder@champion
    minibert export hf OUT [--run RUN_ID]           # a folder Hugging Face transformers loads
    minibert ui-url                                 # the MLflow UI's training-runs table of the experiment
    minibert budget --minutes 15 [--preset budget]  # steps 15 minutes buy here, and the -S flags
    minibert serve [--port 5001]                    # the champion over HTTP (mlflow models serve)
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from minibert import layout
from minibert.artifacts import atomic_path
from minibert.config import ProbeSpec, TrackingConfig
from minibert.errors import MinibertError, stage_errors

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="minibert: BERT pretraining on WikiText-2 (the d2l chapter) as a DVC + MLflow pipeline.")

STAGES = {
    "download": "Stage 1: fetch and verify WikiText-2 into data/raw/ (or from MINIBERT_DATA).",
    "tokenize": "Stage 2: build the vocabulary and token id arrays (data/tokens/).",
    "pairs": "Stage 3: NSP sentence pairs with MLM masks (data/pairs/).",
    "pretrain": "Stage 4: pretrain the BERT (models/, metrics/train.json, an MLflow run).",
    "evaluate": "Stage 5: held-out MLM/NSP loss and accuracy (metrics/eval.json).",
    "publish": "Stage 6: the model into MLflow: encoder, text model, registry version, champion alias.",
    "probe": "Stage 7: encode the probe sentences of params.yaml (probes/, metrics/probe.json).",
    "finetune": "Stage 8: fine-tune on a labelled task beside its controls (metrics/finetune.json, plots/).",
}
RUN_COLUMNS = {  # list_runs column -> short header of `minibert runs`
    "params.model.num_layers": "layers", "params.model.hidden": "hidden", "params.train.lr": "lr",
    "params.train.max_steps": "steps", "params.train.batch_size": "batch", "params.train.precision": "precision",
    "metrics.final_mlm_loss_avg": "mlm loss", "metrics.final_nsp_loss_avg": "nsp loss",
    "metrics.valid_mlm_loss": "valid mlm", "metrics.valid_mlm_accuracy": "valid mlm acc",
    "metrics.valid_nsp_accuracy": "valid nsp acc", "metrics.final_pairs_per_sec": "pairs/s",
}


def _stage_command(name: str, help: str):
    """`minibert <name> ARGS` runs `python -m stages.<name> ARGS`, the stage's own script (the command
    dvc.yaml gives), in a child process from the project root: the library never imports the scripts,
    and a multi-process pretrain relaunches that script, not this command."""
    @app.command(name, help=help + " Options: see `minibert " + name + " --help`.", add_help_option=False,
                 context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def run_stage(ctx: typer.Context) -> None:
        roots = [Path.cwd(), *(Path(d) for d in os.environ.get("PYTHONPATH", "").split(os.pathsep) if d)]
        if not any((r / "stages" / f"{name}.py").is_file() for r in roots):
            print(f"error: minibert {name}: no stages/{name}.py in {Path.cwd()}; run it from the project root "
                  "(the folder with dvc.yaml)", file=sys.stderr)
            raise typer.Exit(2)
        raise typer.Exit(subprocess.run([sys.executable, "-m", f"stages.{name}", *ctx.args], check=False).returncode)


for _name, _help in STAGES.items():
    _stage_command(_name, _help)


# ---------------------------------------------------------------------------- display


def _console() -> Console:
    console = Console()
    # Pipes and CI logs have no width to respect: don't squeeze run ids into wrapped columns.
    return console if console.is_terminal else Console(width=240)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, (float, np.floating)):
        if float(v).is_integer() and abs(v) < 1e15:
            return str(int(v))
        return f"{v:.1f}" if abs(v) >= 1000 else f"{v:.4g}"  # throughputs: no 1.235e+04
    return str(v)


def _numeric(col):
    """MLflow keeps params as strings: numbers again where they all parse (right-aligned, 4 digits)."""
    import pandas as pd

    try:
        return pd.to_numeric(col)
    except (ValueError, TypeError):
        return col


def _table(df, title: str, mark: list[bool] | None = None) -> Table:
    """A pandas frame as a rich table; `mark`ed rows are highlighted and flagged `*` (readable without colour)."""
    table = Table(title=title, title_justify="left")
    if mark is not None:
        table.add_column("diff", justify="center")
    for col in df.columns:
        numeric = df[col].dtype.kind in "fi"
        table.add_column(str(col), justify="right" if numeric else "left", no_wrap=not numeric)
    for i, row in enumerate(df.itertuples(index=False)):
        cells = [_fmt(v) for v in row]
        if mark is None:
            table.add_row(*cells)
        else:
            table.add_row("*" if mark[i] else "", *cells, style="bold yellow" if mark[i] else None)
    return table


# ---------------------------------------------------------------------------- encode


def _load(checkpoint: Path | None, run: str | None, vocab: Path | None, tmp: Path, model: str | None = None,
          device: str = "cpu"):
    """(model, vocabulary, bert.json) from a folder, the `weights/` artifacts of an MLflow run, or a
    registered model (`models:/minibert-encoder@champion`)."""
    from minibert.data.vocab import Vocab
    from minibert.evaluation.inference import load_for_inference

    if sum(x is not None for x in (checkpoint, run, model)) > 1:
        raise MinibertError("give one of --checkpoint, --run, --model")
    folder = checkpoint or layout.MODELS
    if run:
        from minibert.tracking.runs import download_artifacts

        folder = download_artifacts(run, "weights", tmp, Path("."))
    if model:
        from minibert.tracking.registry import download_model

        folder = download_model(model, tmp, Path("."))
    vocab = vocab or (folder / layout.VOCAB.name if run or model else layout.VOCAB)
    voc = Vocab.load(vocab)
    model, meta, _ = load_for_inference(folder, {vocab: voc.sha256}, device=device, key="--device")
    return model, voc, meta


@app.command()
def encode(
    text: str = typer.Argument(..., help="Sentence to encode (lower-cased, split on whitespace)."),
    pair: Optional[str] = typer.Option(None, help="Second sentence: encode `<cls> text <sep> pair <sep>`."),
    checkpoint: Optional[Path] = typer.Option(None, help="Folder with bert.safetensors + bert.json [default: models]."),
    run: Optional[str] = typer.Option(None, help="MLflow run id: use the weights its pretrain stage logged."),
    model: Optional[str] = typer.Option(None, help="Registered model URI, e.g. models:/minibert-encoder@champion."),
    vocab: Optional[Path] = typer.Option(None, help="vocab.txt [default: data/tokens/vocab.txt, or the run's]."),
    out: Optional[Path] = typer.Option(None, help="Also write the table to this parquet file."),
    device: str = typer.Option("cpu", help="Where the model runs: cpu, cuda, cuda:N or auto."),
) -> None:
    """Encode a sentence (or pair) with a pretrained model; print each token's vector summary."""
    from minibert.evaluation.probes import UnknownWordWarning, encode_probe, probe_table

    with stage_errors("encode"):
        for what, s in (("sentence", text), ("--pair", pair)):
            if s is not None and not s.split():
                raise MinibertError(f"empty {what}; pass words, e.g. minibert encode \"a crane is flying\"")
        spec = ProbeSpec("input", text, pair)
        with tempfile.TemporaryDirectory(prefix="minibert-encode-") as tmp:
            bert, voc, _ = _load(checkpoint, run, vocab, Path(tmp), model, device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UnknownWordWarning)
            tokens, segments, enc = encode_probe(bert, voc, spec)  # enc (1, T, H)
        for w in caught:  # one line, not Python's two-line warning format
            print(f"warning: encode: {w.message}", file=sys.stderr)
        df = probe_table([(spec, tokens, segments, enc[0].numpy().astype(np.float64))]).drop(columns="probe")
        if out is not None:
            with atomic_path(out) as tmp:
                df.to_parquet(tmp, index=False)
    _console().print(_table(df, f"{'pair' if pair else 'sentence'} encoding {tuple(enc.shape)}"
                                + (f" -> {out}" if out else "")))


# ---------------------------------------------------------------------------- export


export_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Write a pretrained model in another format.")
app.add_typer(export_app, name="export")


@export_app.command("hf")
def export_hf(
    out: Path = typer.Argument(..., help="Folder to write (replaced whole): config, weights, tokenizer, model card."),
    checkpoint: Optional[Path] = typer.Option(None, help="Folder with bert.safetensors + bert.json [default: models]."),
    run: Optional[str] = typer.Option(None, help="MLflow run id: export the weights its pretrain stage logged."),
    vocab: Optional[Path] = typer.Option(None, help="vocab.txt [default: data/tokens/vocab.txt, or the run's]."),
    metrics: Optional[Path] = typer.Option(None, help="Held-out figures for the model card [default: metrics/eval.json "
                                                      "when present; with --run, the run's valid_* metrics]."),
) -> None:
    """A folder Hugging Face transformers loads (AutoTokenizer; AutoModel* with trust_remote_code=True)."""
    import json

    from minibert.export.hf import export_hf as write_folder

    with stage_errors("export hf"):
        with tempfile.TemporaryDirectory(prefix="minibert-export-") as tmp:
            bert, voc, meta = _load(checkpoint, run, vocab, Path(tmp))
        figures = None
        if metrics is not None or (run is None and layout.EVAL_METRICS.is_file()):
            path = metrics or layout.EVAL_METRICS
            if not path.is_file():
                raise MinibertError(f"{path}: not found; run the evaluate stage or leave out --metrics")
            figures = json.loads(path.read_text())
        elif run:
            from minibert.tracking.runs import run_metrics

            figures = {k.removeprefix("valid_"): v for k, v in run_metrics(run, Path(".")).items()
                       if k.startswith("valid_")} or None
        write_folder(bert, voc, meta, out, figures)
    print(f"export hf: wrote {out} (load with AutoModel.from_pretrained({str(out)!r}, trust_remote_code=True))")


# ---------------------------------------------------------------------------- runs


def _runs_frame(experiment: str, max_results: int):
    from minibert.tracking.runs import list_runs
    from minibert.tracking.store import tracking_uri

    uri = tracking_uri(Path("."))
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise MinibertError(f"no MLflow store at {uri}; run the pipeline here first (dvc repro) "
                            "or set MLFLOW_TRACKING_URI to your server")
    return list_runs(TrackingConfig(experiment=experiment), Path("."), max_results=max_results), uri


def _pick(df, ids: list[str], experiment: str):
    """Rows of `df` for each id (a unique prefix is enough), in the order given."""
    rows = []
    for run_id in ids:
        hits = df.index[df["run_id"].str.startswith(run_id)]
        if len(hits) != 1:
            why = "matches no run" if len(hits) == 0 else f"matches {len(hits)} runs; give more characters"
            raise MinibertError(f"run {run_id!r} {why} in experiment {experiment!r}; see `minibert runs`")
        rows.append(hits[0])
    return df.loc[rows]


@app.command()
def runs(
    ids: Optional[list[str]] = typer.Argument(None, help="Run ids (or unique prefixes) to --compare."),
    compare: bool = typer.Option(False, "--compare", help="Show the given runs side by side."),
    experiment: str = typer.Option("minibert", help="MLflow experiment (params.yaml tracking.experiment)."),
    max_runs: int = typer.Option(20, "--max", min=1, help="Most recent runs listed."),
) -> None:
    """List the MLflow runs of the experiment, newest first; `--compare ID ID` puts runs side by side."""
    import pandas as pd

    with stage_errors("runs"):
        if bool(ids) != compare:
            raise MinibertError("--compare takes run ids: minibert runs --compare ID ID [ID...]")
        df, uri = _runs_frame(experiment, 50_000 if compare else max_runs)
        if df.empty:
            raise MinibertError(f"no runs in experiment {experiment!r} at {uri}; run `dvc repro` or pass --experiment")
        if compare:
            picked = _pick(df, ids, experiment)
            keys = sorted(c for c in picked.columns if c.startswith("params.")) + \
                sorted(c for c in picked.columns if c.startswith("metrics."))
            picked.index = picked["run_id"] + "\n" + picked["run_name"].fillna("")  # header: id, name below
            side = picked[keys].T.dropna(how="all")  # (keys, runs)
            side.insert(0, "key", side.index)
            mark = [len({_fmt(v) for v in row[1:]}) > 1 for row in side.itertuples(index=False)]
            title = f"runs of {experiment!r} side by side ({uri}); * = differs"
            _console().print(_table(side.astype(object), title, mark))
            return
    shown = pd.DataFrame({
        "run_id": df["run_id"], "name": df["run_name"], "status": df["status"],
        "started (UTC)": df["start_time"].dt.strftime("%Y-%m-%d %H:%M:%S"),
        **{short: _numeric(df[col]) if col in df else None for col, short in RUN_COLUMNS.items()},
    })
    _console().print(_table(shown, f"{len(df)} newest runs of {experiment!r} ({uri})"))


@app.command()
def budget(
    minutes: float = typer.Option(..., "--minutes", help="Training time you can afford, in minutes."),
    preset: Optional[str] = typer.Option(None, help="Recipe to size [default: params.yaml's `preset`]."),
    params: Path = typer.Option(layout.PARAMS, help="params file"),
    timed: int = typer.Option(10, min=1, help="Steps timed after 3 warm-up steps (more if they take under --min-seconds)."),
    min_seconds: float = typer.Option(10.0, min=0, help="The timed steps span at least this many seconds."),
) -> None:
    """Measure this machine's step time for a recipe; print the steps N minutes buy and the -S flags."""
    import yaml

    from minibert.config import config_from_dict, load_config
    from minibert.data.pairs import load_pairs
    from minibert.data.vocab import Vocab
    from minibert.training.budget import flags, measure, steps_for

    with stage_errors("budget"):
        if minutes <= 0:
            raise MinibertError(f"--minutes {minutes:g}: give a positive number of minutes")
        load_config(params)  # one clear line for a bad params file
        raw = yaml.safe_load(params.read_text()) or {}
        name = preset or raw.get("preset", "book")
        cfg = config_from_dict({**raw, "preset": name}, str(params))
        if not layout.TRAIN_PAIRS.is_file() or not layout.VOCAB.is_file():
            raise MinibertError(f"{layout.TRAIN_PAIRS}: not found; run `dvc repro pairs` first (the budget "
                                "is measured on the real train pairs)")
        valid = load_pairs(layout.VALID_PAIRS)[0] if layout.VALID_PAIRS.is_file() else None
        cost = measure(cfg, load_pairs(layout.TRAIN_PAIRS)[0], valid, len(Vocab.load(layout.VOCAB)), timed=timed,
                       min_seconds=min_seconds)
        steps = steps_for(minutes, cost)
    evals = (f", {cost.eval_s:.3f} s per held-out evaluation every {cost.eval_every} steps"
             if cost.eval_every else "")
    print(f"budget: preset {name} on {cost.device} ({cost.precision}, {cost.threads} threads): "
          f"{cost.step_s:.4f} s a step (mean of {cost.timed_steps}){evals}")
    print(f"{minutes:g} minutes buy {steps} steps (start-up and the final evaluation not counted):")
    print(f"  {flags(name, steps, minutes)}")


@app.command()
def serve(
    model: Optional[str] = typer.Option(None, help="Registered model URI [default: models:/<tracking.registered_model>@champion]."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(5001, help="Port to listen on."),
    workers: int = typer.Option(1, help="Server worker processes."),
    params: Path = typer.Option(layout.PARAMS, help="params file (tracking.registered_model)."),
) -> None:
    """Serve the registry's text model (text in, vectors out) with `mlflow models serve`, in this environment."""
    from minibert.config import load_config
    from minibert.tracking.serving import serve as serve_model

    with stage_errors("serve"):
        uri = model or f"models:/{load_config(params).tracking.registered_model}@champion"
        code = serve_model(uri, host, port, workers, Path("."))
    raise typer.Exit(code)


@app.command("ui-url")
def ui_url(
    base: str = typer.Option("http://127.0.0.1:5000", help="Where the MLflow UI is served (`make ui`)."),
    experiment: str = typer.Option("minibert", help="MLflow experiment (params.yaml tracking.experiment)."),
    chart: bool = typer.Option(False, "--chart", help="The chart view (metric curves of all runs) instead of the table."),
) -> None:
    """Print the URL of the experiment's training-runs table, with the columns worth comparing."""
    from minibert.tracking.runs import ui_url as url

    with stage_errors("ui-url"):
        _runs_frame(experiment, 1)  # one clear line when there is no store or no run yet
        print(url(TrackingConfig(experiment=experiment), Path("."), base, chart=chart))


if __name__ == "__main__":
    app()
