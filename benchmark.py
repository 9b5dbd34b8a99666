"""Cost benchmark: training step time and peak memory of SFT, DPO (TRL),
S-DPO/NAPO with naive scoring and NAPO with prefix-shared scoring, plus ranking and generation time.

    OMP_NUM_THREADS=1 python benchmark.py --quick --threads 1   # K in {1, 3, 15}: ~2-3 minutes on this 2-core CPU
    OMP_NUM_THREADS=1 python benchmark.py --threads 1           # full, K in {1, 3, 7, 15, 19}: ~6-7 minutes
    python benchmark.py build                                   # the embedded model's build steps, padded vs packed
Writes results/benchmark.json (--json) and results/benchmark.md (--markdown); prints the table (`build`:
results/benchmark_build.json and one line; see build()).

What is measured (every method on the same rows, the same per-device batch size B, default 4):
  training   real optimizer steps through the real trainers, each built by its stage's build_trainer (the
             function the stage's main() calls): TRL SFTTrainer (sft.py: its tokenization, LoRA via peft_config),
             TRL DPOTrainer (dpo.py: sigmoid loss, reference = a copy of the adapter), and NAPOTrainer
             (softmax_dpo.py; napo_trainer.py: NAPO defaults, in-batch negative sharing and the personalised margin
             with the SASRec) with `shared_scoring` False ("naive": one prompt+answer row per answer, as S-DPO's
             trainer) or True ("shared": each prompt encoded once). Every step is timed from the end of the
             previous optimizer step to the end of this one (a TrainerCallback): batch collation, forward,
             backward, gradient clipping, AdamW. The first `warmup` steps are dropped; the median is reported.
             All trainers get the same n_rows = B x (warmup + steps) rows and shuffle them with the same seed.
             "SFT plain" is a manual loop (no TRL: HF loss on the answer tokens, LoRA without dropout, AdamW),
             a stricter baseline than TRL's SFTTrainer, whose CPU path scores every token of the row through
             its chunked log-prob kernel (entropy and accuracy included) and runs LoRA dropout.
  memory     every method runs in its own fresh subprocess (--isolate False: in this process, for tests).
             Baseline = resident memory (VmRSS) once the libraries, model, SASRec and rows are loaded; the
             kernel's peak-RSS mark is then reset (/proc/self/clear_refs) and read back (VmHWM) after
             training. Reported: the absolute peak and the delta over the baseline. The `mem_*` ratio uses the
             delta: the absolute RSS (~0.55 GB) is mostly the Python/torch/transformers/TRL runtime and the
             weights, identical for every method, so an absolute ratio sits near 1 whatever the method costs;
             the delta is what the method itself allocates (activations, logits, gradients, optimizer state,
             the trainer and its tokenized dataset, memory the allocator keeps after the first step).
  ranking    test rows, batches of B, torch.no_grad, the base model: scoring.answer_logps over the 20
             candidates with shared=True vs shared=False, and one plain forward of the same padded prompts
             (logits for the last position only, as a generation prefill). Per-row time = the median over
             repeats of the total time / rows; the three are interleaved batch by batch so CPU load from other
             processes hits all three alike. The rankings (argsort of the scores, ties by position) and the
             inference.py metrics (inference.summarise) of the two paths are compared.
  generation inference.generate (greedy, <= 20 new tokens, left-padded batches of B) per row.
"""
from __future__ import annotations

import json as jsonlib
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cli
from errors import BenchmarkError

from cache import REPO_DIR  # noqa: E402
FULL_KS = (1, 3, 7, 15, 19)
QUICK_KS = (1, 3, 15)
# the cost targets this project holds NAPO to: ratio key -> (comparison, bound)
TARGETS = {
    "napo_k3_over_sft": ("<=", 1.5),
    "napo_k15_over_sft": ("<=", 2.0),
    "mem_napo_k15_over_sft": ("<=", 1.5),
    "rank_over_prompt_forward": ("<=", 2.0),
    "rank_naive_over_shared": (">=", 5.0),
}


# --------------------------------------------------------------------------------------------------
# Machine and memory helpers


def machine_info(threads: int) -> dict:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "load_average_at_start": list(os.getloadavg())}


def _status_kb(field: str) -> int | None:
    """A 'VmRSS'/'VmHWM' line of /proc/self/status in kB (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def current_rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def peak_rss_mb(reset_ok: bool) -> float:
    """Peak RSS since reset_peak_rss() (VmHWM), else over the process's life (ru_maxrss, kB on Linux)."""
    kb = _status_kb("VmHWM") if reset_ok else None
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


# --------------------------------------------------------------------------------------------------
# Worker side: one measurement (run in a fresh process by run_task)


def _setup(task):
    """Threads, seed, catalog, model (+ tokenizer) for a worker."""
    import torch

    import data_interface as di
    import modeling

    if task["kind"] == "train":  # every library a trainer needs, imported before the memory baseline
        import datasets, peft, trl  # noqa: E401, F401
        from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: F401

        import dpo, napo_trainer, sasrec, sft, softmax_dpo  # noqa: E401, F401
    torch.set_num_threads(task["threads"])
    torch.manual_seed(task["seed"])
    catalog = di.load_catalog(task["dataset"])
    model, tokenizer, info = modeling.load_base_model(task["base_model"], task["dataset"], quantize="none",
                                                      for_training=task["kind"] == "train")
    return catalog, model, tokenizer, info


def _train_rows(catalog, task):
    """The same rows for every method: 19 negatives drawn per row, the first K kept."""
    import data_interface as di

    rows = di.preference_rows(catalog, "train", "clean", di.NUM_CANDIDATES - 1, task["seed"], 1, task["n_rows"])
    K = task["K"]
    return [{**r, "rejected": r["rejected"][:K], "negative_ids": r["negative_ids"][:K]} for r in rows]


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time between the ends of consecutive optimizer steps (the first from train begin)."""

        def __init__(self):
            self.marks = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

    return StepTimer()


def _build_trainer(task, model, tokenizer, info, rows, out_dir, sasrec=None):
    """The real trainer of a method, built by the stage's own build_trainer (sft.py / dpo.py / softmax_dpo.py,
    as their main() builds it), on the benchmark's schedule: a constant learning rate, max_steps, no logging
    or checkpoints."""
    import torch
    from peft import get_peft_model

    import dpo
    import modeling
    import sft
    import softmax_dpo
    from napo_config import NAPOConfig

    options = dict(output_dir=out_dir, batch_size=task["batch_size"], gradient_accumulation_steps=1,
                   learning_rate=1e-4, cutoff_len=task["cutoff_len"], lr_scheduler_type="constant", warmup_ratio=0.0,
                   max_grad_norm=0.3, logging_steps=10**6, save_steps=0, report_to="none", seed=task["seed"],
                   max_steps=task["warmup"] + task["steps"], disable_tqdm=True)
    method = task["method"]
    if method == "sft":
        data = sft.tokenized_sft_dataset(tokenizer, [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows],
                                         task["cutoff_len"], "benchmark")
        return sft.build_trainer(model, tokenizer, info, data, **options)
    # preference methods start from a (fresh) LoRA adapter, as load_policy gives them the SFT adapter
    torch.manual_seed(task["seed"])
    model = get_peft_model(model, modeling.lora_config())
    if method == "dpo":
        return dpo.build_trainer(model, tokenizer, info, rows, beta=1.0, **options)
    napo = NAPOConfig(num_negatives=task["K"], reference=task["reference"], shared_scoring=method == "napo_shared")
    return softmax_dpo.build_trainer(model, tokenizer, info, rows, napo, sasrec, **options)


def _load_sasrec(task, catalog):
    import sasrec as sr

    if task["sasrec_checkpoint"]:
        return sr.load_sasrec(task["sasrec_checkpoint"], catalog)
    return sr.get_or_train_sasrec(task["dataset"])


def plain_sft_loop(task, model, tokenizer, rows):
    """A lean SFT step without TRL, as a stricter baseline: the same LoRA (dropout off, as the preference
    trainers run), `model(input_ids, attention_mask, labels)` with labels on the answer tokens only (the HF
    causal-LM loss: full-vocabulary logits), gradient clipping and AdamW. Rows in order, batches of B.
    Returns the step end times (first = start) and the mean loss."""
    import torch
    from peft import get_peft_model

    import modeling
    import sft

    torch.manual_seed(task["seed"])
    model = get_peft_model(model, modeling.lora_config(dropout=0.0))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    data = sft.tokenized_sft_dataset(tokenizer, [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows],
                                     task["cutoff_len"], "benchmark")
    B, pad = task["batch_size"], tokenizer.pad_token_id
    marks, losses = [time.perf_counter()], []
    for i in range(0, len(data), B):
        ids, keep = data[i:i + B]["input_ids"], data[i:i + B]["completion_mask"]
        width = max(map(len, ids))
        x = torch.tensor([s + [pad] * (width - len(s)) for s in ids])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids])
        labels = torch.tensor([[t if k else -100 for t, k in zip(s, m)] + [-100] * (width - len(s))
                               for s, m in zip(ids, keep)])
        loss = model(input_ids=x, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        marks.append(time.perf_counter())
    return marks, sum(losses) / len(losses)


def measure_training(task) -> dict:
    import gc

    catalog, model, tokenizer, info = _setup(task)
    rows = _train_rows(catalog, task)
    sasrec = _load_sasrec(task, catalog) if task["method"].startswith("napo") else None
    gc.collect()
    baseline = current_rss_mb()
    reset_ok = reset_peak_rss()
    if task["method"] == "sft_plain":
        marks, loss = plain_sft_loop(task, model, tokenizer, rows)
        how = "plain loop (no trainer)"
    else:
        with tempfile.TemporaryDirectory(prefix="napo_bench_") as out_dir:
            trainer = _build_trainer(task, model, tokenizer, info, rows, out_dir, sasrec)
            timer = _step_timer()
            trainer.add_callback(timer)
            loss = trainer.train().training_loss
        marks, how = timer.marks, type(trainer).__name__
    peak = peak_rss_mb(reset_ok)
    steps = [b - a for a, b in zip(marks, marks[1:])][task["warmup"]:]
    if not steps:
        raise BenchmarkError(f"{task['method']}: no timed steps (rows {len(rows)}, warmup {task['warmup']})")
    return {"method": task["method"], "K": task["K"], "step_s": statistics.median(steps), "step_s_min": min(steps),
            "step_s_all": steps, "peak_rss_mb": peak, "baseline_rss_mb": baseline, "delta_rss_mb": peak - baseline,
            "peak_reset": reset_ok, "train_loss": loss, "timed_with": how}


def measure_ranking(task) -> dict:
    """Ranking (shared vs naive vs a prompt forward) and generation time per test row, and the rankings."""
    import torch

    import data_interface as di
    import inference
    import scoring
    import tokens

    catalog, model, tokenizer, info = _setup(task)
    model.eval()
    B, pad = task["batch_size"], tokenizer.pad_token_id
    rows = di.eval_rows(catalog, "test", "clean", task["seed"], task["rank_rows"])
    enc = [tokens.encode_prompt_answers(tokenizer, r["prompt"],
                                          [di.answer_text(catalog, c) for c in r["candidate_ids"]]) for r in rows]
    batches = [enc[i:i + B] for i in range(0, len(enc), B)]

    def prompt_forward(batch):
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([p + [pad] * (width - len(p)) for p, _ in batch])
        mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p, _ in batch])
        model(input_ids=ids, attention_mask=mask, logits_to_keep=1, use_cache=False)

    def rank(batch, shared):
        return scoring.answer_logps(model, [p for p, _ in batch], [a for _, a in batch], shared=shared,
                                    pad_token_id=pad)

    ops = {"shared": lambda b: rank(b, True), "naive": lambda b: rank(b, False), "prompt_forward": prompt_forward}
    totals = {k: [] for k in ops}
    scores = {"shared": [], "naive": []}
    with torch.no_grad():
        for name, op in ops.items():  # warm-up
            op(batches[0])
        for rep in range(task["rank_repeats"]):
            spent = dict.fromkeys(ops, 0.0)
            for batch in batches:
                for name, op in ops.items():
                    t0 = time.perf_counter()
                    out = op(batch)
                    spent[name] += time.perf_counter() - t0
                    if rep == 0 and name in scores:
                        scores[name] += out.tolist()
            for name in ops:
                totals[name].append(spent[name])
    per_row = {name: statistics.median(t) / len(rows) for name, t in totals.items()}

    def order(s):
        return sorted(range(len(s)), key=lambda j: (-s[j], j))

    same = [order(a) == order(b) for a, b in zip(scores["shared"], scores["naive"])]
    max_diff = max(abs(x - y) for a, b in zip(scores["shared"], scores["naive"]) for x, y in zip(a, b))

    def metrics(s):  # the ranking metrics inference.py reports (the candidate mass is a float of the scores)
        preds = [{"index": r["index"], "target_id": r["target_id"], "candidate_ids": r["candidate_ids"],
                  "scores": sc} for r, sc in zip(rows, s)]
        return {k: v for k, v in inference.summarise(catalog, preds, "clean", "test").items() if k != "candidate_mass"}

    m_shared, m_naive = metrics(scores["shared"]), metrics(scores["naive"])

    gen_rows = enc[:task["gen_rows"]]
    gen_s = 0.0
    if gen_rows:
        inference.generate(model, tokenizer, [p for p, _ in gen_rows[:B]], task["max_new_tokens"])  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(gen_rows), B):
            inference.generate(model, tokenizer, [p for p, _ in gen_rows[i:i + B]], task["max_new_tokens"])
        gen_s = (time.perf_counter() - t0) / len(gen_rows)
    return {"rows": len(rows), "rank_shared_s_per_row": per_row["shared"], "rank_naive_s_per_row": per_row["naive"],
            "prompt_forward_s_per_row": per_row["prompt_forward"], "totals_s": totals,
            "identical_ranking": all(same), "rows_with_same_ranking": sum(same), "max_abs_logp_diff": max_diff,
            "identical_metrics": m_shared == m_naive, "ranking_hr@1": m_shared["ranking"]["hr@1"],
            "prompt_tokens_mean": statistics.mean(len(p) for p, _ in enc),
            "answer_tokens_mean": statistics.mean(len(a) for _, ans in enc for a in ans),
            "generation_rows": len(gen_rows), "generate_s_per_row": gen_s}


def worker(task_path: str, result_path: str):
    task = jsonlib.loads(Path(task_path).read_text())
    result = measure_training(task) if task["kind"] == "train" else measure_ranking(task)
    Path(result_path).write_text(jsonlib.dumps(result))


# --------------------------------------------------------------------------------------------------
# Parent side: run every measurement in a fresh process, collect, report


def run_task(task: dict, verbose: bool, isolate: bool = True) -> dict:
    """Run one measurement in a fresh Python process (isolate) or, for quick tests, in this one."""
    if not isolate:
        return measure_training(task) if task["kind"] == "train" else measure_ranking(task)
    with tempfile.TemporaryDirectory(prefix="napo_bench_task_") as tmp:
        tp, rp = Path(tmp) / "task.json", Path(tmp) / "result.json"
        tp.write_text(jsonlib.dumps(task))
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}  # offline: cache.py, imported by the worker's stages
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_worker", str(tp), str(rp)],
                              cwd=REPO_DIR, env=env, capture_output=not verbose, text=True)
        if proc.returncode != 0 or not rp.exists():
            tail = (proc.stderr or "")[-3000:] if not verbose else ""
            raise BenchmarkError(f"benchmark worker {task.get('method', task['kind'])} K={task.get('K')} failed "
                                 f"(exit {proc.returncode}):\n{tail}")
        return jsonlib.loads(rp.read_text())


LABELS = {"sft": "SFT (TRL SFTTrainer)", "sft_plain": "SFT plain loop (no TRL)", "dpo": "DPO (TRL DPOTrainer)",
          "napo_naive": "S-DPO/NAPO naive", "napo_shared": "NAPO shared"}


def _ratio(a, b):
    return a / b if a is not None and b else None


def _fmt(x, digits=3):
    return "—" if x is None else f"{x:.{digits}f}"


def render_markdown(res: dict) -> str:
    from report import markdown_table

    mc, cfg = res["machine"], res["config"]
    sft = next(r for r in res["training"] if r["method"] == "sft")
    train = [[LABELS[r["method"]], r["K"] if r["method"].startswith("napo") else "—", f"{r['step_s']:.3f}",
              f"{r['step_s_min']:.3f}", _fmt(_ratio(r["step_s"], sft["step_s"]), 2), f"{r['peak_rss_mb']:.0f}",
              f"{r['delta_rss_mb']:.0f}", _fmt(_ratio(r["delta_rss_mb"], sft["delta_rss_mb"]), 2), r["timed_with"]]
             for r in res["training"]]
    lines = [f"Machine: {mc['cpu']}, {mc['cores']} cores, torch {mc['torch']} with {mc['torch_threads']} thread(s), "
             f"load average at start {', '.join(f'{x:.2f}' for x in mc['load_average_at_start'])}.",
             f"Model: `{cfg['base_model']}` ({res['model_path']}); batch size {cfg['batch_size']}; "
             f"{cfg['n_rows']} train rows ({cfg['warmup']} warm-up + {cfg['steps']} timed steps, median); "
             f"NAPO: reference={cfg['reference']}, sharing on, margin `user`; timing via {res['timing']}.",
             f"Command: `{res['command']}`", "",
             markdown_table(["method", "K", "s/step (median)", "s/step (min)", "× SFT", "peak RSS MB", "Δ RSS MB",
                             "Δ × SFT", "timed with"], train, ["", "r", "r", "r", "r", "r", "r", "r", ""])]
    rk = res["ranking"]
    pf = rk["prompt_forward_s_per_row"]
    ranking = [[name, f"{rk[key] * 1000:.2f}", _fmt(_ratio(rk[key], pf), 2)] for name, key in (
        ("one prompt forward (last-position logits)", "prompt_forward_s_per_row"),
        ("rank 20 candidates, shared", "rank_shared_s_per_row"),
        ("rank 20 candidates, naive", "rank_naive_s_per_row"),
        (f"generate (greedy, ≤{cfg['max_new_tokens']} tokens, {rk['generation_rows']} rows)", "generate_s_per_row"))]
    targets = [[key, _fmt(t["value"], 2), f"{t['op']} {t['bound']}", "yes" if t["pass"] else "NO"]
               for key, t in res["targets"].items()]
    targets.append(["identical_ranking", rk["identical_ranking"], "true", "yes" if rk["identical_ranking"] else "NO"])
    lines += ["", f"Ranking {rk['rows']} test rows × 20 candidates (batch {cfg['batch_size']}, no_grad; prompt ≈ "
                  f"{rk['prompt_tokens_mean']:.0f} tokens, answer ≈ {rk['answer_tokens_mean']:.1f}):", "",
              markdown_table(["per test row", "ms", "× prompt forward"], ranking, ["", "r", "r"])]
    lines += ["", f"Identical ranking shared vs naive: **{rk['identical_ranking']}** "
                  f"({rk['rows_with_same_ranking']}/{rk['rows']} rows; max |Δ log p| {rk['max_abs_logp_diff']:.2e}; "
                  f"inference.py metrics identical: {rk['identical_metrics']}).", "",
              markdown_table(["target", "value", "bound", "pass"], targets, ["", "r", "r", "c"])]
    ra = res["ratios"]
    lines += ["", f"Against the plain SFT loop instead (stricter, informational): NAPO K=3 "
                  f"{_fmt(ra['napo_k3_over_sft_plain'], 2)}×, K=15 {_fmt(ra['napo_k15_over_sft_plain'], 2)}× "
                  f"the step time, Δ memory at K=15 {_fmt(ra['mem_napo_k15_over_sft_plain'], 2)}×."]
    lines += ["", "Δ RSS = peak resident memory during training minus the resident memory once the model is "
                  "loaded (each method in a fresh process); the memory ratio uses Δ, because the absolute RSS is "
                  "dominated by the same runtime + weights for every method.",
              f"Benchmark wall time: {res['wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def _check_ks(name, ks):
    """Every K of --ks obeys K's rule (cli.RULES['num_negatives'])."""
    return tuple(cli.RULES["num_negatives"](name, k) for k in ks)


def ratios_of(training: list[dict], ranking: dict, ks) -> dict:
    """The benchmark's ratios: NAPO K=3 / K=15 step time and memory over SFT's (and over the plain SFT loop's),
    ranking cost over one prompt forward, naive over prefix-shared scoring, and naive over shared NAPO per K."""
    def find(method, K=None):
        return next((r for r in training if r["method"] == method and (K is None or r["K"] == K)), None)

    sft, plain, n3, n15 = find("sft"), find("sft_plain"), find("napo_shared", 3), find("napo_shared", 15)
    ratios = {
        "napo_k3_over_sft": _ratio(n3 and n3["step_s"], sft["step_s"]),
        "napo_k15_over_sft": _ratio(n15 and n15["step_s"], sft["step_s"]),
        "mem_napo_k15_over_sft": _ratio(n15 and n15["delta_rss_mb"], sft["delta_rss_mb"]),
        "mem_abs_napo_k15_over_sft": _ratio(n15 and n15["peak_rss_mb"], sft["peak_rss_mb"]),
        # the same against the lean SFT loop (a stricter baseline: no TRL overhead, no dropout)
        "napo_k3_over_sft_plain": _ratio(n3 and n3["step_s"], plain["step_s"]),
        "napo_k15_over_sft_plain": _ratio(n15 and n15["step_s"], plain["step_s"]),
        "mem_napo_k15_over_sft_plain": _ratio(n15 and n15["delta_rss_mb"], plain["delta_rss_mb"]),
        "rank_over_prompt_forward": _ratio(ranking["rank_shared_s_per_row"], ranking["prompt_forward_s_per_row"]),
        "rank_naive_over_shared": _ratio(ranking["rank_naive_s_per_row"], ranking["rank_shared_s_per_row"]),
    }
    for k in ks:
        ratios[f"napo_k{k}_naive_over_shared"] = _ratio(find("napo_naive", k)["step_s"], find("napo_shared", k)["step_s"])
    return ratios


def targets_of(ratios: dict) -> dict:
    """Each TARGETS ratio with its bound and whether it passes."""
    out = {}
    for key, (op, bound) in TARGETS.items():
        v = ratios[key]
        out[key] = {"value": v, "op": op, "bound": bound,
                    "pass": v is not None and (v <= bound if op == "<=" else v >= bound)}
    return out


def measure_all(base: dict, train_base: dict, plan: list, rank_task: dict, verbose: bool, isolate: bool, t_start):
    """Every training measurement of `plan` ((method, K) pairs) and the ranking one, printed as they finish."""
    training = []
    for method, K in plan:
        r = run_task({**train_base, "method": method, "K": K}, verbose, isolate)
        training.append(r)
        print(f"  {LABELS[method]:<24} K={K:<2}  {r['step_s']:.3f} s/step  peak {r['peak_rss_mb']:.0f} MB "
              f"(Δ {r['delta_rss_mb']:.0f} MB)  [{time.time() - t_start:.0f}s]", flush=True)
    ranking = run_task({**base, **rank_task}, verbose, isolate)
    print(f"  ranking: shared {ranking['rank_shared_s_per_row'] * 1e3:.2f} ms/row, naive "
          f"{ranking['rank_naive_s_per_row'] * 1e3:.2f}, prompt forward "
          f"{ranking['prompt_forward_s_per_row'] * 1e3:.2f}, generate {ranking['generate_s_per_row'] * 1e3:.2f}; "
          f"identical ranking {ranking['identical_ranking']}  [{time.time() - t_start:.0f}s]", flush=True)
    return training, ranking


@cli.validated(ks=cli.Rule(check=_check_ks))
def main(quick: bool = False, base_model: str = "tiny", dataset: str = "lastfm", threads: int = None,
         batch_size: int = 4, ks: tuple = None, steps: int = None, warmup: int = None, rank_rows: int = None,
         rank_repeats: int = None, gen_rows: int = None, max_new_tokens: int = 20, reference: bool = False,
         sasrec_checkpoint: str = None, cutoff_len: int = 512, seed: int = 0, json: str = "results/benchmark.json",
         markdown: str = "results/benchmark.md", verbose: bool = False, isolate: bool = True):
    """Step time and peak memory of every method, and the cost of ranking (see the module's docstring).

    Args:
        quick: a reduced run: K in {1, 3, 15}, fewer steps and rows (a few minutes on 2 cores).
        base_model: tiny (the embedded default), tiny-nocopy, smollm2-135m or a local model folder.
        dataset: a dataset name under data/ or a dataset folder.
        threads: torch threads in every worker (default: torch's default here).
        batch_size: per-device batch, the same for every method.
        ks: the K values (default 1,3,7,15,19; quick 1,3,15).
        steps: timed steps per method (default 20; quick 8).
        warmup: untimed first steps (default 3; quick 2).
        rank_rows: test rows for ranking (default 64; quick 32).
        rank_repeats: timing repeats for ranking, their median (default 5; quick 3).
        gen_rows: test rows for the generation time (default 32; quick 16).
        max_new_tokens: the decoding budget of the generation time.
        reference: NAPO rows with a reference model (S-DPO rewards) instead of NAPO's reference-free default.
        sasrec_checkpoint: a SASRec folder (default: the dataset's cached one, trained once).
        cutoff_len: max prompt+answer tokens.
        seed: seeds the rows and training.
        json: where the results go (JSON).
        markdown: where the markdown table goes.
        verbose: show the workers' output.
        isolate: each measurement in a fresh process (False: in this one; faster, for tests, but then a
            method's memory can hide in an earlier one's).
    """
    import torch

    import modeling

    ks = ks if ks is not None else (QUICK_KS if quick else FULL_KS)
    ks = tuple(int(k) for k in ((ks,) if isinstance(ks, int) else ks))
    steps = steps if steps is not None else (8 if quick else 20)
    warmup = warmup if warmup is not None else (2 if quick else 3)
    rank_task = {"kind": "rank", "rank_rows": rank_rows or (32 if quick else 64),
                 "rank_repeats": rank_repeats or (3 if quick else 5), "gen_rows": gen_rows or (16 if quick else 32),
                 "max_new_tokens": max_new_tokens}
    threads = threads or torch.get_num_threads()
    t_start, machine = time.time(), machine_info(threads)
    # Resolved once (and built if needed): every worker loads this very folder, even if the embedded model's
    # recipe (hence its cache folder) changes while the benchmark runs.
    model_path = str(modeling.resolve_base_model(base_model, dataset))
    base = {"base_model": model_path, "dataset": dataset, "threads": threads, "batch_size": batch_size,
            "seed": seed, "cutoff_len": cutoff_len}
    n_rows = batch_size * (warmup + steps)
    train_base = {**base, "kind": "train", "n_rows": n_rows, "steps": steps, "warmup": warmup,
                  "reference": reference, "sasrec_checkpoint": sasrec_checkpoint}
    if sasrec_checkpoint is None:
        import sasrec as sr

        sr.get_or_train_sasrec(dataset)  # train + cache once, outside the timed workers
    print(f"benchmark: model {base_model}, batch {batch_size}, {n_rows} rows, {warmup}+{steps} steps, K {list(ks)}, "
          f"torch threads {threads}", flush=True)
    plan = [("sft", 0), ("sft_plain", 0), ("dpo", 1)] + [(m, k) for k in ks for m in ("napo_naive", "napo_shared")]
    training, ranking = measure_all(base, train_base, plan, rank_task, verbose, isolate, t_start)
    ratios = ratios_of(training, ranking, ks)
    targets = targets_of(ratios)
    res = {
        "command": (f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else "")
        + ("python benchmark.py " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("benchmark.py")
           else "benchmark.main(...)"),
        "machine": machine, "model_path": model_path,
        "config": {"quick": quick, "base_model": base_model, "dataset": dataset, "batch_size": batch_size,
                   "ks": list(ks), "steps": steps, "warmup": warmup, "n_rows": n_rows, **rank_task,
                   "reference": reference, "sasrec_checkpoint": sasrec_checkpoint or "get_or_train_sasrec",
                   "seed": seed, "isolated_processes": isolate, "missing_target_k": [k for k in (3, 15) if k not in ks]},
        "timing": "the real trainers (a TrainerCallback, end of step to end of step); 'SFT plain' is a manual loop",
        "training": training, "ranking": ranking, "ratios": ratios, "targets": targets,
        "identical_ranking": ranking["identical_ranking"],
        "all_targets_pass": all(t["pass"] for t in targets.values()) and ranking["identical_ranking"],
    }
    res["machine"]["load_average_at_end"] = list(os.getloadavg())
    res["wall_s"] = time.time() - t_start
    table = render_markdown(res)
    print()
    print(table)
    for path, text in ((json, jsonlib.dumps(res, indent=2)), (markdown, table)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    print(f"wrote {json} and {markdown}")
    return res


@cli.validated
def build(dataset: str = "lastfm", steps: int = 12, warmup: int = 2, threads: int = None,
          json: str = "results/benchmark_build.json"):
    """The embedded model's build steps side by side: one padded row per document with every position's
    logits (pretrain_pack=False, the build before packing) vs documents packed into rows with the logits of
    the scored positions only (pretrain_pack=True, the default). The default build's own first batches, two
    copies of the same freshly initialised model, each with its own AdamW; the two modes alternate step by
    step (which goes first alternates too), so machine load hits both alike. A step is the build's step:
    inputs, forward, backward, clipping, AdamW. Prints s/step (median of the timed steps), the ratio, the
    padding share of each, the full build's step count, and |Δ loss| at the first step (same weights, so
    the same loss up to float rounding).

    Args:
        dataset: a dataset name under data/ or a dataset folder.
        steps: timed steps of each mode.
        warmup: untimed first steps.
        threads: torch threads (default: torch's default here).
        json: where the result goes.
    """
    import copy

    import torch

    import data_interface as di
    import pretrain_data
    import pretrain_loss
    import tiny_build

    if threads:
        torch.set_num_threads(int(threads))
    # --steps, --warmup and --threads are checked by cli.validated (cli.RULES) before this body runs
    catalog = di.load_catalog(dataset)
    opts = dict(tiny_build.TINY_DEFAULTS)
    tokenizer = tiny_build.tiny_tokenizer(catalog, opts)
    batches = pretrain_data.pretrain_batches(tokenizer, catalog, opts)
    if len(batches) < warmup + steps:
        raise BenchmarkError(f"--steps {steps} + --warmup {warmup}: the build has only {len(batches)} steps")
    torch.manual_seed(opts["seed"])
    models = {"padded": tiny_build.new_tiny_llama(tokenizer, opts)}
    models["packed"] = copy.deepcopy(models["padded"])
    opt = {k: torch.optim.AdamW(m.parameters(), lr=opts["pretrain_lr"], weight_decay=0.01) for k, m in models.items()}
    times = {k: [] for k in models}
    tokens = {k: [0, 0] for k in models}
    first_loss = {}
    for i, batch in enumerate(batches[:warmup + steps]):
        order = ["padded", "packed"] if i % 2 == 0 else ["packed", "padded"]
        for k in order:
            m = models[k].train()
            t0 = time.perf_counter()
            inputs = pretrain_loss.batch_inputs(m, batch, tokenizer.pad_token_id, pack=k == "packed")
            loss = pretrain_loss.batch_loss(m, inputs, opts["pretrain_list_detach"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt[k].step()
            opt[k].zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            if i == 0:
                first_loss[k] = loss.item()
            if i >= warmup:
                times[k].append(dt)
                tokens[k][0] += inputs["tokens"]
                tokens[k][1] += inputs["positions"]
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"command": " ".join(["python benchmark.py build"] + sys.argv[2:]) if sys.argv[1:2] == ["build"]
           else "benchmark.build(...)", "machine": machine_info(torch.get_num_threads()),
           "steps_timed": steps, "warmup": warmup, "build_steps": len(batches),
           "s_per_step": {k: round(v, 4) for k, v in med.items()},
           "padding_share": {k: round(1 - t / p, 3) for k, (t, p) in tokens.items()},
           "packed_over_padded": round(med["packed"] / med["padded"], 3),
           "first_step_abs_loss_diff": abs(first_loss["packed"] - first_loss["padded"]),
           "build_steps_s_estimate": {k: round(v * len(batches)) for k, v in med.items()}}
    print(f"build steps on {res['machine']['cpu']} ({torch.get_num_threads()} threads), median of {steps}: "
          f"padded {med['padded']:.3f} s/step ({res['padding_share']['padded']:.0%} padding), packed "
          f"{med['packed']:.3f} s/step ({res['padding_share']['packed']:.0%} padding): packed/padded "
          f"{res['packed_over_padded']:.2f}; the build's {len(batches)} steps ~{res['build_steps_s_estimate']['padded']} s "
          f"vs ~{res['build_steps_s_estimate']['packed']} s; first-step |Δ loss| {res['first_step_abs_loss_diff']:.1e}")
    if json:
        Path(json).parent.mkdir(parents=True, exist_ok=True)
        Path(json).write_text(jsonlib.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_DIR))
    if len(sys.argv) == 4 and sys.argv[1] == "_worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        cli.run({"training": main, "build": build}, default="training")