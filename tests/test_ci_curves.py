"""The CI report's held-out curves: base and head as one Mermaid chart, a table, GitHub's size limit;
the workflow posts the report on pull requests and says when it cannot."""
import subprocess

import yaml
from tiny_project import ROOT

from ci.curves import at_rev, chart, read_curve, report, thin

HEADER = "step,valid_mlm_loss,valid_mlm_accuracy,valid_nsp_loss,valid_nsp_accuracy\n"
BASE = HEADER + "5,6.5,0.01,0.7,0.5\n10,6.25,0.02,0.69,0.52\n13,6.0,0.03,0.68,0.55\n"
HEAD = HEADER + "5,6.4,0.01,0.7,0.5\n10,6.0,0.02,0.66,0.52\n13,5.5,0.03,0.61,0.55\n"


def test_one_chart_holds_both_curves_over_the_shared_steps():
    lines = chart(read_curve(BASE), read_curve(HEAD), "valid_mlm_loss", "held-out MLM loss")
    assert lines[0] == "```mermaid" and "xychart-beta" in lines
    assert '    x-axis "step" [5, 10, 13]' in lines
    assert [x for x in lines if x.startswith("    line")] == ["    line [6.5, 6.25, 6]", "    line [6.4, 6, 5.5]"]
    # y range: 5.5..6.5 padded by 5 % of the span
    assert '    y-axis "valid_mlm_loss" 5.45 --> 6.55' in lines
    assert "#9e9e9e, #1f77b4" in lines[1]  # base grey, head blue: the `line` order


def test_a_base_without_the_curve_gives_head_alone_and_says_so():
    text = report("origin/main", HEAD, None)
    assert "`origin/main` has no `plots/valid_curve.csv`" in text
    assert sum(x.startswith("    line") for x in text.splitlines()) == 2  # one line per panel: head's
    assert "No held-out curve" in report("origin/main", HEADER, BASE)


def test_the_table_lists_base_and_head_per_step_and_the_report_fits_a_comment():
    text = report("origin/main", HEAD, BASE, "https://github.com/o/r/actions/runs/7")
    assert "| 10 | 6.25 | 6 | 0.69 | 0.66 |" in text
    assert "[this run](https://github.com/o/r/actions/runs/7)" in text
    long = HEADER + "".join(f"{s},{7 - s / 1e4:.6f},0.1,0.6931,0.5\n" for s in range(1, 100_001, 10))
    big = report("origin/main", long, long)
    assert len(big) < 65_536 // 4  # GitHub rejects comments over 65,536 characters; room for the tables
    assert max(len(x.split(",")) for x in big.splitlines() if x.startswith("    line")) == 60


def test_thin_keeps_the_ends_and_spaces_evenly():
    assert thin(list(range(1, 8)), 60) == list(range(1, 8))
    got = thin(list(range(0, 1000)), 5)
    assert got == [0, 250, 500, 749, 999]


def test_at_rev_reads_the_committed_curve(tmp_path):
    def git(*a):
        subprocess.run(["git", "-C", str(tmp_path), *a], check=True, capture_output=True)
    git("init", "-q")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots/valid_curve.csv").write_text(BASE)
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base")
    (tmp_path / "plots/valid_curve.csv").write_text(HEAD)  # uncommitted: the run's own
    assert at_rev("HEAD", root=tmp_path) == BASE
    assert at_rev("HEAD", "plots/none.csv", root=tmp_path) is None


def test_workflow_posts_the_report_on_pull_requests_and_says_when_it_cannot():
    wf = yaml.safe_load((ROOT / ".github/workflows/pipeline.yml").read_text())
    assert wf["permissions"]["pull-requests"] == "write"
    job = wf["jobs"]["pipeline"]
    assert job["env"]["CI_REPORT"]
    step = next(s for s in job["steps"] if "gh pr comment" in s.get("run", ""))
    assert "pull_request" in step["if"] and "always()" in step["if"]
    assert '--body-file "$CI_REPORT"' in step["run"] and "Not posted" in step["run"] and "GITHUB_STEP_SUMMARY" in step["run"]


def test_curves_sampled_at_other_steps_are_compared_where_both_have_points():
    """Head evaluated more often (steps 5, 7, 10, 13, 15) than base (4, 5, 10, 13): the chart compares
    the steps both have, 5, 10 and 13, by hand, and keeps both lines (base is not dropped for lacking 7)."""
    base = HEADER + "4,6.75,0,0.7,0.5\n5,6.5,0,0.7,0.5\n10,6.25,0,0.69,0.5\n13,6.0,0,0.68,0.5\n"
    head = HEADER + "5,6.4,0,0.7,0.5\n7,6.3,0,0.7,0.5\n10,6.0,0,0.66,0.5\n13,5.5,0,0.61,0.5\n15,5.25,0,0.6,0.5\n"
    lines = chart(read_curve(base), read_curve(head), "valid_mlm_loss", "held-out MLM loss")
    assert '    x-axis "step" [5, 10, 13]' in lines
    assert [x for x in lines if x.startswith("    line")] == ["    line [6.5, 6.25, 6]", "    line [6.4, 6, 5.5]"]
    assert 'title "held-out MLM loss: base vs head"' in lines[3]
