"""Pure loss functions of NAPO and the methods it builds on (DPO, S-DPO).

Everything here is a small function on tensors (torch only, no transformers / torch.distributed), so the
trainer can call it and the tests can check it with hand-made tensors. Notation as in docs/method.md:
per example u, positive item p, negatives N_u, reward r(e), margin gamma_u.

Conventions
- Batch dimension first. Negatives are laid out as (B, M) with a boolean ``mask`` (True = this entry is a
  negative of the row). Masked entries never influence a loss value nor receive gradient, whatever they hold
  (even inf / NaN).
- Losses return one value per example, shape (B,); the trainer averages them.
- Losses are computed in at least float32 (bf16 / fp16 rewards are up-cast; float64 stays float64).
- Only ``logsumexp`` / ``logsigmoid`` are used, never ``log(sum(exp(.)))``, so rewards of +-1e4 give finite
  losses and gradients. (The authors' code computes ``log(sum(exp(.)))`` directly, which overflows to inf in
  float32 once a reward gap r(d) - r(p) reaches about 89; the `authors` mode keeps the stable form.)
- Bad input raises ``NAPOLossError`` (a ``ValueError``) with a one-line message.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from errors import NAPOLossError

__all__ = [
    "NAPOLossError",
    "rewards",
    "dpo_loss",
    "sdpo_loss",
    "napo_loss",
    "reward_accuracy",
    "num_shared",
    "topk_similar",
    "build_negative_pool",
    "authors_pool",
    "item_scores",
    "personal_scores",
    "update_running_mean",
    "dynamic_margin",
]

# user: personalised margin (default); batch: one margin per batch, with this project's corrections;
# authors: the NAPO authors' code as it is (see napo_trainer.authors_objective); none: no margin
from napo_config import MARGIN_MODES  # noqa: E402  (the one list of margin modes)


# ----------------------------------------------------------------------------------------------------------
# helpers

def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise NAPOLossError(f"napo_losses.py: {msg}")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Return x in at least float32 (autograd passes through the cast)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_negatives(chosen: torch.Tensor, rejected: torch.Tensor,
                     mask: Optional[torch.Tensor], fn: str) -> torch.Tensor:
    """Validate (B,), (B,M), (B,M) shapes; return a bool mask (all True when mask is None)."""
    _check(chosen.dim() == 1, f"{fn}: chosen_rewards must be (B,), got {tuple(chosen.shape)}")
    _check(rejected.dim() == 2 and rejected.shape[0] == chosen.shape[0],
           f"{fn}: rejected_rewards must be (B,M) with B={chosen.shape[0]}, got {tuple(rejected.shape)}")
    if mask is None:
        return torch.ones(rejected.shape, dtype=torch.bool, device=rejected.device)
    _check(mask.shape == rejected.shape,
           f"{fn}: mask shape {tuple(mask.shape)} != rejected_rewards shape {tuple(rejected.shape)}")
    _check(mask.dtype == torch.bool, f"{fn}: mask must be a bool tensor, got {mask.dtype}")
    return mask


# ----------------------------------------------------------------------------------------------------------
# rewards and losses: r(e) = β(logπθ − logπref) or β·logπθ; DPO, S-DPO (K negatives), NAPO (+ pool, γ_u)

def rewards(policy_logps: torch.Tensor, ref_logps: Optional[torch.Tensor], beta: float) -> torch.Tensor:
    """Implicit reward of a response.

        r(e) = beta * (log pi_theta(e|x) - log pi_ref(e|x))     with a reference model (DPO, S-DPO)
        r(e) = beta *  log pi_theta(e|x)                         reference-free (ref_logps=None, NAPO authors)

    ``*_logps`` are summed response log-probs of any (matching) shape; the result has the same shape and
    keeps the gradient of ``policy_logps``. ``ref_logps`` is detached (the reference is frozen).
    """
    if ref_logps is None:
        return beta * policy_logps
    _check(ref_logps.shape == policy_logps.shape,
           f"rewards: ref_logps shape {tuple(ref_logps.shape)} != policy_logps shape {tuple(policy_logps.shape)}")
    return beta * (policy_logps - ref_logps.detach())


def dpo_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """DPO:  L = -log sigmoid( r(p) - r(d) ),  per example, shape (B,)."""
    _check(chosen_rewards.dim() == 1 and chosen_rewards.shape == rejected_rewards.shape,
           f"dpo_loss: expected two (B,) tensors, got {tuple(chosen_rewards.shape)} and "
           f"{tuple(rejected_rewards.shape)}")
    return -F.logsigmoid(_upcast(chosen_rewards) - _upcast(rejected_rewards))


def napo_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
              mask: Optional[torch.Tensor] = None,
              gamma: Union[float, torch.Tensor] = 0.0) -> torch.Tensor:
    """NAPO (softmax loss with a margin), per example, shape (B,):

        L_u = -log sigmoid( -logsumexp_{d in N_u} ( r(d) - r(p) ) - gamma_u )

    chosen_rewards (B,) = r(p); rejected_rewards (B,M) = r(d) for the pool of negatives (own + shared);
    mask (B,M) bool, True where the entry belongs to N_u (None = all); gamma a float or a (B,) tensor.
    The margin is a constant: gamma is detached. gamma = 0 gives S-DPO exactly.

    A row with no valid negative (N_u empty) has logsumexp = -inf, i.e. L_u = -log sigmoid(+inf) = 0; it is
    returned as exactly 0 with zero gradient (computed on safe placeholder values, so no NaN appears in the
    forward or backward pass).
    """
    mask = _check_negatives(chosen_rewards, rejected_rewards, mask, "napo_loss")
    chosen = _upcast(chosen_rewards)
    rejected = _upcast(rejected_rewards)
    dtype = torch.promote_types(chosen.dtype, rejected.dtype)
    chosen, rejected = chosen.to(dtype), rejected.to(dtype)

    has_neg = mask.any(dim=1)                                        # (B,)
    diff = rejected - chosen.unsqueeze(1)                            # r(d) - r(p), (B,M)
    # torch.where (not multiplication) so masked inf/NaN cannot leak into the value or the gradient
    diff = torch.where(mask, diff, torch.full_like(diff, float("-inf")))
    # rows without any negative: placeholder zeros keep logsumexp finite; their loss is zeroed below
    diff = torch.where(has_neg.unsqueeze(1), diff, torch.zeros_like(diff))
    lse = torch.logsumexp(diff, dim=1)                               # (B,)

    if isinstance(gamma, torch.Tensor):
        g = gamma.detach().to(device=lse.device, dtype=dtype)
        _check(g.dim() == 0 or g.shape == lse.shape,
               f"napo_loss: gamma must be a scalar or (B,)={tuple(lse.shape)}, got {tuple(g.shape)}")
        logits = -lse - g
    elif gamma == 0:
        logits = -lse                    # no "- 0.0": keeps S-DPO bit-exact, also for -0.0 corner cases
    else:
        logits = -lse - float(gamma)

    loss = -F.logsigmoid(logits)
    return torch.where(has_neg, loss, torch.zeros_like(loss))


def sdpo_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
              mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """S-DPO (softmax DPO), per example, shape (B,):

        L_u = -log sigmoid( -logsumexp_{d in N_u} ( r(d) - r(p) ) )

    Over the negatives where ``mask`` is True (None = all). With one negative this is DPO exactly. Its
    gradient w.r.t. r(d) is  sigmoid(logsumexp(.)) * softmax_{d in N_u}(r(d)): harder negatives weigh more.
    Reference-free at beta = 1 over all the other candidates (r = log p) it is SFT's loss plus log P(candidates):
    -log p(target) + log sum_c p(c), value and gradient (tests/test_losses.py; docs/method.md).
    Rows with no valid negative get loss 0 (see ``napo_loss``).
    """
    return napo_loss(chosen_rewards, rejected_rewards, mask, gamma=0.0)


def reward_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per example 1.0 if r(p) > r(d) for EVERY valid negative d, else 0.0; shape (B,) float.

    Ties count as failures (strict >). A row without valid negatives is vacuously 1.0.
    """
    mask = _check_negatives(chosen_rewards, rejected_rewards, mask, "reward_accuracy")
    beats = chosen_rewards.detach().unsqueeze(1) > rejected_rewards.detach()
    return (beats | ~mask).all(dim=1).float()


# ----------------------------------------------------------------------------------------------------------
# in-batch negative sharing: each example also takes the (detached) negatives of its floor(ρ(B−1)) most
# similar examples of the global batch, by the dot product of SASRec user vectors

def num_shared(rho: float, batch_size: int, truncate: bool = False) -> int:
    """Number of neighbours whose negatives are shared: k = floor(rho * (G - 1)), G = GLOBAL batch size.

    A tiny epsilon protects against float products such as 0.57 * 100 = 56.99999999999999. With ``truncate``
    (the authors' code) k = int(rho * (G - 1)), plain truncation: 56 there.
    """
    _check(0.0 <= rho <= 1.0, f"num_shared: rho must be in [0, 1], got {rho}")
    _check(batch_size >= 1, f"num_shared: batch size must be >= 1, got {batch_size}")
    if truncate:
        return int(rho * (batch_size - 1))
    return int(math.floor(rho * (batch_size - 1) + 1e-9))


@torch.no_grad()
def topk_similar(user_vecs: torch.Tensor, k: int, row_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Indices (G,k) long of the k most similar OTHER examples, by dot product sim(u,v) = h_u . h_v.

    Row i never contains i (self is removed from the candidates, not just down-weighted, so it holds for
    duplicated vectors and when self-similarity is below others). Order: most similar first; ties broken by
    the lower index (stable sort), so the result is deterministic. Run it on the GLOBAL batch of user
    vectors; a process takes rows [offset, offset + local_batch).

    With ``row_ids`` (G,) (the authors' self-exclusion) every entry j whose dataset row id equals row i's, i
    itself included, is ranked after all the others (similarity -inf) instead: it is picked only when fewer
    than k other rows remain, as their argsort over -inf entries would.
    """
    _check(user_vecs.dim() == 2, f"topk_similar: user_vecs must be (G,d), got {tuple(user_vecs.shape)}")
    G = user_vecs.shape[0]
    _check(0 <= k <= max(G - 1, 0), f"topk_similar: k={k} must be in [0, G-1={G - 1}]")
    _check(bool(torch.isfinite(user_vecs).all()), "topk_similar: user_vecs contain inf/NaN")
    _check(row_ids is None or tuple(row_ids.shape) == (G,),
           f"topk_similar: row_ids must be ({G},), got {None if row_ids is None else tuple(row_ids.shape)}")
    device = user_vecs.device
    if k == 0:
        return torch.zeros((G, 0), dtype=torch.long, device=device)
    vecs = _upcast(user_vecs)
    sims = vecs @ vecs.T                                             # (G,G)
    if row_ids is not None:
        ids = row_ids.to(device)
        same = ids.unsqueeze(1) == ids.unsqueeze(0)                  # (G,G), True on the diagonal
        sims = torch.where(same, torch.full_like(sims, float("-inf")), sims)
        return torch.sort(-sims, dim=1, stable=True).indices[:, :k]
    # candidates of row i: all j != i, in increasing order  (j < i -> j ; j >= i -> j + 1)
    j = torch.arange(G - 1, device=device).unsqueeze(0)              # (1,G-1)
    i = torch.arange(G, device=device).unsqueeze(1)                  # (G,1)
    cand = j + (j >= i).long()                                       # (G,G-1)
    cand_sims = sims.gather(1, cand)
    # stable ascending sort of -sim == descending sim with ties kept in index order
    order = torch.sort(-cand_sims, dim=1, stable=True).indices[:, :k]
    return cand.gather(1, order)


def build_negative_pool(own_rewards: torch.Tensor, own_item_ids: torch.Tensor,
                        global_rewards: torch.Tensor, global_item_ids: torch.Tensor,
                        offset: int, neighbours: torch.Tensor,
                        positives: torch.Tensor, histories: torch.Tensor, pad_id: int,
                        drop_shared_duplicates: bool = False,
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pool N_u = own negatives + negatives of the k nearest examples of the global batch.

    own_rewards (B,K)      rewards of this process's own negatives, WITH gradient.
    own_item_ids (B,K)     their item ids.
    global_rewards (G,K)   rewards of all examples of the global batch (all_gather'ed; with one process the
                           same tensor as own_rewards). Used DETACHED: shared negatives get no gradient.
    global_item_ids (G,K)  their item ids.
    offset                 global index of this process's first example (rank * local_batch); local row i
                           is global row offset + i (must not appear among its own neighbours).
    neighbours (B,k)       global indices of each local example's neighbours (rows offset..offset+B-1 of
                           ``topk_similar(global_user_vecs, k)``).
    positives (B,)         positive item id of each example.
    histories (B,L)        history item ids, padded with pad_id (pad entries are ignored).

    Returns, each (B, K + k*K), columns = [own K | neighbour 1's K | ... | neighbour k's K]:
      rewards   own columns attached, shared columns detached;
      item_ids;
      mask      True = counts as a negative of u. Own negatives are always True. A shared negative is False
                when its item is u's positive, occurs in u's history, or equals one of u's OWN negative
                items (the same item would otherwise be counted twice, once with u's own reward and once
                with a neighbour's reward; the own copy wins because it carries the gradient and was scored
                under u's prompt). With ``drop_shared_duplicates`` a shared item that already appeared in an
                earlier shared column of the row is dropped too (off by default: the same item under two
                different users' prompts gives two different rewards, i.e. two "equivalent negatives");
      is_own    True on the first K columns.
    """
    fn = "build_negative_pool"
    _check(own_rewards.dim() == 2, f"{fn}: own_rewards must be (B,K), got {tuple(own_rewards.shape)}")
    B, K = own_rewards.shape
    _check(own_item_ids.shape == (B, K), f"{fn}: own_item_ids must be {(B, K)}, got {tuple(own_item_ids.shape)}")
    _check(global_rewards.dim() == 2 and global_rewards.shape[1] == K,
           f"{fn}: global_rewards must be (G,{K}), got {tuple(global_rewards.shape)}")
    G = global_rewards.shape[0]
    _check(global_item_ids.shape == (G, K),
           f"{fn}: global_item_ids must be {(G, K)}, got {tuple(global_item_ids.shape)}")
    _check(0 <= offset and offset + B <= G, f"{fn}: offset={offset} + local batch {B} exceeds global batch {G}")
    _check(neighbours.dim() == 2 and neighbours.shape[0] == B,
           f"{fn}: neighbours must be (B={B},k), got {tuple(neighbours.shape)}")
    _check(positives.shape == (B,), f"{fn}: positives must be ({B},), got {tuple(positives.shape)}")
    _check(histories.dim() == 2 and histories.shape[0] == B,
           f"{fn}: histories must be (B={B},L), got {tuple(histories.shape)}")
    k = neighbours.shape[1]
    device = own_rewards.device
    neighbours = neighbours.to(device=device, dtype=torch.long)
    if k:
        _check(bool(((neighbours >= 0) & (neighbours < G)).all()),
               f"{fn}: neighbour indices must be in [0, {G})")
        self_rows = torch.arange(offset, offset + B, device=device).unsqueeze(1)
        _check(not bool((neighbours == self_rows).any()),
               f"{fn}: an example lists itself (global row offset+i) as a neighbour")

    # shared part: (B,k,K) -> (B,k*K), rewards detached
    shared_rewards = global_rewards.detach().to(device)[neighbours].reshape(B, k * K)
    shared_ids = global_item_ids.to(device)[neighbours].reshape(B, k * K)
    shared_rewards = shared_rewards.to(own_rewards.dtype)
    own_ids = own_item_ids.to(device)

    pos = positives.to(device).unsqueeze(1)                          # (B,1)
    hist = histories.to(device)
    hist_valid = (hist != pad_id).unsqueeze(1)                       # (B,1,L)
    in_hist = ((shared_ids.unsqueeze(2) == hist.unsqueeze(1)) & hist_valid).any(dim=2)
    is_pos = shared_ids == pos
    dup_own = (shared_ids.unsqueeze(2) == own_ids.unsqueeze(1)).any(dim=2)
    shared_mask = ~(is_pos | in_hist | dup_own)
    if drop_shared_duplicates and k * K > 1:
        same = shared_ids.unsqueeze(2) == shared_ids.unsqueeze(1)    # (B,S,S): [b, c, c'] same item
        earlier = torch.ones(k * K, k * K, dtype=torch.bool, device=device).tril(diagonal=-1)  # c' < c
        shared_mask &= ~(same & earlier).any(dim=2)

    pool_rewards = torch.cat([own_rewards, shared_rewards], dim=1)
    pool_ids = torch.cat([own_ids, shared_ids.to(own_ids.dtype)], dim=1)
    own_true = torch.ones((B, K), dtype=torch.bool, device=device)
    pool_mask = torch.cat([own_true, shared_mask], dim=1)
    is_own = torch.cat([own_true, torch.zeros((B, k * K), dtype=torch.bool, device=device)], dim=1)
    return pool_rewards, pool_ids, pool_mask, is_own


def authors_pool(global_values: torch.Tensor, offset: int, neighbours: torch.Tensor) -> torch.Tensor:
    """The authors' pool of one process's rows, (B, K + k*K): columns [own K | neighbour 1's K | ...], all
    taken from the GATHERED (G,K) tensor, so with rewards nothing in it keeps a gradient (own negatives
    included) and nothing is filtered. Local row i is global row offset + i (their code indexes the gathered
    tensor with i itself, so on ranks other than 0 its "own" columns are rank 0's; that is not reproduced).
    Works for any per-negative value: rewards, or SASRec scores under the owner's history."""
    _check(global_values.dim() == 2, f"authors_pool: global_values must be (G,K), got {tuple(global_values.shape)}")
    G, K = global_values.shape
    _check(neighbours.dim() == 2, f"authors_pool: neighbours must be (B,k), got {tuple(neighbours.shape)}")
    B, k = neighbours.shape
    _check(0 <= offset and offset + B <= G, f"authors_pool: offset={offset} + local batch {B} exceeds G={G}")
    values = global_values.detach()
    nb = neighbours.to(device=values.device, dtype=torch.long)
    return torch.cat([values[offset: offset + B], values[nb].reshape(B, k * K)], dim=1)


# ----------------------------------------------------------------------------------------------------------
# dynamic, personalised margin: γ_u = γ0(1 − α(S_u − M̄)), S_u = mean SASRec score of u's negatives

@torch.no_grad()
def item_scores(user_vecs: torch.Tensor, item_emb: torch.Tensor, item_bias: Optional[torch.Tensor],
                item_ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """s(u,e) = h_u . w_e + b_e for every entry, (B,M) detached, float32 or wider: the SASRec logit of item e
    for u's history. user_vecs (B,d) = h_u; item_emb (n_items,d) = w (SASRec output-layer weight); item_bias
    (n_items,) or None; item_ids (B,M); mask (B,M) bool (None = all valid): entries under False are ignored
    (their ids may be pad) and scored 0."""
    fn = "item_scores"
    _check(user_vecs.dim() == 2, f"{fn}: user_vecs must be (B,d), got {tuple(user_vecs.shape)}")
    B, d = user_vecs.shape
    _check(item_emb.dim() == 2 and item_emb.shape[1] == d,
           f"{fn}: item_emb must be (n_items,{d}), got {tuple(item_emb.shape)}")
    n_items = item_emb.shape[0]
    _check(item_bias is None or item_bias.shape == (n_items,),
           f"{fn}: item_bias must be ({n_items},) or None, got "
           f"{None if item_bias is None else tuple(item_bias.shape)}")
    _check(item_ids.dim() == 2 and item_ids.shape[0] == B,
           f"{fn}: item_ids must be (B={B},M), got {tuple(item_ids.shape)}")
    if mask is None:
        mask = torch.ones(item_ids.shape, dtype=torch.bool, device=item_ids.device)
    _check(mask.shape == item_ids.shape and mask.dtype == torch.bool,
           f"{fn}: mask must be a bool tensor of shape {tuple(item_ids.shape)}")
    device = user_vecs.device
    mask = mask.to(device)
    ids = torch.where(mask, item_ids.to(device).long(), torch.zeros_like(item_ids, device=device).long())
    _check(bool(((ids >= 0) & (ids < n_items)).all()), f"{fn}: valid item ids must be in [0, {n_items})")

    h = _upcast(user_vecs)
    w = item_emb.to(device=device, dtype=h.dtype)[ids]               # (B,M,d)
    s = torch.einsum("bd,bmd->bm", h, w)
    if item_bias is not None:
        s = s + item_bias.to(device=device, dtype=h.dtype)[ids]
    return torch.where(mask, s, torch.zeros_like(s))


@torch.no_grad()
def personal_scores(user_vecs: torch.Tensor, item_emb: torch.Tensor, item_bias: Optional[torch.Tensor],
                    item_ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """S_u = mean_{d in N_u} s(u,d),  s(u,e) = h_u . w_e + b_e   (the SASRec logit of e for u's history).

    Arguments as ``item_scores``. Shared negatives are scored with u's OWN vector, so the margin is personal.
    Returns (B,) detached, float32 or wider. A row with no valid entry gets 0 (cannot happen when every
    example has >= 1 own negative).
    """
    if mask is None:
        mask = torch.ones(item_ids.shape, dtype=torch.bool, device=item_ids.device)
    s = item_scores(user_vecs, item_emb, item_bias, item_ids, mask)
    count = mask.to(s.device).sum(dim=1)
    return s.sum(dim=1) / count.clamp(min=1).to(s.dtype)


def update_running_mean(M_bar: Optional[float], batch_mean: Union[float, torch.Tensor],
                        momentum: float, start: Optional[float] = None) -> float:
    """Running mean of the negatives' confidence:  M_bar <- m * M_bar + (1 - m) * batch_mean.

    ``batch_mean`` = mean_u S_u over the GLOBAL batch (the trainer all-reduces it). M_bar is updated
    before it is used in the margin of the same step (as in the authors' code). On the first step (M_bar None)
    there is no history, so M_bar is initialised to batch_mean (not to 0, which would bias the first margins
    by the raw logit scale). With ``start`` (the authors: 0.0) the first step instead updates M_bar = start:
    M_bar_1 = m * start + (1 - m) * batch_mean.
    """
    _check(0.0 <= momentum <= 1.0, f"update_running_mean: momentum must be in [0, 1], got {momentum}")
    x = float(batch_mean.detach().item()) if isinstance(batch_mean, torch.Tensor) else float(batch_mean)
    _check(math.isfinite(x), f"update_running_mean: batch_mean is not finite ({x})")
    if M_bar is None:
        if start is None:
            return x
        M_bar = start
    return momentum * float(M_bar) + (1.0 - momentum) * x


@torch.no_grad()
def dynamic_margin(S: torch.Tensor, M_bar: Optional[float], gamma0: float, alpha: float,
                   mode: str = "user", clamp: bool = True,
                   batch_stat: Optional[Union[float, torch.Tensor]] = None) -> Tuple[torch.Tensor, float]:
    """Margin gamma (B,) (a constant, no grad) and the fraction of rows whose raw margin was < 0.

      user   : gamma_u = gamma0 * (1 - alpha * (S_u - M_bar))                   (default; personal)
      batch  : gamma   = gamma0 * (1 - alpha * (M_t - M_bar)) for every row      (one margin per batch, with
               this project's corrections: M_t = ``batch_stat`` if given (the trainer passes the GLOBAL
               mean of S, S over the filtered pool scored under u's history), else mean(S) locally)
      authors: gamma   = gamma0 - alpha * (M_t - M_bar) * gamma0 for every row   (the authors' code, as
               written; M_t = ``batch_stat`` (the trainer passes this PROCESS's mean pool score, each
               entry scored under its owner's history), else mean(S); never clamped, whatever ``clamp``)
      none   : gamma = 0

    With ``clamp`` (default) gamma = max(gamma, 0); the returned fraction counts rows whose unclamped
    margin was negative (also reported when clamp=False, then as "would have clamped").
    """
    _check(mode in MARGIN_MODES, f"dynamic_margin: mode must be one of {MARGIN_MODES}, got {mode!r}")
    _check(S.dim() == 1, f"dynamic_margin: S must be (B,), got {tuple(S.shape)}")
    S = _upcast(S.detach())
    if mode == "none":
        return torch.zeros_like(S), 0.0
    _check(M_bar is not None, "dynamic_margin: M_bar is None (call update_running_mean first)")
    if mode == "user":
        raw = gamma0 * (1.0 - alpha * (S - float(M_bar)))
    else:
        if batch_stat is None:
            stat = S.mean()
        else:
            stat = torch.as_tensor(batch_stat, dtype=S.dtype, device=S.device).detach()
            _check(stat.numel() == 1, f"dynamic_margin: batch_stat must be a scalar, got shape {tuple(stat.shape)}")
            stat = stat.reshape(())
        if mode == "authors":
            raw = (gamma0 - alpha * (stat - float(M_bar)) * gamma0).expand_as(S).clone()
            clamp = False
        else:
            raw = (gamma0 * (1.0 - alpha * (stat - float(M_bar)))).expand_as(S).clone()
    neg = raw < 0
    frac = float(neg.float().mean().item()) if raw.numel() else 0.0
    gamma = raw.clamp(min=0.0) if clamp else raw
    return gamma, frac
