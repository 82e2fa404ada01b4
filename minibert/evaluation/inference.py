"""Loading a pretrained model to use it: the one prologue of the evaluate and probe stages and
`minibert encode` (resolve the device, load the weights, check the vocabulary of what it will read)."""
from __future__ import annotations

from pathlib import Path

import torch

from minibert.device import resolve_device
from minibert.model.bert import BERT, check_vocab, load_pretrained


def load_for_inference(models: Path, vocabularies: dict[Path, str | None],
                       device: str = "auto", key: str = "device") -> tuple[BERT, dict, torch.device]:
    """(model in eval mode, its bert.json dict, the device it is on) from the folder `models`.

    `vocabularies` maps each file the caller will feed the model (a vocab.txt, or pairs encoded with
    one) to the vocabulary sha256 it was made with; any that is not the model's fails with one line
    naming the file. `device` is a setting (`eval.device`, `--device`: cpu, cuda, cuda:N or auto, which
    takes a GPU when one is visible); a bad one fails with one line naming `key`."""
    dev = resolve_device(device, key=key)
    model, meta = load_pretrained(models, dev)
    for source, sha in vocabularies.items():
        check_vocab(meta, sha, source)
    return model, meta, dev
