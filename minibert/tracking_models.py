"""MLflow models of minibert: the text-in pyfunc, the Model Registry versions and the `champion` alias.

Split from tracking.py only because that file was over 400 lines; `minibert.tracking` re-exports
everything public here, mlflow is still imported through `tracking._mlflow()` only, and nothing else
in minibert touches mlflow.

The pyfunc is a model from code, not a pickle: MLflow stores `pyfunc_model.py` (which calls
`set_text_model()`), the minibert package as `code_paths`, and the weights, their metadata and the
vocabulary as plain artifacts (safetensors, JSON, text). It takes a DataFrame with a `text` column
(optional `pair`) and returns per row the tokens, segments and encodings (mode `encode`), or the
top-k words for each `<mask>` (mode `fill-mask`). Bad rows raise INVALID_PARAMETER_VALUE: HTTP 400.

Registry policy: the pretrain stage registers its text model as a new version of
`tracking.registered_model`. The evaluate stage tags that version with the sha256 of the held-out
pairs and its `valid_mlm_loss`, then points the alias `champion` at the version with the lowest
`valid_mlm_loss` among the versions evaluated on the same held-out pairs (ties: the older version).
"""
from __future__ import annotations

import logging
import math
import shutil
import tempfile
from pathlib import Path

from minibert.errors import MinibertError

log = logging.getLogger(__name__)

ENTRY_FILE = Path(__file__).with_name("pyfunc_model.py")
MODEL_NAME = "text_model"  # the logged model's name in its run
CHAMPION = "champion"
MODES = ("encode", "fill-mask")


# ---------------------------------------------------------------------------- the pyfunc


def _bad(message: str):
    from minibert.tracking import _mlflow

    return _mlflow().exceptions.MlflowException.invalid_parameter_value(message)


def _rows(model_input) -> list[tuple[str, str | None]]:
    """(text, pair) per row, or INVALID_PARAMETER_VALUE naming the first bad row."""
    import pandas as pd

    df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    if "text" not in df.columns:
        raise _bad(f"input needs a 'text' column (got {list(df.columns)}); send {{\"inputs\": [{{\"text\": \"a crane is flying\"}}]}}")
    pairs = df["pair"] if "pair" in df.columns else [None] * len(df)
    rows = []
    for i, (a, b) in enumerate(zip(df["text"], pairs)):
        if b is None or (isinstance(b, float) and math.isnan(b)):
            b = None
        for col, s in (("text", a), ("pair", b)):
            if col == "pair" and s is None:
                continue
            if not isinstance(s, str):
                raise _bad(f"row {i}: {col} must be a string, got {type(s).__name__} {s!r}")
            if not s.split():
                raise _bad(f"row {i}: {col} is empty; pass at least one word")
        rows.append((a, b))
    if not rows:
        raise _bad("no rows in the input")
    return rows


def make_text_model():
    """The pyfunc instance; its class is built here so importing this module does not import mlflow."""
    from minibert.tracking import _mlflow

    class MinibertText(_mlflow().pyfunc.PythonModel):
        """Text in; tokens with encodings, or top-k words for each `<mask>`, out."""

        def load_context(self, context):
            from minibert.model import load_pretrained
            from minibert.vocab import Vocab

            folder = Path(context.artifacts["model"])
            self.model, _ = load_pretrained(folder)
            self.vocab = Vocab.load(folder / "vocab.txt")

        def predict(self, context, model_input, params=None):
            import pandas as pd

            params = params or {}
            mode, top_k = params.get("mode", "encode"), int(params.get("top_k", 5))
            if mode not in MODES:
                raise _bad(f"params.mode = {mode!r}; use one of {', '.join(MODES)}")
            if not 1 <= top_k <= len(self.vocab):
                raise _bad(f"params.top_k = {top_k}; use an integer in [1, {len(self.vocab)}]")
            batch = encode_rows(self.model, self.vocab, _rows(model_input), mode, top_k)
            return pd.DataFrame(batch)

    return MinibertText()


def encode_rows(model, vocab, rows, mode: str, top_k: int) -> list[dict]:
    """One padded forward for all rows: per row tokens + segments + encoding (T, H), or masks' top-k."""
    import torch

    from minibert.config import ProbeSpec
    from minibert.probes import probe_words
    from minibert.vocab import MASK

    ids, segs = [], []
    for i, (a, b) in enumerate(rows):
        words, segments = probe_words(ProbeSpec("row", a, b))
        if len(words) > model.cfg.max_len:
            raise _bad(f"row {i}: {len(words)} tokens (with <cls>/<sep>) exceed max_len {model.cfg.max_len}; "
                       "shorten the text")
        ids.append(vocab.encode(words))
        segs.append(segments)
    lens = [len(x) for x in ids]
    T = max(lens)
    dev = next(model.parameters()).device  # the inputs go where the model is
    tokens = torch.tensor([x + [0] * (T - len(x)) for x in ids], device=dev)  # (B, T)
    segments = torch.tensor([s + [0] * (T - len(s)) for s in segs], device=dev)  # (B, T)
    valid = torch.tensor(lens, device=dev)  # (B,)
    out = [{"tokens": vocab.decode(x), "segments": s} for x, s in zip(ids, segs)]
    with torch.inference_mode():
        if mode == "encode":
            enc = model.encode(tokens, segments, valid).float().cpu().numpy()  # (B, T, H)
            for b, (r, n) in enumerate(zip(out, lens)):
                r["encoding"] = enc[b, :n].tolist()  # (T_b, H)
            return out
        where = [[t for t, w in enumerate(x) if w == MASK] for x in ids]
        for i, w in enumerate(where):
            if not w:
                raise _bad(f"row {i}: no <mask> in the text; fill-mask needs at least one")
        P = max(len(w) for w in where)
        pos = torch.tensor([w + [0] * (P - len(w)) for w in where], device=dev)  # (B, P)
        weights = torch.tensor([[1.0] * len(w) + [0.0] * (P - len(w)) for w in where], device=dev)  # (B, P)
        logits, _ = model(tokens, segments, valid, pos, weights)  # (M, V), masks row-major
        probs, top = torch.topk(torch.softmax(logits.double(), -1), top_k)  # (M, k)
        probs, top = probs.cpu(), top.cpu()
        m = 0
        for r, w in zip(out, where):
            r["masks"] = []
            for p in w:
                r["masks"].append({"position": p, "words": vocab.decode(top[m].tolist()),
                                   "scores": probs[m].tolist()})
                m += 1
    return out


def set_text_model() -> None:
    """Called by pyfunc_model.py when MLflow loads the model from code."""
    from minibert.tracking import _mlflow

    _mlflow().models.set_model(make_text_model())


# ---------------------------------------------------------------------------- logging + registry


def _signature():
    from minibert.tracking import _mlflow

    mlflow = _mlflow()
    from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema

    # `Any`, not `string`: MLflow would turn {"text": 5} into "5" before predict sees it; the rows
    # are checked in predict instead, so a non-string gets a 400 naming the row.
    inputs = Schema([ColSpec(AnyType(), "text"), ColSpec(AnyType(), "pair", required=False)])
    params = ParamSchema([ParamSpec("mode", "string", "encode"), ParamSpec("top_k", "long", 5)])
    return mlflow.models.ModelSignature(inputs=inputs, params=params)


def log_text_model(tracker, model_dir: Path, vocab_path: Path) -> str | None:
    """Log the text pyfunc into the tracker's run; its model URI, or None (tracking off or it failed)."""
    if getattr(tracker, "uri", None) is None or tracker.run_id is None:
        return None
    from minibert.tracking import _mlflow, _one_line, fluent_uris

    mlflow = _mlflow()
    import mlflow.pyfunc  # noqa: F811 - the submodule
    import torch

    reqs = [f"torch=={torch.__version__.split('+')[0]}", "numpy", "pandas", "safetensors", "pyyaml"]
    try:
        with tempfile.TemporaryDirectory(prefix="minibert-pyfunc-") as tmp:
            staged = Path(tmp) / "model"
            staged.mkdir()
            for f in (Path(model_dir) / "bert.safetensors", Path(model_dir) / "bert.json", Path(vocab_path)):
                shutil.copyfile(f, staged / f.name)
            code = Path(tmp) / "minibert"  # the package the model runs with, without bytecode caches
            shutil.copytree(Path(__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            with fluent_uris(tracker.uri), mlflow.start_run(run_id=tracker.run_id):
                info = mlflow.pyfunc.log_model(
                    name=MODEL_NAME, python_model=str(ENTRY_FILE), artifacts={"model": str(staged)},
                    code_paths=[str(code)], signature=_signature(), pip_requirements=reqs)
            tracker._client.update_run(tracker.run_id, status="RUNNING")
        return info.model_uri
    except Exception as e:  # the weights are in DVC and the run's artifacts: this copy must not fail the stage
        log.warning("MLflow: could not log the text model to run %s: %s", tracker.run_id, _one_line(e)[:300])
        return None


def register_version(tracker, name: str, model_uri: str | None, tags: dict[str, str]) -> str | None:
    """Register `model_uri` as a new version of `name`; the version number, or None (off or failed)."""
    if not name or model_uri is None or tracker.run_id is None:
        return None
    from minibert.tracking import _mlflow, _one_line, fluent_uris

    mlflow = _mlflow()
    try:
        with fluent_uris(tracker.uri):
            mv = mlflow.register_model(model_uri, name, tags={**tags, "mlflow_run_id": tracker.run_id},
                                       await_registration_for=60)
        print(f"pretrain: registered {name} version {mv.version} ({model_uri})", flush=True)
        return str(mv.version)
    except Exception as e:
        log.warning("MLflow: could not register %s as %r: %s", model_uri, name, _one_line(e)[:300])
        return None


def set_champion(tracker, name: str, valid_sha256: str, valid_mlm_loss: float) -> str | None:
    """Tag this run's versions with the held-out set and loss, then move `champion` (policy above).

    Returns the champion's version, or None when registration is off or the run registered nothing."""
    if not name or tracker.run_id is None:
        return None
    from minibert.tracking import _mlflow, _one_line

    client = _mlflow().MlflowClient(tracker.uri, registry_uri=tracker.uri)
    try:
        versions = client.search_model_versions(f"name = '{name}'")
        mine = [v for v in versions if v.tags.get("mlflow_run_id") == tracker.run_id]
        for v in mine:
            client.set_model_version_tag(name, v.version, "valid_pairs_sha256", valid_sha256)
            client.set_model_version_tag(name, v.version, "valid_mlm_loss", repr(float(valid_mlm_loss)))
        if not mine:
            return None
        same_set = [v for v in client.search_model_versions(f"name = '{name}'")
                    if v.tags.get("valid_pairs_sha256") == valid_sha256 and "valid_mlm_loss" in v.tags]
        best = min(same_set, key=lambda v: (float(v.tags["valid_mlm_loss"]), int(v.version)))
        client.set_registered_model_alias(name, CHAMPION, best.version)
        return str(best.version)
    except Exception as e:
        log.warning("MLflow: could not update the %r alias of %r: %s", CHAMPION, name, _one_line(e)[:300])
        return None


def download_model(model_uri: str, dest: str | Path, root: Path) -> Path:
    """The folder (bert.safetensors, bert.json, vocab.txt) of a registered text model, e.g.
    `models:/minibert-encoder@champion`, copied under `dest`."""
    from minibert.tracking import _connect, _mlflow, _one_line, tracking_uri

    uri = tracking_uri(root)
    _connect(uri)  # an unreachable server fails here, in seconds, with one line
    mlflow = _mlflow()
    import mlflow.artifacts  # noqa: F811 - the submodule
    try:
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dest),
                                                        tracking_uri=uri, registry_uri=uri))
    except Exception as e:
        raise MinibertError(f"MLflow at {uri}: could not fetch {model_uri} ({_one_line(e)[:200]}); "
                            "check the name and alias (mlflow models, or the UI's Models tab)") from None
    folder = path / "artifacts" / "model"
    if not (folder / "bert.safetensors").is_file():
        raise MinibertError(f"{model_uri} is not a minibert text model (no artifacts/model/bert.safetensors); "
                            "pass a version the pretrain stage registered")
    return folder



def run_metrics(run_id: str, root: Path) -> dict[str, float]:
    """The latest value of every metric of run `run_id`."""
    from minibert.tracking import _connect, _one_line, tracking_uri

    uri = tracking_uri(root)
    try:
        return dict(_connect(uri).get_run(run_id).data.metrics)
    except MinibertError:
        raise
    except Exception as e:
        raise MinibertError(f"MLflow at {uri}: could not read run {run_id} ({_one_line(e)[:200]}); "
                            "check the id with `minibert runs`") from None
