"""The documentation's links: every relative link and #anchor in README.md, docs/*.md, bench/README.md
and bench/results/*.md resolves, and the README stays a front door (at most 250 lines).

Anchors follow GitHub's rule for heading ids: the heading's text (inline code and emphasis markers
dropped, link text kept), lower-cased, every character that is not a letter, digit, underscore,
hyphen or space removed, spaces turned into hyphens; a repeated id gets -1, -2, ... in order.
"""

import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"`[^`]*`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def doc_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "bench/README.md"]
    files += sorted((ROOT / "docs").glob("*.md")) + sorted((ROOT / "bench/results").glob("*.md"))
    return [f for f in files if f.exists()]


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield n, line


def slug(heading: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays, its target goes
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: Counter[str] = Counter()
    out = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        out.add(base if seen[base] == 0 else f"{base}-{seen[base]}")
        seen[base] += 1
    return out


def broken_links(path: Path) -> list[str]:
    """One line per link in `path` that does not resolve: 'file:line: target (why)'."""
    problems = []
    for n, line in prose_lines(path.read_text(encoding="utf-8")):
        for m in LINK.finditer(CODE_SPAN.sub("", line)):
            target = m.group(1)
            if SCHEME.match(target):
                continue
            where, _, anchor = target.partition("#")
            dest = (path.parent / where).resolve() if where else path
            rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            if not dest.exists():
                problems.append(f"{rel}:{n}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{rel}:{n}: {target} (no heading with that anchor in {dest.name})")
            elif anchor and dest.suffix != ".md":
                problems.append(f"{rel}:{n}: {target} (anchor into a file that is not markdown)")
    return problems


def test_slug_follows_githubs_rule():
    # Hand-worked from GitHub's rule (see the module docstring), not from the code's output.
    assert slug("Outputs (the contract other tools read)") == "outputs-the-contract-other-tools-read"
    assert slug("The CI steps: `make ci` (`python3 -m ci.pipeline`)") == "the-ci-steps-make-ci-python3--m-cipipeline"
    assert slug("DVC's run cache") == "dvcs-run-cache"
    assert slug("The `minibert` command") == "the-minibert-command"
    assert slug("code change → `make repro`") == "code-change--make-repro"
    assert slug("bench.train") == "benchtrain"
    assert slug("Über_cool **bold** [link](x.md)") == "über_cool-bold-link"


def test_repeated_headings_get_numbered_anchors(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A\n\n## Usage\n\n```\n## Usage\n```\n\n## Usage\n", encoding="utf-8")
    assert anchors(page) == {"a", "usage", "usage-1"}


def test_checker_reports_a_broken_file_and_a_broken_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Real section\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[ok](other.md#real-section) [ok too](#page) [web](https://example.org/x#y)\n"
        "[gone](missing.md) and [bad anchor](other.md#no-such-section) and [self](#nowhere)\n"
        "`[in code](missing-too.md)`\n\n```\n[fenced](missing-three.md)\n```\n",
        encoding="utf-8",
    )
    problems = broken_links(page)
    assert len(problems) == 3, problems
    assert any("missing.md (no such file)" in p for p in problems)
    assert any("other.md#no-such-section" in p for p in problems)
    assert any("#nowhere" in p for p in problems)


def test_every_relative_link_and_anchor_resolves():
    files = doc_files()
    assert ROOT / "README.md" in files and ROOT / "bench/README.md" in files
    assert any(f.parent == ROOT / "docs" for f in files)
    problems = [p for f in files for p in broken_links(f)]
    assert not problems, "broken documentation links:\n" + "\n".join(problems)


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move the detail to a page in docs/"
    )
