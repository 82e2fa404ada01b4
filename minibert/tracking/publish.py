"""Publishing a pretrained model in MLflow: the encoder, the text model as a registered version, the
`champion` alias.

The publish stage calls this after evaluate, on the weights pretrain wrote, in pretrain's MLflow run.
Pretraining imports none of it, so an edit to the serving code, the registry or the probe table
republishes the same weights and never retrains them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from minibert.model.bert import Encoder, load_pretrained
from minibert.tracking.registry import register_version, set_champion
from minibert.tracking.serving import log_text_model


def encoder_example(pairs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Two real pairs, trimmed to their longest: the input example of the logged encoder."""
    t = int(pairs["valid_lens"][:2].max())
    return {"tokens": pairs["token_ids"][:2, :t].astype("int64"), "segments": pairs["segments"][:2, :t].astype("int64"),
            "valid_lens": pairs["valid_lens"][:2].astype("int64")}


def publish_model(tracker, models: Path, vocab: Path, registered_model: str, example: dict[str, np.ndarray],
                  valid_sha256: str, valid_mlm_loss: float) -> tuple[str | None, str | None]:
    """Into `tracker`'s run (pretrain's): the encoder as `model` (torch.export), the text pyfunc registered
    as a new version of `registered_model` (tagged with the data the weights came from), then the
    `champion` alias moved by the registry's policy with this held-out score. -> (version, champion);
    None for each when tracking or registration is off, or MLflow refused (a warning says why)."""
    import torch

    model, meta = load_pretrained(models)
    tracker.log_model(Encoder(model).cpu(), example=example,
                      pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"])
    version = register_version(tracker, registered_model, log_text_model(tracker, models, vocab),
                               {"train_pairs_sha256": meta.get("train_pairs_sha256", ""),
                                "vocab_sha256": meta.get("vocab_sha256", "")})
    champion = set_champion(tracker, registered_model, valid_sha256, valid_mlm_loss)
    return version, champion
