"""metrics.py on hand-made cases: every published number goes through these functions."""
import math

import pytest

import metrics as M


def test_target_rank_breaks_ties_by_candidate_position():
    scores = [0.5, 2.0, 2.0, -1.0, 2.0]
    assert M.target_rank(scores, 1) == 1   # the first of three equal top scores
    assert M.target_rank(scores, 2) == 2   # one equal score stands before it
    assert M.target_rank(scores, 4) == 3
    assert M.target_rank(scores, 0) == 4
    assert M.target_rank(scores, 3) == 5
    assert M.target_rank([1.0] * 20, 19) == 20  # all tied: the last candidate ranks last


def test_ranking_metrics_by_hand():
    m = M.ranking_metrics([1, 2, 4, 11])
    assert m["hr@1"] == 0.25 and m["hr@3"] == 0.5 and m["hr@5"] == 0.75 and m["hr@10"] == 0.75
    # NDCG of one relevant item at rank r is 1 / log2(r + 1): 1, 0.6309 (r=2), 0.4307 (r=4), 0.2891 (r=11)
    assert m["ndcg@1"] == 0.25
    assert m["ndcg@3"] == pytest.approx((1 + 0.6309297535714575) / 4, abs=1e-12)
    assert m["ndcg@5"] == pytest.approx((1 + 0.6309297535714575 + 0.43067655807339306) / 4, abs=1e-12)
    assert m["ndcg@10"] == m["ndcg@5"]  # rank 11 is outside every cut-off
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 1 / 11) / 4, abs=1e-12)
    assert set(m) == {f"{k}@{n}" for k in ("hr", "ndcg") for n in (1, 3, 5, 10)} | {"mrr"}
    with pytest.raises(ValueError):
        M.ranking_metrics([])


def test_candidate_metrics_ties_pick_the_first_candidate():
    pop = [0, 7, 3, 1, 5]                         # item popularity (count as a train target)
    scores = [[1.0, 1.0, 1.0], [0.0, 3.0, 3.0]]   # row 0: all tied; row 1: a tie at the top
    cands = [[2, 4, 1], [3, 1, 4]]
    targets = [1, 4]
    m, top1 = M.candidate_metrics(scores, cands, targets, pop)
    assert top1 == [2, 1]                         # the first of the tied candidates
    assert M.target_rank(scores[0], 2) == 3 and M.target_rank(scores[1], 2) == 2
    assert m["ranking"]["hr@1"] == 0.0 and m["ranking"]["hr@3"] == 1.0
    assert m["ranking"]["mrr"] == pytest.approx((1 / 3 + 1 / 2) / 2)


CANDS = ["Sting", "Stingray", "Muse", "Can", "Candlemass"]


@pytest.mark.parametrize("output, named", [
    ("Stingray", [1]),                         # the shorter title only inside the longer one: one candidate
    ("Sting", [0]),
    (" Stingray</s>", [1]),
    ("Sting, then Stingray", [0, 1]),          # both titles stand on their own: two candidates
    ("Stingray and Stingray", [1]),
    ("Candlemass", [4]),
    ("Can Candlemass", [3, 4]),
    ("Muse", [2]),
    ("Muse Stingray", [1, 2]),
    ("Radiohead", []),
    ("", []),
])
def test_match_candidates_substring_rule(output, named):
    assert M.match_candidates(output, CANDS) == named


def test_match_candidates_equal_titles_and_nested_chains():
    assert M.match_candidates("Muse", ["Muse", "Blur", "Muse"]) == [0, 2]  # two candidates, one title
    # a title inside a title inside a title: only the longest is named
    assert M.match_candidates("The Who Tribute", ["Who", "The Who", "The Who Tribute"]) == [2]
    assert M.match_candidates("The Who", ["Who", "The Who", "The Who Tribute"]) == [1]
    assert M.match_candidates("anything", ["", "thing"]) == [1]  # an empty title never matches


def test_generative_metrics_valid_ratio_and_hits():
    cands = [["Sting", "Stingray", "Muse"]] * 5
    targets = [1, 0, 2, 2, 0]
    outputs = ["Stingray",          # valid, hit (Sting inside Stingray does not count)
               "Sting",             # valid, hit
               "Sting and Muse",    # two candidates: invalid
               "Stingray",          # valid, miss
               "nothing"]           # no candidate: invalid
    m, preds = M.generative_metrics(outputs, cands, targets)
    assert preds == [1, 0, None, 1, None]
    assert m == {"valid_ratio": 3 / 5, "hr@1": 2 / 5, "hr@1_valid": 2 / 3}
    m, preds = M.generative_metrics(["x", "y"], [["A", "B"]] * 2, [0, 1])
    assert preds == [None, None] and m == {"valid_ratio": 0.0, "hr@1": 0.0, "hr@1_valid": 0.0}
    with pytest.raises(ValueError):
        M.generative_metrics([], [], [])


def test_popularity_percentile_is_the_share_of_items_at_most_as_popular():
    assert M.popularity_percentiles([5, 1, 1, 3]) == [100.0, 50.0, 50.0, 75.0]
    assert M.popularity_percentiles([2, 2, 2]) == [100.0, 100.0, 100.0]


def test_tail_is_the_least_popular_80_percent_ties_by_id():
    pop = [10, 0, 5, 5, 1, 9, 2, 3, 4, 5]   # 10 items: the head is the 2 most popular
    assert M.tail_items(pop) == set(range(10)) - {0, 5}
    assert M.tail_items([4, 4, 4, 4, 4]) == {1, 2, 3, 4}  # one head item; ties go to the lower id
    assert M.tail_items([1, 2, 3], head_fraction=0.5) == {0}  # round(1.5) = 2 head items


def test_popularity_metrics_by_hand():
    pop = [10, 0, 5, 5, 1, 9, 2, 3, 4, 5]   # head {0, 5}; percentiles: item 0 -> 100, 1 -> 10, 2 -> 80, 6 -> 30
    top1, targets = [0, 2, 6, 1], [0, 2, 1, 6]
    m = M.popularity_metrics(top1, targets, pop)
    assert m["top1_popularity_pct"] == pytest.approx((100 + 80 + 30 + 10) / 4)
    assert m["target_popularity_pct"] == pytest.approx((100 + 80 + 10 + 30) / 4)
    assert m["top1_tail_share"] == 0.75 and m["target_tail_share"] == 0.75
    assert m["hr@1_tail"] == pytest.approx(1 / 3)  # tail targets 2, 1, 6; only item 2 is hit
    m = M.popularity_metrics([0], [5], pop)
    assert m["target_tail_share"] == 0.0 and m["hr@1_tail"] == 0.0  # no tail target: 0, not a division error
    assert math.isclose(m["top1_popularity_pct"], 100.0)


def test_candidate_mass_is_the_probability_of_answering_from_the_list():
    import math

    import metrics as M

    # row 1: 20 candidates sharing 0.5 of the mass; row 2: all of it on one candidate (+ 19 of ~0)
    rows = [[math.log(0.5 / 20)] * 20, [0.0] + [-1e4] * 19]
    m = M.candidate_mass(rows)
    assert m["min"] == pytest.approx(0.5) and m["mean"] == pytest.approx(0.75)
    assert m["p90"] == pytest.approx(1.0) and m["mean_log"] == pytest.approx(math.log(0.5) / 2)
    with pytest.raises(ValueError):
        M.candidate_mass([])
