"""The embedded model's pretraining loss (its build: tiny_build.py; its documents: pretrain_data.py).

The two kinds of document weigh alike: the mean next-token cross-entropy over the windows' tokens + the mean
over the list prompts' answer tokens (one title + EOS each, ~1% of the tokens: counted per token they would
barely register). A list prompt's first answer token is scored by the list loss, −log P(first token ∈ the
candidates' first tokens): answer from the list, which one is left to the model's sequence knowledge (a uniform
pick carries no preference to learn). With `pretrain_list_detach="lm"` (tiny's default) that position's LM-head
logits are detached, so the list loss lifts the candidates through the copy head only and never pushes the LM's
own ranking of the titles.

`batch_inputs` turns a batch of encoded documents into tensors (packed rows, or one padded row per document:
the baseline `python benchmark.py build` times), `batch_loss` computes the loss either way (the same value:
tests/test_list_recall.py checks it).
"""
from __future__ import annotations

import torch

import data_interface as di
import pretrain_data
import scoring


def pretrain_loss(logits, labels, cand_first, first_at=None) -> torch.Tensor:
    """flat_pretrain_loss of a padded batch: logits (B, T, V) and labels (B, T) of B documents, one per row
    (position t predicts labels[t + 1]; -100 = not scored); cand_first (B, 20) and first_at as there."""
    keep = labels[:, 1:] != -100
    return flat_pretrain_loss(logits[:, :-1][keep], labels[:, 1:][keep], keep.nonzero()[:, 0], cand_first, first_at)


def list_answer_first(doc, cand_first, first_at=None) -> torch.Tensor:
    """Indices, among the n scored positions of flat_pretrain_loss (doc (n,) their documents), of the positions
    predicting each list prompt's first answer token (after first_at[d] shared tokens), in document order."""
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[1:] = doc[1:] != doc[:-1]
    first = (starts & (cand_first[:, 0] >= 0)[doc]).nonzero()[:, 0]
    first = first[doc[first].argsort()]  # in document order
    if first_at is not None:  # after the tokens every answer starts with (tiny-bpe: the space)
        first = first + first_at[doc[first]]
    return first


def flat_pretrain_loss(logits, targets, doc, cand_first, first_at=None) -> torch.Tensor:
    """The loss of the module's docstring from the scored positions only: logits (n, V) of the n positions that
    predict a label, targets (n,) those labels, doc (n,) which document of the batch each belongs to (a
    document's positions consecutive and in order, documents in any order). cand_first: (D, 20) the candidates'
    first answer tokens of each document, -1 on windows; first_at: (D,) which of a list prompt's answer tokens
    is its first (ListDoc.first_at; None = the answer's very first)."""
    ce = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    is_list = (cand_first[:, 0] >= 0)[doc]
    if is_list.any():
        first = list_answer_first(doc, cand_first, first_at)
        logp = logits[first].float().log_softmax(-1)
        ce = ce.clone()
        ce[first] = -torch.logsumexp(logp.gather(-1, cand_first[doc[first]]), -1)
    loss = logits.new_zeros((), dtype=torch.float32)
    for kind in (is_list, ~is_list):
        if kind.any():
            loss = loss + ce[kind].mean()
    return loss


def batch_inputs(model, batch, pad_token_id, pack: bool) -> dict:
    """The tensors of one build step (batch_loss' input): packed rows (pretrain_data.pack_batch) with their 4-D
    mask, or (pack False: the build before packing, kept as the benchmark's baseline) one padded row per document."""
    cand_first = torch.tensor([d.cand_first if d else [-1] * di.NUM_CANDIDATES for _, _, d in batch])
    first_at = torch.tensor([d.first_at if d else 0 for _, _, d in batch])
    out = dict(cand_first=cand_first, first_at=first_at, tokens=sum(len(e[0]) for e in batch))
    if pack:
        p = pretrain_data.pack_batch(batch, pad_token_id)
        return dict(out, packed=p, mask=scoring.kernel_mask(model, p.allowed, torch.float32), positions=p.rows_padded)
    width = max(len(e[0]) for e in batch)
    ids = torch.full((len(batch), width), pad_token_id)
    labels = torch.full((len(batch), width), -100)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for j, (e, lab, _) in enumerate(batch):
        ids[j, :len(e)] = torch.tensor(e)
        labels[j, :len(e)] = torch.tensor(lab)
        mask[j, :len(e)] = 1
    return dict(out, ids=ids, labels=labels, mask=mask, positions=mask.numel())


def batch_loss(model, inputs: dict, list_detach=None) -> torch.Tensor:
    """One build step's loss (with gradient) from batch_inputs: packed, the logits of the scored positions
    only (flat_pretrain_loss); padded, every position's (pretrain_loss). The same value either way.
    list_detach "lm" (pretrain_list_detach): the positions predicting a list answer's first token take their
    LM-head logits detached (the model's detach_lm; the value and the copy head's gradients are unchanged)."""
    def first_mask(keep, doc):  # (R, L) bool: the kept positions predicting a list answer's first token
        flat = torch.zeros(int(keep.sum()), dtype=torch.bool, device=keep.device)
        flat[list_answer_first(doc, inputs["cand_first"], inputs["first_at"])] = True
        return torch.zeros_like(keep).masked_scatter(keep, flat)

    if "packed" in inputs:
        p = inputs["packed"]
        extra = {"detach_lm": first_mask(p.keep, p.doc)} if list_detach == "lm" else {}
        logits = scoring.kept_logits(model, p.ids, inputs["mask"], p.pos, p.keep, **extra)
        return flat_pretrain_loss(logits, p.targets, p.doc, inputs["cand_first"], inputs["first_at"])
    extra = {}
    if list_detach == "lm":
        keep = inputs["labels"][:, 1:] != -100
        extra["detach_lm"] = torch.nn.functional.pad(first_mask(keep, keep.nonzero()[:, 0]), (0, 1), value=False)
    logits = model(input_ids=inputs["ids"], attention_mask=inputs["mask"], **extra).logits
    return pretrain_loss(logits, inputs["labels"], inputs["cand_first"], inputs["first_at"])
