"""Tests of the pure loss functions in napo_losses.py (hand-made tensors, CPU, < 1 s)."""

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from napo_losses import (  # noqa: E402
    NAPOLossError,
    build_negative_pool,
    dpo_loss,
    dynamic_margin,
    napo_loss,
    num_shared,
    personal_scores,
    reward_accuracy,
    rewards,
    sdpo_loss,
    topk_similar,
    update_running_mean,
)

PAD = 99


# ---------------------------------------------------------------------------------------------- losses

def test_rewards_with_and_without_reference():
    pol = torch.tensor([-3.0, -1.0], requires_grad=True)
    ref = torch.tensor([-2.0, -4.0], requires_grad=True)
    r = rewards(pol, ref, beta=0.5)
    assert torch.allclose(r, torch.tensor([-0.5, 1.5]))
    r.sum().backward()
    assert ref.grad is None                        # the reference is frozen
    assert torch.allclose(pol.grad, torch.tensor([0.5, 0.5]))
    assert torch.allclose(rewards(pol, None, beta=2.0), torch.tensor([-6.0, -2.0]))


def test_sdpo_with_one_negative_equals_dpo_exactly():
    g = torch.Generator().manual_seed(0)
    chosen = torch.randn(64, generator=g) * 5
    rejected = torch.randn(64, generator=g) * 5
    expected = -F.logsigmoid(chosen - rejected)
    assert torch.equal(dpo_loss(chosen, rejected), expected)
    assert torch.equal(sdpo_loss(chosen, rejected.unsqueeze(1)), expected)
    assert torch.equal(sdpo_loss(chosen, rejected.unsqueeze(1), torch.ones(64, 1, dtype=torch.bool)), expected)


def test_sdpo_equals_log_one_plus_k_when_rewards_equal():
    for K in (1, 3, 19):
        chosen = torch.full((4,), 2.5)
        rejected = torch.full((4, K), 2.5)
        assert torch.allclose(sdpo_loss(chosen, rejected), torch.full((4,), math.log(1 + K)))


def test_sdpo_matches_closed_form():
    chosen = torch.tensor([1.0, -2.0], dtype=torch.float64)
    rejected = torch.tensor([[0.0, 2.0, -1.0], [-3.0, -2.5, 0.5]], dtype=torch.float64)
    expected = torch.log1p(torch.exp(rejected - chosen[:, None]).sum(1))   # -log sigmoid(-log sum exp)
    assert torch.allclose(sdpo_loss(chosen, rejected), expected)


def test_napo_with_gamma_zero_and_no_sharing_equals_sdpo():
    g = torch.Generator().manual_seed(1)
    B, K = 5, 3
    chosen = torch.randn(B, generator=g)
    own = torch.randn(B, K, generator=g)
    ids = torch.arange(B * K).reshape(B, K)
    # pool with no neighbours (sharing off)
    pr, pid, pmask, is_own = build_negative_pool(
        own, ids, own, ids, 0, torch.zeros(B, 0, dtype=torch.long),
        torch.full((B,), 500), torch.full((B, 4), PAD), PAD)
    assert pr.shape == (B, K) and bool(pmask.all()) and bool(is_own.all())
    expected = sdpo_loss(chosen, own)
    assert torch.equal(napo_loss(chosen, pr, pmask, 0.0), expected)
    assert torch.equal(napo_loss(chosen, pr, pmask, torch.zeros(B)), expected)
    assert torch.equal(napo_loss(chosen, pr, None), expected)


def test_napo_margin_increases_loss_and_matches_formula():
    chosen = torch.tensor([0.5, 0.5])
    rejected = torch.tensor([[0.0, -1.0], [0.0, -1.0]])
    gamma = torch.tensor([0.0, 1.0])
    loss = napo_loss(chosen, rejected, None, gamma)
    lse = torch.logsumexp(rejected - chosen[:, None], 1)
    assert torch.allclose(loss, -F.logsigmoid(-lse - gamma))
    assert loss[1] > loss[0]
    # gamma is a constant: no gradient flows into it
    g = torch.tensor([1.0, 1.0], requires_grad=True)
    c = chosen.clone().requires_grad_()
    napo_loss(c, rejected, None, g).sum().backward()
    assert g.grad is None and c.grad is not None


def test_losses_finite_for_huge_logps_mixed_signs():
    pol_c = torch.tensor([1e4, -1e4, -1e4, 1e4], requires_grad=True)
    pol_r = torch.tensor([[-1e4, 1e4, -1e4], [1e4, 1e4, -1e4], [-1e4, -1e4, -1e4], [1e4, -1e4, 1e4]],
                         requires_grad=True)
    ref_c = torch.tensor([-1e4, 1e4, 0.0, 1e4])
    ref_r = torch.tensor([[1e4, -1e4, 0.0]] * 4)
    for ref in (None, (ref_c, ref_r)):
        pol_c.grad = None
        pol_r.grad = None
        rc = rewards(pol_c, None if ref is None else ref[0], 1.0)
        rr = rewards(pol_r, None if ref is None else ref[1], 1.0)
        mask = torch.tensor([[True, True, False], [True, True, True], [True, False, True], [True] * 3])
        loss = (sdpo_loss(rc, rr).sum() + napo_loss(rc, rr, mask, torch.tensor([0.0, 1.0, 1e4, 3.0])).sum()
                + dpo_loss(rc, rr[:, 0]).sum())
        assert torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(pol_c.grad).all() and torch.isfinite(pol_r.grad).all()
        assert pol_c.grad.abs().sum() > 0


def test_sdpo_gradient_weights_negatives_by_softmax():
    chosen = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([[2.0, -1.0, 0.5, 0.0]], dtype=torch.float64, requires_grad=True)
    sdpo_loss(chosen, rejected).sum().backward()
    lse = torch.logsumexp(rejected.detach() - chosen.detach(), 1)
    expected = torch.sigmoid(lse)[:, None] * torch.softmax(rejected.detach(), dim=1)
    assert torch.allclose(rejected.grad, expected)
    assert torch.allclose(rejected.grad / rejected.grad.sum(), torch.softmax(rejected.detach(), 1))
    assert torch.allclose(chosen.grad, -rejected.grad.sum(1))            # shift invariance
    # hardest negative gets the largest weight
    assert int(rejected.grad.argmax()) == 0
    # finite differences, also with a mask and a margin
    mask = torch.tensor([[True, False, True, True]])
    assert torch.autograd.gradcheck(
        lambda c, r: napo_loss(c, r, mask, torch.tensor([0.7], dtype=torch.float64)),
        (chosen.detach().requires_grad_(), rejected.detach().requires_grad_()))


def test_masked_entries_have_no_influence():
    chosen = torch.tensor([0.0, 1.0, 2.0])
    compact = torch.tensor([[0.5, -0.5], [1.0, 3.0], [0.0, -1.0]])
    junk = torch.tensor([[float("nan"), 1e30, float("inf")]] * 3)
    full = torch.cat([compact[:, :1], junk, compact[:, 1:]], dim=1).requires_grad_()
    mask = torch.tensor([[True, False, False, False, True]] * 3)
    expected = sdpo_loss(chosen, compact)
    loss = sdpo_loss(chosen, full, mask)
    assert torch.allclose(loss, expected)
    loss.sum().backward()
    assert torch.isfinite(full.grad).all()
    assert torch.equal(full.grad[:, 1:4], torch.zeros(3, 3))
    # changing a masked value changes nothing
    other = full.detach().clone()
    other[:, 1:4] = -7.0
    assert torch.equal(sdpo_loss(chosen, other, mask), loss.detach())
    assert torch.equal(napo_loss(chosen, other, mask, 0.5), napo_loss(chosen, full.detach(), mask, 0.5))


def test_row_without_negatives_gives_zero_loss_and_no_nan():
    chosen = torch.tensor([1.0, 2.0], requires_grad=True)
    rejected = torch.tensor([[0.0, float("nan")], [1.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[False, False], [True, True]])
    loss = napo_loss(chosen, rejected, mask, torch.tensor([2.0, 0.0]))
    assert loss[0].item() == 0.0 and torch.isfinite(loss).all()
    loss.sum().backward()
    assert chosen.grad[0].item() == 0.0 and torch.isfinite(chosen.grad).all()
    assert torch.isfinite(rejected.grad).all() and torch.equal(rejected.grad[0], torch.zeros(2))


def test_bad_shapes_raise():
    with pytest.raises(NAPOLossError):
        sdpo_loss(torch.zeros(2), torch.zeros(3, 2))
    with pytest.raises(NAPOLossError):
        sdpo_loss(torch.zeros(2), torch.zeros(2, 3), torch.ones(2, 3))     # mask not bool
    with pytest.raises(ValueError):
        napo_loss(torch.zeros(2), torch.zeros(2, 3), None, torch.zeros(3))


def test_reward_accuracy():
    chosen = torch.tensor([1.0, 1.0, 1.0, 0.0])
    rejected = torch.tensor([[0.0, 0.5], [0.0, 1.5], [0.0, 1.0], [5.0, 5.0]])
    mask = torch.tensor([[True, True], [True, True], [True, True], [False, False]])
    acc = reward_accuracy(chosen, rejected, mask)
    assert acc.tolist() == [1.0, 0.0, 0.0, 1.0]     # tie fails; empty row vacuously 1
    mask2 = torch.tensor([[True, True], [True, False], [True, True], [True, True]])
    assert reward_accuracy(chosen, rejected, mask2).tolist() == [1.0, 1.0, 0.0, 0.0]


# ---------------------------------------------------------------------------------------------- sharing

def test_num_shared():
    assert num_shared(0.7, 16) == 10                # the paper's example: 3 + 10*3 = 33 equivalent negatives
    assert num_shared(0.57, 101) == 57              # 0.57*100 = 56.999... in floats
    assert num_shared(0.0, 16) == 0 and num_shared(1.0, 16) == 15 and num_shared(0.7, 1) == 0
    with pytest.raises(NAPOLossError):
        num_shared(1.5, 4)


def test_topk_never_selects_self_and_picks_most_similar():
    vecs = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]])
    nb = topk_similar(vecs, 2)
    assert nb.dtype == torch.long and nb.shape == (5, 2)
    assert nb[0].tolist() == [1, 3]                 # sims 0.9, 0.1, 0.0(2), -1
    assert nb[2].tolist() == [3, 1]
    assert nb[4].tolist() == [2, 3]                 # sims 0(2), -0.1(3), -0.9(1), -1(0)
    for i in range(5):
        assert i not in nb[i].tolist()


def test_topk_with_duplicates_and_low_self_similarity():
    # rows 0 and 1 identical: each must pick the other, never itself
    vecs = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.2, 0.0], [3.0, 3.0]])
    nb = topk_similar(vecs, 1)
    assert nb[:, 0].tolist() == [3, 3, 3, 0]         # row 3 ties 0 and 1 (sim 6) -> lower index
    nb2 = topk_similar(vecs, 2)
    assert nb2[0].tolist() == [3, 1] and nb2[1].tolist() == [3, 0]
    # self-similarity (0.04) below others: still excluded
    assert 2 not in nb2[2].tolist()
    # all identical: ties broken by lower index
    same = torch.ones(4, 3)
    assert topk_similar(same, 3).tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]
    assert topk_similar(same, 0).shape == (4, 0)
    with pytest.raises(NAPOLossError):
        topk_similar(same, 4)


def _pool_inputs():
    # global batch G=4, K=2; item ids chosen to exercise the mask
    g_ids = torch.tensor([[10, 11], [20, 21], [30, 31], [40, 41]])
    positives = torch.tensor([1, 2, 3, 4])
    histories = torch.tensor([[5, 6, PAD, PAD], [7, 8, 9, PAD], [PAD, PAD, PAD, PAD], [5, PAD, PAD, PAD]])
    return g_ids, positives, histories


def test_pool_layout_and_exclusions():
    g_ids, positives, histories = _pool_inputs()
    positives = positives.clone()
    histories = histories.clone()
    positives[0] = 20            # neighbour 1's first negative is row 0's positive
    histories[0, 1] = 31         # neighbour 2's second negative is in row 0's history
    own_ids = g_ids.clone()
    own_ids[0, 1] = 41           # neighbour 3's second negative duplicates one of row 0's own negatives
    g_r = torch.arange(8.0).reshape(4, 2)
    nb = torch.tensor([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])
    r, ids, mask, is_own = build_negative_pool(g_r, own_ids, g_r, own_ids, 0, nb, positives, histories, PAD)
    assert r.shape == ids.shape == mask.shape == is_own.shape == (4, 2 + 3 * 2)
    assert ids[0].tolist() == [10, 41, 20, 21, 30, 31, 40, 41]
    assert r[0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert mask[0].tolist() == [True, True, False, True, True, False, True, False]
    assert is_own[0].tolist() == [True, True] + [False] * 6
    # row 3 (own 40, 41) receives row 0's (10, 41): 41 duplicates its own negative -> dropped
    assert ids[3].tolist() == [40, 41, 10, 41, 20, 21, 30, 31]
    assert mask[3].tolist() == [True, True, True, False, True, True, True, True]
    # rows 1, 2: nothing to exclude (pad entries of the history match nothing)
    assert bool(mask[1:3].all())


def test_pool_keeps_own_negatives_always_and_ignores_pad_in_history():
    g_ids, positives, histories = _pool_inputs()
    own_ids = g_ids.clone()
    own_ids[0, 0] = 5                     # own negative in history and ...
    own_ids[0, 1] = 1                     # ... equal to the positive: still kept
    g_ids2 = own_ids.clone()
    g_ids2[1, 0] = PAD                    # a shared item id equal to the pad id is not "in the history"
    g_r = torch.zeros(4, 2)
    nb = torch.tensor([[1], [0], [3], [2]])
    _, ids, mask, _ = build_negative_pool(g_r, own_ids, g_r, g_ids2, 0, nb, positives, histories, PAD)
    assert ids[0].tolist() == [5, 1, PAD, 21]
    assert mask[0].tolist() == [True, True, True, True]
    # row 1 takes row 0's negatives (5, 1): neither is row 1's positive/history -> kept
    assert mask[1].tolist() == [True, True, True, True]
    # row 3 (history [5]) takes row 2's (30, 31): kept; row 2 takes row 3's (40, 41): kept
    assert bool(mask[2:].all())


def test_pool_drop_shared_duplicates_flag():
    own = torch.zeros(1, 1)
    own_ids = torch.tensor([[7]])
    g_ids = torch.tensor([[7], [8], [8], [9]])
    nb = torch.tensor([[1, 2, 3]])
    args = (own, own_ids, torch.zeros(4, 1), g_ids, 0, nb, torch.tensor([1]), torch.full((1, 2), PAD), PAD)
    assert build_negative_pool(*args)[2].tolist() == [[True, True, True, True]]
    assert build_negative_pool(*args, drop_shared_duplicates=True)[2].tolist() == [[True, True, False, True]]


def test_shared_negatives_get_exactly_zero_gradient():
    g = torch.Generator().manual_seed(3)
    B, K = 4, 3
    own = torch.randn(B, K, generator=g).requires_grad_()      # this process's rewards (attached)
    glob = torch.randn(B, K, generator=g).requires_grad_()     # gathered copy, separate leaf
    chosen = torch.randn(B, generator=g).requires_grad_()
    ids = torch.arange(B * K).reshape(B, K)
    nb = topk_similar(torch.randn(B, 5, generator=g), 2)
    r, _, mask, is_own = build_negative_pool(own, ids, glob, ids, 0, nb, torch.full((B,), 100),
                                             torch.full((B, 3), PAD), PAD)
    napo_loss(chosen, r, mask, torch.full((B,), 0.5)).sum().backward()
    assert glob.grad is None                                    # shared part: no gradient at all
    assert (own.grad != 0).all() and (chosen.grad != 0).all()

    # one process: global tensor IS the own tensor; its grad must equal the grad with shared values frozen
    leaf = torch.randn(B, K, generator=g).requires_grad_()
    r, _, mask, _ = build_negative_pool(leaf, ids, leaf, ids, 0, nb, torch.full((B,), 100),
                                        torch.full((B, 3), PAD), PAD)
    napo_loss(chosen.detach(), r, mask, 0.5).sum().backward()
    frozen = leaf.detach().clone()
    leaf2 = frozen.clone().requires_grad_()
    manual = torch.cat([leaf2, frozen[nb].reshape(B, -1)], dim=1)
    napo_loss(chosen.detach(), manual, mask, 0.5).sum().backward()
    assert torch.allclose(leaf.grad, leaf2.grad)
    # but the shared columns do change the loss (harder pool -> larger loss)
    assert (napo_loss(chosen, r, mask) > napo_loss(chosen, r[:, :K], mask[:, :K])).all()


def test_pool_with_offset_uses_global_rows_and_rejects_self():
    # simulate rank 1 of 2, local batch 2, global batch 4
    g_ids, positives, histories = _pool_inputs()
    g_r = torch.arange(8.0).reshape(4, 2)
    own = g_r[2:].clone().requires_grad_()
    nb_all = torch.tensor([[1], [0], [3], [2]])                 # pairs (0,1), (2,3)
    r, ids, mask, _ = build_negative_pool(own, g_ids[2:], g_r, g_ids, 2, nb_all[2:], positives[2:],
                                          histories[2:], PAD)
    assert ids.tolist() == [[30, 31, 40, 41], [40, 41, 30, 31]]
    assert r.tolist() == [[4.0, 5.0, 6.0, 7.0], [6.0, 7.0, 4.0, 5.0]]
    with pytest.raises(NAPOLossError):                          # local row 0 is global row 2
        build_negative_pool(own, g_ids[2:], g_r, g_ids, 2, torch.tensor([[2], [0]]), positives[2:],
                            histories[2:], PAD)
    with pytest.raises(NAPOLossError):
        build_negative_pool(own, g_ids[2:], g_r, g_ids, 3, nb_all[2:], positives[2:], histories[2:], PAD)


# ---------------------------------------------------------------------------------------------- margin

def test_personal_scores_scores_pool_under_own_vector():
    h = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    w = torch.tensor([[1.0, 1.0], [2.0, -1.0], [0.0, 3.0]])
    b = torch.tensor([0.5, 0.0, -1.0])
    ids = torch.tensor([[0, 1, 2], [2, 0, PAD]])                 # PAD under mask False is ignored
    mask = torch.tensor([[True, True, False], [True, True, False]])
    S = personal_scores(h, w, b, ids, mask)
    # row0: s(0)=1+0.5, s(1)=2 -> 1.75 ; row1: s(2)=6-1=5, s(0)=2+0.5 -> 3.75
    assert torch.allclose(S, torch.tensor([1.75, 3.75]))
    assert torch.allclose(personal_scores(h, w, None, ids[:, :2]), torch.tensor([1.5, 4.0]))
    assert not S.requires_grad


def test_margin_falls_as_negative_scores_rise():
    h = torch.tensor([[1.0, 0.0]])
    Ss = []
    for scale in (-2.0, -1.0, 0.0, 1.0, 2.0, 3.0):
        w = torch.tensor([[scale, 0.0], [scale + 0.5, 1.0]])
        Ss.append(personal_scores(h, w, None, torch.tensor([[0, 1]]), None))
    S = torch.cat(Ss)
    assert (S[1:] > S[:-1]).all()
    gamma, _ = dynamic_margin(S, M_bar=0.0, gamma0=1.0, alpha=0.3, mode="user", clamp=False)
    assert (gamma[1:] < gamma[:-1]).all()
    assert torch.allclose(gamma, 1.0 * (1 - 0.3 * S))
    gamma_c, _ = dynamic_margin(S, M_bar=0.0, gamma0=1.0, alpha=0.3)
    assert (gamma_c[1:] <= gamma_c[:-1]).all()


def test_batch_mode_equals_user_mode_at_the_mean():
    S = torch.tensor([0.0, 1.0, 5.0, -2.0])
    g_batch, _ = dynamic_margin(S, M_bar=0.5, gamma0=1.0, alpha=0.3, mode="batch")
    g_user_mean, _ = dynamic_margin(S.mean().reshape(1), M_bar=0.5, gamma0=1.0, alpha=0.3, mode="user")
    assert torch.allclose(g_batch, g_user_mean.expand(4))
    assert torch.unique(g_batch).numel() == 1
    g_user, _ = dynamic_margin(S, M_bar=0.5, gamma0=1.0, alpha=0.3, mode="user")
    assert torch.unique(g_user).numel() == 4
    # trainer-supplied global statistic overrides the local mean
    g_glob, _ = dynamic_margin(S, M_bar=0.5, gamma0=1.0, alpha=0.3, mode="batch", batch_stat=torch.tensor(2.5))
    assert torch.allclose(g_glob, torch.full((4,), 1.0 * (1 - 0.3 * (2.5 - 0.5))))
    g_none, frac = dynamic_margin(S, M_bar=None, gamma0=1.0, alpha=0.3, mode="none")
    assert torch.equal(g_none, torch.zeros(4)) and frac == 0.0
    with pytest.raises(NAPOLossError):
        dynamic_margin(S, None, 1.0, 0.3, mode="user")
    with pytest.raises(NAPOLossError):
        dynamic_margin(S, 0.0, 1.0, 0.3, mode="global")


def test_margin_clamp_and_clamped_fraction():
    S = torch.tensor([0.0, 2.0, 10.0, 20.0])                   # raw: 1, 0.4, -2, -5
    gamma, frac = dynamic_margin(S, M_bar=0.0, gamma0=1.0, alpha=0.3)
    assert torch.allclose(gamma, torch.tensor([1.0, 0.4, 0.0, 0.0]))
    assert frac == 0.5
    raw, frac2 = dynamic_margin(S, M_bar=0.0, gamma0=1.0, alpha=0.3, clamp=False)
    assert torch.allclose(raw, torch.tensor([1.0, 0.4, -2.0, -5.0])) and frac2 == 0.5
    gb, fb = dynamic_margin(S, M_bar=0.0, gamma0=1.0, alpha=0.3, mode="batch")   # mean 8 -> -1.4
    assert torch.equal(gb, torch.zeros(4)) and fb == 1.0
    assert not dynamic_margin(S.requires_grad_(), 0.0, 1.0, 0.3)[0].requires_grad


def test_update_running_mean():
    assert update_running_mean(None, 4.0, 0.9) == 4.0            # first step: initialise
    assert update_running_mean(2.0, 4.0, 0.9) == pytest.approx(0.9 * 2.0 + 0.1 * 4.0)
    assert update_running_mean(2.0, torch.tensor(4.0), 0.0) == pytest.approx(4.0)
    assert update_running_mean(2.0, 4.0, 1.0) == pytest.approx(2.0)
    m = None
    for x in (1.0, 1.0, 1.0):
        m = update_running_mean(m, x, 0.9)
    assert m == pytest.approx(1.0)
    with pytest.raises(NAPOLossError):
        update_running_mean(0.0, 1.0, 1.5)


def test_listwise_sdpo_is_sft_up_to_the_candidate_mass():
    """The identity behind docs/method.md's "SFT is listwise S-DPO": with rewards r = log p (reference-free,
    beta = 1), all the other candidates as negatives and no margin, S-DPO's loss is the SFT loss -log p(target)
    plus log P(candidates) = log sum_c p(c), in value and in gradient. A model whose mass sits on the list
    (P(candidates) ~ 1) gets the same gradient from both; the gap is exactly log P(candidates)."""
    torch.manual_seed(0)
    for mass_scale in (0.0, 4.0):  # logits over 25 "answers", 20 of them candidates; a larger scale moves mass off
        logits = torch.randn(6, 25, dtype=torch.float64)
        logits[:, 20:] += mass_scale
        logits.requires_grad_(True)
        logp = logits.log_softmax(-1)[:, :20]           # (B, 20) log p of each candidate; candidate 0 is the target
        loss = sdpo_loss(rewards(logp[:, 0], None, 1.0), rewards(logp[:, 1:], None, 1.0))
        sft = -logp[:, 0]
        log_mass = torch.logsumexp(logp, -1)
        assert torch.allclose(loss, sft + log_mass, atol=1e-12, rtol=0)
        (g_sdpo,) = torch.autograd.grad(loss.sum(), logits, retain_graph=True)
        (g_sft,) = torch.autograd.grad((sft + log_mass).sum(), logits)
        assert torch.allclose(g_sdpo, g_sft, atol=1e-12, rtol=0)
    # and the gap is not zero unless the mass is 1: with mass off the list, the losses differ by log P(cands) < 0
    assert log_mass.max() < -1.0
    # with beta != 1 or K < 19 the identity no longer holds
    loss_b = sdpo_loss(rewards(logp[:, 0], None, 0.5), rewards(logp[:, 1:], None, 0.5))
    assert not torch.allclose(loss_b, sft + log_mass, atol=1e-3)
    loss_k = sdpo_loss(rewards(logp[:, 0], None, 1.0), rewards(logp[:, 1:4], None, 1.0))
    assert not torch.allclose(loss_k, sft + log_mass, atol=1e-3)
