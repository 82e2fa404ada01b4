"""The evaluation room: held-out MLM/NSP figures with their trivial baselines (heldout) and the probe table
of contextual similarities (probes)."""
