"""Reporting: from the numbers the runs wrote (a summary dict, as in results/summary.json) to statistics,
per-claim verdicts, markdown tables (results_page.py assembles them into docs/results.md) and the list of result
figures.

It runs nothing: reproduce.py plans and runs the stages and collects their outputs into the summary, then
calls these functions; plots.py draws the figures of FIGURES with the same metric getter (`metric`) and the
same confidence interval (`binomial_halfwidth`); inference.py and benchmark.py render their tables with
`markdown_table`.
"""
from __future__ import annotations

import json
import math

from cache import REPO_DIR  # noqa: E402
Z95 = 1.96
PRIMARY = ("ranking", "hr@1")  # the metric of the claims: ranking HR@1 (deterministic; every row is valid)
# Series of the sweeps (plots and claim (a)), in increasing order of the swept value.
SWEEPS = {
    "K": {"S-DPO": ["sdpo_k1", "sdpo", "sdpo_k7", "sdpo_k15"], "NAPO": ["napo_k1", "napo", "napo_k7", "napo_k15"]},
    "rho": {"NAPO": ["napo_rho05", "napo", "napo_rho10"]},
    # alpha = 0, 0.3, 1, 3; at alpha = 0 both margins are the fixed gamma0 (one run, `napo_fixed_margin`)
    "alpha": {"NAPO": ["napo_fixed_margin", "napo", "napo_alpha1", "napo_alpha3"],
              "NAPO, batch margin": ["napo_fixed_margin", "napo_batch_margin", "napo_batch_alpha1",
                                     "napo_batch_alpha3"]},
}
FIGURES = {  # file name -> (plots.py function, caption); plots.draw_results draws them, the results page links them
    "results_hr1_by_method.png": ("plot_hr1_by_method", "Ranking HR@1 per method under both candidate protocols"),
    "results_hr1_vs_negatives.png": ("plot_hr1_vs_negatives",
                                     "HR@1 against the number of (equivalent) negatives: S-DPO vs NAPO"),
    "results_popularity.png": ("plot_popularity", "Popularity percentile of the top-1 recommendation vs the targets"),
    "results_training_curves.png": ("plot_training_curves", "Preference training: loss, reward accuracy, margin"),
    "results_gamma.png": ("plot_gamma_spread", "The margin gamma per run: its range and its spread within a batch"),
    "results_knobs.png": ("plot_knobs", "The knob study: each knob's paired ranking HR@1 difference against SFT "
                                        "continued (95% CI)"),
}

# ==================================================================================================
# Getting numbers out of a summary


def get(d, *keys):
    """d[k1][k2]...; None where a key is missing."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def metric(summary, method, protocol, *path):
    """A metric of one method's evaluation under a protocol, e.g. metric(s, "napo", "clean", "ranking", "hr@1");
    None when that method, evaluation or metric is missing."""
    return get(summary["methods"].get(method, {}), "eval", protocol, *path)


def hr1(summary, m, protocol="clean"):
    return metric(summary, m, protocol, *PRIMARY)


def n_rows(summary, m, protocol="clean"):
    return metric(summary, m, protocol, "n_rows")


# ==================================================================================================
# Statistics


def binomial_halfwidth(p, n) -> float:
    """95% half-width of a hit rate p measured on n rows (normal approximation): 1.96·sqrt(p(1−p)/n); 0 at
    p = 0 or 1. With n = 0 there is no estimate, so no interval: NaN."""
    return Z95 * math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def sample_sd(values, single=0.0) -> float:
    """The sample standard deviation (n-1) of `values`; `single` for fewer than two."""
    values = list(values)
    if len(values) < 2:
        return single
    m = sum(values) / len(values)
    return math.sqrt(sum((x - m) ** 2 for x in values) / (len(values) - 1))


def mean_std(dicts: list[dict]) -> tuple[dict, dict]:
    """The mean and the sample standard deviation (n-1; 0 for one dict) of every number found at the same
    place in all of `dicts` (nested dicts are followed; other values are taken from the first)."""
    mean, std = {}, {}
    for k, v in dicts[0].items():
        vals = [d.get(k) for d in dicts]
        if isinstance(v, dict) and all(isinstance(x, dict) for x in vals):
            mean[k], std[k] = mean_std(vals)
        elif all(x == v for x in vals) and not isinstance(v, dict):  # the same everywhere (row counts): as is
            mean[k] = v
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                std[k] = 0.0
        elif all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals):
            mean[k] = sum(vals) / len(vals)
            std[k] = sample_sd(vals)
        else:
            mean[k] = v
    return mean, std


def seed_values(summary, m, protocol="clean", path=PRIMARY) -> dict:
    """{seed: value} of one method's metric (default ranking HR@1) at each seed that evaluated it (the
    per-seed entries of a summary over several seeds); a one-seed summary: {its seed: the value}; {} when
    not evaluated."""
    e = summary["methods"].get(m) or {}
    if "seeds" in e:
        vals = {str(s): get(x, "eval", protocol, *path) for s, x in e["seeds"].items()}
    else:
        vals = {str(get(summary, "settings", "seed")): metric(summary, m, protocol, *path)}
    return {s: v for s, v in vals.items() if v is not None}


def on_common_seeds(summary, methods, protocol="clean", path=PRIMARY) -> tuple[dict, list]:
    """({method: mean of the metric over the seeds every one of `methods` was evaluated at}, those seeds), so
    a series (a sweep) is compared seed for seed: a method run at seeds 0-2 and one at seed 0 only are both
    read at seed 0. Methods not evaluated at all are left out; ({}, []) when the rest share no seed."""
    vals = {m: seed_values(summary, m, protocol, path) for m in methods}
    vals = {m: v for m, v in vals.items() if v}
    seeds = sorted(set.intersection(*(set(v) for v in vals.values())), key=str) if vals else []
    if not seeds:
        return {}, []
    return {m: sum(v[s] for s in seeds) / len(seeds) for m, v in vals.items()}, seeds


def runs_of(summary) -> list[dict]:
    """The settings of each seed's chain (reproduce.seed_run); a summary from before seeds: its one run."""
    return summary.get("seed_runs") or [summary["settings"]]


def _predictions(settings, m, protocol="clean"):
    """The per-row predictions {index: row} of a method in one seed's run, as reproduce.plan lays out a run
    folder: <out>/<method>/eval_<protocol>/predictions.jsonl or, where that is absent (a fresh clone), the
    committed per-row results <records>/<method>/eval_<protocol>.rows.json (records.save_record)."""
    path = REPO_DIR / settings["out"] / m / f"eval_{protocol}" / "predictions.jsonl"
    if path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return {r["index"]: r for r in rows}
    if not settings.get("records"):
        return None
    path = REPO_DIR / settings["records"] / m / f"eval_{protocol}.rows.json"
    if not path.exists():
        return None
    cols = json.loads(path.read_text())
    return {i: {k: cols[k][j] for k in cols} for j, i in enumerate(cols["index"])}


_PCT_CACHE = {}


def _percentiles(dataset):
    if dataset not in _PCT_CACHE:
        import data_interface as di
        import metrics as M

        _PCT_CACHE[dataset] = M.popularity_percentiles(di.target_popularity(di.load_catalog(dataset)))
    return _PCT_CACHE[dataset]


Z_POWER80 = 0.8416  # the standard normal quantile at 0.8: 80% power


def paired(runs, a, b, what="hit", protocol="clean") -> dict | None:
    """a − b row by row: paired(runs, "napo", "sdpo"); `runs`: one run's settings or a list of them (one per
    seed). See paired_pool."""
    return paired_pool(runs, [(a, b)], what, protocol)


# what paired_pool compares row by row: {what: (the per-row key it needs, its value from a row and the
# popularity percentiles)}
PAIRED_VALUES = {
    "hit": ("top1_id", lambda r, pct: float(r["top1_id"] == r["target_id"])),
    "pop": ("top1_id", lambda r, pct: pct[r["top1_id"]]),
    "gen_hit": ("generated_id", lambda r, pct: float(r["generated_id"] == r["target_id"])),
    "valid": ("generated_id", lambda r, pct: float(r["generated_id"] is not None)),
}


def paired_pool(runs, pairs, what="hit", protocol="clean") -> dict | None:
    """The paired differences a − b, pooled over every seed's run (`runs`: one settings dict or a list, as
    runs_of gives), every pair of methods in `pairs` [(a, b), ...] and every row both were evaluated on:
    what = one of PAIRED_VALUES: 'hit' (ranking HR@1: 1 if the top-1 item is the target, else 0), 'pop'
    (popularity percentile of the top-1 item), 'gen_hit' (generative HR@1: 1 if free generation named the
    target, else 0) or 'valid' (ValidRatio: 1 if it named exactly one candidate); a method evaluated without
    free generation counts as not run for the last two. Returns the mean difference `diff`, its standard
    error se = sd / sqrt(n) over the n pooled differences (sd with n-1), the 95% half-width 1.96·se, and the
    minimum detectable difference mde = (1.96 + 0.84)·se ≈ 2.8·se: the true difference this run detects
    (two-sided, alpha 0.05) with 80% power. The pooled differences are treated as independent; the same test
    row under another seed is not quite (the rows' difficulty is shared), so `per_seed` (each seed's mean
    difference) shows the spread between seeds as well. None when no pair was evaluated on a common row."""
    runs = [runs] if isinstance(runs, dict) else list(runs)
    d, a_vals, b_vals, per_seed = [], [], [], []
    pct = None
    for settings in runs:
        seed_d = []
        for a, b in pairs:
            pa, pb = _predictions(settings, a, protocol), _predictions(settings, b, protocol)
            if not pa or not pb or any(PAIRED_VALUES[what][0] not in next(iter(p.values())) for p in (pa, pb)):
                continue
            if what == "pop" and pct is None:
                pct = _percentiles(settings["dataset"])

            def val(r):
                return PAIRED_VALUES[what][1](r, pct)

            for i in sorted(set(pa) & set(pb)):
                va, vb = val(pa[i]), val(pb[i])
                a_vals.append(va)
                b_vals.append(vb)
                seed_d.append(va - vb)
        if seed_d:
            per_seed.append({"seed": settings.get("seed"), "n": len(seed_d), "diff": sum(seed_d) / len(seed_d)})
            d += seed_d
    if not d:
        return None
    n = len(d)
    mean = sum(d) / n
    sd = sample_sd(d, single=float("inf"))
    se = sd / math.sqrt(n)
    return {"a": pairs[0][0] if len(pairs) == 1 else [p[0] for p in pairs],
            "b": pairs[0][1] if len(pairs) == 1 else [p[1] for p in pairs], "what": what, "n": n,
            "n_seeds": len(per_seed), "diff": mean, "se": se, "halfwidth": Z95 * se,
            "mde": (Z95 + Z_POWER80) * se, "a_mean": sum(a_vals) / n, "b_mean": sum(b_vals) / n,
            "per_seed": per_seed}


# ==================================================================================================
# Verdicts


def verdict_of(p: dict | None, higher_is_better=True, z=Z95) -> str:
    """'supported' when the difference is beyond its CI (z·se; default 95%) in the claimed direction,
    'refuted' when beyond it in the other, else 'inconclusive'; 'not run' without numbers."""
    if p is None:
        return "not run"
    d = p["diff"] if higher_is_better else -p["diff"]
    hw = p["halfwidth"] if z == Z95 else z * p["se"]
    if d > hw:
        return "supported"
    if d < -hw:
        return "refuted"
    return "inconclusive"


def _fmt_pair(p, unit="HR@1", scale=1.0, digits=4):
    if p is None:
        return "not run"
    f = f"{{:.{digits}f}}"
    if p["halfwidth"] == 0 and p["diff"] == 0:
        return f"{unit} {f.format(p['a_mean'] * scale)} for both, row by row identical on all {p['n']} rows"
    seeds = p.get("n_seeds", 1)
    text = (f"{unit} {f.format(p['a_mean'] * scale)} vs {f.format(p['b_mean'] * scale)}: difference "
            f"{_signed(p['diff'] * scale, f)} (95% paired CI ±{f.format(p['halfwidth'] * scale)}, n={p['n']}"
            + (f" rows over {seeds} seeds" if seeds > 1 else "") + ")")
    if "mde" in p:
        text += f", smallest detectable difference {f.format(p['mde'] * scale)}"
    if seeds > 1:
        text += "; per seed " + ", ".join(_signed(x["diff"] * scale, f) for x in p["per_seed"])
    return text


def _signed(v, f):
    return ("+" if v >= 0 else "−") + f.format(abs(v))


def _bonferroni_z(k: int) -> float:
    """The two-sided normal quantile for k comparisons at a family-wise 0.05 (Bonferroni: 0.05 / k each)."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(1 - 0.05 / (2 * k)) if k > 1 else Z95


# the main comparisons (a, b): the first claims on ranking, and the free-generation table on the papers' metrics
MAIN_PAIRS = [("napo", "sdpo"), ("napo", "sft_cont"), ("sdpo", "sft_cont"), ("dpo", "sft_cont"),
              ("napo", "sft"), ("sdpo", "sft"), ("dpo", "sft")]
SHORT_NAMES = {"napo": "NAPO", "sdpo": "S-DPO", "dpo": "DPO", "sft_cont": "SFT continued", "sft": "SFT"}
MAIN_CLAIMS = {"sdpo": "{a} is more accurate than S-DPO",  # the claim a > b, by b
               "sft_cont": "{a} beats SFT continued on the same rows and steps",
               "sft": "{a} improves on the SFT adapter it starts from"}


def claims(summary) -> list[dict]:
    """Per-claim verdicts from the numbers (clean protocol, ranking HR@1). A difference counts when it is
    larger than its 95% paired confidence half-width, from the per-row differences pooled over the seeds'
    runs and the test rows (paired_pool): supported, refuted (significantly the other way) or inconclusive."""
    s, methods = runs_of(summary), summary["methods"]
    out = []

    def claim(cid, text, verdict, evidence):
        out.append({"id": cid, "claim": text, "verdict": verdict, "evidence": evidence})

    def label(m):
        return get(methods, m, "label") or m

    # the headline, then preference optimisation vs more SFT on the same rows and steps (sft_cont) and vs the
    # SFT adapter it starts from
    for a, b in MAIN_PAIRS:
        p = paired(s, a, b)
        claim(f"{a}>{b}", MAIN_CLAIMS[b].format(a=SHORT_NAMES[a]), verdict_of(p),
              f"{SHORT_NAMES[a]} vs {SHORT_NAMES[b]}, {_fmt_pair(p)}")

    # (a) more negatives help: the S-DPO K sweep
    at, seeds = on_common_seeds(summary, SWEEPS["K"]["S-DPO"])
    series = [(methods[m]["num_negatives"], m) for m in SWEEPS["K"]["S-DPO"] if m in at]
    if len(series) >= 2:
        vals = [(k, at[m]) for k, m in series]
        p = paired(s, series[-1][1], series[0][1])  # every seed both ends ran at
        mono = all(b[1] >= a[1] for a, b in zip(vals, vals[1:]))
        ev = (f"S-DPO HR@1 by K ({_at_seeds(seeds)}): " + ", ".join(f"K={k}: {v:.4f}" for k, v in vals) +
              f" ({'non-decreasing' if mono else 'not monotone'}); K={series[-1][0]} vs K={series[0][0]}, "
              + _fmt_pair(p))
        nat, nseeds = on_common_seeds(summary, SWEEPS["K"]["NAPO"])
        nap = [(methods[m].get("equivalent_negatives"), nat[m]) for m in SWEEPS["K"]["NAPO"] if m in nat]
        if nap:
            ev += f"; NAPO by equivalent negatives ({_at_seeds(nseeds)}): " + ", ".join(
                f"{e:.1f}: {v:.4f}" if e is not None else f"?: {v:.4f}" for e, v in nap)
        claim("a", "(a) more negatives help (S-DPO, K = 1 → 15)", verdict_of(p), ev)
    else:
        claim("a", "(a) more negatives help (S-DPO, K = 1 → 15)", "not run", "needs at least two S-DPO K runs")

    # (b) sharing adds negatives at almost no cost
    p = paired(s, "napo", "napo_noshare")
    t_share = get(methods, "napo", "step_seconds")
    t_none = get(methods, "napo_noshare", "step_seconds")
    v = verdict_of(p)
    ev = "NAPO vs NAPO without sharing, " + _fmt_pair(p)
    eq_s, eq_n = get(methods, "napo", "equivalent_negatives"), get(methods, "napo_noshare", "equivalent_negatives")
    if eq_s is not None and eq_n is not None:
        ev += f"; equivalent negatives {eq_s:.1f} vs {eq_n:.1f}"
    if t_share and t_none:
        overhead = t_share / t_none - 1
        ev += (f"; time per step {t_share:.3f}s vs {t_none:.3f}s ({overhead:+.0%}; wall time on a shared CPU, "
               f"noisy)")
        if v == "supported" and overhead > 0.10:
            v = "partly supported (more accurate, but the step costs more than 10% extra)"
    claim("b", "(b) sharing adds negatives at almost no cost", v, ev)

    out.append(margin_helps_claim(summary))
    out.append(personal_vs_batch_claim(summary))

    # (e) less popularity bias: lower popularity percentile of the top-1 item than S-DPO
    p = paired(s, "napo", "sdpo", what="pop")
    ev = "NAPO vs S-DPO, " + _fmt_pair(p, unit="top-1 popularity percentile", digits=1)
    tgt = get(methods, "napo", "eval", "clean", "popularity", "target_popularity_pct")
    if tgt is not None:
        ev += f"; the targets' mean percentile is {tgt:.1f}"
    claim("e", "(e) NAPO recommends less popular items than S-DPO", verdict_of(p, higher_is_better=False), ev)
    return out


def _at_seeds(seeds) -> str:
    return ("seed " if len(seeds) == 1 else "mean over seeds ") + ", ".join(seeds)


def _alpha(summary, m) -> str:
    a = get(summary["methods"], m, "flags", "alpha")
    return f"{a:g}" if a is not None else f"({m})"


def margin_helps_claim(summary) -> dict:
    """(c) Does the dynamic (personalised) margin help at any alpha? Each alpha > 0 of SWEEPS["alpha"]["NAPO"]
    against alpha = 0 (the fixed margin gamma0), row by row. With k alphas the CIs are Bonferroni-widened
    (0.05 / k each): 'supported' when one alpha is significantly better, 'refuted' when every alpha is
    significantly worse, else 'inconclusive'."""
    s = runs_of(summary)
    fixed, *dynamic = SWEEPS["alpha"]["NAPO"]
    tests = [(m, paired(s, m, fixed)) for m in dynamic]
    tests = [(m, p) for m, p in tests if p is not None]
    text = "(c) the dynamic margin beats the fixed one (alpha = 0) at some alpha"
    if not tests:
        return {"id": "c", "claim": text, "verdict": "not run",
                "evidence": f"needs `{fixed}` and at least one of {', '.join(f'`{m}`' for m in dynamic)}"}
    z = _bonferroni_z(len(tests))
    verdicts = [verdict_of(p, z=z) for _, p in tests]
    verdict = ("supported" if "supported" in verdicts else
               "refuted" if all(v == "refuted" for v in verdicts) else "inconclusive")
    ev = "; ".join(f"alpha={_alpha(summary, m)} vs 0: {_fmt_pair(p)} → {v}" for (m, p), v in zip(tests, verdicts))
    if len(tests) > 1:
        ev += f" (each verdict at the Bonferroni-widened CI ±{z:.2f}·se over {len(tests)} alphas)"
    return {"id": "c", "claim": text, "verdict": verdict, "evidence": ev}


def personal_vs_batch_claim(summary) -> dict:
    """(d) Does the personalised margin beat one margin per batch? At each alpha > 0 both were run with, the
    user margin against the batch margin, row by row; the verdict comes from the differences pooled over
    those alphas, the seeds and the rows (the per-alpha differences are listed)."""
    s = runs_of(summary)
    user, batch = SWEEPS["alpha"]["NAPO"][1:], SWEEPS["alpha"]["NAPO, batch margin"][1:]
    pairs = [(u, b) for u, b in zip(user, batch) if paired(s, u, b) is not None]
    text = "(d) a personalised margin beats one margin per batch"
    if not pairs:
        return {"id": "d", "claim": text, "verdict": "not run",
                "evidence": "needs a user-margin and a batch-margin run at the same alpha"}
    p = paired_pool(s, pairs)
    ev = f"user vs batch margin, pooled over alpha = {', '.join(f'{_alpha(summary, u)}' for u, _ in pairs)}: " \
         + _fmt_pair(p)
    if len(pairs) > 1:
        ev += "; by alpha: " + "; ".join(f"alpha={_alpha(summary, u)}: {_fmt_pair(paired(s, u, b))}"
                                         for u, b in pairs)
    return {"id": "d", "claim": text, "verdict": verdict_of(p), "evidence": ev}


def leak(summary) -> dict:
    """The numbers that show the sdpo protocol leaks the answer."""
    out = {}
    for m in ("heuristic", "sft", "sft_sdpo", "sasrec", "most_popular"):
        vals = {p: hr1(summary, m, p) for p in summary["protocols"]}
        if any(v is not None for v in vals.values()):
            out[m] = vals
    return out


# ==================================================================================================
# Markdown


def markdown_table(header, rows, align=None) -> str:
    """The one markdown table renderer: a header row, rows of cells (str() of each) and, per column, an
    alignment '' (default), 'r' or 'c'. Cells are written as `| a | b |`, an empty cell as `|  |`."""
    seps = [{"r": "---:", "c": ":---:"}.get(a, "---") for a in (align or [""] * len(header))]
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join(seps) + "|"]
    lines += ["| " + " | ".join(map(str, cells)) + " |" for cells in rows]
    return "\n".join(lines)


def cell(v, digits=4):
    """A number as a table cell: floats with `digits` decimals, None as an empty cell."""
    return "" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def _secs(v):
    if v is None:
        return ""
    return f"{v:.0f}s" if v < 120 else (f"{v / 60:.1f}min" if v < 7200 else f"{v / 3600:.1f}h")


TABLE = [  # header, (protocol, metric path)
    ("rank HR@1 clean", ("clean", "ranking", "hr@1")),
    ("rank HR@1 sdpo", ("sdpo", "ranking", "hr@1")),
    ("NDCG@5", ("clean", "ranking", "ndcg@5")),
    ("MRR", ("clean", "ranking", "mrr")),
    ("gen HR@1", ("clean", "generative", "hr@1")),
    ("ValidRatio", ("clean", "generative", "valid_ratio")),
    ("top-1 pop. pct", ("clean", "popularity", "top1_popularity_pct")),
    ("tail HR@1", ("clean", "popularity", "hr@1_tail")),
]


def results_table(summary) -> str:
    """One row per evaluated method: the metrics of TABLE (with several seeds: mean ± standard deviation over
    the seeds that ran it, `seeds` of them; one seed: the value alone), equivalent negatives, training time
    (summed over the seeds)."""
    several = "seeds" in next(iter(summary["methods"].values()), {})
    head = ["method", "trained on"] + (["seeds"] if several else []) + [h for h, _ in TABLE] + \
        ["eq. negatives", "train time"]
    rows = []
    for m, e in summary["methods"].items():
        if not e["eval"] or e.get("group") == "knobs":  # the knob study has its own table (knob_table)
            continue
        cells = [f"{e['label']} (`{m}`)", e["trained_on"] or ""]
        n_seeds = get(e, "eval", "clean", "n_seeds")
        if several:
            cells.append(cell(n_seeds))
        for _, (p, *path) in TABLE:
            digits = 1 if "pct" in path[-1] else 4
            v, sd = metric(summary, m, p, *path), get(e, "eval_std", p, *path)
            spread = v is not None and sd is not None and get(e, "eval", p, "n_seeds") != 1
            cells.append(cell(v, digits) + (f" ± {cell(sd, digits)}" if spread else ""))
        cells.append(cell(e.get("equivalent_negatives"), 1))
        cells.append(_secs(get(e, "stages", "train", "seconds")))
        rows.append(cells)
    return markdown_table(head, rows)


BOTH_METRICS = [("rank HR@1", ("ranking", "hr@1")), ("gen HR@1", ("generative", "hr@1")),
                ("ValidRatio", ("generative", "valid_ratio"))]


def main_metrics_table(summary) -> str | None:
    """The main methods by ranking and by free generation (HR@1, ValidRatio) under both candidate protocols;
    None when no main method was evaluated by generation."""
    rows = []
    for m, e in summary["methods"].items():
        if e["group"] != "main" or not any(metric(summary, m, p, "generative") for p in summary["protocols"]):
            continue
        cells = [f"{e['label']} (`{m}`)"]
        for p in summary["protocols"]:
            for _, path in BOTH_METRICS:
                v, sd = metric(summary, m, p, *path), get(e, "eval_std", p, *path)
                cells.append(cell(v) + (f" ± {cell(sd)}" if v is not None and sd is not None else ""))
        rows.append(cells)
    if not rows:
        return None
    head = ["method"] + [f"{h} `{p}`" for p in summary["protocols"] for h, _ in BOTH_METRICS]
    return markdown_table(head, rows)


def _diff_cell(p) -> str:
    """A paired comparison (paired_pool) as one table cell: "a − b = diff ± CI half-width"."""
    return f"{p['a_mean']:.4f} − {p['b_mean']:.4f} = {_signed(p['diff'], '{:.4f}')} ± {p['halfwidth']:.4f}"


def generative_table(summary, protocol="clean") -> str | None:
    """The main comparisons (MAIN_PAIRS) on free generation: generative HR@1 and ValidRatio, each as the
    paired difference pooled over seeds and rows (paired_pool) with its 95% CI, the smallest detectable
    difference and the verdict; None when no pair was evaluated by free generation."""
    s, rows, n = runs_of(summary), [], None
    for a, b in MAIN_PAIRS:
        ps = [paired(s, a, b, what=w, protocol=protocol) for w in ("gen_hit", "valid")]
        if all(p is None for p in ps):
            continue
        n = n or next(p for p in ps if p)
        cells = [f"{get(summary['methods'], a, 'label') or a} − {get(summary['methods'], b, 'label') or b}"]
        for p in ps:
            cells += ["", "", ""] if p is None else [_diff_cell(p), f"{p['mde']:.4f}", verdict_of(p)]
        rows.append(cells)
    if not rows:
        return None
    return (markdown_table(["comparison (a − b)", "gen HR@1: a − b ± 95% CI", "detectable", "verdict",
                            "ValidRatio: a − b ± 95% CI", "detectable", "verdict"], rows) +
            f"\n\nUnder `{protocol}`, free (unconstrained greedy) generation; each difference pools the per-row "
            f"differences over {n['n_seeds']} seed(s) and the test rows (n = {n['n']} for a pair run at every "
            "seed), as the claims below do for ranking; `supported` = a > b beyond the CI, `refuted` = a < b "
            "beyond it; detectable = the smallest difference the run could detect (2.8 standard errors).")


VARIANT_GROUPS = ("ablation", "k_sweep", "alpha_sweep", "rho_sweep")  # compared with the method they vary


def variants_table(summary, protocol="clean") -> str | None:
    """Each ablation or sweep point against the method it varies (`sdpo_*` against S-DPO, every other one
    against NAPO): the paired ranking HR@1 difference variant − reference, pooled over the seeds both ran and
    the rows, its 95% CI, the smallest detectable difference and whether the variant is better (supported),
    worse (refuted) or neither beyond the CI (inconclusive). Unadjusted for the number of comparisons;
    None when no variant was evaluated."""
    s, rows, methods = runs_of(summary), [], summary["methods"]
    for m, e in methods.items():
        if e.get("group") not in VARIANT_GROUPS:
            continue
        ref = "sdpo" if m.startswith("sdpo") else "napo"
        p = paired(s, m, ref, protocol=protocol)
        if p is None:
            continue
        rows.append([f"{e['label']} (`{m}`)", SHORT_NAMES[ref], str(p["n_seeds"]), _diff_cell(p),
                     f"{p['mde']:.4f}", verdict_of(p)])
    if not rows:
        return None
    return (markdown_table(["variant (a)", "against (b)", "seeds", "rank HR@1: a − b ± 95% CI", "detectable",
                            "a better than b"], rows) +
            f"\n\nUnder `{protocol}`, each variant against the method it varies, row by row on the test rows of "
            "every seed both ran (their HR@1 here is on those rows, so it can differ from the table above); CIs "
            f"unadjusted for the {len(rows)} comparisons, so about {len(rows) * 0.05:.1f} of them would fall "
            "outside their CI by chance alone.")


def gamma_table(summary) -> str | None:
    """The margin's spread per run (reproduce.gamma_spread): one row per method and seed; None when no run
    logged a margin."""
    rows = []
    for m, e in summary["methods"].items():
        per_run = ({int(k): v.get("gamma") for k, v in e["seeds"].items()} if "seeds" in e
                   else {summary["settings"]["seed"]: e.get("gamma")})
        for seed, g in per_run.items():
            if g:
                rows.append([f"{e['label']} (`{m}`)", seed] + [cell(g.get(k)) for k in
                                                               ("min", "max", "mean", "std", "range", "clamped")])
    if not rows:
        return None
    return (markdown_table(["method", "seed", "min", "max", "mean", "std over training", "mean range in a batch",
                            "clamped share"], rows) +
            "\n\nFrom each run's training log: min / max = the smallest batch minimum and the largest batch "
            "maximum logged; std = the standard deviation of the logged batch means over training; range = the "
            "mean spread between the users of one batch (0 for a batch margin). Each logged value is the mean "
            "over `logging_steps` steps.")


def sweep_markdown(result) -> str:
    """results/sweep.md from reproduce.sweep's result: every candidate's validation HR@1, the chosen one per
    family in bold, and the selection rule."""
    chosen = set(result["chosen"].values())
    start = next((r["val_hr1"] for r in result["candidates"] if r["family"] == "start"), None)
    rows = []
    for r in result["candidates"]:
        flags = ", ".join(f"{k}={v:g}" for k, v in r["flags"].items())
        name = f"**`{r['method']}`**" if r["method"] in chosen else f"`{r['method']}`"
        vs = "" if start is None or r["val_hr1"] is None or r["family"] == "start" else _signed(
            r["val_hr1"] - start, "{:.4f}")
        rows.append([r["family"], name, flags, cell(r["val_hr1"]), vs, cell(r["val_rows"])])
    edges = []  # a choice at the end of its grid: the best value may lie beyond it
    for fam, m in result["chosen"].items():
        rows_f = [r for r in result["candidates"] if r["family"] == fam]
        pick = next(r for r in rows_f if r["method"] == m)
        for k, v in pick["flags"].items():
            values = sorted({r["flags"][k] for r in rows_f})
            if len(values) > 2 and v in (values[0], values[-1]):  # of two values, either is an end
                edges.append(f"{fam}: {k}={v:g} is the {'smallest' if v == values[0] else 'largest'} value tried")
    s = result["settings"]
    return "\n\n".join([
        "# Validation sweep\n\n_Generated by `python reproduce.py sweep`; do not edit by hand._",
        f"Base model `{s['base_model']}`, dataset `{s['dataset']}`, seed {s['seed']}; preference rows "
        f"{s['pref_rows']}, validation rows {'all' if s['val_rows'] < 0 else s['val_rows']} (ranking HR@1 under "
        f"`clean`; the test split is never read).",
        f"Selection rule: {result['rule']}. The chosen settings (bold) are copied into `TUNED` of "
        f"`methods.py` by hand (a test checks that they agree).",
        "Family `start` is the SFT adapter every candidate starts from, evaluated the same way (no training): "
        "`vs start` is a candidate's difference from it.",
        markdown_table(["family", "candidate", "settings", "val rank HR@1", "vs start", "val rows"], rows,
                       ["", "", "", "r", "r", "r"]),
        *(["At the edge of the grid (the best setting may lie beyond it): " + "; ".join(edges) + "."]
          if edges else []),
    ]) + "\n"


def leak_text(summary) -> str:
    lk = summary["leak"]
    if not lk:
        return "_not run_"
    table = markdown_table(["method", "HR@1 `clean`", "HR@1 `sdpo`"],
                           [[f"{summary['methods'][m]['label']} (`{m}`)", cell(vals["clean"]), cell(vals["sdpo"])]
                            for m, vals in lk.items()])
    notes = []
    h = lk.get("heuristic", {})
    if h.get("sdpo") is not None and h.get("clean") is not None:
        notes.append(f"The seeded-candidate heuristic learns nothing and reads the target off the candidate list: "
                     f"HR@1 {h['sdpo']:.4f} under `sdpo`, {h['clean']:.4f} under `clean` (chance 0.05).")
    a, b = lk.get("sft_sdpo", {}), lk.get("sft", {})
    if a.get("sdpo") is not None and a.get("clean") is not None:
        t = (f"SFT trained on `sdpo` candidates: {a['sdpo']:.4f} on `sdpo` test candidates vs {a['clean']:.4f} on "
             f"re-drawn (`clean`) ones (gap {a['sdpo'] - a['clean']:+.4f})")
        if b.get("sdpo") is not None and b.get("clean") is not None:
            t += (f"; SFT trained on `clean` candidates: {b['sdpo']:.4f} vs {b['clean']:.4f} "
                  f"(gap {b['sdpo'] - b['clean']:+.4f})")
        notes.append(t + ".")
    return table + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "")


def claims_text(summary) -> str:
    lines = []
    for c in summary["claims"]:
        lines.append(f"- **{c['claim']}: {c['verdict']}.** {c['evidence']}.")
    n = max((n_rows(summary, m) or 0 for m in summary["methods"]), default=0)
    if n:
        p = hr1(summary, "napo") or hr1(summary, "sft") or 0.5
        lines.append(f"\nNoise: with n = {n} test rows a single HR@1 near {p:.2f} has a 95% binomial CI of "
                     f"±{binomial_halfwidth(p, n):.3f} (±{binomial_halfwidth(0.5, n):.3f} at 0.5). The comparisons "
                     f"above are paired (the same rows, the same candidates), so their CIs are tighter; a "
                     f"difference inside its CI is reported as inconclusive. " + _seeds_note(summary))
    return "\n".join(lines)


def _seeds_note(summary) -> str:
    seeds = summary["settings"].get("seeds") or [summary["settings"]["seed"]]
    if len(seeds) == 1:
        return "One seed only: the spread between training seeds is not measured."
    return (f"Seeds {', '.join(map(str, seeds))}: the tables show the mean ± standard deviation over the seeds; "
            f"each verdict pools the paired differences over seeds and rows (its CI treats them as independent; "
            f"the per-seed differences show the spread between seeds), and states the smallest difference "
            f"the run could detect (2.8 standard errors: 80% power at a two-sided 0.05).")


def full_run_seconds(summary) -> dict | None:
    """What a run of every method of the summary at every seed costs: the stage seconds measured, plus, for
    each method missing at a seed, the mean of its measured seeds (estimated); None for a one-seed summary."""
    seeds = [str(x) for x in summary["settings"].get("seeds") or []]
    if len(seeds) < 2:
        return None
    measured = estimated = 0.0
    missing = []
    for m, e in summary["methods"].items():
        per = {sd: sum(v["seconds"] or 0 for v in x["stages"].values()) for sd, x in e.get("seeds", {}).items()}
        if not per:
            continue
        measured += sum(per.values())
        for sd in seeds:
            if sd not in per:
                estimated += sum(per.values()) / len(per)
                missing.append(f"{m}@{sd}")
    return {"measured": measured, "estimated": estimated, "missing": missing, "total": measured + estimated}


def time_table(summary) -> str:
    """Each method's stage wall times (summed over its seeds), the total, and with several seeds what a full
    run at every seed would take (full_run_seconds)."""
    names = ["train"] + [f"eval_{p}" for p in summary["protocols"]]
    rows = []
    for m, e in summary["methods"].items():
        secs = [get(e, "stages", n, "seconds") for n in names]
        if any(v is not None for v in secs):
            rows.append([f"`{m}`"] + [_secs(v) for v in secs] + [_secs(sum(v or 0 for v in secs))])
    rows.append(["**all stages**"] + [""] * len(names) + [f"**{_secs(summary['total_seconds'])}**"])
    table = markdown_table(["method"] + [n.replace("_", " ") for n in names] + ["total"], rows)
    full = full_run_seconds(summary)
    if full and full["missing"]:
        table += (f"\n\nEvery method above at every seed: {_secs(full['measured'])} measured + about "
                  f"{_secs(full['estimated'])} for the {len(full['missing'])} method × seed runs not made (each "
                  f"at the mean of that method's measured seeds) = about **{_secs(full['total'])}** of stages "
                  "(methods run at no seed are not counted).")
    elif full:
        table += f"\n\nEvery method above ran at every seed: **{_secs(full['total'])}** of stages."
    return table


def _settings_line(summary) -> str:
    s = summary["settings"]
    rows = lambda v: "all" if v is None or v < 0 else str(v)  # noqa: E731
    seeds = s.get("seeds") or [s["seed"]]
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}"
    return (f"Base model `{s['base_model']}`, dataset `{s['dataset']}`, {seed_text}; "
            f"rows: SFT {rows(s['sft_rows'])}, "
            f"preference {rows(s['pref_rows'])}, test {rows(s['test_rows'])}{' (--quick)' if s['quick'] else ''}. "
            f"Total stage wall time {_secs(summary['total_seconds'])}. Metric of the claims: "
            f"`{summary['primary_metric']}` under the `clean` candidate protocol.")


def _settings_and_missing(summary, methods) -> str:
    """The settings line, then the methods of `methods` (the whole table) without both evaluations (not run,
    still running, or failed)."""
    import methods as MT

    missing = [m for m in methods if set(MT.METHODS.get(m, {}).get("protocols", summary["protocols"]))
               - set(summary["methods"].get(m, {}).get("eval", {}))]
    return _settings_line(summary) + (
        "\n\n**Not evaluated yet** (not selected, not finished or failed; rerun `bash reproduce.sh` to continue): "
        + ", ".join(f"`{m}`" for m in missing) + "." if missing else "")


def results_markdown(summary, methods) -> str:
    """results/results.md; `methods`: every method of the table (those not evaluated are listed)."""
    return "\n\n".join([
        "# Results\n\n_Generated by `python reproduce.py` from the run outputs; do not edit by hand._",
        _settings_and_missing(summary, methods),
        "## Method comparison\n\n" + results_table(summary),
        *(["## Main methods: ranking and generation, both protocols\n\n" + main_metrics_table(summary)]
          if main_metrics_table(summary) else []),
        *(["## Main methods: paired differences in free generation\n\n" + generative_table(summary)]
          if generative_table(summary) else []),
        "## Claims\n\n" + claims_text(summary),
        *(["## Variants against the method they vary\n\n" + variants_table(summary)]
          if variants_table(summary) else []),
        *(["## The margin gamma per run\n\n" + gamma_table(summary)] if gamma_table(summary) else []),
        "## The `sdpo` candidate protocol leaks the answer\n\n" + leak_text(summary),
        "## Wall time per stage\n\n" + time_table(summary),
    ]) + "\n"
