"""NAPOTrainer: S-DPO with K negatives, in-batch negative sharing and a dynamic, personalised margin.

A subclass of TRL's DPOTrainer that overrides the documented TRL 1.x points: `_prepare_dataset` (our
tokenization, 1+K answers per prompt, item ids kept), the data collator (token lists as they are, item ids as
tensors), `_compute_loss` and `compute_ref_log_probs` (so `precompute_ref_log_probs` works). The maths lives in
napo_losses.py as pure functions; this file wires them to the model, the SASRec and (under torchrun) the other processes.

Per step, for the (global) batch:
  1. logπθ of the positive and the K own negatives, each prompt encoded once (scoring.answer_logps);
  2. rewards r = β(logπθ − logπref) (reference = frozen SFT adapter) or β·logπθ (reference-free);
  3. sharing: SASRec user vectors h_u; each example takes the negatives (rewards detached) of its
     floor(ρ(B−1)) most similar examples of the global batch; a shared item that is u's positive, in u's
     history, or one of u's own negatives is dropped;
  4. margin: S_u = mean SASRec score of u's pool under u's own history; M̄ ← m·M̄ + (1−m)·mean S (global);
     γ_u = γ0(1 − α(S_u − M̄)), clamped at 0 (mode `user`), one batch margin (mode `batch`), or 0 (`none`);
  5. L = mean_u −log σ(−log Σ_d exp(r_d − r_p) − γ_u).
Mode `authors` (`--margin_mode authors`) follows the NAPO authors' code instead: see authors_objective.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from trl import DPOTrainer

import cache
import data_interface as di
import scoring
import tokens
from napo_config import NAPOConfig  # its one home is napo_config.py (importable from here too)
from napo_losses import (  # noqa: F401  (re-exported: the loss family is importable from here too)
    MARGIN_MODES, authors_pool, build_negative_pool, dpo_loss, dynamic_margin, item_scores, napo_loss, num_shared,
    personal_scores, reward_accuracy, rewards, sdpo_loss, topk_similar, update_running_mean)


# --------------------------------------------------------------------------------------------------
# Cross-process helpers (no-ops with one process)


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """all_gather along dim 0 with per-rank sizes that may differ (a short last batch). Returns the global
    tensor (rank order, no gradient) and this rank's offset in it."""
    rank, size = world()
    if size == 1:
        return t.detach(), 0
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    width = max(sizes)
    padded = torch.zeros((width,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t.detach()
    parts = [torch.zeros_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]), sum(sizes[:rank])


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of x over the rows of all processes. The sums are taken in float64 (summing float32 first would
    round differently for different splits of the rows), so any split gives the one-process value."""
    total = torch.stack([x.detach().to(torch.float64).sum(),
                         torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)])
    if world()[1] > 1:
        dist.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).to(torch.float32)


# --------------------------------------------------------------------------------------------------
# The NAPO objective on one batch, given the rewards (shared by the trainer, the tests and the benchmark)


def napo_objective(chosen_r, own_rej_r, neg_ids, pos_ids, histories, cfg: NAPOConfig, sasrec=None, M_bar=None,
                   row_ids=None):
    """Per-example NAPO losses of this process's rows, plus statistics and the new running mean.

    chosen_r (B,), own_rej_r (B,K) attached rewards; neg_ids (B,K), pos_ids (B,), histories (B,L) item ids
    padded with the SASRec's padding id (sasrec.pad_id, the dataset's; the collator pads them on the left, the
    SASRec's layout). Histories and the SASRec are used only when cfg.needs_sasrec. With sharing on, the pool is
    built over the global batch (all processes). row_ids (B,): dataset row ids, read by mode `authors` only."""
    if cfg.margin_mode == "authors":
        return authors_objective(chosen_r, own_rej_r, neg_ids, histories, cfg, sasrec, M_bar, row_ids)
    B, K = own_rej_r.shape
    pool_r, pool_ids, mask = own_rej_r, neg_ids, torch.ones_like(own_rej_r, dtype=torch.bool)
    h = None
    if cfg.needs_sasrec:
        if sasrec is None:
            raise ValueError("sharing or a dynamic margin needs the SASRec (sasrec=None)")
        with torch.no_grad():
            h = sasrec.user_vectors(histories).to(own_rej_r.device)
    if cfg.share_negatives:
        g_h, offset = gather_rows(h)
        g_r, _ = gather_rows(own_rej_r)
        g_ids, _ = gather_rows(neg_ids)
        k = num_shared(cfg.rho, g_h.shape[0])
        nb = topk_similar(g_h, k)[offset: offset + B]
        pool_r, pool_ids, mask, _ = build_negative_pool(own_rej_r, neg_ids, g_r, g_ids, offset, nb, pos_ids,
                                                        histories, sasrec.pad_id)
    stats = {"equivalent_negatives": mask.sum(1).float()}
    gamma = torch.zeros(B, device=own_rej_r.device)
    if cfg.margin_mode != "none":
        w, b = sasrec.output_layer()
        S = personal_scores(h, w, b, pool_ids, mask)
        S_global = global_mean(S)
        M_bar = update_running_mean(M_bar, S_global, cfg.momentum)
        gamma, clamped = dynamic_margin(S, M_bar, cfg.gamma0, cfg.alpha, cfg.margin_mode, cfg.clamp_margin,
                                        batch_stat=S_global)
        stats.update({"S_mean": S.float(), "clamped": torch.tensor([clamped] * B, device=S.device)})
    stats["gamma"] = gamma.float()
    losses = napo_loss(chosen_r, pool_r, mask, gamma)
    stats["accuracy_pool"] = reward_accuracy(chosen_r.detach(), pool_r.detach(), mask)
    return losses, stats, M_bar


def authors_objective(chosen_r, own_rej_r, neg_ids, histories, cfg: NAPOConfig, sasrec, M_bar=None, row_ids=None):
    """napo_objective as the NAPO authors' code computes it (mode `authors`), to measure this project's
    corrections. Differences from the other modes, all on purpose here:
      * sharing on: the pool is taken from the gathered (gradient-free) rewards, own negatives included, so only
        the positive term trains; nothing is filtered (u's positive, history, own negatives may recur);
      * k = int(ρ(G−1)) (truncation); a neighbour never has u's dataset row id (row_ids; None = every row
        distinct), duplicates of u's row included;
      * one margin per batch and per PROCESS: M_t = mean SASRec score over every entry of this process's pool, a
        shared negative scored under its owner's history; M̄ starts at 0 and M̄ ← m·M̄ + (1−m)·M_t is averaged
        over the processes (= m·M̄ + (1−m)·mean over ranks of M_t); γ = γ0 − α(M_t − M̄)γ0, never clamped.
    Kept from this project: global indices for "own" rows under several processes (their code uses the local
    index), the stable log-sum-exp (their log(sum(exp)) overflows in float32 at a reward gap near 90), and eval
    batches not moving M̄ (their evaluation updates it too)."""
    if sasrec is None:
        raise ValueError("mode 'authors' needs the SASRec (sasrec=None)")
    B = own_rej_r.shape[0]
    with torch.no_grad():
        h = sasrec.user_vectors(histories).to(own_rej_r.device)
    w, b = sasrec.output_layer()
    own_s = item_scores(h, w, b, neg_ids)                  # (B,K): each negative under its owner's history
    pool_r, pool_s = own_rej_r, own_s                      # sharing off: own negatives keep their gradient
    if cfg.share_negatives:
        g_h, offset = gather_rows(h)
        g_r, _ = gather_rows(own_rej_r)
        g_s, _ = gather_rows(own_s)
        g_ids = gather_rows(row_ids.to(h.device))[0] if row_ids is not None else torch.arange(g_h.shape[0])
        nb = topk_similar(g_h, num_shared(cfg.rho, g_h.shape[0], truncate=True), row_ids=g_ids)[offset: offset + B]
        pool_r, pool_s = authors_pool(g_r, offset, nb), authors_pool(g_s, offset, nb)
    M_t = pool_s.mean()
    M_bar = update_running_mean(M_bar, global_mean(M_t.reshape(1)), cfg.momentum, start=0.0)
    gamma, negative = dynamic_margin(pool_s.mean(1), M_bar, cfg.gamma0, cfg.alpha, "authors", batch_stat=M_t)
    stats = {"equivalent_negatives": torch.full((B,), float(pool_r.shape[1]), device=own_rej_r.device),
             "S_mean": pool_s.mean(1).float(), "clamped": torch.tensor([negative] * B, device=own_rej_r.device),
             "gamma": gamma.float()}
    losses = napo_loss(chosen_r, pool_r, None, gamma)
    stats["accuracy_pool"] = reward_accuracy(chosen_r.detach(), pool_r.detach())
    return losses, stats, M_bar


# --------------------------------------------------------------------------------------------------
# Data: our tokenization, kept item ids, a collator that puts each field in the one form its consumer takes


class NAPOCollator:
    """A batch of prepared examples, each field in the form its one consumer takes, made once:
      prompt_ids    B token-id lists and answer_ids B lists of 1+K token-id lists (the chosen answer first), as
                    they are: scoring.answer_logps packs and pads them itself (each prompt encoded once);
      history_ids   (B, W) item ids LEFT-padded with the SASRec's padding id, newest item last: the SASRec's own
                    layout (SASRec.pad keeps it as it is) and the (B, L) form the pool filter reads; only when a
                    padding id is given (with a SASRec: plain S-DPO reads no history);
      target_id (B,), negative_ids (B, K); row_id (B,) (the dataset row) when the rows carry it;
      ref_chosen_logps (B,), ref_rejected_logps (B, K) when precomputed."""

    def __init__(self, pad_item_id: int | None = None):
        self.pad_item = pad_item_id

    def __call__(self, examples):
        batch = {
            "target_id": torch.tensor([e["target_id"] for e in examples]),
            "negative_ids": torch.tensor([list(e["negative_ids"]) for e in examples]),
        }
        if self.pad_item is not None:
            hist = [list(e["history_ids"]) for e in examples]
            width = max(1, max(map(len, hist)))
            batch["history_ids"] = torch.tensor([[self.pad_item] * (width - len(h)) + h for h in hist],
                                                dtype=torch.long)
        if "row_id" in examples[0]:
            batch["row_id"] = torch.tensor([e["row_id"] for e in examples])
        if "ref_chosen_logps" in examples[0]:
            batch["ref_chosen_logps"] = torch.tensor([e["ref_chosen_logps"] for e in examples])
            batch["ref_rejected_logps"] = torch.tensor([list(e["ref_rejected_logps"]) for e in examples])
        batch["prompt_ids"] = [list(e["prompt_ids"]) for e in examples]
        batch["answer_ids"] = [[list(e["chosen_ids"])] + [list(a) for a in e["rejected_ids"]] for e in examples]
        return batch


# --------------------------------------------------------------------------------------------------


class NAPOTrainer(DPOTrainer):
    """DPOTrainer with the S-DPO / NAPO objective. Pass `napo=NAPOConfig(...)` and the frozen `sasrec` (needed
    when sharing or a margin is on; its padding id pads the histories)."""

    def __init__(self, *args, napo: NAPOConfig, sasrec=None, **kwargs):
        napo.validate()
        self.napo = napo  # set before super().__init__, which calls _prepare_dataset
        if kwargs.get("args") is not None:  # β has one source, napo.beta; TRL's DPOConfig (logs, saved
            kwargs["args"].beta = napo.beta  # training_args.bin) records the same value
        self.sasrec = sasrec
        self.M_bar = None
        kwargs.setdefault("data_collator", NAPOCollator(sasrec.pad_id if sasrec is not None else None))
        super().__init__(*args, **kwargs)
        if self.sasrec is not None:
            self.sasrec.to(self.accelerator.device).eval()
            for p in self.sasrec.parameters():
                p.requires_grad_(False)

    # -- data ------------------------------------------------------------------------------------
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        K, max_len = self.napo.num_negatives, args.max_length

        def tokenize(example, row_id):
            prompt_ids, ans = tokens.encode_prompt_answers(processing_class, example["prompt"],
                                                             [example["chosen"]] + list(example["rejected"]))
            if max_len is not None and len(prompt_ids) + max(map(len, ans)) > max_len:
                raise di.DataError(f"{dataset_name} row: prompt+answer is {len(prompt_ids) + max(map(len, ans))} "
                                   f"tokens, over --cutoff_len {max_len} (rows are never truncated)")
            # row_id: the dataset row, so mode `authors` can exclude every copy of u's row from its neighbours
            return {"prompt_ids": prompt_ids, "chosen_ids": ans[0], "rejected_ids": ans[1:], "row_id": row_id}

        first = dataset[0]
        if len(first["rejected"]) != K:
            raise di.DataError(f"{dataset_name}: rows have {len(first['rejected'])} rejected answers, "
                               f"--num_negatives is {K}")
        return dataset.map(tokenize, with_indices=True, remove_columns=["prompt", "chosen", "rejected"])

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt_ids", "chosen_ids", "rejected_ids", "history_ids", "target_id",
                                       "negative_ids", "row_id", "ref_chosen_logps", "ref_rejected_logps"]

    # -- reference ---------------------------------------------------------------------------------
    def _ref_context(self):
        from trl.trainer.utils import use_adapter

        unwrapped = self.accelerator.unwrap_model(self.model)
        if self.ref_model is None and hasattr(unwrapped, "peft_config"):
            return unwrapped, use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return (self.ref_model or unwrapped), contextlib.nullcontext()

    def _reference_logps(self, prompts, answers):
        model, ctx = self._ref_context()
        with torch.no_grad(), ctx:
            return scoring.answer_logps(model, prompts, answers, shared=self.napo.shared_scoring,
                                        pad_token_id=self.processing_class.pad_token_id)

    def compute_ref_log_probs(self, model, inputs):
        """(chosen (B,), rejected (B,K)): used by the precompute_ref_log_probs pass."""
        ref = self._reference_logps(inputs["prompt_ids"], inputs["answer_ids"])
        return ref[:, 0], ref[:, 1:]

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """The precompute_ref_log_probs pass, kept in memory. TRL's version writes the result to a cache file
        named after the dataset; our datasets live in memory, so that file lands in a per-process temporary
        folder and under torchrun the other ranks cannot open rank 0's file. Here every rank scores its shard
        of the (unshuffled) rows, gathers all shards back in dataset order, and adds the two columns itself."""
        from torch.utils.data import DataLoader

        loader = self.accelerator.prepare(DataLoader(
            dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False,
            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory))
        chosen, rejected = [], []
        for batch in loader:
            c, r = self.compute_ref_log_probs(None, batch)
            c, r = self.accelerator.gather_for_metrics((c, r))  # rank order = dataset order; padding dropped
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
        chosen, rejected = torch.cat(chosen), torch.cat(rejected)
        if len(chosen) != len(dataset):
            raise RuntimeError(f"reference log-probs for {len(chosen)} {name} rows, the dataset has {len(dataset)}")
        return (dataset.add_column("ref_chosen_logps", chosen.tolist())
                .add_column("ref_rejected_logps", rejected.tolist()))

    # -- loss ----------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs, return_outputs=False):
        mode = "train" if self.model.training else "eval"
        cfg = self.napo
        prompts, answers = inputs["prompt_ids"], inputs["answer_ids"]
        logps = scoring.answer_logps(model, prompts, answers, shared=cfg.shared_scoring,
                                     pad_token_id=self.processing_class.pad_token_id)      # (B, 1+K)
        ref = None
        if cfg.reference:
            if "ref_chosen_logps" in inputs:
                ref = torch.cat([inputs["ref_chosen_logps"][:, None], inputs["ref_rejected_logps"]], 1).to(logps)
            else:
                ref = self._reference_logps(prompts, answers).to(logps)
        r = rewards(logps, ref, cfg.beta)
        chosen_r, rej_r = r[:, 0], r[:, 1:]
        losses, stats, M_bar = napo_objective(
            chosen_r, rej_r, inputs["negative_ids"], inputs["target_id"], inputs.get("history_ids"), cfg,
            self.sasrec, self.M_bar, inputs.get("row_id"))  # eval batches never move the trainer's running mean
        if mode == "train":
            self.M_bar = M_bar
        loss = losses.mean()
        self._log_metrics(mode, chosen_r, rej_r, logps, stats, M_bar)
        return (loss, {"losses": losses}) if return_outputs else loss

    def _log_metrics(self, mode, chosen_r, rej_r, logps, stats, M_bar):
        g = self.accelerator.gather_for_metrics
        m = self._metrics[mode]
        cr, rr = g(chosen_r.detach()), g(rej_r.detach())
        m["rewards/chosen"].append(cr.mean().item())
        m["rewards/rejected"].append(rr.mean().item())
        m["rewards/accuracies"].append((cr > rr.max(1).values).float().mean().item())
        m["rewards/margins"].append((cr - rr.mean(1)).mean().item())
        m["logps/chosen"].append(g(logps[:, 0].detach()).mean().item())
        m["logps/rejected"].append(g(logps[:, 1:].detach()).mean().item())
        m["napo/accuracy_pool"].append(g(stats["accuracy_pool"]).mean().item())
        m["napo/equivalent_negatives"].append(g(stats["equivalent_negatives"]).mean().item())
        gam = g(stats["gamma"])
        m["napo/gamma_mean"].append(gam.mean().item())
        m["napo/gamma_min"].append(gam.min().item())
        m["napo/gamma_max"].append(gam.max().item())
        if "S_mean" in stats:
            m["napo/S_mean"].append(g(stats["S_mean"]).mean().item())
            m["napo/gamma_clamped"].append(g(stats["clamped"]).mean().item())
            m["napo/M_bar"].append(float(M_bar))

    # -- checkpoints keep the running mean, so a resumed run continues exactly ------------------------
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.is_world_process_zero():
            ckpt = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
            cache.atomic_write_text(ckpt / "napo_state.json",
                                 json.dumps({"M_bar": self.M_bar, "napo": asdict(self.napo)}))

    def train(self, resume_from_checkpoint=None, **kwargs):
        if resume_from_checkpoint:
            state = Path(resume_from_checkpoint) / "napo_state.json"
            if state.exists():
                self.M_bar = json.loads(state.read_text())["M_bar"]
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
