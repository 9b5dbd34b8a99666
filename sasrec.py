"""A small SASRec (self-attentive sequential recommender: item and position embeddings,
one transformer block, the hidden state at the last position scored against every item).

Two roles in the project:
  * the frozen auxiliary model of NAPO: user vectors h_u (the hidden state at the last history
    position) for in-batch negative sharing, and item scores s(u,e) = h_u . w_e + b_e for the dynamic margin;
  * the classic baseline row of the results table, evaluated with the same 20-candidate protocol.

Histories are lists of item ids, oldest first. They are LEFT-padded to max_len with the padding id
(= n_items), so the newest item always sits at the last position: that is the 'last valid position', and
every history gets the same positions whatever else is in the batch. Padding keys are masked in attention.

CLI:  python sasrec.py train --dataset lastfm --output_dir out/sasrec
      python sasrec.py evaluate --checkpoint out/sasrec --protocol clean
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import cache
import data_interface as di
import metrics
from errors import SASRecError

WEIGHTS_FILE = "sasrec.safetensors"
CONFIG_FILE = "sasrec_config.json"


@dataclass
class SASRecConfig:
    n_items: int
    max_len: int = 10
    hidden: int = 64
    heads: int = 1
    blocks: int = 1
    dropout: float = 0.5  # LastFM val HR@1: 0.713 (0.5, lr 2e-3, best epoch 14) vs 0.675 (0.2, lr 1e-3)


# --------------------------------------------------------------------------------------------------
# Model


class Block(nn.Module):
    """Pre-LN transformer block: causal multi-head self-attention + pointwise feed-forward."""

    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        if cfg.hidden % cfg.heads:
            raise SASRecError(f"hidden {cfg.hidden} is not divisible by heads {cfg.heads}")
        self.heads = cfg.heads
        self.ln1 = nn.LayerNorm(cfg.hidden)
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.ln2 = nn.LayerNorm(cfg.hidden)
        self.ff = nn.Sequential(nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(), nn.Dropout(cfg.dropout),
                                nn.Linear(cfg.hidden, cfg.hidden))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, allowed):
        # x: (B, L, H); allowed: (B, 1, L, L) bool, True where query i may attend to key j.
        B, L, H = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(H, dim=-1)
        q, k, v = (t.view(B, L, self.heads, H // self.heads).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(H // self.heads)
        att = self.drop(att.masked_fill(~allowed, float("-inf")).softmax(dim=-1))
        y = (att @ v).transpose(1, 2).reshape(B, L, H)
        x = x + self.drop(self.proj(y))
        return x + self.drop(self.ff(self.ln2(x)))


class SASRec(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.cfg = cfg
        self.pad_id = cfg.n_items
        self.item_emb = nn.Embedding(cfg.n_items + 1, cfg.hidden, padding_idx=self.pad_id)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.blocks))
        self.ln_f = nn.LayerNorm(cfg.hidden)
        # Output layer over all items: s(u, e) = h_u . item_emb_out.weight[e] + item_emb_out.bias[e].
        self.item_emb_out = nn.Linear(cfg.hidden, cfg.n_items)
        for emb in (self.item_emb, self.pos_emb):
            nn.init.normal_(emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[self.pad_id].zero_()

    @property
    def config(self) -> dict:
        return asdict(self.cfg)

    def output_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight (n_items, hidden), bias (n_items,)) of the output layer: s(u,e) = h_u . w_e + b_e."""
        return self.item_emb_out.weight, self.item_emb_out.bias

    def pad(self, histories) -> torch.Tensor:
        """Histories -> (B, max_len) LongTensor, left-padded, newest item last. Histories longer than max_len
        keep their newest max_len items. Takes lists of ids (oldest first) or a (B, W) tensor padded with
        the padding id: NAPO's collator pads on the left already (this layout, kept as it is); padding on the
        right is moved to the left."""
        L, pad_id = self.cfg.max_len, self.pad_id
        if torch.is_tensor(histories):
            ids = histories.to(self.item_emb.weight.device, torch.long)
            if ids.dim() != 2 or ((ids < 0) | (ids > pad_id)).any():
                raise SASRecError(f"history tensor must be (B, W) with ids in 0..{pad_id} (padding {pad_id})")
            # a stable sort on 'is a real item' puts the padding first and keeps the items in order
            ids = ids.gather(1, torch.sort((ids != pad_id).int(), dim=1, stable=True).indices)
            ids = torch.cat([ids.new_full((ids.shape[0], max(0, L - ids.shape[1])), pad_id), ids], 1)[:, -L:]
            if (ids[:, -1] == pad_id).any():
                raise SASRecError("history tensor holds a row with only padding")
            return ids
        out = []
        for i, h in enumerate(histories):
            h = [int(x) for x in h][-L:]
            if not h:
                raise SASRecError(f"history {i} is empty")
            if not all(0 <= x < self.cfg.n_items for x in h):
                raise SASRecError(f"history {i} holds an id outside 0..{self.cfg.n_items - 1}")
            out.append([pad_id] * (L - len(h)) + h)
        return torch.tensor(out, dtype=torch.long, device=self.item_emb.weight.device)

    def user_vectors(self, histories) -> torch.Tensor:
        """h_u: the hidden state at the last (newest) history position, (B, hidden)."""
        ids = self.pad(histories)
        B, L = ids.shape
        x = self.item_emb(ids) * math.sqrt(self.cfg.hidden) + self.pos_emb.weight[:L]
        x = self.emb_drop(x)
        valid = ids != self.pad_id
        causal = torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()
        # Query i sees keys j <= i that are real items. A padding query also sees itself, so its softmax
        # row is never empty (no NaN); padding rows are never seen by real queries, so they do not matter.
        allowed = causal & (valid[:, None, :] | torch.eye(L, dtype=torch.bool, device=ids.device))
        allowed = allowed[:, None]  # (B, 1, L, L), broadcast over heads
        for block in self.blocks:
            x = block(x, allowed)
        return self.ln_f(x[:, -1])

    def item_scores(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over all items, (B, n_items)."""
        return self.item_emb_out(h)

    def forward(self, histories) -> torch.Tensor:
        return self.item_scores(self.user_vectors(histories))

    def score_candidates(self, histories, candidate_ids) -> torch.Tensor:
        """Logits of the given candidates only, (B, C): h_u . w_e + b_e."""
        h = self.user_vectors(histories)
        c = torch.as_tensor(candidate_ids, dtype=torch.long, device=h.device)
        w, b = self.item_emb_out.weight[c], self.item_emb_out.bias[c]  # (B, C, H), (B, C)
        return (w @ h.unsqueeze(-1)).squeeze(-1) + b


# --------------------------------------------------------------------------------------------------
# Checkpoints


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_sasrec(model: SASRec, output_dir, info: dict) -> None:
    """Weights first, config (with the weights' sha256) last, each file written atomically."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{WEIGHTS_FILE}.tmp{os.getpid()}"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp))
    digest = _sha256_file(tmp)
    tmp.chmod(0o644)
    os.replace(tmp, out / WEIGHTS_FILE)
    config = {"model": asdict(model.cfg), **info, "weights_sha256": digest}
    cache.atomic_write_text(out / CONFIG_FILE, json.dumps(config, indent=2) + "\n")


def check_items(n_items: int, catalog: di.ItemCatalog | None, checkpoint) -> None:
    """A checkpoint of another dataset (item count mismatch) -> one-line error before any training."""
    if catalog is not None and catalog.n_items != n_items:
        raise SASRecError(f"SASRec checkpoint {checkpoint} has {n_items} items but dataset "
                          f"{catalog.name} has {catalog.n_items} items (trained on another dataset?)")


def load_sasrec(path_or_dir, catalog: di.ItemCatalog | None = None, device="cpu") -> SASRec:
    """Load a checkpoint directory (or its sasrec.safetensors) as a frozen model in eval mode."""
    path = Path(path_or_dir)
    folder = path.parent if path.suffix == ".safetensors" else path
    cfg_path, w_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.exists() or not w_path.exists():
        raise SASRecError(f"{folder}: not a SASRec checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    why = checkpoint_problem(folder)
    if why:
        raise SASRecError(f"SASRec checkpoint {folder}: {why}: a damaged checkpoint (an interrupted copy or a full "
                          "disk?); copy it again, or retrain it: python sasrec.py train --dataset "
                          f"{catalog.path if catalog is not None else 'DATASET'} --output_dir {folder}")
    config = json.loads(cfg_path.read_text())
    cfg = SASRecConfig(**config["model"])
    check_items(cfg.n_items, catalog, folder)
    model = SASRec(cfg)
    model.load_state_dict(load_file(str(w_path)))
    model.info = config
    return model.to(device).eval().requires_grad_(False)


def checkpoint_problem(folder) -> str | None:
    """What is wrong with a SASRec folder's files, without building the model (None: sound): sasrec_config.json
    a JSON object whose `model` is a SASRecConfig, sasrec.safetensors whole (its header and size) and the weights
    the config's weights_sha256 names."""
    folder = Path(folder)
    config, why = cache.read_json(folder / CONFIG_FILE)
    if why:
        return f"{folder / CONFIG_FILE} is {why}"
    try:
        SASRecConfig(**config["model"])
    except (KeyError, TypeError):
        return f"{folder / CONFIG_FILE} has no valid `model` entry"
    w_path = folder / WEIGHTS_FILE
    why = cache.safetensors_problem(w_path)
    if config.get("weights_sha256") and (why or _sha256_file(w_path) != config["weights_sha256"]):
        return f"{w_path} is {why or 'corrupt'}: its weights do not match {CONFIG_FILE}'s weights_sha256"
    return f"{w_path} is {why}" if why else None


# --------------------------------------------------------------------------------------------------
# Training


@torch.no_grad()
def _candidate_hr1(model, ids, cands, targets, batch_size=1024) -> float:
    model.eval()
    hits = 0
    for i in range(0, len(ids), batch_size):
        s = model.score_candidates(ids[i:i + batch_size], cands[i:i + batch_size])
        # ties by candidate position, as metrics.target_rank does: argmax returns the first maximum
        hits += (cands[i:i + batch_size].gather(1, s.argmax(1, keepdim=True)).squeeze(1)
                 == targets[i:i + batch_size]).sum().item()
    return hits / len(ids)


def train_sasrec(dataset="lastfm", output_dir=None, epochs=30, batch_size=256, lr=2e-3, seed=0,
                 device="cpu", time_budget_s=None, max_train_samples=None, dropout=0.5, weight_decay=0.0,
                 patience=5, num_threads=1, verbose=True):
    """Next-item cross entropy over all items on the kept train rows; the epoch with the best validation
    HR@1 (20 candidates, `clean` protocol, one fixed draw) is kept; stops after `patience` epochs without
    improvement, at `epochs`, or when the next epoch would overrun `time_budget_s`.
    Returns (model in eval mode, info dict); saves into output_dir when given.

    Defaults (LastFM, 1 thread): ~5-7 s an epoch, best val epoch around 15-20, test HR@1 (clean) ~0.72.
    num_threads=1 by default: this model's ops are tiny, and on a CPU shared with other jobs 2 OpenMP
    threads were measured 5-20x slower per step than 1. Same seed + same thread count -> same weights
    (a time budget can cut the run short, so it is not reproducible under load). The caller's torch
    thread count and global RNG state are left as they were."""
    prev_threads = torch.get_num_threads()
    try:
        if num_threads:
            torch.set_num_threads(num_threads)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, info = _fit(dataset, epochs, batch_size, lr, seed, device, time_budget_s, max_train_samples,
                               dropout, weight_decay, patience, verbose)
    finally:
        torch.set_num_threads(prev_threads)
    model.info = info
    if output_dir is not None:
        save_sasrec(model, output_dir, info)
    return model, info


def _fit(dataset, epochs, batch_size, lr, seed, device, time_budget_s, max_train_samples, dropout,
         weight_decay, patience, verbose):
    t0 = time.time()
    catalog = di.load_catalog(dataset)
    model = SASRec(SASRecConfig(n_items=catalog.n_items, dropout=dropout)).to(device)

    rows = di.load_split(catalog, "train")
    if max_train_samples is not None:
        rows = rows[:max_train_samples]
    x_train = model.pad([r.history for r in rows])
    y_train = torch.tensor([r.target for r in rows], device=device)
    val = di.load_split(catalog, "val")
    x_val = model.pad([r.history for r in val])
    y_val = torch.tensor([r.target for r in val], device=device)
    c_val = torch.tensor(di.split_candidates(catalog, val, "val", "clean", seed=0), device=device)

    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    best, best_state, best_epoch, history, epoch_s = -1.0, None, 0, [], 0.0
    for epoch in range(1, epochs + 1):
        if time_budget_s is not None and time.time() - t0 + epoch_s > time_budget_s:
            break
        te = time.time()
        model.train()
        total = 0.0
        for idx in torch.randperm(len(rows), generator=gen).split(batch_size):
            idx = idx.to(device)
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        hr1 = _candidate_hr1(model, x_val, c_val, y_val)
        epoch_s = time.time() - te
        history.append({"epoch": epoch, "train_loss": total / len(rows), "val_hr@1": hr1})
        if verbose:
            print(f"epoch {epoch:3d}  train loss {total / len(rows):.4f}  val hr@1 {hr1:.4f}  "
                  f"({epoch_s:.1f}s)", flush=True)
        if hr1 > best:
            best, best_epoch = hr1, epoch
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= patience:
            break
    if best_state is None:
        raise SASRecError(f"--time_budget_s {time_budget_s}: too small to train one epoch")
    model.load_state_dict(best_state)
    model.eval()
    info = {
        "dataset": catalog.name, "dataset_path": str(catalog.path), "n_items": catalog.n_items,
        "fingerprint": di.data_fingerprint(catalog),
        "val_metric": {"name": "hr@1", "split": "val", "protocol": "clean", "value": best},
        "best_epoch": best_epoch, "epochs_run": len(history), "train_rows": len(rows),
        "train": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "dropout": dropout,
                  "weight_decay": weight_decay, "patience": patience, "time_budget_s": time_budget_s,
                  "max_train_samples": max_train_samples},
        "train_seconds": round(time.time() - t0, 1), "history": history,
    }
    return model, info


def cache_root(cache_dir=None) -> Path:
    """The given folder, else the project's cache root (cache.cache_root: $NAPO_CACHE or <repo>/.cache)."""
    return Path(cache_dir) if cache_dir else cache.cache_root()


def get_or_train_sasrec(dataset="lastfm", cache_dir=None, **train_kwargs) -> SASRec:
    """A frozen SASRec for `dataset`, trained once and cached under <cache root>/sasrec/<name>-<fingerprint>
    (train_kwargs given, other than device/verbose/num_threads, add a hash of them to the folder name).
    Trained into a temporary sibling folder renamed into place (cache.build_once: across processes, e.g. torchrun
    ranks, one trains and the others wait and load it), so a killed run leaves no half checkpoint."""
    catalog = di.load_catalog(dataset)
    key = f"{catalog.name}-{di.data_fingerprint(catalog)}"
    train_kwargs.pop("output_dir", None)
    options = {k: v for k, v in train_kwargs.items() if k not in ("device", "verbose", "num_threads")}
    if options:
        key += "-" + hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:8]
    final = cache_root(cache_dir) / "sasrec" / key
    cache.build_once(final, lambda tmp: train_sasrec(catalog.path, output_dir=tmp, **train_kwargs),
                     ready=lambda folder: (folder / CONFIG_FILE).exists(), problem=checkpoint_problem,
                     what="SASRec")  # a damaged cached one is reported in one line and retrained
    return load_sasrec(final, catalog, device=train_kwargs.get("device", "cpu"))


# --------------------------------------------------------------------------------------------------
# Evaluation and CLI


@torch.no_grad()
def evaluate_sasrec(model, catalog, split="test", protocol="clean", seed=0, max_samples=None,
                    batch_size=1024) -> dict:
    """Rank each row's 20 candidates by s(u,e) and compute metrics.candidate_metrics."""
    model.eval()
    rows = di.eval_rows(catalog, split, protocol, seed, max_samples)
    scores = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        scores += model.score_candidates([r["history_ids"] for r in chunk],
                                         [r["candidate_ids"] for r in chunk]).tolist()
    m, _ = metrics.candidate_metrics(scores, [r["candidate_ids"] for r in rows], [r["target_id"] for r in rows],
                                     di.target_popularity(catalog))
    return {"n_rows": len(rows), "split": split, "protocol": protocol, "model": "sasrec", **m}


def _summary(res: dict) -> str:
    r, p = res["ranking"], res["popularity"]
    return (f"sasrec {res['split']} [{res['protocol']}] n={res['n_rows']}  hr@1 {r['hr@1']:.4f}  "
            f"hr@5 {r['hr@5']:.4f}  ndcg@10 {r['ndcg@10']:.4f}  mrr {r['mrr']:.4f}  "
            f"top1 pop pct {p['top1_popularity_pct']:.1f}  tail hr@1 {p['hr@1_tail']:.4f}")


def train(dataset="lastfm", output_dir=None, epochs=30, batch_size=256, lr=2e-3, seed=0, device="cpu",
          time_budget_s=160, max_train_samples=None, dropout=0.5, weight_decay=0.0, patience=5, num_threads=1):
    """Train, save, then evaluate on test under both protocols (metrics_{clean,sdpo}.json).
    The default time budget (160 s) keeps a run under ~3 minutes; pass --time_budget_s None to lift it.

    Args:
        dataset: a dataset name under data/ or a dataset folder.
        output_dir: the checkpoint folder to write (required).
        epochs: at most this many epochs.
        batch_size: training rows per step.
        lr: AdamW learning rate.
        seed: seeds the initialisation, the order and the validation candidates.
        device: cpu or cuda.
        time_budget_s: stop before an epoch would end after this many seconds (None: no budget).
        max_train_samples: the first N train rows (None: all).
        dropout: dropout of the embeddings and the block.
        weight_decay: AdamW weight decay.
        patience: stop after this many epochs without a better validation HR@1.
        num_threads: torch threads while training (1 is fastest for this small model).
    """
    if output_dir is None:
        raise SASRecError("--output_dir is required")
    model, info = train_sasrec(dataset, output_dir, epochs, batch_size, lr, seed, device, time_budget_s,
                               max_train_samples, dropout, weight_decay, patience, num_threads)
    print(f"best val hr@1 {info['val_metric']['value']:.4f} at epoch {info['best_epoch']} "
          f"({info['epochs_run']} epochs, {info['train_seconds']}s); saved to {output_dir}")
    catalog = di.load_catalog(dataset)
    for protocol in di.PROTOCOLS:
        res = evaluate_sasrec(model, catalog, "test", protocol, seed)
        res["checkpoint"] = str(output_dir)
        cache.atomic_write_text(Path(output_dir) / f"metrics_{protocol}.json", json.dumps(res, indent=2) + "\n")
        print(_summary(res))


def evaluate(checkpoint, protocol="clean", dataset=None, split="test", seed=0, max_samples=None, output=None):
    """Evaluate a saved checkpoint on the 20-candidate rows and print its metrics.

    Args:
        checkpoint: the SASRec folder (sasrec_config.json + sasrec.safetensors).
        protocol: the candidate protocol: clean or sdpo.
        dataset: a dataset name or folder (default: the one it was trained on).
        split: test, val or train.
        seed: seeds the clean candidates.
        max_samples: the first N rows (None: all).
        output: a metrics JSON file to write.
    """
    di.check_protocol(protocol)
    model = load_sasrec(checkpoint)
    if dataset is None:  # the folder it was trained on if it still exists, else its name under data/
        path = Path(model.info.get("dataset_path", ""))
        dataset = path if path.is_dir() else model.info.get("dataset", "lastfm")
    catalog = di.load_catalog(dataset)
    check_items(model.cfg.n_items, catalog, checkpoint)
    res = evaluate_sasrec(model, catalog, split, protocol, seed, max_samples)
    res["checkpoint"] = str(checkpoint)
    if output:
        cache.atomic_write_text(output, json.dumps(res, indent=2) + "\n")
    print(_summary(res))


if __name__ == "__main__":
    import cli

    cli.run({"train": cli.validated(train), "evaluate": cli.validated(evaluate)})
