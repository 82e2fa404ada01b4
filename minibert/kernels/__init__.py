"""Fused CPU kernels for the training step's memory-bound chains, one module per family:

- `dropout`: the mask drawn and applied in one pass (backward regenerates it from the seed);
- `addnorm`: post-LN AddNorm, LayerNorm(x + dropout(y)), forward and backward one pass each.

Each has a plain-torch reference computing the same values from the same random bits
(`reference_*`), which the tests compare against (forward and gradient) and which runs where
the C++ library (`build.py`, csrc/) cannot be built.
"""
