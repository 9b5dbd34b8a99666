"""`--margin_mode authors`: napo_trainer.authors_objective against a transcription of the NAPO authors' formulas,
written here with loops in their order of operations (random tensors, a small random SASRec, CPU, ~1 s).

The transcription: per-negative SASRec scores s(v, d) under the owner v's history; neighbours by argsort of
h_u . h_v with every entry of u's dataset row id set to -inf; k = int(rho (B-1)); the pool = the gathered
(detached) rewards, own row first, nothing filtered; M_t = mean of the pool's scores; M_bar starts at 0 and
M_bar <- m M_bar + (1-m) M_t before use; gamma = gamma0 - alpha (M_t - M_bar) gamma0; the softmax term
-log(sum(exp(r_d - r_p))) computed directly (fine at these reward scales)."""
import math

import pytest
import torch
import torch.nn.functional as F

from napo_losses import num_shared

N_ITEMS, K, HIST_LEN = 40, 2, 6
B, RHO = 51, 0.58                     # rho (B-1) = 28.999999999999996: int() gives 28, floor(x + 1e-9) gives 29
GAMMA0, ALPHA, MOMENTUM = 1.0, 0.3, 0.9


def make_sasrec():
    from sasrec import SASRec, SASRecConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SASRec(SASRecConfig(n_items=N_ITEMS, hidden=16, dropout=0.0))
        with torch.no_grad():
            model.item_emb_out.bias.normal_(2.0, 1.0)  # scores well away from 0, so M_bar's start matters
    return model.eval()


def make_batch(step):
    g = torch.Generator().manual_seed(50 + step)
    batch = {"chosen": torch.randn(B, generator=g) * 2, "rejected": torch.randn(B, K, generator=g) * 2,
             "pos": torch.randint(0, N_ITEMS, (B,), generator=g),
             "neg": torch.randint(0, N_ITEMS, (B, K), generator=g),  # often in a history: the authors keep them
             "hist": torch.randint(0, N_ITEMS, (B, HIST_LEN), generator=g), "row_ids": torch.arange(100, 100 + B)}
    for t in batch.values():  # row 1 is a copy of row 0 (a padded batch's duplicate): the same row id
        t[1] = t[0]
    return batch


def transcription(batch, sasrec, M_mean):
    """The authors' step, one row at a time. Returns (losses, gamma, new M_mean, pool width)."""
    with torch.no_grad():
        h = sasrec.user_vectors(batch["hist"])
        w, b = (t.double() for t in sasrec.output_layer())
    rec_score = torch.tensor([[float(h[i].double() @ w[d] + b[d]) for d in batch["neg"][i].tolist()]
                              for i in range(B)], dtype=torch.float64)
    neg_logits = batch["rejected"].detach().double()          # gathered under no_grad
    sim = h @ h.T                                             # float32, as the SASRec gives it: the same order
    num_to_take = int(RHO * (B - 1))
    pool_s, pool_r = [], []
    for i in range(B):
        scores = sim[i].clone()
        scores[batch["row_ids"] == batch["row_ids"][i]] = float("-inf")
        top = torch.argsort(scores, descending=True)[:num_to_take]
        pool_s.append(torch.cat([rec_score[i]] + [rec_score[j] for j in top.tolist()]))
        pool_r.append(torch.cat([neg_logits[i]] + [neg_logits[j] for j in top.tolist()]))
    pool_s, pool_r = torch.stack(pool_s), torch.stack(pool_r)
    M_local = float(pool_s.mean())
    M_mean = MOMENTUM * M_mean + (1 - MOMENTUM) * M_local
    gamma = GAMMA0 - ALPHA * (M_local - M_mean) * GAMMA0
    chosen = batch["chosen"].double()
    temp = sum(torch.exp(pool_r[:, c] - chosen) for c in range(pool_r.shape[1]))
    A = -torch.log(temp)
    return -F.logsigmoid(A - gamma), gamma, M_mean, pool_r.shape[1]


def test_authors_mode_matches_their_formulas_over_steps():
    from napo_trainer import NAPOConfig, napo_objective

    cfg = NAPOConfig(num_negatives=K, rho=RHO, margin_mode="authors", gamma0=GAMMA0, alpha=ALPHA,
                     momentum=MOMENTUM)
    assert cfg.needs_sasrec
    sasrec = make_sasrec()
    M_bar, M_mean = None, 0.0
    for step in range(3):
        batch = make_batch(step)
        chosen = batch["chosen"].clone().requires_grad_(True)
        rejected = batch["rejected"].clone().requires_grad_(True)
        losses, stats, M_bar = napo_objective(chosen, rejected, batch["neg"], batch["pos"], batch["hist"], cfg,
                                              sasrec, M_bar, batch["row_ids"])
        want, gamma, M_mean, width = transcription(batch, sasrec, M_mean)
        where = f"step {step}"
        if step == 0:  # M_bar started at 0: the first margin is gamma0 (1 - m alpha M_1)
            assert gamma == pytest.approx(GAMMA0 * (1 - MOMENTUM * ALPHA * float(stats["S_mean"].mean())), abs=1e-5)
            assert gamma < GAMMA0 - 0.2, where  # far from gamma0, which an M_bar started at M_1 would give
        assert M_bar == pytest.approx(M_mean, abs=1e-5), where
        assert stats["gamma"].tolist() == pytest.approx([gamma] * B, abs=1e-5), where
        # k = int(0.58 * 50) = 28 neighbours, nothing filtered: every row has K (1 + 28) negatives
        assert width == K * 29 and stats["equivalent_negatives"].tolist() == [float(width)] * B, where
        assert losses.double().tolist() == pytest.approx(want.tolist(), abs=1e-5), where
        # detached negatives (own ones too): only the positive term trains
        losses.sum().backward()
        assert rejected.grad is None or torch.count_nonzero(rejected.grad) == 0, where
        assert torch.all(chosen.grad < 0), where


def test_authors_mode_neighbours_and_rounding():
    """The duplicate of a row (same row id) is never its neighbour, though it is the most similar; k is
    truncated; the default mode excludes only the row itself and rounds k up to 29."""
    from napo_losses import topk_similar

    h = torch.randn(B, 8, generator=torch.Generator().manual_seed(3))
    h[1] = h[0]
    row_ids = torch.arange(B)
    row_ids[1] = 0
    assert num_shared(RHO, B, truncate=True) == 28 and num_shared(RHO, B) == 29
    authors = topk_similar(h, 28, row_ids=row_ids)
    ours = topk_similar(h, 28)
    assert ours[0, 0] == 1 and ours[1, 0] == 0           # the copy is the nearest neighbour by position
    assert 1 not in authors[0].tolist() and 0 not in authors[1].tolist()
    assert all(i not in authors[i].tolist() for i in range(B))
    assert authors[2:].tolist() == ours[2:].tolist()      # rows without a copy: the same neighbours
    # too few other rows: the excluded entries (self, the copy) come last, as their argsort over -inf does
    full = topk_similar(h[:3], 2, row_ids=torch.tensor([7, 7, 8]))
    assert full[0].tolist() == [2, 0] and full[1].tolist() == [2, 0] and sorted(full[2].tolist()) == [0, 1]


def test_authors_mode_without_sharing_keeps_own_gradients():
    from napo_trainer import NAPOConfig, napo_objective

    cfg = NAPOConfig(num_negatives=K, share_negatives=False, margin_mode="authors")
    batch = make_batch(0)
    rejected = batch["rejected"].clone().requires_grad_(True)
    losses, stats, M_bar = napo_objective(batch["chosen"], rejected, batch["neg"], batch["pos"], batch["hist"], cfg,
                                          make_sasrec(), None)
    losses.sum().backward()
    assert torch.all(rejected.grad > 0) and stats["equivalent_negatives"].tolist() == [float(K)] * B
    assert M_bar == pytest.approx((1 - cfg.momentum) * float(stats["S_mean"].mean()), abs=1e-6)


def test_direct_log_sum_exp_overflows_where_the_stable_one_does_not():
    """The authors' -log(sum(exp(r_d - r_p))) is inf at a reward gap of 100 in float32 (NaN gradient); the
    logsumexp this project keeps in every mode stays finite."""
    from napo_losses import napo_loss

    chosen = torch.tensor([-120.0, 0.0], requires_grad=True)
    rejected = torch.tensor([[-20.0, -130.0], [-1.0, -2.0]], requires_grad=True)    # gap 100 in row 0
    direct = -F.logsigmoid(-torch.log(torch.exp(rejected - chosen[:, None]).sum(1)) - 1.0)
    assert math.isinf(direct[0].item())
    direct.sum().backward()
    assert torch.isnan(chosen.grad[0])
    chosen.grad = None
    stable = napo_loss(chosen, rejected, gamma=1.0)
    stable.sum().backward()
    assert torch.isfinite(stable).all() and torch.isfinite(chosen.grad).all()
    assert stable[0].item() == pytest.approx(101.0, abs=1e-3)
    assert stable[1].item() == pytest.approx(direct[1].item(), abs=1e-6)
