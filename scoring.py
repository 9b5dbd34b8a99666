"""Summed answer log-probabilities, with the prompt encoded once per example (prefix sharing).

`answer_logps(model, prompts, answers)` returns a (B, N) tensor: for prompt b and its answer j, the sum over the
answer tokens of log p(token | prompt, earlier answer tokens). Prompt tokens are not scored.

shared=True (default) packs one row per prompt, [prompt, ans_1, ..., ans_N], and uses a custom 4-D attention mask
so that every answer sees the prompt and its own earlier tokens only, never another answer. Position ids restart
at len(prompt) for every answer, so each answer is computed exactly as if it were appended alone to the prompt.
Cost: P + N*R tokens per example instead of N*(P+R): with a 7B tokenizer's P ≈ 200 prompt and R ≈ 5 answer
tokens, 3.7x fewer at N = 4 answers (K = 3 negatives), 14x at N = 20.

shared=False is the naive reference: one padded row per (prompt, answer) pair with an ordinary 2-D padding mask.

How the model is called: the FULL model forward, `model(input_ids, attention_mask, position_ids,
logits_to_keep=<bool (rows, L) mask>, use_cache=False)`. In transformers 5.24 a boolean 2-D `logits_to_keep`
makes the causal-LM head project only the selected positions and return logits of shape (num_selected, vocab)
(`modeling_utils.slice_logits_to_keep`). Calling the whole model (rather than its backbone + lm_head) keeps any
model-specific logit post-processing, goes through PEFT's forward (LoRA adapters, `disable_adapter()`), and
works with TRL's `add_fused_lm_head` patch, which only changes the forward when `fused_lm_head=True` is passed.
No `labels` are passed. Older transformers 5.x (5.17, as on the GPU machines) lack the boolean form: there every
position's logits are computed and the kept ones selected (same values, more memory).

Custom 4-D masks in transformers 5.24 (masking_utils.create_causal_mask): a 4-D tensor is returned as-is, so
it must already be in the format of the attention kernel. `eager` ADDS it to the scores, so it must be a float
additive mask (0 = attend, finfo(dtype).min = blocked); a bool mask would be silently added as 0/1. `sdpa`
accepts a bool mask (True = attend) and passes it to torch SDPA. Other kernels (flash_attention_*, flex) are
not supported by the shared path; use sdpa/eager or shared=False.
"""

from __future__ import annotations

import functools

import torch

from errors import ScoringInputError


def _ids(seq) -> list[int]:
    return seq.tolist() if isinstance(seq, torch.Tensor) else [int(t) for t in seq]


def pad_left_or_right(seqs: list[list[int]], pad, side: str, length: int | None = None) -> list[list[int]]:
    """Pad every list in `seqs` to `length` (default: the longest) with `pad`, on the `side` ('left'/'right')."""
    length = max(len(s) for s in seqs) if length is None else length
    if side == "right":
        return [list(s) + [pad] * (length - len(s)) for s in seqs]
    if side == "left":
        return [[pad] * (length - len(s)) + list(s) for s in seqs]
    raise ScoringInputError(f"scoring.py: padding_side must be 'left' or 'right', got {side!r}")


@functools.lru_cache(maxsize=None)
def _bool_logits_to_keep() -> bool:
    """Whether this transformers takes a boolean 2-D `logits_to_keep` (5.24 does, via modeling_utils.
    slice_logits_to_keep). Older 5.x releases, e.g. the 5.17 of the GPU machines (gpu_check.sh), index
    `hidden_states[:, logits_to_keep]` and raise; there the full logits are computed and the kept rows taken."""
    import transformers.modeling_utils as mu

    return hasattr(mu, "slice_logits_to_keep")


def kept_logits(model, ids, mask, pos, keep, **extra) -> torch.Tensor:
    """(n, V) logits of the n positions where the bool (R, L) `keep` is True, in row-major order: one forward
    of the full model with a boolean `logits_to_keep` (older transformers: every position, then the kept ones).
    `extra`: further keywords of the model's forward."""
    R, L = ids.shape
    if _bool_logits_to_keep():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep, use_cache=False,
                       **extra).logits
    else:  # every position's logits, then the kept ones in the same row-major order
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **extra).logits
        logits = logits.reshape(R * L, -1)[keep.reshape(-1)]
    n_keep = int(keep.sum())
    if logits.shape[:-1] != (n_keep,):
        raise RuntimeError(
            f"scoring.py: model forward ignored the boolean logits_to_keep (logits shape {tuple(logits.shape)}, "
            f"expected ({n_keep}, vocab)); needs transformers>=5 causal-LM forward"
        )
    return logits


def kernel_mask(model, allowed: torch.Tensor, dtype) -> torch.Tensor:
    """A custom (R, 1, L, L) bool `allowed` (True = attend) in the format of the model's attention kernel:
    as is for sdpa, an additive float mask for eager (see the module docstring); other kernels are refused."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl == "eager":  # eager adds the mask to the scores: additive float in the model dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)
    if impl in (None, "sdpa"):  # torch SDPA takes a bool mask, True = attend
        return allowed
    raise ScoringInputError(
        f"scoring.py: a custom 4-D mask needs attn_implementation 'sdpa' or 'eager', got {impl!r}; use shared=False"
    )


def _run(model, ids, pos, mask, src, tgt, owner, n_out):
    """One forward; returns (n_out,) fp32 sums of log p(tgt[t] | position src[t]) grouped by owner[t].

    ids/pos: (R, L) long; mask: 2-D padding mask or 4-D custom mask; src: (T,) flat indices into R*L of the
    position whose next-token distribution predicts target token tgt[t]; owner: (T,) output slot of token t.
    """
    R, L = ids.shape
    keep = torch.zeros(R * L, dtype=torch.bool, device=ids.device)
    keep[src] = True
    keep = keep.view(R, L)
    logits = kept_logits(model, ids, mask, pos, keep)
    # Kept logits come out in row-major order of `keep`, so a position's row in `logits` is its rank in `keep`.
    rank = keep.view(-1).cumsum(0) - 1
    logp = torch.log_softmax(logits.float(), dim=-1)[rank[src], tgt]
    return torch.zeros(n_out, dtype=torch.float32, device=logp.device).index_add(0, owner, logp)


def _shared_batch(model, prompts, answers, pad_token_id, side, device, dtype, L):
    """Pack [prompt, ans_1..ans_N] per prompt, padded to length L; return the arguments of _run."""
    n = len(answers[0])
    rows_ids, rows_pos, rows_seg, srcs, tgt, owner = [], [], [], [], [], []
    for b, (p, ans) in enumerate(zip(prompts, answers)):
        P = len(p)
        ids, pos, seg, src = list(p), list(range(P)), [0] * P, []
        for j, a in enumerate(ans):
            start = len(ids)
            ids += a
            pos += range(P, P + len(a))  # every answer restarts right after the prompt
            seg += [j + 1] * len(a)  # segment id: 0 = prompt, j+1 = answer j, -1 = padding
            # token k of the answer is predicted at the previous packed position; token 0 at the last prompt token
            src += [P - 1] + list(range(start, start + len(a) - 1))
            tgt += a
            owner += [b * n + j] * len(a)
        rows_ids.append(ids), rows_pos.append(pos), rows_seg.append(seg), srcs.append(src)
    flat_src = []
    for r, (row, src) in enumerate(zip(rows_ids, srcs)):
        off = r * L + (L - len(row) if side == "left" else 0)
        flat_src += [off + s for s in src]
    t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    ids = t(pad_left_or_right(rows_ids, pad_token_id, side, L))
    pos = t(pad_left_or_right(rows_pos, 0, side, L))
    seg = t(pad_left_or_right(rows_seg, -1, side, L))

    # 4-D mask (R, 1, L, L), query index q (row) x key index k (column), over packed indices:
    #   allowed[q, k] = k <= q  (causal in packed order)
    #                   and (seg[k] == seg[q]           same segment: prompt-prompt, ans_j-ans_j, pad-pad
    #                        or (seg[k] == 0 and seg[q] > 0))   any answer token sees the whole prompt
    # Answers never see other answers. Padding keys are never seen by real tokens; a padding query sees only
    # padding (itself at least), so no row is fully masked (no NaN in the softmax or its gradient).
    ar = torch.arange(L, device=device)
    causal = ar[None, :, None] >= ar[None, None, :]
    sq, sk = seg[:, :, None], seg[:, None, :]
    allowed = (causal & ((sk == sq) | ((sk == 0) & (sq > 0))))[:, None]
    mask = kernel_mask(model, allowed, dtype)
    return ids, pos, mask, t(flat_src), t(tgt), t(owner), len(prompts) * n


def _naive_batch(pairs, pad_token_id, side, device, L):
    """One row per (prompt, answer) pair, padded to length L, with a 2-D padding mask; return the arguments of _run."""
    seqs = [p + a for p, a in pairs]
    flat_src, tgt, owner = [], [], []
    for r, (p, a) in enumerate(pairs):
        off = r * L + (L - len(p) - len(a) if side == "left" else 0)
        flat_src += [off + len(p) - 1 + k for k in range(len(a))]
        tgt += a
        owner += [r] * len(a)
    t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    ids = t(pad_left_or_right(seqs, pad_token_id, side, L))
    attn = t(pad_left_or_right([[1] * len(s) for s in seqs], 0, side, L))
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # positions ignore left padding
    return ids, pos, attn, t(flat_src), t(tgt), t(owner), len(pairs)


def answer_logps(
    model, prompts, answers, *, shared=True, pad_token_id=0, padding_side="right", chunk_size=None
) -> torch.Tensor:
    """Summed log-probabilities of every answer given its prompt, as a float32 (B, N) tensor.

    prompts: B token-id lists (non-empty). answers: B lists of exactly N token-id lists (each >= 1 token, EOS
    included by the caller if wanted). shared: encode each prompt once (packed rows + 4-D mask) instead of
    concatenating prompt+answer for all B*N pairs. chunk_size: max rows per forward (packed rows if shared,
    prompt+answer rows otherwise). Differentiable under grad mode; never changes model.training.
    """
    prompts, answers = list(prompts), list(answers)
    if not prompts or len(prompts) != len(answers):
        raise ScoringInputError(
            f"scoring.py: need as many answer lists as prompts (>0), got {len(prompts)} prompts, "
            f"{len(answers)} answer lists"
        )
    prompts = [_ids(p) for p in prompts]
    answers = [[_ids(a) for a in ans] for ans in answers]
    n = len(answers[0])
    for b, (p, ans) in enumerate(zip(prompts, answers)):
        if not p:
            raise ScoringInputError(f"scoring.py: prompt {b} is empty")
        if len(ans) != n or n == 0:
            raise ScoringInputError(
                f"scoring.py: prompt {b} has {len(ans)} answers, expected the same N>0 as prompt 0 ({n})"
            )
        if any(len(a) == 0 for a in ans):
            raise ScoringInputError(f"scoring.py: prompt {b} has an empty answer (answers need >= 1 token)")
    if chunk_size is not None and chunk_size < 1:
        raise ScoringInputError(f"scoring.py: chunk_size must be >= 1 or None, got {chunk_size}")
    pad_left_or_right([[0]], 0, padding_side)  # validates padding_side

    pad_token_id = 0 if pad_token_id is None else pad_token_id  # pad ids are masked out; any valid id works
    # attribute look-ups go through a DDP/DataParallel wrapper; the forward itself is called on `model`
    wrapped = isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel))
    core = model.module if wrapped else model
    emb = core.get_input_embeddings().weight
    device, dtype = emb.device, emb.dtype
    B = len(prompts)
    # Every chunk is padded to the longest row of the whole call, so a row's computation does not depend on the
    # chunking (same shapes; results equal the unchunked ones up to BLAS rounding, <= 1e-6 seen, mostly bitwise).
    parts = []
    if shared:
        L = max(len(p) + sum(len(a) for a in ans) for p, ans in zip(prompts, answers))
        step = chunk_size or B
        for i in range(0, B, step):
            sl = slice(i, i + step)
            args = _shared_batch(core, prompts[sl], answers[sl], pad_token_id, padding_side, device, dtype, L)
            parts.append(_run(model, *args))
    else:
        pairs = [(p, a) for p, ans in zip(prompts, answers) for a in ans]  # row b*N + j
        L = max(len(p) + len(a) for p, a in pairs)
        step = chunk_size or len(pairs)
        for i in range(0, len(pairs), step):
            parts.append(_run(model, *_naive_batch(pairs[i : i + step], pad_token_id, padding_side, device, L)))
    return torch.cat(parts).view(B, n)
