"""Helper of tests/test_distributed.py: the NAPO objective on each process's share of a fixed global batch.

    python tests/dist_napo_check.py --out ref --splits 8                    one process, all 8 rows
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_napo_check.py \\
        --out dist --splits 4,4 5,3                                        two processes, even and uneven halves

Every process builds the same deterministic global batches (rewards, item ids, histories) and the same small
random SASRec, takes its rows [offset, offset + size) of each batch (a split lists the per-rank sizes) and
runs napo_trainer.napo_objective on them with sharing on, for two steps (the running mean M_bar carries over)
and for the margin modes `user`, `batch` and `authors`. Its rewards are fresh leaf tensors, so their gradient says
exactly which rewards the losses depend on: with sharing done right, dL_u/dr_v = 0 for v != u (shared
negatives detached; `cross_grad` records the largest such entry) while u's own negatives keep theirs, and
two processes give what one process holding all rows gives. Writes <out>/rank<r>.json: per step the
per-example losses, the gradient of their sum w.r.t. the rank's own chosen and rejected rewards, M_bar, the
pool sizes (equivalent negatives) and the margins.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N_ITEMS, K, HIST_LEN, STEPS = 50, 3, 10, 2
PAD = N_ITEMS  # SASRec's padding id


def make_batch(step: int, n: int) -> dict:
    """The global batch of a step: n rows, deterministic (its own generator), the same on every process."""
    g = torch.Generator().manual_seed(1000 + step)
    pos = torch.randint(0, N_ITEMS, (n,), generator=g)
    neg = torch.randint(0, N_ITEMS, (n, K), generator=g)  # may hit other rows' positives/histories: masking
    hist = torch.full((n, HIST_LEN), PAD, dtype=torch.long)
    for i, length in enumerate(torch.randint(3, HIST_LEN + 1, (n,), generator=g).tolist()):
        hist[i, :length] = torch.randint(0, N_ITEMS, (length,), generator=g)  # right-padded, like the collator
    return {"chosen": torch.randn(n, generator=g) * 2, "rejected": torch.randn(n, K, generator=g) * 2,
            "pos": pos, "neg": neg, "hist": hist}


def make_sasrec():
    from sasrec import SASRec, SASRecConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SASRec(SASRecConfig(n_items=N_ITEMS, hidden=32, dropout=0.0))
        with torch.no_grad():  # a spread of output biases, so the margins differ between users
            model.item_emb_out.bias.normal_(0.0, 1.0)
    return model.eval()


def run(sizes: list[int], rank: int, sasrec, modes=("user", "batch", "authors")) -> dict:
    """This rank's results for one split (per-rank sizes), every margin mode, STEPS steps."""
    from napo_trainer import NAPOConfig, napo_objective

    n, lo = sum(sizes), sum(sizes[:rank])
    hi = lo + sizes[rank]
    out = {"sizes": sizes, "rows": list(range(lo, hi)), "modes": {}}
    for mode in modes:
        cfg = NAPOConfig(num_negatives=K, share_negatives=True, rho=0.7, margin_mode=mode)
        M_bar, steps = None, []
        for step in range(STEPS):
            b = make_batch(step, n)
            chosen = b["chosen"][lo:hi].clone().requires_grad_(True)       # leaves: this rank's own rewards
            rejected = b["rejected"][lo:hi].clone().requires_grad_(True)
            losses, stats, M_bar = napo_objective(chosen, rejected, b["neg"][lo:hi], b["pos"][lo:hi],
                                                  b["hist"][lo:hi], cfg, sasrec, M_bar)
            # d L_u / d r_v for every pair of this rank's rows: only v = u may be nonzero (shared = detached)
            cross = 0.0
            for u in range(len(losses)):
                gc, gr = torch.autograd.grad(losses[u], (chosen, rejected), retain_graph=True, allow_unused=True,
                                             materialize_grads=True)  # `authors`: no gradient reaches rejected
                gc[u], gr[u] = 0.0, 0.0
                cross = max(cross, gc.abs().max().item(), gr.abs().max().item())
            losses.sum().backward()
            grad_rejected = torch.zeros_like(rejected) if rejected.grad is None else rejected.grad
            steps.append({"losses": losses.tolist(), "grad_chosen": chosen.grad.tolist(), "cross_grad": cross,
                          "grad_rejected": grad_rejected.tolist(), "M_bar": M_bar,
                          "equivalent_negatives": stats["equivalent_negatives"].tolist(),
                          "gamma": stats["gamma"].tolist(), "M_t": float(stats["S_mean"].double().mean())})
        out["modes"][mode] = steps
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--splits", nargs="+", required=True, help="per-rank sizes, e.g. 4,4 5,3")
    a = ap.parse_args()
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    splits = [[int(x) for x in s.split(",")] for s in a.splits]
    for s in splits:
        if len(s) != world:
            sys.exit(f"error: split {s} has {len(s)} sizes for {world} processes")
    sasrec = make_sasrec()
    result = [run(s, rank, sasrec) for s in splits]
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"rank{rank}.json").write_text(json.dumps(result))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
