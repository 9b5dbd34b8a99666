"""The no-learning baselines of the method table: rank each test row's 20 candidates by train popularity
(`most_popular`), or read the answer off the published `sdpo` candidate lists (`seeded_candidates`, the leak).
Run as `python reproduce.py baseline --kind ...` (the reproduce stage), which writes the metrics to --output.
"""
from __future__ import annotations

import json
import time

import cache
import data_interface as di
import metrics as M
from methods import DATASET, SEED


def baseline(kind="most_popular", protocol="clean", dataset=DATASET, seed=SEED, test_rows=-1, output=None):
    """Metrics of a rule on the test rows: `most_popular` (rank the candidates by train popularity, ties by
    position) or `seeded_candidates` (recompute each candidate's sdpo negative set; pick the best
    match — it needs no learning and reads the answer off the published candidate lists)."""
    di.check_protocol(protocol)
    catalog = di.load_catalog(dataset)
    rows = di.eval_rows(catalog, "test", protocol, seed, test_rows)
    pop = di.target_popularity(catalog)
    cands, targets = [r["candidate_ids"] for r in rows], [r["target_id"] for r in rows]
    t0 = time.time()
    if kind == "most_popular":
        res, _ = M.candidate_metrics([[float(pop[c]) for c in cs] for cs in cands], cands, targets, pop)
    elif kind == "seeded_candidates":
        split_rows = di.load_split(catalog, "test")
        hr = di.seeded_candidate_heuristic(catalog, [split_rows[r["index"]] for r in rows], cands)
        res = {"ranking": {"hr@1": hr}}
    else:
        raise di.DataError(f"--kind {kind!r}: choose most_popular or seeded_candidates")
    res = {"n_rows": len(rows), "protocol": protocol, "split": "test", "model": kind, **res,
           "seconds": round(time.time() - t0, 1)}
    if output:
        cache.atomic_write_text(output, json.dumps(res, indent=2) + "\n")
    print(f"{kind} [{protocol}] n={len(rows)} hr@1 {res['ranking']['hr@1']:.4f}")
    return res
