"""The CI steps, one script for GitHub Actions, `make ci` and a laptop: `python3 -m ci.pipeline --help`.

install → test → pull (if a DVC remote is configured) → `dvc repro` → push (on push events) →
metrics and params diff against the base branch, and the held-out curves of base and head as one
picture (ci/curves.py), as markdown: the job summary, and with `--report FILE` the pull-request comment.

Standard library only: it runs before the install step has made `.venv`. Every failing step ends in
one line on stderr, `error: ci: <step>: <what>; <how to fix>`, and a non-zero exit; DVC's own output
of the step is printed above it, its tracebacks are not.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ci.curves import curves_section

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"
REMOTE = "ci"  # the name `DVC_REMOTE_URL` is added under (in .dvc/config.local, never committed)
PLUGINS = {"s3://": "dvc-s3", "gs://": "dvc-gs", "azure://": "dvc-azure", "ssh://": "dvc-ssh"}


class StepError(Exception):
    """A step failed: the message is the one line to print."""


def env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}


def run(step: str, cmd: list[str], hint: str, capture: bool = False, tee: bool = True) -> str:
    """Run `cmd`; raise StepError with its cause on failure. `capture`: return stdout instead of
    echoing it. `tee`: echo stderr live (progress of long steps); else hold it back, so that a
    failure shows only the one error line."""
    shown = " ".join([Path(cmd[0]).name, *cmd[1:]])
    gha = bool(os.environ.get("GITHUB_ACTIONS"))
    print(f"::group::{step}: {shown}" if gha else f"$ {shown}", flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), text=True, stdout=subprocess.PIPE if capture else None,
                            stderr=subprocess.PIPE)
    if capture:  # both pipes at once: reading one to its end could block on the other's full buffer
        stdout, err = proc.communicate()
        lines = err.splitlines(keepends=True)
    else:
        stdout, lines = "", []
        for line in proc.stderr:
            lines.append(line)
            if tee:
                sys.stderr.write(line)
        proc.wait()
    if gha:
        print("::endgroup::", flush=True)
    if proc.returncode != 0:
        raise StepError(f"{step}: `{shown}` failed: {cause([x for x in lines if x.strip()])}; {hint}")
    if not tee or capture:
        sys.stderr.writelines(lines)
    print(f"{step}: {time.monotonic() - t0:.1f} s", flush=True)
    return stdout


def cause(lines: list[str]) -> str:
    """The most telling line of a failed command's stderr: DVC's `ERROR:` line, else the last one."""
    for prefix in ("error:", "ERROR:"):  # a stage's own line first (`error: pretrain: ...`), then DVC's
        for line in lines:
            if line.startswith(prefix):
                return line.removeprefix("ERROR:").strip().removeprefix("unexpected error - ")
    return lines[-1].strip() if lines else "no message"


def dvc(*args: str) -> list[str]:
    exe = VENV_BIN / "dvc"
    return [str(exe) if exe.exists() else "dvc", *args]


# ---------------------------------------------------------------------------------------------- steps

def install() -> None:
    run("install", ["make", "install"], "see the pip output above")
    remote_url = os.environ.get("DVC_REMOTE_URL", "") or remote_urls()
    for scheme, plugin in PLUGINS.items():  # dvc-s3 comes with the dev extra; the others on demand
        if scheme in remote_url and plugin != "dvc-s3":
            run("install", [str(VENV_BIN / "pip"), "install", "-q", plugin], f"install {plugin} by hand")


def test() -> None:
    run("test", ["make", "test"], "fix the failing tests listed above")


def remote_urls() -> str:
    """The configured remotes, `name\\turl` per line ('' when none, or when dvc is not there yet)."""
    if not shutil.which(dvc()[0]) and not Path(dvc()[0]).exists():
        return ""
    proc = subprocess.run(dvc("remote", "list"), cwd=ROOT, env=env(), capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def configure_remote() -> bool:
    """Add `DVC_REMOTE_URL` (+ `DVC_REMOTE_ENDPOINT`) as the local default remote; True if any remote."""
    url, endpoint = os.environ.get("DVC_REMOTE_URL", ""), os.environ.get("DVC_REMOTE_ENDPOINT", "")
    if url:
        hint = "check DVC_REMOTE_URL"
        run("remote", dvc("remote", "add", "--local", "--force", "-d", REMOTE, url), hint)
        if endpoint:
            run("remote", dvc("remote", "modify", "--local", REMOTE, "endpointurl", endpoint), hint)
    return bool(remote_urls())


def remote_hint() -> str:
    remotes = ", ".join(" ".join(line.split()) for line in remote_urls().splitlines())
    where = os.environ.get("DVC_REMOTE_ENDPOINT") or "its endpointurl"
    return (f"check that the DVC remote ({remotes}) and {where} answer, and that AWS_ACCESS_KEY_ID/"
            f"AWS_SECRET_ACCESS_KEY (or the remote's own credentials) are set and valid")


def pull() -> None:
    # --allow-missing: a first run (or a new branch) finds some outputs not pushed yet, which is fine;
    # --run-cache: the entries of every stage run ever pushed (deps+params -> outputs), so that
    # `dvc repro --pull` restores those stages instead of recomputing them.
    run("pull", dvc("pull", "--allow-missing", "--run-cache"), remote_hint(), tee=False)


def repro(remote: bool) -> None:
    # --pull: a stage found in the (pulled) run cache gets its outputs from the remote; without it DVC
    # finds the entry but not the files, and runs the stage again.
    run("repro", dvc("repro", *(["--pull"] if remote else [])),
        "fix the failing stage named above; `make repro` reruns it locally")


def push() -> None:
    run("push", dvc("push", "--run-cache"), remote_hint(), tee=False)
    # The run-cache entries' `cache: false` outputs (metrics, plots), which `dvc push --run-cache`
    # leaves out; without them no other machine can restore a stage from the run cache (ci/runcache.py).
    python = VENV_BIN / "python"
    run("push", [str(python) if python.exists() else sys.executable, "-m", "ci.runcache"], remote_hint(),
        tee=False)


# -------------------------------------------------------------------------------------------- summary

def fmt(x) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return "—" if x is None else str(x)
    return str(x) if isinstance(x, int) else f"{x:.6g}"


def change(old, new) -> tuple[str, str]:
    """(absolute change, relative change) for numbers; ('changed', '') for other values."""
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (old, new))
    if not numeric:
        return ("" if old == new else "changed"), ""
    d = new - old
    rel = f"{d / abs(old) * 100:+.2f} %" if old else ""
    return (f"{d:+d}" if isinstance(d, int) else f"{d:+.6g}"), rel


def metrics_table(diff: dict) -> tuple[list[str], list[str]]:
    """Rows `| file | metric | old | new | change | % |`, split into (changed, unchanged)."""
    changed, same = [], []
    for path in sorted(diff):
        for key in sorted(diff[path]):
            old, new = diff[path][key].get("old"), diff[path][key].get("new")
            absolute, rel = change(old, new)
            row = f"| `{path}` | `{key}` | {fmt(old)} | {fmt(new)} | {absolute} | {rel} |"
            (changed if old != new else same).append(row)
    return changed, same


def params_table(diff: dict) -> list[str]:
    return [f"| `{path}` | `{key}` | {fmt(v.get('old'))} | {fmt(v.get('new'))} |"
            for path in sorted(diff) for key, v in sorted(diff[path].items())]


def diff_json(kind: str, base: str) -> dict:
    out = run(f"{kind} diff", dvc(kind, "diff", "--all", "--json", base), f"is `{base}` fetched "
              f"(actions/checkout with fetch-depth: 0)?", capture=True, tee=False)
    return json.loads(out) if out.strip() else {}


def summary(base: str) -> str:
    changed, same = metrics_table(diff_json("metrics", base))
    params = params_table({p: {k: v for k, v in d.items() if v.get("old") != v.get("new")}
                           for p, d in diff_json("params", base).items()})
    head = "| file | metric | old | new | change | % |\n|---|---|---|---|---|---|"
    lines = [f"## minibert: metrics against `{base}`", ""]
    lines += [head, *changed, ""] if changed else ["No metric changed.", ""]
    if same:
        lines += [f"<details><summary>{len(same)} unchanged metrics</summary>", "", head, *same, "",
                  "</details>", ""]
    lines += [f"## params against `{base}`", ""]
    lines += (["| file | param | old | new |", "|---|---|---|---|", *params, ""] if params
              else ["No param changed.", ""])
    lines.append(curves_section(base, ROOT, run_url()))
    return "\n".join(lines)


def run_url() -> str | None:
    """This GitHub Actions run's page (where its artifacts are), when running there."""
    parts = [os.environ.get(k) for k in ("GITHUB_SERVER_URL", "GITHUB_REPOSITORY", "GITHUB_RUN_ID")]
    return f"{parts[0]}/{parts[1]}/actions/runs/{parts[2]}" if all(parts) else None


def default_base() -> str:
    """Pull requests: their base branch. Pushes to the default branch: the previous commit. Else main."""
    if os.environ.get("GITHUB_BASE_REF"):
        return f"origin/{os.environ['GITHUB_BASE_REF']}"
    default = os.environ.get("CI_DEFAULT_BRANCH", "main")
    if os.environ.get("GITHUB_REF_NAME", "") == default:
        return "HEAD~1"
    return f"origin/{default}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m ci.pipeline", description=__doc__.split("\n\n")[0])
    flag = lambda name: os.environ.get(name, "") not in ("", "0", "false")  # noqa: E731
    p.add_argument("--skip-install", action="store_true", default=flag("CI_SKIP_INSTALL"),
                   help="skip `make install` (env CI_SKIP_INSTALL=1)")
    p.add_argument("--skip-test", action="store_true", default=flag("CI_SKIP_TEST"),
                   help="skip `make test` (env CI_SKIP_TEST=1)")
    p.add_argument("--push", action=argparse.BooleanOptionalAction,
                   default=os.environ.get("GITHUB_EVENT_NAME") == "push",
                   help="push outputs and run cache to the remote (default: on GitHub push events)")
    p.add_argument("--base", default=None, help="git ref to diff metrics/params against "
                   "(default: the PR's base branch, HEAD~1 on the default branch, else origin/main)")
    p.add_argument("--summary", type=Path, default=os.environ.get("GITHUB_STEP_SUMMARY") or None,
                   help="append the markdown summary here (default: $GITHUB_STEP_SUMMARY, else stdout)")
    p.add_argument("--report", type=Path, default=os.environ.get("CI_REPORT") or None,
                   help="also write the summary here, whole (env CI_REPORT): the pull-request comment's body")
    args = p.parse_args(argv)
    try:
        if not args.skip_install:
            install()
        if not args.skip_test:
            test()
        remote = configure_remote()
        if remote:
            pull()
        else:
            print("no DVC remote configured: every stage is computed here", flush=True)
        repro(remote)
        if args.push and remote:
            push()
        text = summary(args.base or default_base())
    except StepError as e:
        print(f"error: ci: {e}", file=sys.stderr)
        return 1
    if args.summary:
        with open(args.summary, "a", encoding="utf-8") as f:
            f.write(text + "\n")
    if args.report:
        args.report.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
