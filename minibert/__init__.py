"""minibert: small BERT pretraining (the book's model) with DVC, MLflow and torch.

Importing the package sets one process-wide default, before torch can load its OpenMP runtime:
OpenMP workers spin `GOMP_SPINCOUNT=3000` times (~35 µs on a 2-core Xeon) waiting for work, then sleep,
instead of libgomp's own 300,000 (~3 ms). On a machine shared with other work, a worker spinning at a
barrier while its peer is descheduled burned the time the peer needed: the book's steps ran at 0.3-0.4
of their fair share of the cores beside 3-4 busy processes with libgomp's spin, 0.7-0.9 with this one,
which costs ~1 % on a quiet machine and changes no number (docs/performance.md, "Sharing the machine").
A user's own `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT` is left as it is. It takes effect only when minibert
is imported before torch (the training stages and the CLI are; tests/test_contention.py reads what
libgomp parsed); otherwise only in the subprocesses this process starts.
"""
import os as _os

OPENMP_SPIN = "3000"
if not any(k in _os.environ for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")):
    _os.environ["GOMP_SPINCOUNT"] = OPENMP_SPIN
