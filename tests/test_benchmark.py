"""benchmark.py in its smallest configuration on the small local model: every method runs, the JSON has the
target-ratio keys, and ranking with the prompt encoded once gives the naive path's ranking. Timings are not asserted."""
import json

import pytest
import torch

import benchmark
import data_interface as di
import dpo
import sasrec
import sft
import softmax_dpo

RATIO_KEYS = {"napo_k3_over_sft", "napo_k15_over_sft", "mem_napo_k15_over_sft", "rank_over_prompt_forward",
              "rank_naive_over_shared"}


def random_sasrec(folder):
    catalog = di.load_catalog("lastfm")
    torch.manual_seed(0)
    sasrec.save_sasrec(sasrec.SASRec(sasrec.SASRecConfig(n_items=catalog.n_items)).eval(), folder, {})
    return str(folder)


def test_benchmark_smallest_config(small_model, tmp_path, monkeypatch):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    built = []  # the trainers come from the stage scripts' own build_trainer
    for stage in (dpo, sft, softmax_dpo):
        def spy(*args, _real=stage.build_trainer, _name=stage.__name__, **kwargs):
            built.append(_name)
            return _real(*args, **kwargs)
        monkeypatch.setattr(stage, "build_trainer", spy)
    benchmark.main(base_model=small_model, ks=(3,), steps=1, warmup=0, batch_size=2, rank_rows=4, rank_repeats=1,
                   gen_rows=2, max_new_tokens=3, threads=1, sasrec_checkpoint=random_sasrec(tmp_path / "sasrec"),
                   json=str(out_json), markdown=str(out_md), isolate=False)
    res = json.loads(out_json.read_text())
    assert RATIO_KEYS <= res["ratios"].keys()
    assert res["ratios"]["napo_k3_over_sft"] > 0 and res["ratios"]["napo_k15_over_sft"] is None  # K=15 not run
    assert res["ratios"]["rank_naive_over_shared"] > 0 and res["ratios"]["rank_over_prompt_forward"] > 0
    assert res["identical_ranking"] is True and res["ranking"]["identical_metrics"] is True
    assert res["ranking"]["rows"] == 4 and res["ranking"]["generation_rows"] == 2
    assert {(r["method"], r["K"]) for r in res["training"]} == {
        ("sft", 0), ("sft_plain", 0), ("dpo", 1), ("napo_naive", 3), ("napo_shared", 3)}
    for r in res["training"]:
        assert len(r["step_s_all"]) == 1 and r["step_s"] > 0 and r["peak_rss_mb"] > 0
        assert r["train_loss"] == r["train_loss"]  # not NaN
    assert set(res["targets"]) == RATIO_KEYS and res["targets"]["napo_k15_over_sft"]["pass"] is False
    assert res["machine"]["torch_threads"] == 1 and res["machine"]["cpu"]
    assert sorted(built) == ["dpo", "sft", "softmax_dpo", "softmax_dpo"]
    md = out_md.read_text()
    assert "| NAPO shared | 3 |" in md and "rank 20 candidates, shared" in md and "napo_k3_over_sft" in md


def test_worker_subprocess_ranking(small_model):
    """The fresh-process path (what the real benchmark uses for every measurement)."""
    task = {"kind": "rank", "base_model": small_model, "dataset": "lastfm", "threads": 1, "batch_size": 2,
            "seed": 0, "cutoff_len": 512, "rank_rows": 2, "rank_repeats": 1, "gen_rows": 0, "max_new_tokens": 2}
    res = benchmark.run_task(task, verbose=False, isolate=True)
    assert res["identical_ranking"] is True and res["rows"] == 2 and res["rank_naive_s_per_row"] > 0


def test_build_benchmark_times_the_same_step_both_ways(tmp_path):
    """benchmark.py build: the default build's first batches, padded vs packed, from the same weights — the
    same first-step loss, less padding packed, and a report with both timings and their ratio."""
    import json

    res = benchmark.build(steps=1, warmup=0, threads=1, json=str(tmp_path / "b.json"))
    assert json.loads((tmp_path / "b.json").read_text()) == json.loads(json.dumps(res))
    assert res["first_step_abs_loss_diff"] < 1e-4
    assert res["padding_share"]["packed"] < 0.5 * res["padding_share"]["padded"]
    assert set(res["s_per_step"]) == {"padded", "packed"} and res["packed_over_padded"] > 0
    assert res["build_steps"] > 300 and res["machine"]["cpu"]  # the default build: 3 epochs, 383 steps


def test_build_benchmark_refuses_bad_steps(capsys):
    import cli

    with pytest.raises(SystemExit):
        cli.run({"training": benchmark.main, "build": benchmark.build}, ["build", "--steps", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --steps 0: must be >= 1"], err
