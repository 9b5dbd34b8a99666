"""Metrics for 20-candidate next-item recommendation. One place, imported everywhere.

* ranking    — candidates scored by a model; HR@K, NDCG@K (K in 1,3,5,10) and MRR. Ties are broken by
               candidate position (a stable sort), so results are deterministic.
* generative — greedy outputs matched against the candidate titles: ValidRatio, HR@1 over all rows,
               HR@1 over valid rows (LLaRA's definition). A row is valid when its output names exactly one
               candidate (match_candidates: substring match, where a title found only inside a longer
               candidate title found in the output does not count; 21 of the 2,495 `clean` test rows and 25
               of the `sdpo` ones hold such a pair, e.g. "Can" and "Candlemass").
* candidate mass — for a language model, P(candidates) = Σ_c p(title_c + EOS | prompt), the probability that
               it answers with one of the listed titles (from the ranking's summed log-probs); mean and
               quantiles. Where it is ≈ 1, SFT's loss −log p(target) equals reference-free listwise S-DPO's at
               β = 1 over all 19 negatives, up to log P(candidates) (tests/test_losses.py; docs/method.md).
* popularity — popularity = count as a target in train; mean popularity percentile of the top-1 items
               vs. of the targets; HR@1 on tail targets (the least popular 80% of items).
"""
from __future__ import annotations

import math

KS = (1, 3, 5, 10)


def target_rank(scores, target_pos: int) -> int:
    """1-based rank of the target among the candidates: higher score first, ties by position."""
    t = scores[target_pos]
    return 1 + sum(1 for i, s in enumerate(scores) if s > t or (s == t and i < target_pos))


def ranking_metrics(ranks: list[int]) -> dict:
    n = len(ranks)
    if n == 0:
        raise ValueError("ranking_metrics: no rows")
    out = {}
    for k in KS:
        out[f"hr@{k}"] = sum(r <= k for r in ranks) / n
    for k in KS:
        out[f"ndcg@{k}"] = sum(1.0 / math.log2(r + 1) for r in ranks if r <= k) / n
    out["mrr"] = sum(1.0 / r for r in ranks) / n
    return out


def match_candidates(output: str, candidate_names: list[str]) -> list[int]:
    """Positions of the candidates that `output` names. A candidate is named when its title occurs in the
    output (substring match, as in the papers) at least once outside an occurrence of a longer candidate
    title. With the candidates "Sting" and "Stingray": "Stingray" names Stingray only, "Sting" names Sting
    only, "Sting, not Stingray" names both (invalid). Two candidates with the same title are both named."""
    spans = {}
    for i, c in enumerate(candidate_names):
        start = output.find(c) if c else -1
        while start >= 0:
            spans.setdefault(i, []).append((start, start + len(c)))
            start = output.find(c, start + 1)

    def covered(i, s, e):
        return any(len(candidate_names[j]) > len(candidate_names[i]) and a <= s and e <= b
                   for j, occ in spans.items() for a, b in occ)

    return [i for i, occ in spans.items() if any(not covered(i, s, e) for s, e in occ)]


def generative_metrics(outputs: list[str], candidate_names: list[list[str]], target_pos: list[int]):
    """Returns (metrics, per-row predicted candidate position or None)."""
    n = len(outputs)
    if n == 0:
        raise ValueError("generative_metrics: no rows")
    preds, valid, hits = [], 0, 0
    for out, cands, t in zip(outputs, candidate_names, target_pos):
        m = match_candidates(out, cands)
        p = m[0] if len(m) == 1 else None
        preds.append(p)
        valid += p is not None
        hits += p is not None and cands[p] == cands[t]
    return {"valid_ratio": valid / n, "hr@1": hits / n, "hr@1_valid": hits / valid if valid else 0.0}, preds


def popularity_percentiles(popularity: list[int]) -> list[float]:
    """Percentile (0..100) of every item's popularity: the share of items at most as popular."""
    order = sorted(popularity)
    n = len(order)
    import bisect

    return [100.0 * bisect.bisect_right(order, p) / n for p in popularity]


def tail_items(popularity: list[int], head_fraction: float = 0.2) -> set[int]:
    """The least popular (1 - head_fraction) of items; the head is the top 20% by popularity (ties by id)."""
    ranked = sorted(range(len(popularity)), key=lambda i: (-popularity[i], i))
    n_head = int(round(head_fraction * len(popularity)))
    return set(ranked[n_head:])


def popularity_metrics(top1_ids: list[int], target_ids: list[int], popularity: list[int]) -> dict:
    pct = popularity_percentiles(popularity)
    tail = tail_items(popularity)
    n = len(top1_ids)
    tail_rows = [(p, t) for p, t in zip(top1_ids, target_ids) if t in tail]
    return {
        "top1_popularity_pct": sum(pct[i] for i in top1_ids) / n,
        "target_popularity_pct": sum(pct[t] for t in target_ids) / n,
        "top1_tail_share": sum(i in tail for i in top1_ids) / n,
        "target_tail_share": len(tail_rows) / n,
        "hr@1_tail": (sum(p == t for p, t in tail_rows) / len(tail_rows)) if tail_rows else 0.0,
    }


def candidate_metrics(scores: list[list[float]], candidate_ids: list[list[int]], target_ids: list[int],
                      popularity: list[int]) -> tuple[dict, list[int]]:
    """Ranking + popularity metrics from candidate scores (used by inference.py and sasrec.py).
    Returns (metrics, per-row top-1 item id)."""
    ranks, top1 = [], []
    for s, cands, t in zip(scores, candidate_ids, target_ids):
        ranks.append(target_rank(s, cands.index(t)))
        best = max(range(len(s)), key=lambda i: (s[i], -i))
        top1.append(cands[best])
    out = {"ranking": ranking_metrics(ranks), "popularity": popularity_metrics(top1, target_ids, popularity)}
    return out, top1



def candidate_mass(scores: list[list[float]]) -> dict:
    """P(candidates) per row = exp(logsumexp of the row's summed answer log-probs), i.e. Σ_c p(c | prompt):
    the mean, the quantiles (min, 10%, median, 90%) and the mean of log P(candidates). Scores must be
    log-probabilities (a language model's), not a recommender's logits."""
    if not scores:
        raise ValueError("candidate_mass: no rows")
    logm = []
    for s in scores:
        top = max(s)
        logm.append(top + math.log(sum(math.exp(x - top) for x in s)))
    mass = sorted(min(1.0, math.exp(x)) for x in logm)
    n = len(mass)

    def q(f):
        return mass[min(n - 1, int(f * (n - 1) + 0.5))]

    return {"mean": sum(mass) / n, "min": mass[0], "p10": q(0.1), "median": q(0.5), "p90": q(0.9),
            "mean_log": sum(logm) / n}
