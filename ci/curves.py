"""The held-out curves of base and head as one picture in markdown, for the CI summary and PR comment.

GitHub's markdown drops `data:` image URIs and cannot show an artifact inline, but it draws Mermaid
charts in job summaries, pull-request comments and issues alike: so the picture is a Mermaid
`xychart-beta` (base grey, head blue) of `plots/valid_curve.csv` at both revisions, a small table
of the same points under it (what a reader without Mermaid sees), and a link to the run's uploaded
`dvc plots diff` (the full pictures). A few KB for any curve: far under a comment's 65,536 characters.

Standard library only, like ci/pipeline.py: it runs before the install step.
"""
from __future__ import annotations

import csv
import io
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CURVE = "plots/valid_curve.csv"
PANELS = (("valid_mlm_loss", "held-out MLM loss"), ("valid_nsp_loss", "held-out NSP loss"))
COLORS = "#9e9e9e, #1f77b4"  # base, head: the order of the `line` rows below
MAX_POINTS = 60  # a longer curve is thinned evenly (ends kept): the chart stays legible and small


def read_curve(text: str) -> dict[int, dict[str, float]]:
    """step -> {column: value} of a valid_curve.csv; {} for an empty or header-only file."""
    out = {}
    for row in csv.DictReader(io.StringIO(text)):
        try:
            out[int(row["step"])] = {k: float(v) for k, v in row.items() if k != "step" and v not in ("", None)}
        except (KeyError, ValueError):
            continue  # a malformed row (not this project's writer): left out rather than failing CI
    return out


def at_rev(rev: str, path: str = CURVE, root: Path = ROOT) -> str | None:
    """`path` as committed at `rev`; None when it is not there (a base before held-out curves existed)."""
    p = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, text=True)
    return p.stdout if p.returncode == 0 else None


def thin(steps: list[int], n: int = MAX_POINTS) -> list[int]:
    if len(steps) <= n:
        return steps
    return sorted({steps[round(i * (len(steps) - 1) / (n - 1))] for i in range(n)})


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.4g}"


def chart(base: dict, head: dict, key: str, title: str) -> list[str]:
    """One Mermaid xychart over the steps both curves share (head's steps when they share none)."""
    shared = sorted(set(base) & set(head))
    steps = thin(shared or sorted(head))
    series = [(name, [c[s].get(key) for s in steps]) for name, c in (("base", base), ("head", head))
              if all(s in c and key in c[s] for s in steps)]
    values = [v for _, vs in series for v in vs]
    if not steps or not values:
        return []
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.05 or 0.05
    lines = ["```mermaid", f'%%{{init: {{"themeVariables": {{"xyChart": {{"plotColorPalette": "{COLORS}"}}}}}}}}%%',
             "xychart-beta", f'    title "{title}: ' + " vs ".join(n for n, _ in series) + '"',
             f'    x-axis "step" [{", ".join(map(str, steps))}]',
             f'    y-axis "{key}" {lo - pad:.4g} --> {hi + pad:.4g}']
    lines += [f'    line [{", ".join(f"{v:.4g}" for v in vs)}]' for _, vs in series]
    return lines + ["```", ""]


def report(base_rev: str, head_text: str | None, base_text: str | None, plots_url: str | None = None) -> str:
    """The markdown section: charts, the table of points, where the full pictures are."""
    lines = [f"## held-out curves: `{base_rev}` (grey) vs this run (blue)", ""]
    head, base = read_curve(head_text or ""), read_curve(base_text or "")
    if not head:
        return "\n".join(lines + ["No held-out curve in this run (`train.eval_every: 0`?).", ""])
    if not base:
        lines += [f"`{base_rev}` has no `{CURVE}`: this run's curve alone.", ""]
    for key, title in PANELS:
        lines += chart(base, head, key, title)
    steps = thin(sorted(set(base) | set(head)), 12)
    lines += ["<details><summary>the points</summary>", "",
              "| step | " + " | ".join(f"{k} base | {k} head" for k, _ in PANELS) + " |",
              "|---|" + "---|---|" * len(PANELS)]
    for s in steps:
        cells = [_num(c.get(s, {}).get(k)) for k, _ in PANELS for c in (base, head)]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", "</details>", ""]
    if plots_url:
        lines += [f"Full pictures (`dvc plots diff`): the `minibert-plots` artifact of [this run]({plots_url}).", ""]
    return "\n".join(lines)


def curves_section(base_rev: str, root: Path = ROOT, plots_url: str | None = None) -> str:
    head = root / CURVE
    return report(base_rev, head.read_text() if head.is_file() else None, at_rev(base_rev, CURVE, root), plots_url)
