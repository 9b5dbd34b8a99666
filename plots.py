"""The results figures (report.FIGURES), drawn from a summary written by reproduce.py (results/summary.json);
the framework figure is framework_diagram.py's.

    python plots.py results              # the results_*.png from results/summary.json
"""

import math
import os

import matplotlib

matplotlib.use("Agg")

import fire  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402,F401  (FuncFormatter for the log axis)

from report import FIGURES, binomial_halfwidth, get, metric as _metric, on_common_seeds, seed_values  # noqa: E402

def _ensure_dir(path):
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)


# ---------------------------------------------------------------------------
# Figures: results of reproduce.py (each reads the dict of results/summary.json)
# ---------------------------------------------------------------------------

PROTOCOL_COLORS = {"clean": "#2f6db5", "sdpo": "#e39a4f"}
SERIES_COLORS = {"S-DPO": "#c07a12", "NAPO": "#6a1f80"}
CURVE_METHODS = ["dpo", "sdpo", "napo_noshare", "napo_fixed_margin", "napo_batch_margin", "napo"]  # NAPO on top
CURVE_COLORS = {"dpo": "#888888", "sdpo": "#c07a12", "napo": "#6a1f80", "napo_noshare": "#2f6db5",
                "napo_fixed_margin": "#3b9a4a", "napo_batch_margin": "#d9534f"}


def _run_note(summary):
    s = summary.get("settings", {})
    rows = "all" if s.get("test_rows", -1) < 0 else s.get("test_rows")
    seeds = s.get("seeds") or [s.get("seed", "?")]
    return f"model {s.get('base_model', '?')}, seed{'s' if len(seeds) > 1 else ''} " \
        f"{', '.join(map(str, seeds))}, test rows: {rows}" + \
        ("  (--quick: plumbing check, numbers mean nothing)" if s.get("quick") else "")


def _save(fig, path):
    _ensure_dir(path)
    fig.savefig(path, dpi=150, facecolor="white", bbox_inches="tight", pil_kwargs={"optimize": True})
    plt.close(fig)
    return path


def plot_hr1_by_method(summary, path="assets/results_hr1_by_method.png"):
    """Horizontal bars: ranking HR@1 of each method under `clean` and `sdpo` candidates, the mean over the
    seeds that ran it; error bars: ± the standard deviation over the seeds where there are several (each
    seed's value a dot), else the 95% binomial CI of the one run; baselines, methods, ablations, then the rows
    that show the sdpo leak."""
    groups = ("baseline", "main", "ablation", "leak")
    methods = [m for m, e in summary["methods"].items()
               if e["group"] in groups and _metric(summary, m, "clean", "ranking", "hr@1") is not None]
    if not methods:
        return None
    methods.sort(key=lambda m: groups.index(summary["methods"][m]["group"]))  # stable: table order inside a group
    height = 0.55 * len(methods) + 1.6
    fig, ax = plt.subplots(figsize=(8.5, height))
    h = 0.38
    for j, proto in enumerate(("clean", "sdpo")):
        ys, vals, errs = [], [], []
        for i, m in enumerate(methods):
            v = _metric(summary, m, proto, "ranking", "hr@1")
            if v is None:
                continue
            n = _metric(summary, m, proto, "n_rows") or 0
            ys.append(i + (j - 0.5) * h)
            vals.append(v)
            per_seed = seed_values(summary, m, proto)
            if len(per_seed) > 1:
                errs.append(get(summary["methods"][m], "eval_std", proto, "ranking", "hr@1") or 0.0)
                ax.plot(list(per_seed.values()), [ys[-1]] * len(per_seed), "o", ms=2.5, color="#222222", zorder=3)
            else:
                errs.append(binomial_halfwidth(v, n))  # NaN without rows: no error bar is drawn
        ax.barh(ys, vals, height=h, xerr=errs, color=PROTOCOL_COLORS[proto], ecolor="#444444", capsize=2,
                error_kw={"lw": 0.9}, label=f"{proto} candidates" + (" (claims)" if proto == "clean" else
                                                                     " (published, leaks the answer)"))
        for y, v, e in zip(ys, vals, errs):
            ax.text(v + (0 if math.isnan(e) else e) + 0.012, y, f"{v:.3f}", va="center", fontsize=7.5, color="#333333")
    for i in range(1, len(methods)):  # a thin line between groups
        if summary["methods"][methods[i]]["group"] != summary["methods"][methods[i - 1]]["group"]:
            ax.axhline(i - 0.5, color="#cccccc", lw=0.8)
    ax.axvline(0.05, color="#999999", ls=":", lw=1)
    ax.text(0.05, -0.75, " random 0.05", fontsize=7.5, color="#777777", va="center")
    ax.set_yticks(range(len(methods)))
    ax.set_yticklabels([summary["methods"][m]["label"] for m in methods], fontsize=9)
    ax.set_ylim(len(methods) - 0.45, -1.0)
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("ranking HR@1 (20 candidates; several seeds: mean, ± std over seeds, a dot per seed; "
                  "one seed: 95% binomial CI)", fontsize=8.5)
    ax.set_title("HR@1 by method and candidate protocol", fontsize=12, fontweight="bold", loc="left")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.09 - 0.35 / height), ncol=2, fontsize=8.5, frameon=False)
    ax.text(0, -1.3 / height, _run_note(summary), transform=ax.transAxes, fontsize=7.5, color="#777777", va="top")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return _save(fig, path)


def plot_hr1_vs_negatives(summary, path="assets/results_hr1_vs_negatives.png"):
    """HR@1 (clean) against the negatives per example: S-DPO's K own negatives vs NAPO's equivalent negatives
    (own + shared, read from its training log), one point per K; each series read at the seeds all its runs
    share (report.on_common_seeds)."""
    fig, ax = plt.subplots(figsize=(7, 4.4))
    drawn = False
    for name, series in summary.get("sweeps", {}).get("K", {}).items():
        pts = []
        at, seeds = on_common_seeds(summary, series)
        for m in series:
            e = summary["methods"].get(m)
            v = at.get(m)
            if e is None or v is None:
                continue
            x = e.get("equivalent_negatives") or e.get("num_negatives")
            if x is None:
                continue
            pts.append((x, v, binomial_halfwidth(v, _metric(summary, m, "clean", "n_rows") or 0),
                        e.get("num_negatives")))
        if not pts:
            continue
        pts.sort()
        drawn = True
        c = SERIES_COLORS.get(name, None)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], color=c, marker="o",
                    lw=1.8, capsize=3, label=name + (" (own K negatives)" if name == "S-DPO" else
                                                     " (own + shared = equivalent negatives)") +
                    f", seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)}")
        for x, v, _, k in pts:
            ax.annotate(f"K={k}", (x, v), textcoords="offset points", xytext=(5, 6), fontsize=8, color=c)
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("negatives per example (log scale)")
    ax.set_ylabel("ranking HR@1, clean candidates")
    ax.set_title("More negatives: S-DPO's K vs NAPO's shared negatives", fontsize=12, fontweight="bold", loc="left")
    ax.legend(fontsize=8.5, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    ax.grid(alpha=0.3)
    ax.text(0, -0.27, _run_note(summary) + "; error bars: 95% binomial CI", transform=ax.transAxes, fontsize=7.5,
            color="#777777", va="top")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return _save(fig, path)


def plot_popularity(summary, path="assets/results_popularity.png"):
    """Per method (clean candidates): mean popularity percentile of the top-1 item vs the targets', and the
    share of top-1 items from the long tail vs the targets' share."""
    groups = ("baseline", "main", "ablation")
    methods = [m for m, e in summary["methods"].items()
               if e["group"] in groups and _metric(summary, m, "clean", "popularity") is not None]
    if not methods:
        return None
    methods.sort(key=lambda m: groups.index(summary["methods"][m]["group"]))
    labels = [summary["methods"][m]["label"] for m in methods]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(methods) + 1.8), sharey=True)
    panels = [("top1_popularity_pct", "target_popularity_pct", "mean popularity percentile of top-1 item", 100),
              ("top1_tail_share", "target_tail_share", "share of top-1 items from the tail (least popular 80%)", 1)]
    for ax, (key, tkey, xlabel, xmax) in zip(axes, panels):
        vals = [_metric(summary, m, "clean", "popularity", key) for m in methods]
        ax.barh(range(len(methods)), vals, color="#8a3fa0", height=0.6)
        for i, v in enumerate(vals):
            ax.text(v + xmax * 0.01, i, f"{v:.1f}" if xmax == 100 else f"{v:.2f}", va="center", fontsize=7.5)
        target = _metric(summary, methods[0], "clean", "popularity", tkey)
        if target is not None:
            ax.axvline(target, color="#3b9a4a", ls="--", lw=1.5,
                       label=f"true targets: {target:.1f}" if xmax == 100 else f"true targets: {target:.2f}")
            ax.legend(fontsize=8, frameon=False, loc="lower right")
        ax.set_xlim(0, xmax * 1.08)
        ax.set_xlabel(xlabel, fontsize=9)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    axes[0].set_yticks(range(len(methods)))
    axes[0].set_yticklabels(labels, fontsize=9)
    axes[0].invert_yaxis()
    fig.suptitle("Popularity bias of the top-1 recommendation (clean candidates)", fontsize=12, fontweight="bold",
                 x=0.01, ha="left")
    fig.text(0.01, -0.01, _run_note(summary), fontsize=7.5, color="#777777", va="top")
    fig.tight_layout()
    return _save(fig, path)


def plot_training_curves(summary, path="assets/results_training_curves.png"):
    """Preference-stage training logs against the epoch: loss, reward accuracy (positive above every own
    negative) and the mean margin gamma (NAPO variants)."""
    methods = [m for m in CURVE_METHODS if summary["methods"].get(m, {}).get("curves", {}).get("step")]
    if not methods:
        return None
    panels = [("loss", "training loss"), ("rewards/accuracies", "reward accuracy"),
              ("napo/gamma_mean", "mean margin $\\gamma$")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, title) in zip(axes, panels):
        for m in methods:
            c = summary["methods"][m]["curves"]
            ys = c.get(key)
            if not ys or all(y is None for y in ys):
                continue
            xs = c.get("epoch") or c["step"]
            pts = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
            main = m == "napo"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=CURVE_COLORS.get(m), lw=2.4 if main else 1.3,
                    ls="-" if main or m in ("dpo", "sdpo") else "--", marker="o" if len(pts) < 12 else None,
                    ms=3, label=summary["methods"][m]["label"], zorder=3 if main else 2)
        ax.set_title(title, fontsize=11, loc="left")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8.5, frameon=False,
               bbox_to_anchor=(0.5, -0.08))
    fig.suptitle("Preference optimisation from the SFT adapter", fontsize=12, fontweight="bold", x=0.01, ha="left")
    fig.text(0.01, -0.12, _run_note(summary) + ".\nLosses differ in their negative pools and margins, so compare "
             "their trends, not their levels; reward accuracy = the positive's reward beats every own negative's.",
             fontsize=7.5, color="#777777", va="top")
    fig.tight_layout()
    return _save(fig, path)


def plot_gamma_spread(summary, path="assets/results_gamma.png"):
    """The margin gamma of every run that logged one (reproduce.gamma_spread, averaged over the run's seeds):
    a thin line from the smallest to the largest logged value, a thick one for the mean spread between the
    users of one batch (centred on the mean), a dot at the mean; gamma0 dotted."""
    runs = [(m, e["gamma"]) for m, e in summary["methods"].items()
            if e.get("gamma") and e["gamma"].get("max") is not None and e["gamma"]["max"] > 0]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(runs) + 1.5))
    for i, (m, g) in enumerate(runs):
        ax.plot([g["min"], g["max"]], [i, i], color="#8a8a8a", lw=1.2)
        half = (g.get("range") or 0.0) / 2
        ax.plot([max(g["mean"] - half, g["min"]), min(g["mean"] + half, g["max"])], [i, i], color="#6a2c8a",
                lw=5, solid_capstyle="butt")
        ax.plot([g["mean"]], [i], "o", color="black", ms=4)
    ax.axvline(1.0, color="#999999", ls=":", lw=1)
    ax.set_yticks(range(len(runs)))
    ax.set_yticklabels([summary["methods"][m]["label"] for m, _ in runs], fontsize=8.5)
    ax.invert_yaxis()
    ax.set_xlabel("margin $\\gamma$ (thin: min to max logged; thick: mean spread within a batch; dot: mean; "
                  "dotted: $\\gamma_0$)", fontsize=8.5)
    ax.set_title("The margin per run", fontsize=12, fontweight="bold", loc="left")
    ax.grid(alpha=0.3, axis="x")
    ax.text(0, -1.0 / (0.42 * len(runs) + 1.5), _run_note(summary) + "; each run's figures averaged over its seeds",
            transform=ax.transAxes, fontsize=7.5, color="#777777", va="top")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return _save(fig, path)


def plot_knobs(summary, path="assets/results_knobs.png"):
    """The knob study: each knob row's paired ranking HR@1 difference against SFT continued (report.knob_effects,
    pooled over seeds and rows) with its 95% CI, one bar per knob; None without knob runs."""
    from results_page import knob_effects

    effects = knob_effects(summary)
    if not effects:
        return None
    names = list(effects)
    diffs = [effects[m]["hit"]["diff"] for m in names]
    hws = [effects[m]["hit"]["halfwidth"] for m in names]
    colors = ["#3b9a4a" if d - h > 0 else "#d9534f" if d + h < 0 else "#888888" for d, h in zip(diffs, hws)]
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(names) + 1.6))
    y = list(range(len(names)))[::-1]
    ax.barh(y, diffs, xerr=hws, color=colors, ecolor="#333333", capsize=3, height=0.6)
    ax.axvline(0, color="#333333", lw=1)
    ax.set_yticks(y)
    ax.set_yticklabels([summary["methods"][m]["label"] for m in names], fontsize=8)
    ax.set_xlabel("ranking HR@1 − SFT continued (paired, 95% CI)")
    ax.set_title("The knob study: what moves preference optimisation away from more SFT\n" + _run_note(summary),
                 fontsize=9)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return _save(fig, path)


def draw_results(summary="results/summary.json", assets="assets"):
    """The result figures (report.FIGURES) from a summary (a dict, or the path of a summary.json written by
    reproduce.py) into the folder `assets`; returns the paths drawn. A figure that fails is reported and
    skipped: a plot must not lose the numbers.

    Args:
        summary: a summary.json written by reproduce.py (or its dict).
        assets: the folder the figures go to.
    """
    import json

    if not isinstance(summary, dict):
        with open(summary) as f:
            summary = json.load(f)
    out = []
    for name, (fn, _) in FIGURES.items():
        try:
            p = globals()[fn](summary, os.path.join(str(assets), name))
        except Exception as e:  # noqa: BLE001
            print(f"plot {name} failed: {type(e).__name__}: {e}")
            continue
        if p:
            out.append(p)
    return out


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

if __name__ == "__main__":
    fire.Fire({"results": draw_results})
