"""report.py: the one CI, the one metric getter and the one table renderer (plots.py, inference.py and
benchmark.py use them), and the README section regenerating the committed one from results/summary.json."""
import json
import math
from pathlib import Path

import pytest

import inference
import report
import reproduce

REPO = Path(__file__).resolve().parents[1]


def test_binomial_halfwidth():
    assert report.binomial_halfwidth(0.5, 100) == pytest.approx(1.96 * 0.05)
    assert report.binomial_halfwidth(0.64, 2495) == pytest.approx(0.01883, abs=1e-5)
    assert report.binomial_halfwidth(0.0, 50) == 0.0 and report.binomial_halfwidth(1.0, 50) == 0.0
    assert math.isnan(report.binomial_halfwidth(0.5, 0))  # no rows: no interval
    assert math.isnan(report.binomial_halfwidth(0.5, None))


def test_plots_share_the_getter_and_the_ci():
    import plots

    assert plots._metric is report.metric and plots.binomial_halfwidth is report.binomial_halfwidth
    summary = {"methods": {"napo": {"eval": {"clean": {"n_rows": 10, "ranking": {"hr@1": 0.3}}}}}}
    assert report.metric(summary, "napo", "clean", "ranking", "hr@1") == 0.3
    assert report.metric(summary, "napo", "sdpo", "ranking", "hr@1") is None
    assert report.metric(summary, "sft", "clean", "n_rows") is None
    assert report.metric(summary, "napo", "clean", "ranking", "hr@1", "deeper") is None


def test_markdown_table():
    assert report.markdown_table(["a", "b"], [["x", ""], [1, 2.5]]) == "| a | b |\n|---|---|\n| x |  |\n| 1 | 2.5 |"
    assert report.markdown_table(["a", "b", "c"], [], ["", "r", "c"]) == "| a | b | c |\n|---|---:|:---:|"
    assert report.cell(0.123456) == "0.1235" and report.cell(81.06, 1) == "81.1"
    assert report.cell(None) == "" and report.cell(2495) == "2495"


def test_inference_table_uses_the_renderer():
    res = {"protocol": "clean", "n_rows": 4, "ranking": {"hr@1": 0.25, "hr@5": 1.0}}
    lines = inference.metrics_table([("run1", res)]).splitlines()
    assert lines[0].startswith("| run | protocol | rows | rank HR@1 | HR@5 |")
    assert lines[1] == "|" + "---|" * (len(inference.TABLE_COLUMNS) + 1)
    assert lines[2].startswith("| run1 | clean | 4 | 0.2500 | 1.0000 |  |")


def test_committed_results_regenerate(tmp_path):
    """results/results.md and the README's results section come back byte for byte from summary.json."""
    summary = json.loads((REPO / "results" / "summary.json").read_text())
    assert report.results_markdown(summary, list(reproduce.METHODS)) == (REPO / "results" / "results.md").read_text()
    readme = tmp_path / "README.md"
    committed = (REPO / "README.md").read_text()
    readme.write_text(committed)
    reproduce.readme(readme_path=str(readme), results_dir=str(REPO / "results"), assets_dir=str(REPO / "assets"))
    regenerated = readme.read_text()
    # the same text, but for the figure links: relative to the README's folder, here a temporary one
    section = lambda text: [ln for ln in text.split(report.START)[1].split(report.END)[0].splitlines()  # noqa: E731
                            if not ln.startswith("![")]
    assert section(regenerated) == section(committed) and regenerated.count("\n![") == committed.count("\n![")
    assert regenerated.split(report.START)[0] == committed.split(report.START)[0]
    assert regenerated.split(report.END)[1] == committed.split(report.END)[1]
