"""Figures for the NAPO project.

Each figure has its own section below and its own entry in the command line at the bottom:

    python plots.py framework            # -> assets/framework.png
    python plots.py framework --path=x.png
    python plots.py results              # the four results_*.png from results/summary.json (reproduce.py)
"""

import math
import os

import matplotlib

matplotlib.use("Agg")

import fire  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402,F401  (FuncFormatter for the log axis)
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch, Rectangle  # noqa: E402

from report import FIGURES, binomial_halfwidth, get, metric as _metric, on_common_seeds, seed_values  # noqa: E402

# ---------------------------------------------------------------------------
# Shared drawing helpers
# ---------------------------------------------------------------------------

COLORS = {
    "data": ("#e8f1fb", "#2f6db5"),
    "prompt": ("#eef7ea", "#3b8a3b"),
    "sft": ("#fff4e0", "#c07a12"),
    "po": ("#f6ecf8", "#8a3fa0"),
    "infer": ("#eaf6f6", "#1f7f80"),
    "sasrec": ("#f2f2f2", "#555555"),
    "panel": ("#fbfbfb", "#999999"),
    "pos": "#3b9a4a",
    "own": "#d9534f",
    "shared": "#f4b6b3",
    "faded": "#d0d0d0",
}


def _ensure_dir(path):
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)


def _box(ax, x, y, w, h, fc, ec, lw=1.6, radius=0.12, ls="-", z=1):
    """Rounded rectangle with its lower-left corner at (x, y)."""
    patch = FancyBboxPatch(
        (x, y), w, h,
        boxstyle=f"round,pad=0,rounding_size={radius}",
        fc=fc, ec=ec, lw=lw, ls=ls, zorder=z,
    )
    ax.add_patch(patch)
    return patch


def _arrow(ax, start, end, color="#444444", lw=1.8, ls="-", style="-|>", rad=0.0, z=3, ms=14):
    arrow = FancyArrowPatch(
        start, end,
        arrowstyle=style, mutation_scale=ms, color=color, lw=lw, ls=ls,
        connectionstyle=f"arc3,rad={rad}", zorder=z, shrinkA=0, shrinkB=0,
    )
    ax.add_patch(arrow)
    return arrow


def _text(ax, x, y, s, size=10.5, ha="center", va="center", color="#222222", weight="normal", **kw):
    return ax.text(x, y, s, fontsize=size, ha=ha, va=va, color=color, fontweight=weight, zorder=5, **kw)


def _item(ax, x, y, kind, size=0.26, label=None):
    """A small square standing for one candidate item: positive, own negative, shared negative."""
    styles = {
        "pos": dict(fc=COLORS["pos"], ec="#1f5f2a", hatch=None),
        "own": dict(fc=COLORS["own"], ec="#8f2320", hatch=None),
        "shared": dict(fc=COLORS["shared"], ec="#b0504c", hatch="///"),
        "faded": dict(fc=COLORS["faded"], ec="#9a9a9a", hatch=None),
    }[kind]
    ax.add_patch(Rectangle((x - size / 2, y - size / 2), size, size, lw=1.0, zorder=4, **styles))
    if label:
        _text(ax, x, y, label, size=7.5, color="white" if kind in ("pos", "own") else "#333333")


# ---------------------------------------------------------------------------
# Figure: framework overview (pipeline + NAPO mechanisms)
# ---------------------------------------------------------------------------


def _draw_pipeline(ax):
    top, h = 6.5, 2.1            # boxes span y in [top - h, top]
    w, gap, x0 = 2.5, 0.3, 0.15
    xs = [x0 + i * (w + gap) for i in range(5)]
    y0 = top - h

    stages = [
        ("data", "1  LastFM sequences"),
        ("prompt", "2  20-candidate prompts"),
        ("sft", "3  SFT"),
        ("po", "4  Preference optimisation"),
        ("infer", "5  Inference & evaluation"),
    ]
    for x, (key, title) in zip(xs, stages):
        fc, ec = COLORS[key]
        _box(ax, x, y0, w, h, fc, ec)
        _text(ax, x + w / 2, top - 0.22, title, size=11.5, weight="bold", color=ec)
    for i in range(4):
        _arrow(ax, (xs[i] + w + 0.02, y0 + h / 2), (xs[i + 1] - 0.02, y0 + h / 2), lw=2.2, ms=16)

    cx = [x + w / 2 for x in xs]
    body = top - 0.5  # top of the first line under the title

    # 1 data
    _text(ax, cx[0], body, "last $\\leq$10 item IDs\n(oldest first)  $\\rightarrow$  next item",
          size=10, va="top", linespacing=1.4)
    for j in range(6):  # a mini item sequence: history -> next item
        ax.add_patch(Rectangle((xs[0] + 0.3 + j * 0.25, y0 + 0.85), 0.19, 0.19, fc="#9dbfe6", ec="#2f6db5",
                               lw=0.8, zorder=4))
    _arrow(ax, (xs[0] + 1.82, y0 + 0.945), (xs[0] + 2.02, y0 + 0.945), lw=1.4, ms=10)
    ax.add_patch(Rectangle((xs[0] + 2.05, y0 + 0.85), 0.19, 0.19, fc=COLORS["pos"], ec="#1f5f2a", lw=0.8,
                           zorder=4))
    _text(ax, cx[0], y0 + 0.15, "4,606 artists\ntrain 47,872 / val 2,767\ntest 2,495 rows", size=9.3,
          va="bottom", color="#444444", linespacing=1.3)

    # 2 prompts
    _text(ax, cx[1], body, "history + 20 candidates\n(target + 19 negatives)\n\u2026 \u201cAnswer:\u201d",
          size=9.6, va="top", linespacing=1.3)
    pw, ph = w - 0.3, 0.4
    px = xs[1] + 0.15
    _box(ax, px, y0 + 0.56, pw, ph, "#ffffff", "#3b8a3b", lw=1.2, radius=0.06, z=2)
    _text(ax, px + pw / 2, y0 + 0.56 + ph / 2, "clean: per-row seeds\n(used for claims)", size=8.8,
          color="#235a23", linespacing=1.15)
    _box(ax, px, y0 + 0.1, pw, ph, "#fff0f0", "#b33a3a", lw=1.2, radius=0.06, ls="--", z=2)
    _text(ax, px + pw / 2, y0 + 0.1 + ph / 2, "sdpo: published, seeded by\ntarget $\\rightarrow$ leaks the answer",
          size=8.8, color="#9a2222", linespacing=1.15)

    # 3 SFT
    _text(ax, cx[2], body, "LoRA adapter on the LLM\n\nanswer-only loss\n(prompt tokens masked)\n\n"
          "response = title + EOS", size=10, va="top", linespacing=1.25)
    _text(ax, cx[2], y0 + 0.2, "adapter initialises stage 4", size=8.8, color="#555555", style="italic")

    # 4 preference optimisation
    rows = [
        ("DPO", "1 negative", 0.34),
        ("S-DPO", "K negatives,\nsoftmax loss", 0.5),
        ("NAPO", "S-DPO + shared negs.\n+ personalised margin", 0.5),
    ]
    ry = body + 0.02
    for name, desc, rh in rows:
        napo = name == "NAPO"
        ec = "#6a1f80" if napo else "#8a3fa0"
        _box(ax, xs[3] + 0.12, ry - rh, w - 0.24, rh, "#ead3f1" if napo else "#ffffff", ec,
             lw=1.7 if napo else 1.0, radius=0.06, z=2)
        _text(ax, xs[3] + 0.22, ry - rh / 2, name, size=9.8, ha="left", weight="bold", color=ec)
        _text(ax, xs[3] + 0.85, ry - rh / 2, desc, size=8.8, ha="left", linespacing=1.15)
        ry -= rh + 0.08

    # 5 inference
    groups = [
        ("Ranking", "score 20 candidates by $\\log\\pi_\\theta(e|x)$\nHR@K, NDCG@K, MRR", 0.68),
        ("Generative", "greedy decoding: HR@1, ValidRatio", 0.47),
        ("Popularity bias", "popularity percentile, tail HR@1", 0.47),
    ]
    ly = body + 0.02
    for name, desc, step in groups:
        _text(ax, xs[4] + 0.15, ly, name, size=9.8, ha="left", va="top", weight="bold", color="#1f7f80")
        _text(ax, xs[4] + 0.15, ly - 0.21, desc, size=8.8, ha="left", va="top", linespacing=1.2)
        ly -= step

    # frozen SASRec feeding NAPO
    sw, sh = 2.7, 0.5
    sx, sy = xs[2] + 0.4, y0 - 0.72
    _box(ax, sx, sy, sw, sh, *COLORS["sasrec"], lw=1.4, radius=0.08)
    _text(ax, sx + sw / 2, sy + sh / 2 + 0.1, "frozen SASRec (1 block, d = 64)", size=9.8, weight="bold",
          color="#333333")
    _text(ax, sx + sw / 2, sy + sh / 2 - 0.13, "trained on the train split", size=8.5, color="#555555")
    # data -> SASRec (training)
    _arrow(ax, (cx[0], y0 - 0.02), (sx - 0.02, sy + sh / 2), color="#777777", lw=1.3, ls="--",
           rad=0.2, ms=12)
    # SASRec -> NAPO
    _arrow(ax, (sx + sw + 0.02, sy + sh / 2), (xs[3] + 1.2, y0 + 0.02), color="#6a1f80", lw=1.6, rad=0.3,
           ms=13)
    _text(ax, xs[3] + 1.45, sy + 0.22, "user vectors $h_u$\nitem scores $s(u,e)$", size=9.3, ha="left",
          color="#6a1f80", linespacing=1.25)

    return y0


def _draw_sharing(ax, x0, y0, w, h):
    _box(ax, x0, y0, w, h, *COLORS["panel"], lw=1.2, radius=0.1)
    top = y0 + h
    _text(ax, x0 + 0.15, top - 0.22, "(a)  In-batch negative sharing", size=11.5, ha="left",
          weight="bold", color="#6a1f80")
    _text(ax, x0 + 0.15, top - 0.52, "$\\mathrm{sim}(u,v) = h_u \\cdot h_v$ over the global batch;"
          "  each $u$ takes the top-$k$ others, $k = \\lfloor\\rho\\,(B-1)\\rfloor$", size=9.5, ha="left",
          color="#333333")

    sims = [("self", None), ("0.91  top-k", True), ("0.78  top-k", True), ("0.12", False)]
    row_y = [top - 1.12 - i * 0.48 for i in range(4)]
    ux = x0 + 0.42
    simx = x0 + 1.2
    posx = x0 + 2.1
    negx = [x0 + 2.55 + j * 0.33 for j in range(3)]

    head = row_y[0] + 0.33
    _text(ax, simx, head, "$h_1 \\cdot h_v$", size=9, color="#333333")
    _text(ax, posx, head, "pos", size=8.8, color="#1f5f2a")
    _text(ax, negx[1], head, "own K = 3 negs.", size=8.8, color="#8f2320")
    for i, y in enumerate(row_y):
        focus = i == 0
        ax.add_patch(Circle((ux, y), 0.18, fc="#6a1f80" if focus else "#ffffff", ec="#6a1f80", lw=1.4,
                            zorder=4))
        _text(ax, ux, y, f"u{i + 1}", size=9, color="white" if focus else "#6a1f80", weight="bold")
        label, chosen = sims[i]
        faded = chosen is False
        _text(ax, simx, y, label, size=8.8, color="#333333" if chosen else "#999999",
              weight="bold" if chosen else "normal")
        _item(ax, posx, y, "faded" if faded else "pos")
        for nx in negx:
            _item(ax, nx, y, "faded" if faded else "own")
    _text(ax, x0 + 0.15, row_y[-1] - 0.4, "toy batch: B = 4, $\\rho$ = 0.7 $\\Rightarrow$ k = 2",
          size=8.8, ha="left", color="#555555", style="italic")

    # N_u1 assembly on the right
    nx0 = x0 + 4.2
    items_x = [nx0 + 0.15 + j * 0.33 for j in range(3)]
    lab_x = nx0 + 1.08
    _text(ax, nx0 + 1.15, head, "$\\mathcal{N}_{u_1}$ = own $\\cup$ shared", size=10.5, weight="bold",
          color="#6a1f80")
    ny = [row_y[0], row_y[1], row_y[2]]
    for j in range(3):
        _item(ax, items_x[j], ny[0], "own")
        _item(ax, items_x[j], ny[1], "shared")
        _item(ax, items_x[j], ny[2], "shared")
    _text(ax, lab_x, ny[0], "own: with gradient", size=8.8, ha="left", color="#8f2320")
    _text(ax, lab_x, ny[1], "from u2: detached", size=8.8, ha="left", color="#b0504c")
    _text(ax, lab_x, ny[2], "from u3: detached", size=8.8, ha="left", color="#b0504c")
    # one dropped shared item (equals u1's positive or is in u1's history)
    dx, dy = items_x[2], ny[2]
    for sgn in (1, -1):
        ax.plot([dx - 0.17, dx + 0.17], [dy - 0.17 * sgn, dy + 0.17 * sgn], color="#222222", lw=1.8, zorder=6)
    _text(ax, nx0 - 0.05, row_y[3], "$\\times$ dropped: equals u1's positive\n    or is in u1's history",
          size=8.3, ha="left", color="#222222", linespacing=1.15)
    # u1's own negatives and u2, u3's negatives move into N_u1
    for r in range(3):
        _arrow(ax, (negx[-1] + 0.2, row_y[r]), (nx0 - 0.05, ny[r]),
               color="#8f2320" if r == 0 else "#b0504c", lw=1.2, ls="-" if r == 0 else "--", ms=10)

    # equivalent negatives
    _text(ax, x0 + w / 2, y0 + 0.24, "equivalent negatives $= K + k\\cdot K$   (e.g. 3 + 10$\\cdot$3 = 33 at"
          " B = 16, $\\rho$ = 0.7)", size=9.8, color="#222222")


def _draw_margin(ax, fig, x0, y0, w, h):
    _box(ax, x0, y0, w, h, *COLORS["panel"], lw=1.2, radius=0.1)
    top = y0 + h
    _text(ax, x0 + 0.15, top - 0.22, "(b)  Dynamic, personalised reward margin", size=11.5, ha="left",
          weight="bold", color="#6a1f80")

    ex = x0 + 0.2
    eqs = [
        ("$S_u = \\mathrm{mean}_{d \\in \\mathcal{N}_u}\\; s(u,d)$",
         "SASRec confidence; shared negatives scored under $u$'s own history"),
        ("$\\bar{M} \\leftarrow m\\,\\bar{M} + (1-m)\\;\\mathrm{mean}_u\\, S_u$",
         "running mean over the global batch, updated each step before use"),
        ("$\\gamma_u = \\max\\{0,\\; \\gamma_0\\,(1 - \\alpha\\,(S_u - \\bar{M}))\\}$",
         "plausible (maybe false) negatives $\\rightarrow$ smaller margin"),
    ]
    ey = top - 0.68
    for eq, note in eqs:
        _text(ax, ex, ey, eq, size=12, ha="left")
        _text(ax, ex + 0.1, ey - 0.31, note, size=8.6, ha="left", color="#555555", style="italic")
        ey -= 0.7
    # loss, highlighted
    lx, lw_, lh = ex - 0.05, w - 0.3, 0.62
    ly = y0 + 0.14
    _box(ax, lx, ly, lw_, lh, "#ead3f1", "#6a1f80", lw=1.4, radius=0.06, z=2)
    _text(ax, lx + 0.15, ly + lh / 2,
          "$\\mathcal{L} = -\\log\\sigma\\left(-\\log\\sum_{d \\in \\mathcal{N}_u}"
          "\\exp\\left(r(d) - r(p)\\right) - \\gamma_u\\right)$", size=12.5, ha="left")
    _text(ax, lx + lw_ - 0.12, ly + lh / 2, "S-DPO loss with\nshared negatives\nand margin $\\gamma_u$",
          size=8.5, ha="right", color="#4a1560", linespacing=1.15)

    # inset: gamma_u against S_u - M_bar (gamma0 = 1, alpha = 0.3)
    fx0, fy0, fw, fh = x0 + w - 1.72, y0 + 1.12, 1.55, 1.55
    inset = fig.add_axes([fx0 / 14, fy0 / 7, fw / 14, fh / 7])
    xs = [-3 + 0.05 * i for i in range(181)]
    ys = [max(0.0, 1.0 * (1 - 0.3 * v)) for v in xs]
    inset.plot(xs, ys, color="#6a1f80", lw=1.8)
    inset.axvline(0, color="#999999", lw=0.8, ls=":")
    inset.set_xlim(-3, 6)
    inset.set_ylim(-0.1, 2.1)
    inset.set_xticks([-2, 0, 2, 4, 6])
    inset.set_yticks([0, 1, 2])
    inset.set_xlabel("$S_u - \\bar{M}$", fontsize=9, labelpad=1)
    inset.set_ylabel("$\\gamma_u$", fontsize=10, labelpad=1)
    inset.tick_params(labelsize=7.5, length=2, pad=1)
    inset.text(0.97, 0.97, "$\\gamma_0 = 1$\n$\\alpha = 0.3$", transform=inset.transAxes, fontsize=8,
               ha="right", va="top", color="#444444")
    inset.text(4.7, 0.12, "clamp", fontsize=7.5, ha="center", va="bottom", color="#6a1f80")
    for side in ("top", "right"):
        inset.spines[side].set_visible(False)


def draw_framework(path="assets/framework.png"):
    """Overview figure: the training / evaluation pipeline and NAPO's two mechanisms."""
    _ensure_dir(path)
    fig = plt.figure(figsize=(14, 7), dpi=150, facecolor="white")
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, 14)
    ax.set_ylim(0, 7)
    ax.axis("off")

    _text(ax, 7, 6.77, "NAPO: an LLM recommender trained with SFT, then negative-aware preference optimisation",
          size=13.5, weight="bold")
    _draw_pipeline(ax)

    panel_top = 3.55
    _draw_sharing(ax, 0.15, 0.1, 6.75, panel_top - 0.1)
    _draw_margin(ax, fig, 7.05, 0.1, 6.8, panel_top - 0.1)

    fig.savefig(path, dpi=150, facecolor="white", pil_kwargs={"optimize": True})
    plt.close(fig)
    return path


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


def draw_results(summary="results/summary.json", assets="assets"):
    """The result figures (report.FIGURES) from a summary (a dict, or the path of a summary.json written by
    reproduce.py) into the folder `assets`; returns the paths drawn. A figure that fails is reported and
    skipped: a plot must not lose the numbers."""
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
    fire.Fire({
        "framework": draw_framework,
        "results": draw_results,
    })
