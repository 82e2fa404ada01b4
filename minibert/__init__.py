"""minibert: small BERT pretraining (the book's model) with DVC, MLflow and torch.

Importing the package sets one process-wide default, before torch can load its OpenMP runtime:
OpenMP workers spin `GOMP_SPINCOUNT=10000` times (~0.1 ms on a 2-core Xeon) waiting for work, then sleep,
instead of libgomp's own 300,000 (~3 ms). On a machine shared with other work, a worker spinning at a
barrier while its peer is descheduled burned the time the peer needed: the book's steps ran at 0.36-0.39
of their fair share of the cores beside 1 or 3 busy processes with libgomp's spin, 0.66-0.69 with this
one, which costs ~4 % on a quiet machine (a shorter spin, 3000, gained little more beside busy processes
and cost 5-8 % quiet) and changes no number (docs/performance.md, "Sharing the machine").
A user's own `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT` is left as it is. It takes effect only when minibert
is imported before torch (the training stages and the CLI are; tests/test_contention.py reads what
libgomp parsed); otherwise only in the subprocesses this process starts.
"""
import os as _os

OPENMP_SPIN = "10000"
if not any(k in _os.environ for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")):
    _os.environ["GOMP_SPINCOUNT"] = OPENMP_SPIN
