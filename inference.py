"""Evaluate a base model (+ optional LoRA adapter) on the 20-candidate test rows.

    python inference.py --adapter output/sft/final_checkpoint --output_dir output/eval_sft

Three views of the same rows, all named with their candidate protocol:
  generative   greedy decoding, <= 20 new tokens; ValidRatio, HR@1 (all rows), HR@1 over valid rows;
  constrained  greedy decoding that may only spell one of the row's candidates (a token trie);
  ranking      every candidate scored by its summed answer log-prob (prompt encoded once); HR@K, NDCG@K, MRR;
  popularity   of the ranking's top-1 vs. the targets.
Writes output_dir/metrics.json and output_dir/predictions.jsonl (whole files or nothing). Under torchrun (or
accelerate launch) the batches are dealt out over the processes and merged on rank 0, which writes the files:
the same predictions and metrics as one process (NPROC=2 bash inference.sh).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import cache
import cli
import data_interface as di
import metrics as M
import modeling  # sets the offline environment first
import report
import scoring
import stage
import tokens


def dist_info():
    """(rank, world_size); initialises torch.distributed when launched with several processes."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if modeling.use_cuda():  # NCCL collectives (all_gather_object too) run on the current device
            import torch

            torch.cuda.set_device(modeling.local_rank())
        dist.init_process_group("nccl" if modeling.use_cuda() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if world > 1 else (0, 1)


class CandidateTrie:
    """Allowed next tokens when decoding may only spell one of the candidates' answer token sequences."""

    def __init__(self, sequences: list[list[int]]):
        self.root: dict = {}
        for seq in sequences:
            node = self.root
            for t in seq:
                node = node.setdefault(t, {})

    def allowed(self, prefix: list[int]) -> list[int]:
        node = self.root
        for t in prefix:
            node = node.get(t)
            if node is None:
                return []
        return list(node)


def generate(model, tokenizer, prompt_ids, max_new_tokens, tries=None):
    """Greedy decoding of a batch (left padding). With `tries`, each row may only spell a candidate."""
    import torch

    width = max(map(len, prompt_ids))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
    device = next(model.parameters()).device
    kwargs = {}
    if tries is not None:
        eos = tokenizer.eos_token_id

        def allowed(batch_id, sent):
            nxt = tries[batch_id].allowed(sent[width:].tolist())
            return nxt or [eos]

        kwargs["prefix_allowed_tokens_fn"] = allowed
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                             num_beams=1, **kwargs)
    return [t.strip() for t in tokens.decode_many(tokenizer, [o[width:] for o in out])]


OPTIONS = [
    cli.Opt("adapter", None, str, "the LoRA adapter folder to evaluate (None: the base model alone)"),
    cli.Opt("split", "test", str, "the split to evaluate: test (default), val or train"),
    cli.Opt("max_test_samples", -1, int, "the first N rows (-1: all 2,495 test rows of LastFM)"),
    cli.Opt("batch_size", 16, int, "rows per forward"),
    cli.Opt("generative", True, bool, "run free greedy decoding (ValidRatio, HR@1)"),
    cli.Opt("constrained", True, bool, "run greedy decoding that may only spell a candidate"),
    cli.Opt("ranking", True, bool, "score the 20 candidates by their summed answer log-probs (HR@K, NDCG, MRR)"),
    cli.Opt("scoring_mode", "shared", str, "shared (each prompt encoded once) or naive (one prompt+answer row each)"),
    cli.Opt("max_new_tokens", 20, int, "decoding budget"),
    cli.Opt("merge_adapter", True, bool, "fold the adapter into the weights once (W + BA) unless 4-bit"),
    cli.Opt("progress", True, bool, "show a progress bar"),
    cli.Opt("resume_from_checkpoint", None, str, "deprecated: the old name of --adapter",
            rule=cli.Rule(check=cli.existing_folder)),
]


@cli.entry(stage.COMMON, OPTIONS, output_dir="output/inference")
def main(o):
    """Evaluate a base model (+ a LoRA adapter) on the 20-candidate rows; writes OUTPUT_DIR/metrics.json and
    predictions.jsonl."""
    adapter = cli.renamed(o.adapter, o.resume_from_checkpoint, "--resume_from_checkpoint", "--adapter")
    protocol, split, batch_size = o.protocol, o.split, o.batch_size
    # every input is checked before a model is loaded: options (cli.entry), the rows, the base model
    # folder and the adapter, trained on that very base model (its recorded fingerprint)
    catalog = di.load_catalog(o.dataset)
    rows = di.eval_rows(catalog, split, protocol, o.seed, o.max_test_samples)
    if adapter:  # its files whole and, by the recorded name, trained on this --base_model: before it is built
        modeling.check_adapter(adapter, "--adapter")
        modeling.check_adapter_base_name(adapter, o.base_model, o.dataset)
    base = modeling.resolve_base_model(o.base_model, o.dataset)
    if adapter:
        modeling.check_adapter(adapter, "--adapter", base=base)
    rank, world = dist_info()
    model, tokenizer, info = modeling.load_base_model(o.base_model, o.dataset, quantize=o.quantize, for_training=False)
    if adapter:
        modeling.check_adapter_precision(adapter, info)  # trained in 4-bit, evaluated unquantized (or the reverse)
        model = modeling.load_adapter(model, adapter, trainable=False)
        if o.merge_adapter and not info.get("quantized_4bit"):
            model = model.merge_and_unload()  # the same function, without LoRA's extra matmuls in every forward
    model.eval()
    # Shard whole batches, not rows: batch j (rows j*batch_size ...) goes to process j % world. Every batch then
    # holds the same rows, padded the same way, as with one process, so scores and greedy outputs are
    # computed identically and the merged metrics equal the one-process metrics exactly.
    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)][rank::world]
    t0 = time.time()
    preds = predict(model, tokenizer, catalog, batches, o, show=o.progress and rank == 0)
    elapsed = time.time() - t0
    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world
        dist.all_gather_object(gathered, preds)
        preds = [p for part in gathered for p in part]
        times = [None] * world
        dist.all_gather_object(times, elapsed)
        elapsed = max(times)
    preds.sort(key=lambda p: p["index"])
    if rank != 0:
        return None
    result = summarise(catalog, preds, protocol, split)
    result.update({"model": info, "adapter": adapter, "scoring_mode": o.scoring_mode,
                   "adapter_merged": bool(adapter and o.merge_adapter and not info.get("quantized_4bit")),
                   "seconds": round(elapsed, 1), "processes": world})
    out = Path(o.output_dir)
    # each file whole or absent; metrics.json (the "done" mark) goes first and comes back last, so a run killed
    # in between never leaves an older metrics.json beside newer predictions
    (out / "metrics.json").unlink(missing_ok=True)
    cache.clear_stale_tmp(out)
    cache.atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in preds))
    cache.atomic_write_text(out / "metrics.json", json.dumps(result, indent=2))
    print(metrics_table([(adapter or o.base_model, result)]))
    print(f"wrote {out / 'metrics.json'} and predictions.jsonl ({len(preds)} rows, {elapsed:.0f}s)")
    return result


def predict(model, tokenizer, catalog, batches, o, show=True) -> list[dict]:
    """Per row of `batches` (lists of eval rows): its candidates' summed answer log-probs (o.ranking; prefix-shared
    or naive, o.scoring_mode), its free greedy output (o.generative) and its constrained one (o.constrained)."""
    import torch
    from tqdm import tqdm

    preds = []
    bar = tqdm(total=sum(map(len, batches)), desc=f"eval[{o.protocol}]", disable=not show, file=sys.stdout)
    for batch in batches:
        enc = [tokens.encode_prompt_answers(tokenizer, r["prompt"], [di.answer_text(catalog, c) for c in r["candidate_ids"]])
               for r in batch]
        prompt_ids = [p for p, _ in enc]
        recs = [{"index": r["index"], "target_id": r["target_id"], "candidate_ids": r["candidate_ids"]} for r in batch]
        if o.ranking:
            with torch.no_grad():
                s = scoring.answer_logps(model, prompt_ids, [a for _, a in enc], shared=o.scoring_mode == "shared",
                                         pad_token_id=tokenizer.pad_token_id)
            for rec, sc in zip(recs, s.float().cpu().tolist()):
                rec["scores"] = sc
        if o.generative:
            for rec, out in zip(recs, generate(model, tokenizer, prompt_ids, o.max_new_tokens)):
                rec["generated"] = out
        if o.constrained:
            tries = [CandidateTrie(a) for _, a in enc]
            for rec, out in zip(recs, generate(model, tokenizer, prompt_ids, o.max_new_tokens, tries)):
                rec["constrained"] = out
        preds.extend(recs)
        bar.update(len(batch))
    bar.close()
    return preds


def summarise(catalog, preds, protocol, split) -> dict:
    """Metrics from per-row predictions (adds each row's predicted ids in place)."""
    names = catalog.names
    result = {"n_rows": len(preds), "protocol": protocol, "split": split}
    cand_names = [[names[c] for c in p["candidate_ids"]] for p in preds]
    target_pos = [p["candidate_ids"].index(p["target_id"]) for p in preds]
    for key in ("generated", "constrained"):
        if preds and key in preds[0]:
            m, pos = M.generative_metrics([p[key] for p in preds], cand_names, target_pos)
            result["generative" if key == "generated" else "constrained"] = m
            for p, j in zip(preds, pos):
                p[key + "_id"] = None if j is None else p["candidate_ids"][j]
    if preds and "scores" in preds[0]:
        m, top1 = M.candidate_metrics([p["scores"] for p in preds], [p["candidate_ids"] for p in preds],
                                      [p["target_id"] for p in preds], di.target_popularity(catalog))
        result.update(m)
        result["candidate_mass"] = M.candidate_mass([p["scores"] for p in preds])
        for p, t in zip(preds, top1):
            p["top1_id"] = t
    return result


TABLE_COLUMNS = [("protocol", "protocol"), ("rows", "n_rows"), ("rank HR@1", "ranking.hr@1"),
                 ("HR@5", "ranking.hr@5"), ("NDCG@5", "ranking.ndcg@5"), ("MRR", "ranking.mrr"),
                 ("gen HR@1", "generative.hr@1"), ("ValidRatio", "generative.valid_ratio"),
                 ("constr HR@1", "constrained.hr@1"), ("P(cands)", "candidate_mass.mean"), ("top1 pop%", "popularity.top1_popularity_pct"),
                 ("tail HR@1", "popularity.hr@1_tail")]


def flatten(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def metrics_table(results: list[tuple[str, dict]]) -> str:
    """A markdown table: one row per (label, metrics.json dict), the columns of TABLE_COLUMNS."""
    rows = [[label] + [report.cell(flatten(r).get(key)) for _, key in TABLE_COLUMNS] for label, r in results]
    return report.markdown_table(["run"] + [h for h, _ in TABLE_COLUMNS], rows)


if __name__ == "__main__":
    cli.run(main)
