"""From a run's outputs to the summary's numbers: the training curves, equivalent negatives, time per step and
the margin's spread of one training stage (from its napo_run.json), and several seeds' entries combined into
means and standard deviations. Pure functions on the dicts reproduce.py collects; report.py renders them.
"""
from __future__ import annotations

import report as R
from methods import METHODS, PROTOCOLS

CURVE_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "napo/gamma_mean", "napo/equivalent_negatives")


def training_info(run_json: dict | None) -> dict:
    """Training curves, equivalent negatives and the time per optimizer step from a stage's napo_run.json."""
    if not run_json:
        return {}
    logs = run_json.get("log_history", [])
    steps = [h for h in logs if "loss" in h and "step" in h]
    curves = {"step": [h["step"] for h in steps], "epoch": [h.get("epoch") for h in steps]}
    for k in CURVE_KEYS:
        if any(k in h for h in steps):
            curves[k] = [h.get(k) for h in steps]
    eq = [h["napo/equivalent_negatives"] for h in steps if "napo/equivalent_negatives" in h]
    final = next((h for h in reversed(logs) if "train_runtime" in h), {})
    n_steps = final.get("step") or (steps[-1]["step"] if steps else None)
    return {"curves": curves, "gamma": gamma_spread(steps),
            "equivalent_negatives": sum(eq) / len(eq) if eq else None,
            "train_runtime": final.get("train_runtime"),
            "steps": n_steps,
            "step_seconds": final["train_runtime"] / n_steps if final.get("train_runtime") and n_steps else None,
            "train_rows": run_json.get("train_rows"),
            "M_bar": run_json.get("M_bar")}


def gamma_spread(logs: list[dict]) -> dict | None:
    """The margin's spread over one run, from the logged training steps (None for runs without a margin).
    Each logged value is the trainer's mean over its `logging_steps` steps of a per-batch statistic (the
    batch's mean, min or max of gamma), so: min = the smallest logged batch minimum, max = the largest logged
    batch maximum, mean = the mean of the logged batch means, std = the sample standard deviation of the logged
    batch means (how much gamma moves over training; a batch margin moves only there), range = the mean of
    (batch max - batch min) (how much gamma differs between the users of one batch; 0 for a batch margin),
    clamped = the mean share of rows whose margin was clamped at 0."""
    rows = [h for h in logs if "napo/gamma_mean" in h]
    if not rows:
        return None
    means = [h["napo/gamma_mean"] for h in rows]
    mins = [h.get("napo/gamma_min", h["napo/gamma_mean"]) for h in rows]
    maxs = [h.get("napo/gamma_max", h["napo/gamma_mean"]) for h in rows]
    mean = sum(means) / len(means)
    clamped = [h["napo/gamma_clamped"] for h in rows if "napo/gamma_clamped" in h]
    return {"min": min(mins), "max": max(maxs), "mean": mean,
            "std": R.sample_sd(means),
            "range": sum(b - a for a, b in zip(mins, maxs)) / len(rows),
            "clamped": sum(clamped) / len(clamped) if clamped else None, "logged_steps": len(rows)}


def combine_seeds(per_seed: dict) -> dict:
    """{method: entry} over several seeds ({seed: collect_seed(...)}): the first seed's entry with eval = the
    mean over the seeds that ran that evaluation, eval_std = their sample standard deviation (n-1), the
    training numbers (equivalent negatives, time per step, gamma) averaged, the stages' wall times summed,
    and each seed's own entry under seeds."""
    methods = {}
    for m in METHODS:
        entries = {seed: e[m] for seed, e in per_seed.items() if m in e}
        if not entries:
            continue
        first = next(iter(entries.values()))
        entry = {k: v for k, v in first.items() if k not in ("eval", "stages")}
        entry["seeds"] = {str(seed): e for seed, e in entries.items()}
        entry["eval"], entry["eval_std"] = {}, {}
        for p in PROTOCOLS:
            evals = [e["eval"][p] for e in entries.values() if p in e["eval"]]
            if evals:
                entry["eval"][p], entry["eval_std"][p] = R.mean_std(evals)
                entry["eval"][p]["n_seeds"] = len(evals)
        for k in ("equivalent_negatives", "step_seconds", "train_runtime"):
            vals = [e[k] for e in entries.values() if e.get(k) is not None]
            entry[k] = sum(vals) / len(vals) if vals else None
        gammas = [e["gamma"] for e in entries.values() if e.get("gamma")]
        if gammas:
            entry["gamma"] = R.mean_std(gammas)[0]
        entry["stages"] = {}
        for name, st in first["stages"].items():
            secs = [e["stages"][name]["seconds"] for e in entries.values() if name in e["stages"]
                    and e["stages"][name]["seconds"] is not None]
            entry["stages"][name] = {"command": st["command"],
                                     "done": all(e["stages"].get(name, {}).get("done") for e in entries.values()),
                                     "seconds": round(sum(secs), 1) if secs else None, "finished_at": None}
        methods[m] = entry
    return methods
