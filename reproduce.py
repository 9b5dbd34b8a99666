"""One command for the method comparison, the ablations, the protocol leak and the plots.

    bash reproduce.sh                          # everything: embedded model, fixed seed, full LastFM test split
    python reproduce.py --methods sft,sdpo,napo   # a subset (their dependencies are trained too)
    python reproduce.py --seeds 0,1,2          # each seed's whole chain (seed 0 in <out>, seed N in <out>/seedN)
    python reproduce.py --quick                # plumbing check: small model, a few rows (~1-2 min)
    python reproduce.py report                 # rebuild summary.json, results.md and the plots from the runs
    python reproduce.py readme                 # write the results page docs/results.md from those files
    python reproduce.py commands               # print the method -> command table
    python reproduce.py sweep --families napo   # settings tried on the validation split (results/sweep.md)

Every method is one row of methods.METHODS (stage + flags); every stage is a command line of a stage script
(`python sft.py --...`, `python softmax_dpo.py --...`, `python inference.py --...`, `python sasrec.py ...`),
run as a subprocess (default; a crash or a memory leak stays in its stage) or in this process (--isolate False,
the default under --quick: no 10 s import per stage). Outputs:

    <out>/<method>/final_checkpoint/            adapter + napo_run.json (training log)      (out = results/runs)
    <out>/<method>/eval_{clean,sdpo}/           metrics.json + predictions.jsonl
    <out>/<method>/stage_<name>.json            the command, its wall time, when it finished
    <out>/logs/<method>.<stage>.log             stdout/stderr of a subprocess stage
    <out>/seed<N>/...                           the same for seed N (--seeds; seed 0 is <out> itself)
    results/records/seed<N>/<method>/           committed copy of each finished stage: stage_<name>.json
                                                (command, wall time, metrics / training log), <eval>.rows.json
    results/summary.json, results/results.md    every metric, wall time and command; the generated tables
    results/sweep.json, results/sweep.md        the validation sweep (`reproduce.py sweep`) and its choices
    assets/*.png                                the plots (plots.py)

This file plans and runs the stages and collects what they wrote into summary.json (records.py keeps each
stage's committed copy; baselines.py evaluates the no-learning rows); report.py computes the statistics,
verdicts and tables from it, results_page.py writes docs/results.md.

A stage is skipped when its final output exists (napo_run.json / metrics.json / sasrec_config.json; all are
written last and atomically) and was made by the same command; an interrupted run continues where it
stopped. A stage that runs again makes the stages that depend on it run again. Where the run folder lacks a
stage (a fresh clone: results/runs is not committed) its committed record counts, when made by the same
command: evaluations are skipped, and a training stage runs again only if a stage that still has to run needs
its adapter (plan_states).
"""
from __future__ import annotations

import copy
import functools
import importlib
import inspect
import json
import os
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

import cache
import cli
import data_interface as di
import report as R
import results_page as RP
from baselines import baseline
from collect import combine_seeds, training_info
from records import commit_record, read_json as _read_json, save_record
from methods import (  # noqa: F401  (the table: the planner, the runner and the tests read it here)
    cli_value, select_sweep, sweep_candidates,
    DATASET, SEED, PROTOCOLS, SCALE, QUICK_SCALE, QUICK_MODEL, DEFAULT, STAGE_FUNCTIONS, STAGE_FLAGS,
    QUICK_STAGE_FLAGS, BUDGET_KEYS, TUNED, TUNED_SWEEP, NAPO, SDPO, KNOB_LR, KNOB_START, RANKING_ONLY, METHODS,
    SWEEP_RULE, SWEEP_START, SWEEP,
)
from napo_config import NAPOConfig

REPO_DIR = cache.REPO_DIR


HELP = {  # every flag of reproduce.py's commands, written once (cli.document)
    "methods": "a comma-separated subset of methods.METHODS (their dependencies are trained too); default all",
    "families": "a comma-separated subset of the sweep's families (dpo, sdpo, napo, sft_cont); default all",
    "quick": "plumbing check: a small model built in seconds and a few rows (numbers mean nothing)",
    "base_model": "tiny (the embedded default), tiny-nocopy, smollm2-135m or a local model folder",
    "out": "the run folder (default results/runs; --quick: results/runs/quick)",
    "results_dir": "summary.json, results.md, sweep.* and records/ (default results; --quick: the run folder)",
    "assets_dir": "the plots (default assets; --quick: <run folder>/assets)",
    "sft_rows": "SFT train rows (-1: all; default methods.SCALE)",
    "pref_rows": "preference (and SFT-continued) train rows (-1: all; default methods.SCALE)",
    "test_rows": "test rows (-1: all)", "val_rows": "the sweep's validation rows (-1: all)",
    "seed": "one seed (default 0)",
    "seeds": "several seeds, e.g. 0,1,2: each seed's whole chain (seed 0 in <out>, seed N in <out>/seed<N>)",
    "isolate": "one subprocess per stage (default True; --quick: False)",
    "threads": "torch/OpenMP threads per stage (default: the environment's)",
    "plots": "draw the plots after the run",
    "dry_run": "print the stages and whether each would run; run nothing",
    "commit_records": "git-commit each stage's committed record as it is saved (those files only)",
    "settings": "(Python callers) the settings dict of a run; from the command line give --seeds, --out, ...",
    "readme_path": "the results page to write (default docs/results.md)",
    "kind": "most_popular (rank the candidates by train popularity) or seeded_candidates (the sdpo leak)",
    "protocol": "the candidate protocol: clean or sdpo",
    "dataset": "a dataset name under data/ or a dataset folder",
    "output": "the metrics.json to write",
    "kw": "",
}


def budget(quick: bool) -> dict:
    """{batch_size, gradient_accumulation_steps, num_train_epochs} of the preference stages (see BUDGET_KEYS)."""
    flags = {**stage_defaults("softmax_dpo"), **stage_flags("softmax_dpo", quick)}
    return {k: flags[k] for k in BUDGET_KEYS}


# ==================================================================================================
# Stages


def _rel(path) -> str:
    """A path relative to the repository when it lies inside it (commands run with cwd = the repository)."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(REPO_DIR))
    except ValueError:
        return str(p)


class Stage:
    """One command line: `python <module>.py [command] --key=value ...`, equivalently <module>.<fn>(**kwargs)."""

    def __init__(self, method, name, module, kwargs, done_file, command=None, deps=(), base=None):
        self.method, self.name, self.module, self.command = method, name, module, command
        self.kwargs, self.done_file, self.deps = kwargs, Path(done_file), list(deps)
        self.base = base  # what the output depends on beyond the command line: base_identity, or None

    def made_by(self, rec: dict | None) -> bool:
        """Was the output of this record made by this stage: the same command line on the same base model
        (`--base_model tiny` names a new model whenever the build recipe changes)?"""
        return rec is not None and rec.get("command") == self.command_line() and rec.get("base") == self.base

    @property
    def key(self) -> str:
        return f"{self.method}:{self.name}"

    def argv(self) -> list[str]:
        args = ["python", f"{self.module}.py"] + ([self.command] if self.command else [])
        return args + [f"--{k}={cli_value(v)}" for k, v in self.kwargs.items()]

    def command_line(self) -> str:
        return shlex.join(self.argv())

    def record_file(self, out: Path) -> Path:
        return Path(out) / self.method / f"stage_{self.name}.json"

    def committed_file(self, records) -> Path:
        """The committed record of this stage (command, wall time, its small outputs): see save_record."""
        return REPO_DIR / records / self.method / f"stage_{self.name}.json"

    def rows_file(self, records) -> Path:
        """An evaluation's per-row results beside its committed record (predictions.jsonl is too large)."""
        return REPO_DIR / records / self.method / f"{self.name}.rows.json"

    def call(self):
        fn = getattr(importlib.import_module(self.module), self.command or "main")
        return fn(**copy.deepcopy(self.kwargs))


def base_identity(base_model: str, dataset: str) -> str | None:
    """The base model an LLM stage runs on, where its command line does not say it: for the embedded models
    (`tiny`, `tiny-nocopy`) the build recipe's name (tiny_build.embedded_name: builder version, options, data), so a
    record made on an earlier build of `tiny` is not taken for this one's; None for a model folder (its path
    is in the command) and smollm2-135m (one fixed conversion)."""
    import tiny_build

    return tiny_build.embedded_name(base_model, dataset)


def resolve_settings(base_model="tiny", out=None, sft_rows=None, pref_rows=None, test_rows=None, quick=False,
                     seed=SEED, dataset=DATASET, seeds=None, results_dir=None, val_rows=None) -> dict:
    """The options a run depends on (recorded in summary.json; the commands follow from them). `seeds` (e.g.
    "0,1,2") replaces `seed`; each seed's chain has its own folders (seed_run). `records`: the committed copy
    of each finished stage's record and small outputs, <results_dir>/records (default results/records, under
    --quick <out>/records)."""
    scale = dict(QUICK_SCALE if quick else SCALE)
    for k, v in (("sft_rows", sft_rows), ("pref_rows", pref_rows), ("test_rows", test_rows), ("val_rows", val_rows)):
        if v is not None:
            scale[k] = int(v)
    if seeds is not None and int(seed) != SEED:
        raise di.DataError(f"--seed {seed} and --seeds {seeds}: give one of them (--seeds N is --seed N)")
    seed_list = parse_seeds(seeds if seeds is not None else seed, "--seeds" if seeds is not None else "--seed")
    import modeling
    import tiny_build

    if quick and base_model == "tiny":  # the small model of tests/conftest.py, built once into the cache
        base_model = _rel(tiny_build.tiny_path(dataset, **QUICK_MODEL))
    elif base_model not in modeling.BASE_MODEL_NAMES:  # a local model folder
        base_model = _rel(base_model)
    out = out or ("results/runs/quick" if quick else "results/runs")
    settings = {"base_model": base_model, "dataset": dataset, "seed": seed_list[0], "quick": bool(quick),
                "out": _rel(out), **scale}
    results, _ = _default_dirs(settings, results_dir, None)
    return {**settings, "seeds": seed_list, "records": _rel(results / "records")}


def parse_seeds(value, flag="--seeds") -> list[int]:
    """--seeds 0,1,2 (fire hands over an int, a tuple or a string): distinct whole numbers >= 0, in order."""
    items = [str(v).strip() for v in (value if isinstance(value, (list, tuple)) else str(value).split(","))]
    text = ",".join(items)
    seeds = []
    for v in items:
        if not v.isdigit():
            raise di.DataError(f"{flag} {text}: {v!r} is not a whole number >= 0 (give e.g. {flag} 0,1,2)")
        seeds.append(int(v))
    if not seeds or len(set(seeds)) != len(seeds):
        raise di.DataError(f"{flag} {text}: give distinct seeds, e.g. {flag} 0,1,2")
    return seeds


def seed_run(settings: dict, seed: int) -> dict:
    """The settings of one seed's chain: seed 0 (SEED) keeps the run folder itself, as before seeds existed;
    seed N runs in <out>/seed<N>. Committed records: <records>/seed<N> for every seed."""
    out = settings["out"] if seed == SEED else str(Path(settings["out"]) / f"seed{seed}")
    one = {k: v for k, v in settings.items() if k not in ("seeds", "records")}
    one.update(seed=int(seed), out=out)
    if settings.get("records"):
        one["records"] = str(Path(settings["records"]) / f"seed{seed}")
    return one


def seed_runs(settings: dict) -> list[dict]:
    return [seed_run(settings, s) for s in settings.get("seeds") or [settings["seed"]]]


@functools.lru_cache(maxsize=None)
def stage_defaults(stage: str) -> dict:
    """{option: default} of a stage's function (STAGE_FUNCTIONS), read from its signature."""
    module, fn = STAGE_FUNCTIONS[stage].split(".")
    params = inspect.signature(getattr(importlib.import_module(module), fn)).parameters
    return {k: p.default for k, p in params.items()}


def stage_flags(stage: str, quick: bool) -> dict:
    flags = {**STAGE_FLAGS.get(stage, {}), **(QUICK_STAGE_FLAGS.get(stage, {}) if quick else {})}
    return {k: stage_defaults(stage)[k] if v is DEFAULT else v for k, v in flags.items()}


def needs_sasrec(method: str, table: dict = None) -> bool:
    spec = (table or METHODS)[method]
    return spec["stage"] == "softmax_dpo" and NAPOConfig.from_options(spec.get("flags", {})).needs_sasrec


def plan(settings: dict, methods=None, extra: dict = None) -> list[Stage]:
    """The ordered stages of the selected methods; their dependencies' training stages come first. `extra`:
    further methods {name: spec} beside METHODS (the validation sweep's candidates, sweep_candidates)."""
    table = {**METHODS, **(extra or {})}
    out = Path(settings["out"])
    if not out.is_absolute():
        out = REPO_DIR / out
    o = lambda *parts: _rel(out.joinpath(*parts))  # noqa: E731
    s, quick = settings, settings["quick"]
    common = dict(base_model=s["base_model"], dataset=s["dataset"])
    sasrec_dir = o("sasrec", "model")
    base = base_identity(s["base_model"], s["dataset"])  # the LLM stages' (sasrec and the baselines: none)

    def train_stage(m) -> Stage | None:
        spec = table[m]
        flags = dict(spec.get("flags", {}))
        kind = spec["stage"]
        if "evaluates" in spec:  # evaluates another method's adapter: no training of its own
            return None
        if kind == "sasrec":
            kw = dict(dataset=s["dataset"], output_dir=sasrec_dir, seed=s["seed"], **stage_flags("sasrec", quick))
            return Stage(m, "train", "sasrec", kw, Path(sasrec_dir) / "sasrec_config.json", command="train")
        if kind == "baseline":
            return None
        kw = dict(common, output_dir=o(m), protocol=flags.pop("protocol", "clean"), seed=s["seed"])
        deps = []
        if "start" not in spec:  # SFT from the base model
            kw["max_train_samples"] = s["sft_rows"]
        else:  # a preference stage, or SFT continued: from the start method's adapter, on the preference rows
            start = spec["start"]
            kw["start_adapter"] = o(start, "final_checkpoint")
            kw["max_train_samples"] = s["pref_rows"]
            deps.append(f"{start}:train")
            if needs_sasrec(m, table):
                kw["sasrec_checkpoint"] = sasrec_dir
                deps.append("sasrec:train")
        kw.update(stage_flags(kind, quick))
        if "start" in spec and kind != "softmax_dpo":  # softmax_dpo's own defaults are the budget
            kw.update(budget(quick))
        kw.update(flags)
        return Stage(m, "train", kind, kw, Path(o(m, "final_checkpoint", "napo_run.json")), deps=deps, base=base)

    def eval_stages(m) -> list[Stage]:
        spec = table[m]
        stages = []
        split = spec.get("eval_split", "test")  # the sweep's candidates: "val", under `clean` only
        adapter = spec.get("evaluates", m)  # whose adapter is evaluated (the sweep's start row: the SFT's)
        for p in spec.get("protocols", PROTOCOLS):
            if split != "test":
                metrics_file = o(m, f"{split}_{p}", "metrics.json")
                kw = dict(common, adapter=o(adapter, "final_checkpoint"),
                          output_dir=o(m, f"{split}_{p}"),
                          protocol=p, split=split, max_test_samples=s["val_rows"], seed=s["seed"],
                          **{**stage_flags("inference", quick), **spec.get("eval_flags", {})})
                stages.append(Stage(m, f"{split}_{p}", "inference", kw, metrics_file, deps=[f"{adapter}:train"],
                                    base=base))
                continue
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
                kw = dict(common, adapter=o(adapter, "final_checkpoint"), output_dir=o(m, f"eval_{p}"),
                          protocol=p, max_test_samples=s["test_rows"], seed=s["seed"],
                          **{**stage_flags("inference", quick), **spec.get("eval_flags", {})})
                stages.append(Stage(m, f"eval_{p}", "inference", kw, metrics_file, deps=[f"{adapter}:train"],
                                    base=base))
        return stages

    selected = select_methods(methods, table)
    ordered: list[Stage] = []
    seen = set()

    def add(stage):
        if stage is not None and stage.key not in seen:
            seen.add(stage.key)
            ordered.append(stage)

    for m in selected:
        spec = table[m]
        if needs_sasrec(m, table):
            add(train_stage("sasrec"))
        for dep in (spec.get("start"), spec.get("evaluates")):
            if dep:
                add(train_stage(dep))
        add(train_stage(m))
        for st in eval_stages(m):
            add(st)
    return ordered


def select_methods(methods=None, table=None) -> list[str]:
    """--methods: None/'all' (the methods of METHODS), a comma-separated string or a list of names of `table`
    (default METHODS); the table's order is kept."""
    if methods in (None, "", "all"):
        return list(METHODS)
    table = METHODS if table is None else table
    if isinstance(methods, str):
        methods = methods.split(",")
    wanted = [str(m).strip() for m in methods if str(m).strip()]
    unknown = [m for m in wanted if m not in table]
    if unknown:
        raise di.DataError(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(METHODS)})")
    return [m for m in table if m in wanted]


# ==================================================================================================
# Running


def _stage_env(threads) -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"  # the offline environment: cache.py, imported by every stage
    env["PYTHONPATH"] = str(REPO_DIR) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def stage_state(stage: Stage, out: Path, reran: set, records=None) -> str:
    """'done' (skip), 'stale' (output made by another command, or a dependency ran again), 'todo', or
    'recorded': the output is absent (a fresh clone: results/runs is not committed) but the committed record
    under `records` was made by this command (plan_states decides whether it must be made again)."""
    if not (REPO_DIR / stage.done_file).exists():
        rec = _read_json(stage.committed_file(records)) if records else None
        if stage.made_by(rec) and not any(d in reran for d in stage.deps):
            return "recorded"
        return "todo"
    if any(d in reran for d in stage.deps):
        return "stale"
    rec = _read_json(stage.record_file(out))
    if rec is None and records:
        rec = _read_json(stage.committed_file(records))
    if rec is not None and not stage.made_by(rec):
        return "stale"
    return "done"  # no record: made outside reproduce.py; trusted


def plan_states(stages: list[Stage], out: Path, records=None) -> dict:
    """{stage key: state} for one seed's ordered stages. A stage that runs (todo / stale) makes the stages
    that depend on it stale. A 'recorded' stage (committed record, no output) counts as done, except a
    training stage whose adapter a stage that runs needs: it is made again ('restore'), by the same command,
    and does not make the stages already recorded from its earlier output stale (on CPU the same command
    and seed give the same adapter; elsewhere it may differ in the last digits)."""
    states, reran = {}, set()
    for st in stages:
        states[st.key] = stage_state(st, out, reran, records)
        if states[st.key] in ("todo", "stale"):
            reran.add(st.key)
    for st in reversed(stages):  # the stages that need an output come after it
        if states[st.key] == "recorded":
            needed = any(st.key in o.deps and states[o.key] in ("todo", "stale", "restore") for o in stages)
            states[st.key] = "restore" if needed else "done"
    return states


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


@cli.document(HELP)
def run(methods=None, quick: bool = False, base_model: str = "tiny", out: str = None, results_dir: str = None,
        assets_dir: str = None, sft_rows: int = None, pref_rows: int = None, test_rows: int = None,
        seed: int = SEED, seeds=None, isolate: bool = None, threads: int = None, plots: bool = True,
        dry_run: bool = False, commit_records: bool = False):
    """Run every stage not done yet, then write summary.json, results.md and the plots. Each finished stage is
    also recorded in <results_dir>/records/seed<N>/ (save_record): commit that folder, and a run on a fresh clone
    skips the stages recorded there with the same command."""
    settings = resolve_settings(base_model, out, sft_rows, pref_rows, test_rows, quick, seed, seeds=seeds,
                                results_dir=results_dir)
    isolate = (not quick) if isolate is None else bool(isolate)
    select_methods(methods)  # an unknown method is an error before anything runs
    if not dry_run:
        save_settings(settings)
    if threads and not isolate:
        import torch

        torch.set_num_threads(int(threads))
    failed = {}
    t_all = time.time()
    for one in seed_runs(settings):
        failed.update(run_seed(one, methods, isolate, threads, dry_run, len(settings["seeds"]) > 1,
                               commit=commit_records))
    if dry_run:
        return None
    print(f"reproduce: stages finished in {time.time() - t_all:.0f}s", flush=True)
    summary = report(settings=settings, results_dir=results_dir, assets_dir=assets_dir, plots=plots)
    if failed:
        print("reproduce: FAILED stages:\n" + "\n".join(f"  {k}: {v.splitlines()[0]}" for k, v in failed.items()))
        sys.exit(1)
    return summary


def run_seed(settings: dict, methods, isolate: bool, threads, dry_run: bool, name_seed: bool,
             extra: dict = None, commit: bool = False) -> dict:
    """One seed's chain (settings from seed_run): run the stages plan_states does not mark done; returns the
    failed stages {key: why}. `extra`: further methods for plan (the sweep's candidates); `commit`: git-commit
    each record saved (commit_record)."""
    out_dir, records = REPO_DIR / settings["out"], settings.get("records")
    stages = plan(settings, methods, extra)
    states = plan_states(stages, out_dir, records)
    print(f"reproduce: {len(stages)} stages, base model {settings['base_model']}, rows sft {settings['sft_rows']} "
          f"pref {settings['pref_rows']} test {settings['test_rows']}, seed {settings['seed']}, out "
          f"{settings['out']}, {'subprocess per stage' if isolate else 'in-process'}", flush=True)
    failed = {}
    tag = f"seed{settings['seed']}/" if name_seed else ""
    for i, st in enumerate(stages, 1):
        head = f"[{tag}{i}/{len(stages)}] {st.key:<28}"
        state = states[st.key]
        blocked = [d for d in st.deps if d in failed]
        if blocked and state != "done":
            failed[st.key] = f"blocked by {', '.join(blocked)}"
            (REPO_DIR / st.done_file).unlink(missing_ok=True)  # an older output no longer matches its inputs
            print(f"{head} blocked by the failure of {', '.join(blocked)}", flush=True)
            continue
        if dry_run:
            print(f"{head} {'skip (done)' if state == 'done' else 'run (' + state + ')'}: {st.command_line()}")
            continue
        if state == "done":
            rec = _read_json(st.record_file(out_dir))
            committed = _read_json(st.committed_file(records)) if records else None
            if records and rec and (REPO_DIR / st.done_file).exists() and not st.made_by(committed):
                save_record(st, rec, records)  # finished before records existed: record it now
                if commit:
                    commit_record(st, records, settings["seed"])
            print(f"{head} done already{'' if (REPO_DIR / st.done_file).exists() else ' (committed record)'}, "
                  f"skipped", flush=True)
            continue
        why = {"stale": " again (stale)", "restore": " again (its output is needed; committed record)"}
        print(f"{head} running{why.get(state, '')}: {st.command_line()}", flush=True)
        (REPO_DIR / st.done_file).unlink(missing_ok=True)  # a stale output must not look finished if this fails
        try:
            seconds = run_stage(st, out_dir, isolate, threads)
        except Exception as e:  # noqa: BLE001 — one failed stage must not stop the others
            failed[st.key] = f"{type(e).__name__}: {e}"
            print(f"{head} FAILED: {failed[st.key]}", flush=True)
            if not isolate:
                traceback.print_exc()
            continue
        rec = {"stage": st.key, "command": st.command_line(), "base": st.base, "seconds": round(seconds, 1),
               "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), "isolated": isolate,
               "threads": threads or os.environ.get("OMP_NUM_THREADS")}
        cache.atomic_write_text(st.record_file(out_dir), json.dumps(rec, indent=2) + "\n")
        if records and state != "restore":  # a restored output keeps the record of the one it replaces
            save_record(st, rec, records)
            if commit:
                commit_record(st, records, settings["seed"])
        print(f"{head} done in {seconds:.0f}s", flush=True)
    return {tag + k: v for k, v in failed.items()}


# ==================================================================================================
# The validation sweep


@cli.document(HELP)
def sweep(families=None, quick: bool = False, base_model: str = "tiny", out: str = None, results_dir: str = None,
          sft_rows: int = None, pref_rows: int = None, val_rows: int = None, seed: int = SEED,
          isolate: bool = None, threads: int = None, dry_run: bool = False):
    """The validation sweep: train every candidate of SWEEP (--families dpo,sdpo,napo,sft_cont; default all)
    from the run's SFT adapter (trained first if need be, in the same run folder as the main chain), evaluate
    it by ranking on --val_rows validation rows (-1 = all), and write <results_dir>/sweep.json and sweep.md:
    every candidate's validation HR@1 and the choice per family (select_sweep). Test rows are never read.
    Costs one preference training per candidate: 21 at the default grid."""
    settings = resolve_settings(base_model, out, sft_rows, pref_rows, None, quick, seed, results_dir=results_dir,
                                val_rows=val_rows)
    candidates = sweep_candidates(families)
    isolate = (not quick) if isolate is None else bool(isolate)
    one = seed_run(settings, settings["seed"])
    if threads and not isolate:
        import torch

        torch.set_num_threads(int(threads))
    failed = run_seed(one, list(candidates), isolate, threads, dry_run, False, extra=candidates)
    if dry_run:
        return None
    stages = plan(one, list(candidates), candidates)
    rows = []
    for name, spec in candidates.items():
        st = next(x for x in stages if x.method == name and x.name.startswith("val_"))
        done, _, res = stage_output(st, REPO_DIR / one["out"], one.get("records"))
        rows.append({"family": spec["family"], "method": name, "flags": spec["sweep"],
                     "val_hr1": R.get(res, *R.PRIMARY) if done else None, "val_rows": R.get(res, "n_rows"),
                     "command": next(x for x in stages if x.key == f"{spec.get('evaluates', name)}:train")
                     .command_line()})
    result = {"settings": settings, "rule": SWEEP_RULE,
              "candidates": rows, "chosen": {f: r["method"] for f, r in select_sweep(rows).items()}}
    results, _ = _default_dirs(settings, results_dir, None)
    cache.atomic_write_text(results / "sweep.json", json.dumps(result, indent=1) + "\n")
    cache.atomic_write_text(results / "sweep.md", R.sweep_markdown(result))
    print(f"wrote {_rel(results / 'sweep.json')} and {_rel(results / 'sweep.md')}")
    if failed:
        print("reproduce sweep: FAILED stages:\n" + "\n".join(f"  {k}: {v.splitlines()[0]}" for k, v in failed.items()))
        sys.exit(1)
    return result


# ==================================================================================================
# Baselines that need no model (run as stages too, so they are timed and skipped like the others)


# ==================================================================================================
# Summary: what the stages wrote, in one dict (report.py turns it into statistics, verdicts and markdown)


def stage_output(st: Stage, out: Path, records=None) -> tuple[bool, dict, dict | None]:
    """(done, its record, its final output: metrics.json / napo_run.json) of a stage, from the run folder or,
    where that lacks it (a fresh clone), from its committed record when made by the same command."""
    output = _read_json(REPO_DIR / st.done_file) if (REPO_DIR / st.done_file).exists() else None
    if output is not None:
        return True, _read_json(st.record_file(out)) or {}, output
    committed = (_read_json(st.committed_file(records)) or {}) if records else {}
    if st.made_by(committed):
        return True, committed, committed.get("run" if st.name == "train" else "metrics")
    return False, {}, None


def collect_seed(settings: dict) -> dict:
    """{method: entry} of one seed's chain (settings from seed_run): what its stages wrote, from the run folder
    or, where the run folder lacks it (a fresh clone), from the committed records (missing outputs are left
    out)."""
    out, records = REPO_DIR / settings["out"], settings.get("records")
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
            done, rec, output = stage_output(st, out, records)
            entry["stages"][st.name] = {"command": st.command_line(), "done": done,
                                        "seconds": rec.get("seconds") if done else None,
                                        "finished_at": rec.get("finished_at") if done else None}
            if st.name.startswith("eval_") and output is not None:
                entry["eval"][st.name[5:]] = output
            if st.name == "train" and st.module != "sasrec" and output is not None:
                entry.update(training_info(output))
        if entry["eval"] or any(v["done"] for v in entry["stages"].values()):
            methods[m] = entry
    return methods


def collect(settings: dict) -> dict:
    """Everything the runs wrote, for every method of the table: one seed's entries as collect_seed makes them;
    with several seeds, each method's entry holds the mean over the seeds that evaluated it (eval; eval_std:
    their standard deviation) and every seed's own entry (seeds: {seed: entry}); see combine_seeds."""
    runs = seed_runs(settings)
    per_seed = {one["seed"]: collect_seed(one) for one in runs}
    methods = per_seed[runs[0]["seed"]] if len(runs) == 1 else combine_seeds(per_seed)
    summary = {"settings": settings, "primary_metric": ".".join(R.PRIMARY), "protocols": list(PROTOCOLS),
               "sweeps": R.SWEEPS, "methods": methods, "seed_runs": runs}
    summary["total_seconds"] = round(sum(v["seconds"] or 0 for e in methods.values()
                                         for v in e["stages"].values()), 1)
    summary["claims"] = R.claims(summary)
    summary["leak"] = R.leak(summary)
    return summary


def commands_table(settings) -> str:
    """method -> stage script, starting adapter and the method's own flags (from METHODS), then every command
    line in the order reproduce.py runs them (the same strings it records in summary.json)."""
    stages = plan(seed_run(settings, settings["seed"]))
    rows = []
    for m, spec in METHODS.items():
        script = {"baseline": "reproduce.py baseline", "sasrec": "sasrec.py train"}.get(spec["stage"],
                                                                                      spec["stage"] + ".py")
        flags = " ".join(f"--{k}={cli_value(v)}" for k, v in spec.get("flags", {}).items())
        if spec.get("eval_flags"):
            ev = " ".join(f"--{k}={cli_value(v)}" for k, v in spec["eval_flags"].items())
            flags += f" (evaluated with {ev})"
        rows.append([f"`{m}`", f"`{script}`", f"`{spec['start']}`" if spec.get("start") else "",
                     f"`{flags}`" if flags else ""])
    common = {k: stage_flags(k, settings["quick"]) for k in ("sft", "dpo", "softmax_dpo", "inference")}
    common["dpo"].update(budget(settings["quick"]))  # what every dpo.py run gets (plan: the equal budget)
    equal = " ".join(f"--{a}={cli_value(b)}" for a, b in budget(settings["quick"]).items())
    lines = [R.markdown_table(["method", "stage", "starts from", "its own flags"], rows), ""]
    lines.append("Options every run of a stage gets (`STAGE_FLAGS`): " + "; ".join(
        f"`{k}.py` " + " ".join(f"--{a}={cli_value(b)}" for a, b in v.items()) for k, v in common.items()) +
        f". Rows: SFT {settings['sft_rows']}, preference {settings['pref_rows']}, test {settings['test_rows']} "
        f"(-1 = all); {_seeds_text(settings)}; each trained method is evaluated by `inference.py` under "
        f"{' and '.join(f'`{p}`' for p in PROTOCOLS)}. Equal budgets: every preference method and `sft_cont` "
        f"train on the same {settings['pref_rows']} preference rows with {equal} (`budget`), so the same number "
        f"of optimizer steps.")
    lines += ["", "<details><summary>Every command line, in the order <code>bash reproduce.sh</code> runs them"
              "</summary>", "", "```bash"] + [st.command_line() for st in stages] + ["```", "", "</details>"]
    return "\n".join(lines)


def _seeds_text(settings) -> str:
    seeds = settings.get("seeds") or [settings["seed"]]
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    return (f"seeds {', '.join(map(str, seeds))} (each seed's chain in its own folder: seed {SEED} in the run "
            f"folder, seed N in <run folder>/seed<N>; the command lines below are seed {seeds[0]}'s)")


# ==================================================================================================
# Writing the reports: which files, from which run folder (their text comes from report.py)


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
        cache.atomic_write_text(path, text)


@cli.document(HELP)
def report(settings: dict = None, results_dir: str = None, assets_dir: str = None, plots: bool = True, **kw):
    """Write summary.json, results.md and the plots from a run folder (no training). The settings are read
    from <out>/reproduce_settings.json (written by the last run) unless given (--quick, --out, rows...). On a
    fresh clone (no run folder) give the run's options, e.g. --seeds 0,1,2: the numbers come from the
    committed records."""
    if settings is None:
        settings = resolve_settings(results_dir=results_dir,
                                    **{k: v for k, v in kw.items() if k in ("quick", "out")})
        saved = _read_json(REPO_DIR / settings["out"] / SETTINGS_FILE)
        # a fresh clone has no run folder: give the run's options (--seeds, rows...) to find its records
        settings = ({"records": settings["records"], **saved} if saved and set(kw) <= {"quick", "out"}
                    else resolve_settings(results_dir=results_dir, **kw))
    summary = collect(settings)
    results, assets = _default_dirs(settings, results_dir, assets_dir)
    cache.atomic_write_text(results / "summary.json", json.dumps(summary, indent=1) + "\n")
    cache.atomic_write_text(results / "results.md", R.results_markdown(summary, list(METHODS)))
    if plots:
        import plots as P

        drawn = P.draw_results(summary, assets)
    else:
        drawn = []
    print(f"wrote {_rel(results / 'summary.json')}, {_rel(results / 'results.md')}"
          + (f" and {len(drawn)} plots in {_rel(assets)}" if drawn else ""))
    return summary


@cli.document(HELP)
def readme(readme_path: str = None, results_dir: str = None, assets_dir: str = None, quick: bool = False):
    """Write the results page (docs/results.md; --quick: <quick run>/results_page.md, never docs/) from
    <results_dir>/summary.json (default results/) and the other committed summaries (KNOB_RUNS, EXTRA_RUNS)."""
    default_out = "results/runs/quick" if quick else "results/runs"
    results, assets = _default_dirs({"out": default_out, "quick": quick}, results_dir, assets_dir)
    source = _rel(results / "summary.json")
    summary = _read_json(results / "summary.json")
    if summary is None:
        raise di.DataError(f"{source}: not found; run `python reproduce.py` first")
    target = Path(readme_path).resolve() if readme_path else (
        results / "results_page.md" if quick else REPO_DIR / RP.RESULTS_PAGE)
    page = RP.results_page(summary, list(METHODS), commands_table(summary["settings"]), results, assets, target.parent,
                           source)
    cache.atomic_write_text(target, page)
    print(f"wrote {_rel(target)}")
    if not quick and not readme_path:  # the README's headline table, between its markers, from the same summaries
        headline = RP.headline_table(RP.knob_regimes(summary, results))
        readme_file = REPO_DIR / "README.md"
        text = readme_file.read_text() if readme_file.exists() else ""
        new = RP.replace_between(text, RP.HEADLINE_MARKERS, headline) if headline else None
        if new is not None and new != text:
            cache.atomic_write_text(readme_file, new)
            print("updated the headline table of README.md")
    return str(target)


@cli.document(HELP)
def commands(quick: bool = False, base_model: str = "tiny", out: str = None, sft_rows=None, pref_rows=None,
             test_rows=None, seed: int = SEED, seeds=None):
    """Print the method -> command table for these settings."""
    print(commands_table(resolve_settings(base_model, out, sft_rows, pref_rows, test_rows, quick, seed, seeds=seeds)))


COMMANDS = {"run": run, "sweep": sweep, "report": report, "readme": readme, "commands": commands,
            "baseline": cli.document(HELP)(baseline)}

if __name__ == "__main__":
    cli.run({name: cli.validated(fn) for name, fn in COMMANDS.items()}, default="run")
