"""Push the files that the local run-cache entries name, `cache: false` outputs included.

`python -m ci.runcache [--remote NAME]`, after `dvc push --run-cache` (ci/pipeline.py does both).

Why: `dvc push --run-cache` (dvc 3.x) uploads the entries (a stage's command, deps and params -> its
output hashes) and the workspace's cached outputs, but not the objects of the `cache: false` outputs
an entry names (metrics/train.json, plots/...). Another machine's `dvc repro --pull` then finds the
entry, cannot fetch metrics/train.json's object, and runs the stage again. DVC already stores those
objects in the local cache when it saves an entry; this sends them, the way `dvc repro --pull`
fetches them (dvc/stage/cache.py, `restore`).
"""
from __future__ import annotations

import argparse
from pathlib import Path


def push_run_outputs(root: Path, remote: str | None = None) -> int:
    """Upload every object the local run-cache entries name; returns how many were missing remotely."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        cache = repo.stage_cache
        runs = Path(cache.cache_dir)
        sent = 0
        for value_file in sorted(runs.glob("*/*/*")) if runs.is_dir() else []:
            entry = cache._load_cache(value_file.parent.name, value_file.name)
            if not entry:
                continue
            stage = cache._create_stage(entry)  # every out as a cached one, as restore() sees them
            for objs in stage.get_used_objs().values():
                sent += len(repo.cloud.push(objs, remote=remote).transferred)
    return sent


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m ci.runcache", description=__doc__.split("\n\n")[0])
    p.add_argument("--remote", default=None, help="DVC remote name (default: the default remote)")
    args = p.parse_args()
    print(f"run cache: {push_run_outputs(Path.cwd(), args.remote)} output files pushed")
