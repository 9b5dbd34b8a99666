"""report.py: the one CI, the one metric getter and the one table renderer (plots.py, inference.py and
benchmark.py use them), and the README section regenerating the committed one from results/summary.json."""
import json
import math
from pathlib import Path

import pytest

import inference
import report
import reproduce
import results_page

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
    """results/results.md and the results page docs/results.md come back byte for byte from the committed
    summaries (but for the figure links, relative to the page's folder, here a temporary one)."""
    summary = json.loads((REPO / "results" / "summary.json").read_text())
    assert report.results_markdown(summary, list(reproduce.METHODS)) == (REPO / "results" / "results.md").read_text()
    page = tmp_path / "results.md"
    reproduce.readme(readme_path=str(page), results_dir=str(REPO / "results"), assets_dir=str(REPO / "assets"))
    committed = (REPO / "docs" / "results.md").read_text()
    regenerated = page.read_text()
    lines = lambda text: [ln for ln in text.splitlines() if not ln.startswith("![")]  # noqa: E731
    assert lines(regenerated) == lines(committed) and regenerated.count("\n![") == committed.count("\n![")
    # the README's headline table is the same summaries' (between its markers)
    readme = (REPO / "README.md").read_text()
    start, end = results_page.HEADLINE_MARKERS
    headline = results_page.headline_table(results_page.knob_regimes(summary, REPO / "results"))
    assert readme.split(start)[1].split(end)[0].strip() == (headline or "").strip()


def _predictions(folder, method, hits, rows_file=False):
    """Hand-made per-row results of one method: predictions.jsonl in a run folder, or (rows_file) the
    committed <records>/<method>/eval_clean.rows.json."""
    top1 = [7 if h else 9 for h in hits]
    if rows_file:
        path = folder / method / "eval_clean.rows.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"index": list(range(len(hits))), "target_id": [7] * len(hits), "top1_id": top1}))
        return
    path = folder / method / "eval_clean" / "predictions.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"index": i, "target_id": 7, "top1_id": t}) + "\n" for i, t in enumerate(top1)))


def _two_seeds(tmp_path):
    """Seed 0 read from a run folder, seed 1 from committed records only (a fresh clone)."""
    s0 = {"out": str(tmp_path / "runs"), "records": str(tmp_path / "records" / "seed0"), "seed": 0,
          "dataset": "lastfm"}
    s1 = {"out": str(tmp_path / "runs" / "seed1"), "records": str(tmp_path / "records" / "seed1"), "seed": 1,
          "dataset": "lastfm"}
    return s0, s1


def test_paired_differences_pool_seeds_and_rows(tmp_path):
    s0, s1 = _two_seeds(tmp_path)
    _predictions(Path(s0["out"]), "napo", [1, 1, 0, 0])
    _predictions(Path(s0["out"]), "sft_cont", [0, 1, 0, 0])      # seed 0: differences 1, 0, 0, 0
    _predictions(Path(s1["records"]), "napo", [1, 0, 1, 1], rows_file=True)
    _predictions(Path(s1["records"]), "sft_cont", [0, 0, 0, 1], rows_file=True)  # seed 1: 1, 0, 1, 0
    p = report.paired([s0, s1], "napo", "sft_cont")
    # pooled: 3 ones and 5 zeros; mean 3/8; sum of squared deviations 3·(5/8)² + 5·(3/8)² = 1.875
    se = math.sqrt(1.875 / 7 / 8)
    assert (p["n"], p["n_seeds"]) == (8, 2)
    assert p["diff"] == pytest.approx(0.375) and p["se"] == pytest.approx(se)
    assert p["halfwidth"] == pytest.approx(1.96 * se) and p["mde"] == pytest.approx((1.96 + 0.8416) * se)
    assert (p["a_mean"], p["b_mean"]) == (5 / 8, 2 / 8)
    assert p["per_seed"] == [{"seed": 0, "n": 4, "diff": 0.25}, {"seed": 1, "n": 4, "diff": 0.5}]
    assert report.verdict_of(p) == "supported"  # 0.375 > 1.96·0.1830 = 0.3586
    assert report.verdict_of(p, z=2.5) == "inconclusive"
    assert report.verdict_of({**p, "diff": -0.375}) == "refuted"
    assert report.paired([s0, s1], "napo", "dpo") is None  # no DPO run
    one = report.paired(s0, "napo", "sft_cont")  # one run's settings, as before seeds
    assert (one["n"], one["diff"], one["per_seed"]) == (4, 0.25, [{"seed": 0, "n": 4, "diff": 0.25}])
    summary = {"settings": {**s0, "seeds": [0, 1]}, "seed_runs": [s0, s1], "methods": {}}
    v = {c["id"]: c for c in report.claims(summary)}
    assert v["napo>sft_cont"]["verdict"] == "supported"
    assert "n=8 rows over 2 seeds" in v["napo>sft_cont"]["evidence"]
    assert "smallest detectable difference 0.5126" in v["napo>sft_cont"]["evidence"]
    assert "per seed +0.2500, +0.5000" in v["napo>sft_cont"]["evidence"]
    assert v["sdpo>sft_cont"]["verdict"] == v["dpo>sft_cont"]["verdict"] == v["napo>sft"]["verdict"] == "not run"


def _generated(folder, method, gen, rows_file=False):
    """Hand-made per-row free-generation results: gen[i] = 1 names the target (7), 0 another candidate (9),
    None no candidate (invalid); ranking always right."""
    ids = [None if g is None else (7 if g else 9) for g in gen]
    cols = {"index": list(range(len(gen))), "target_id": [7] * len(gen), "top1_id": [7] * len(gen),
            "generated_id": ids}
    if rows_file:
        path = folder / method / "eval_clean.rows.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cols))
        return
    path = folder / method / "eval_clean" / "predictions.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({k: cols[k][i] for k in cols}) + "\n" for i in range(len(gen))))


def test_generative_paired_differences(tmp_path):
    """gen HR@1 and ValidRatio compared row by row like ranking HR@1, pooled over seeds (run folder and
    committed records alike); a method evaluated by ranking only is 'not run' there."""
    s0, s1 = _two_seeds(tmp_path)
    _generated(Path(s0["out"]), "napo", [1, 1, 0, 1])
    _generated(Path(s0["out"]), "sdpo", [1, None, None, 0])
    _generated(Path(s1["records"]), "napo", [1, 0, 1, 1], rows_file=True)
    _generated(Path(s1["records"]), "sdpo", [None, 0, None, None], rows_file=True)
    _predictions(Path(s0["out"]), "sft", [1, 1, 1, 1])  # ranking only: no generated_id
    g = report.paired([s0, s1], "napo", "sdpo", what="gen_hit")
    v = report.paired([s0, s1], "napo", "sdpo", what="valid")
    assert (g["n"], g["a_mean"], g["b_mean"], g["diff"]) == (8, 6 / 8, 1 / 8, 5 / 8)
    assert (v["a_mean"], v["b_mean"], v["diff"]) == (1.0, 3 / 8, 5 / 8)
    assert [x["diff"] for x in v["per_seed"]] == [0.5, 0.75]
    assert report.paired([s0, s1], "napo", "sft", what="gen_hit") is None
    assert report.paired([s0, s1], "napo", "sft")["diff"] == 0.0  # ranking: both always right
    summary = {"settings": {**s0, "seeds": [0, 1]}, "seed_runs": [s0, s1],
               "methods": {"napo": {"label": "NAPO"}, "sdpo": {"label": "S-DPO"}}}
    table = report.generative_table(summary).splitlines()
    assert len(table) == 2 + 1 + 2  # header, separator, the one pair run by generation, blank, note
    assert table[2].startswith("| NAPO − S-DPO | 0.7500 − 0.1250 = +0.6250 ± ")
    assert table[2].count("| supported |") == 2
    assert "over 2 seed(s)" in table[-1] and "n = 8" in table[-1]
    assert report.generative_table({**summary, "seed_runs": [s0], "methods": {}}) is not None
    _generated(Path(s0["out"]), "napo", [0, 0, 0, 0])
    _generated(Path(s0["out"]), "sdpo", [1, 1, 1, 1])
    assert "refuted" in report.generative_table({**summary, "seed_runs": [s0]}).splitlines()[2]


def test_margin_claims_over_the_alpha_sweep(tmp_path):
    """(c): each alpha > 0 against the fixed margin, Bonferroni over the alphas run; (d): user vs batch margin
    pooled over the alphas both were run with."""
    s0 = {"out": str(tmp_path / "runs"), "seed": 0, "dataset": "lastfm"}
    out = Path(s0["out"])
    n = 100
    fixed = [0] * n
    better = [1] * 4 + [0] * (n - 4)  # +0.04: se = sqrt(0.04·0.96·100/99)/10 = 0.019695; 1.96·se = 0.0386 < 0.04
    _predictions(out, "napo_fixed_margin", fixed)
    _predictions(out, "napo", better)
    summary = {"settings": s0, "methods": {}}
    c = report.margin_helps_claim(summary)
    assert c["verdict"] == "supported" and "Bonferroni" not in c["evidence"]
    # two more alphas, no better than the fixed margin: three comparisons, each at 2.394·se = 0.0472 > 0.04
    _predictions(out, "napo_alpha1", fixed)
    _predictions(out, "napo_alpha3", fixed)
    assert report._bonferroni_z(3) == pytest.approx(2.3940, abs=1e-4)
    c = report.margin_helps_claim(summary)
    assert c["verdict"] == "inconclusive" and "over 3 alphas" in c["evidence"]
    # every alpha significantly worse than the fixed margin: refuted
    for m in ("napo_fixed_margin", "napo", "napo_alpha1", "napo_alpha3"):
        (out / m / "eval_clean" / "predictions.jsonl").unlink()
    _predictions(out, "napo_fixed_margin", [1] * 50 + [0] * 50)
    for m in ("napo", "napo_alpha1", "napo_alpha3"):
        _predictions(out, m, [0] * n)
    assert report.margin_helps_claim(summary)["verdict"] == "refuted"
    # (d) pooled over alpha 0.3 and 1: napo − batch = +1 on 10 rows, napo_alpha1 − batch_alpha1 = 0 everywhere
    _predictions(out, "napo_batch_margin", [0] * n)
    _predictions(out, "napo_batch_alpha1", [0] * n)
    (out / "napo" / "eval_clean" / "predictions.jsonl").unlink()
    _predictions(out, "napo", [1] * 10 + [0] * 90)
    d = report.personal_vs_batch_claim(summary)
    assert "n=200" in d["evidence"] and "difference +0.0500" in d["evidence"] and "by alpha" in d["evidence"]
    assert d["verdict"] == "supported"  # 0.05 vs 1.96·sqrt(0.05·0.95·200/199/200) = 0.0303


def test_variants_against_the_method_they_vary(tmp_path):
    """sdpo_* against S-DPO, the other variants against NAPO, row by row; a variant without a run is left
    out, and without any the table is None."""
    s0 = {"out": str(tmp_path / "runs"), "seed": 0, "dataset": "lastfm"}
    out = Path(s0["out"])
    n = 100
    _predictions(out, "napo", [1] * 50 + [0] * 50)
    _predictions(out, "sdpo", [0] * n)
    _predictions(out, "sdpo_k15", [1] * 10 + [0] * 90)  # +0.10 over S-DPO: beyond 1.96·0.0302
    _predictions(out, "napo_noshare", [1] * 50 + [0] * 50)  # NAPO's rows exactly: +0
    group = {"napo": "main", "sdpo": "main", "sdpo_k15": "k_sweep", "napo_noshare": "ablation",
             "napo_k7": "k_sweep"}
    summary = {"settings": s0, "methods": {m: {"label": m.upper(), "group": g} for m, g in group.items()}}
    rows = {line.split(" | ")[0]: line for line in report.variants_table(summary).splitlines()
            if line.startswith("| ") and "(`" in line}
    assert set(rows) == {"| NAPO_NOSHARE (`napo_noshare`)", "| SDPO_K15 (`sdpo_k15`)"}  # no napo_k7 run
    assert "| S-DPO | 1 | 0.1000 − 0.0000 = +0.1000 ± " in rows["| SDPO_K15 (`sdpo_k15`)"]
    assert rows["| SDPO_K15 (`sdpo_k15`)"].endswith("| supported |")
    assert "| NAPO | 1 | 0.5000 − 0.5000 = +0.0000 ± 0.0000 |" in rows["| NAPO_NOSHARE (`napo_noshare`)"]
    assert rows["| NAPO_NOSHARE (`napo_noshare`)"].endswith("| inconclusive |")
    assert report.variants_table({"settings": s0, "methods": {"napo": {"group": "main"}}}) is None


def test_full_run_time_counts_the_missing_seeds_at_their_method_mean():
    st = lambda *secs: {"stages": {f"s{i}": {"seconds": v} for i, v in enumerate(secs)}}  # noqa: E731
    summary = {"settings": {"seeds": [0, 1, 2]}, "protocols": ["clean"], "total_seconds": 100.0, "methods": {
        "sft": {"stages": {}, "seeds": {"0": st(10, 20), "1": st(30), "2": st(30)}},
        "napo_k7": {"stages": {}, "seeds": {"0": st(6, 4)}},           # 10 s at seed 0: 2 x 10 s to add
        "sft_sdpo": {"stages": {}, "seeds": {}}}}                      # run at no seed: not counted
    full = report.full_run_seconds(summary)
    assert full == {"measured": 100.0, "estimated": 20.0, "missing": ["napo_k7@1", "napo_k7@2"], "total": 120.0}
    assert "100s measured + about 20s for the 2 method × seed runs not made" in report.time_table(summary)
    assert "= about **2.0min** of stages" in report.time_table(summary)
    assert report.full_run_seconds({"settings": {"seed": 0}, "methods": {}}) is None


def test_mean_and_std_over_seeds_in_the_table():
    mean, std = report.mean_std([{"n_rows": 4, "ranking": {"hr@1": 0.25}, "protocol": "clean"},
                                 {"n_rows": 4, "ranking": {"hr@1": 0.75}, "protocol": "clean"}])
    assert mean == {"n_rows": 4, "ranking": {"hr@1": 0.5}, "protocol": "clean"} and isinstance(mean["n_rows"], int)
    assert std["ranking"]["hr@1"] == pytest.approx(math.sqrt(0.125)) and std["n_rows"] == 0.0
    summary = {"methods": {"napo": {"label": "NAPO", "trained_on": "clean", "stages": {},
                                    "eval": {"clean": mean}, "eval_std": {"clean": std}}}}
    assert "| NAPO (`napo`) | clean | 0.5000 ± 0.3536 |  |" in report.results_table(summary)


def test_series_are_read_at_their_common_seeds_and_one_seed_shows_no_spread():
    """A sweep whose K=3 point ran at seeds 0-2 and whose K=1 point at seed 0 only is compared at seed 0;
    the table gives the seed count and no "± 0" for a one-seed method."""
    ev = lambda v: {"clean": {"n_rows": 4, "ranking": {"hr@1": v}}}  # noqa: E731
    three = {"0": {"eval": ev(0.5)}, "1": {"eval": ev(0.75)}, "2": {"eval": ev(1.0)}}
    summary = {"settings": {"seed": 0, "seeds": [0, 1, 2]}, "methods": {
        "sdpo": {"label": "S-DPO", "trained_on": "clean", "stages": {}, "seeds": three,
                 "eval": {"clean": {"n_rows": 4, "n_seeds": 3, "ranking": {"hr@1": 0.75}}},
                 "eval_std": {"clean": {"n_rows": 0.0, "ranking": {"hr@1": 0.25}}}},
        "sdpo_k1": {"label": "S-DPO (K=1)", "trained_on": "clean", "stages": {}, "seeds": {"0": {"eval": ev(0.25)}},
                    "eval": {"clean": {"n_rows": 4, "n_seeds": 1, "ranking": {"hr@1": 0.25}}},
                    "eval_std": {"clean": {"n_rows": 0.0, "ranking": {"hr@1": 0.0}}}},
        "sdpo_k7": {"label": "S-DPO (K=7)", "trained_on": "clean", "stages": {}, "eval": {}}}}
    assert report.seed_values(summary, "sdpo") == {"0": 0.5, "1": 0.75, "2": 1.0}
    assert report.on_common_seeds(summary, ["sdpo_k1", "sdpo", "sdpo_k7"]) == ({"sdpo_k1": 0.25, "sdpo": 0.5},
                                                                               ["0"])
    assert report.on_common_seeds(summary, ["sdpo"]) == ({"sdpo": 0.75}, ["0", "1", "2"])
    table = report.results_table(summary)
    assert "| S-DPO (`sdpo`) | clean | 3 | 0.7500 ± 0.2500 |" in table
    assert "| S-DPO (K=1) (`sdpo_k1`) | clean | 1 | 0.2500 |" in table
    one = {"settings": {"seed": 4}, "methods": {"sdpo": {"eval": ev(0.5)}}}  # a one-seed summary
    assert report.seed_values(one, "sdpo") == {"4": 0.5} and report.seed_values(one, "napo") == {}


def test_main_methods_both_metrics_both_protocols():
    ev = lambda r, g, v: {"ranking": {"hr@1": r}, "generative": {"hr@1": g, "valid_ratio": v}}  # noqa: E731
    summary = {"protocols": ["clean", "sdpo"], "methods": {
        "sft_cont": {"label": "SFT continued", "group": "main", "eval": {"clean": ev(0.5, 0.25, 0.75),
                                                                         "sdpo": ev(0.625, 0.125, 1.0)}},
        "napo_k7": {"label": "NAPO (K=7)", "group": "k_sweep", "eval": {"clean": ev(0.5, 0.25, 0.75)}},
        "dpo": {"label": "DPO", "group": "main", "eval": {"clean": {"ranking": {"hr@1": 0.5}}}}}}
    lines = report.main_metrics_table(summary).splitlines()
    assert lines[0] == ("| method | rank HR@1 `clean` | gen HR@1 `clean` | ValidRatio `clean` | rank HR@1 `sdpo` | "
                        "gen HR@1 `sdpo` | ValidRatio `sdpo` |")
    assert lines[2:] == ["| SFT continued (`sft_cont`) | 0.5000 | 0.2500 | 0.7500 | 0.6250 | 0.1250 | 1.0000 |"]
    assert report.main_metrics_table({**summary, "methods": {"dpo": summary["methods"]["dpo"]}}) is None


def test_knob_table_compares_each_knob_with_sft_continued(tmp_path):
    """results_page.knob_table: each knob row against SFT continued row by row (pooled over seeds), with its metrics
    (mean over seeds) and candidate mass; the head-to-head pairs; None without knob rows."""
    s0, s1 = _two_seeds(tmp_path)
    _generated(Path(s0["out"]), "knob_sft_cont", [1, 0, 0, 1])
    _generated(Path(s0["out"]), "knob_start", [1, 0, 0, 1])           # the identity point: the same rows right
    _generated(Path(s0["out"]), "knob_beta0.1", [1, 1, None, 1])      # one more hit, one invalid answer
    _generated(Path(s1["records"]), "knob_sft_cont", [0, 0, 1, 1], rows_file=True)
    _generated(Path(s1["records"]), "knob_beta0.1", [1, 0, 1, 1], rows_file=True)
    ev = lambda hr, mass: {"clean": {"ranking": {"hr@1": hr}, "generative": {"hr@1": hr, "valid_ratio": 1.0},  # noqa: E731
                                     "candidate_mass": {"mean": mass}, "n_seeds": 2}}
    methods = {m: {"label": m, "group": "knobs", "eval": ev(hr, mass), "eval_std": {}, "stages": {}}
               for m, hr, mass in (("knob_sft_cont", 0.5, 0.99), ("knob_start", 0.5, 0.98), ("knob_beta0.1", 0.75, 0.9))}
    summary = {"settings": {**s0, "seeds": [0, 1], "base_model": "tiny", "sft_rows": 8, "pref_rows": 4,
                            "test_rows": 4, "quick": False}, "seed_runs": [s0, s1], "methods": methods,
               "total_seconds": 0, "primary_metric": "ranking.hr@1", "protocols": ["clean", "sdpo"]}
    eff = results_page.knob_effects(summary)
    assert set(eff) == {"knob_start", "knob_beta0.1"}
    assert eff["knob_start"]["hit"]["diff"] == 0 and eff["knob_start"]["hit"]["n"] == 4  # seed 1 did not run it
    # knob_beta0.1 − control, ranking (every row's top-1 is the target there, so 'hit' = 1 for all): 0 everywhere;
    # generative: seed 0 +1 (row 1; row 2's invalid answer misses like the control's), seed 1 +1 (row 0): +2/8
    assert eff["knob_beta0.1"]["gen_hit"]["diff"] == pytest.approx(2 / 8)
    assert eff["knob_beta0.1"]["valid"]["diff"] == pytest.approx(-1 / 8)
    table = results_page.knob_table(summary)
    assert "| knob_beta0.1 (`knob_beta0.1`) | 2 | 0.7500 |" in table and "| 0.9000 |" in table
    assert "Bonferroni correction for the 2 comparisons" in table
    assert "knob_start" in results_page.knob_pairs_table(summary)
    assert results_page.knob_table({**summary, "methods": {}}) is None
