"""The controls printed beside every fine-tuning figure: what a model gets without pretraining.

- `majority`: always the most frequent training label.
- `BagOfWords`: multinomial logistic regression on the word frequencies of the same tokens the BERT
  sees (an `EmbeddingBag` of mean one-hot rows is exactly a linear map of the term-frequency vector),
  trained with the fine-tuning loop itself, so only the features differ.
The third control, the same architecture from random initialisation, is `build_model` with the seed.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from minibert.data.vocab import SPECIALS


def majority(train_labels: np.ndarray, n_test: int) -> np.ndarray:
    """The most frequent training label (the smallest id on a tie) for every test example."""
    return np.full(n_test, np.bincount(train_labels).argmax(), np.int64)


class BagOfWords(nn.Module):
    """logits = W · tf(tokens) + b, over the words of the input (specials and padding left out)."""

    def __init__(self, vocab_size: int, n_classes: int):
        super().__init__()
        self.weights = nn.EmbeddingBag(vocab_size, n_classes, mode="mean")
        nn.init.zeros_(self.weights.weight)  # the convex problem's usual start: no seed in the init
        self.bias = nn.Parameter(torch.zeros(n_classes))

    def forward(self, tokens: Tensor, segments: Tensor, valid_lens: Tensor) -> Tensor:
        words = tokens >= len(SPECIALS)  # (B, T): real words only
        words[:, 0] |= ~words.any(1)  # a row without known words keeps its <cls>: no bag is empty
        flat = tokens[words]  # (N,)
        offsets = nn.functional.pad(words.sum(1).cumsum(0)[:-1], (1, 0))  # (B,) start of each bag
        return self.weights(flat, offsets) + self.bias  # (B, C)

