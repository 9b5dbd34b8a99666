"""The framework figure, assets/framework.png: the training / evaluation pipeline and NAPO's two mechanisms
(in-batch negative sharing, the dynamic margin). A drawing, computed from nothing; the results figures are
plots.py's.

    python framework_diagram.py            # -> assets/framework.png
    python framework_diagram.py --path=x.png
"""
import os

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch, Rectangle  # noqa: E402

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
    """Overview figure: the training / evaluation pipeline and NAPO's two mechanisms.

    Args:
        path: the PNG file to write.
    """
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


if __name__ == "__main__":
    import fire

    fire.Fire(draw_framework)
