"""Fused CPU kernels for the training step's memory-bound chains, one module per family:

- `dropout`: the mask drawn and applied in one pass (backward regenerates it from the seed);
- `addnorm`: post-LN AddNorm, LayerNorm(x + dropout(y)), forward and backward one pass each;
- `attention`: the training attention's layout changes, key mask, softmax and weight dropout around
  its two batched GEMMs, one pass each;
- `softmax_xent`: the MLM loss's vocabulary softmax, loss and gradient in place.

Each has a plain-torch reference computing the same values from the same random bits
(`reference_*`), which the tests compare against (forward and gradient) and which runs where
the C++ library (`build.py`, csrc/) cannot be built.
"""
