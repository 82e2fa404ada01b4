"""The Model Registry: each pretrain's text model as a version, and the `champion` alias.

Policy: the publish stage registers pretrain's text model (minibert/tracking/serving.py) as a new version
of `tracking.registered_model`, tags that version with the sha256 of the held-out pairs evaluate scored
and their `valid_mlm_loss`, then points the alias `champion` at the version with the lowest
`valid_mlm_loss` among the versions evaluated on the same held-out pairs (ties: the older version).
"""
from __future__ import annotations

import logging
from pathlib import Path

from minibert.errors import MinibertError
from minibert.tracking.store import connect, fluent_uris, mlflow_module, one_line, store_client, tracking_uri

log = logging.getLogger(__name__)

CHAMPION = "champion"


def register_version(tracker, name: str, model_uri: str | None, tags: dict[str, str]) -> str | None:
    """Register `model_uri` as a new version of `name`; the version number, or None (off or failed)."""
    if not name or model_uri is None or tracker.run_id is None:
        return None
    mlflow = mlflow_module()
    try:
        with fluent_uris(tracker.uri):
            mv = mlflow.register_model(model_uri, name, tags={**tags, "mlflow_run_id": tracker.run_id},
                                       await_registration_for=60)
        print(f"publish: registered {name} version {mv.version} ({model_uri})", flush=True)
        return str(mv.version)
    except Exception as e:
        log.warning("MLflow: could not register %s as %r: %s", model_uri, name, one_line(e)[:300])
        return None


def set_champion(tracker, name: str, valid_sha256: str, valid_mlm_loss: float) -> str | None:
    """Tag this run's versions with the held-out set and loss, then move `champion` (policy above).

    Returns the champion's version, or None when registration is off or the run registered nothing."""
    if not name or tracker.run_id is None:
        return None
    client = store_client(tracker.uri, registry=True)
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
        log.warning("MLflow: could not update the %r alias of %r: %s", CHAMPION, name, one_line(e)[:300])
        return None


def download_model(model_uri: str, dest: str | Path, root: Path) -> Path:
    """The folder (bert.safetensors, bert.json, vocab.txt) of a registered text model, e.g.
    `models:/minibert-encoder@champion`, copied under `dest`."""
    uri = tracking_uri(root)
    connect(uri)  # an unreachable server fails here, in seconds, with one line
    mlflow = mlflow_module()
    import mlflow.artifacts  # noqa: F811 - the submodule
    try:
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dest),
                                                        tracking_uri=uri, registry_uri=uri))
    except Exception as e:
        raise MinibertError(f"MLflow at {uri}: could not fetch {model_uri} ({one_line(e)[:200]}); "
                            "check the name and alias (mlflow models, or the UI's Models tab)") from None
    folder = path / "artifacts" / "model"
    if not (folder / "bert.safetensors").is_file():
        raise MinibertError(f"{model_uri} is not a minibert text model (no artifacts/model/bert.safetensors); "
                            "pass a version the publish stage registered")
    return folder


def registered_version(model_uri: str, root: Path) -> str:
    """The version `models:/NAME@ALIAS` or `models:/NAME/VERSION` names in the project's store, or one
    line saying what is missing and how to make it (the publish stage registers and moves the alias)."""
    name, _, ref = model_uri.removeprefix("models:/").partition("@")
    version = None
    if not ref:
        name, _, version = name.partition("/")
    if not model_uri.startswith("models:/") or not name or not (ref or version):
        raise MinibertError(f"{model_uri!r} is not a registered model URI; use models:/NAME@ALIAS or "
                            "models:/NAME/VERSION, e.g. models:/minibert-encoder@champion")
    uri = tracking_uri(root)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise MinibertError(f"no MLflow store at {uri} (so no {model_uri}); run the pipeline (dvc repro) "
                            "in this folder first, or set MLFLOW_TRACKING_URI to the store that has it")
    connect(uri)  # an unreachable server fails here, in seconds, with one line
    client = store_client(uri, registry=True)
    try:
        mv = client.get_model_version_by_alias(name, ref) if ref else client.get_model_version(name, version)
    except Exception as e:
        raise MinibertError(f"MLflow at {uri}: no {model_uri} ({one_line(e)[:160]}); run the pipeline "
                            "(dvc repro) so publish registers a version and sets the champion") from None
    return str(mv.version)
