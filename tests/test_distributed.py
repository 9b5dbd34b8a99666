"""Several processes on CPU (torchrun, gloo backend): NAPO sharing across processes, every stage, inference.

Each launch starts torch + transformers in every process (~10 s on 2 cores), so the checks are grouped into
few launches: one for the NAPO objective (two splits of the global batch), one per training stage, and one
one-process reference each for NAPO training and inference. All processes run with OMP_NUM_THREADS=1, so a
row is computed by the same kernels whatever the number of processes.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is needed")

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **extra}


def _run(cmd, cwd, **env):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(**env), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{(r.stdout + r.stderr)[-4000:]}"
    return r


def _run_info(output_dir):
    return json.loads((Path(output_dir) / "final_checkpoint" / "napo_run.json").read_text())


def _train_steps(run_info):
    return [h for h in run_info["log_history"] if "loss" in h]


# --------------------------------------------------------------------------------------------------
# (a) the NAPO objective: 2 processes x b rows == 1 process x 2b rows, per example


def test_napo_objective_two_processes_equal_one(tmp_path):
    """Per-example losses, gradients w.r.t. each process's own rewards and the running mean M_bar are the same
    when the global batch is split over 2 processes (evenly, 4 + 4, and unevenly, 5 + 3) as when one process
    holds all 8 rows; sharing on, margin modes user and batch, two steps. Mode `authors` keeps the authors'
    per-process margin, so there only the pool and the running mean agree with one process."""
    sys.path.insert(0, str(Path(__file__).parent))
    import dist_napo_check as chk

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the launched processes
    try:
        ref = chk.run([8], 0, chk.make_sasrec())  # one process, in this process (no process group)
    finally:
        torch.set_num_threads(threads)
    _run(TORCHRUN + [REPO / "tests" / "dist_napo_check.py", "--out", tmp_path, "--splits", "4,4", "5,3"], tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for i, sizes in enumerate([[4, 4], [5, 3]]):
        parts = [ranks[r][i] for r in range(2)]
        assert [p["sizes"] for p in parts] == [sizes, sizes]
        assert parts[0]["rows"] + parts[1]["rows"] == list(range(8))
        for mode in ("user", "batch"):
            for step in range(chk.STEPS):
                one = ref["modes"][mode][step]
                two = [p["modes"][mode][step] for p in parts]
                cat = lambda key: [x for t in two for x in t[key]]  # noqa: E731  (rank order = row order)
                where = f"split {sizes}, margin {mode}, step {step}"
                assert cat("losses") == pytest.approx(one["losses"], abs=1e-5), where
                assert cat("grad_chosen") == pytest.approx(one["grad_chosen"], abs=1e-5), where
                for a, b in zip(cat("grad_rejected"), one["grad_rejected"]):
                    assert a == pytest.approx(b, abs=1e-5), where
                # the pool was built over the global batch (k = floor(0.7 * 7) = 4 neighbours, not 1 or 2)
                assert cat("equivalent_negatives") == one["equivalent_negatives"], where
                assert max(one["equivalent_negatives"]) > chk.K + 2 * chk.K, where
                assert cat("gamma") == pytest.approx(one["gamma"], abs=1e-6), where
                # the running mean is the global one, identical on every rank
                assert two[0]["M_bar"] == two[1]["M_bar"], where
                assert two[0]["M_bar"] == pytest.approx(one["M_bar"], abs=1e-7), where  # (bitwise equal here)
                # own negatives keep their gradient; no loss reaches another example's rewards (shared detached)
                assert all(g > 0 for row in one["grad_rejected"] for g in row), where
                assert one["cross_grad"] == 0.0 and two[0]["cross_grad"] == two[1]["cross_grad"] == 0.0, where
    assert ref["modes"]["user"][1]["M_bar"] != ref["modes"]["user"][0]["M_bar"]  # it did move
    # mode `authors`: the same pool as one process, but each rank its own margin from its own M_t, and M_bar
    # (from 0) the mean over ranks of m M_bar + (1-m) M_t; no gradient reaches any negative
    for i, sizes in enumerate([[4, 4], [5, 3]]):
        two_runs = [ranks[r][i]["modes"]["authors"] for r in range(2)]
        M_bar = 0.0
        for step in range(chk.STEPS):
            one, two = ref["modes"]["authors"][step], [t[step] for t in two_runs]
            where = f"authors, split {sizes}, step {step}"
            assert [x for t in two for x in t["equivalent_negatives"]] == one["equivalent_negatives"], where
            M_bar = 0.9 * M_bar + 0.1 * (two[0]["M_t"] + two[1]["M_t"]) / 2
            assert two[0]["M_bar"] == two[1]["M_bar"] == pytest.approx(M_bar, abs=1e-6), where
            for t in two:
                assert t["gamma"] == pytest.approx([1.0 - 0.3 * (t["M_t"] - M_bar)] * len(t["gamma"]), abs=1e-6)
                assert all(g == 0.0 for row in t["grad_rejected"] for g in row), where
            assert two[0]["gamma"][0] != pytest.approx(two[1]["gamma"][0], abs=1e-6), where  # per-rank margins
        assert ref["modes"]["authors"][0]["M_bar"] == pytest.approx(0.1 * ref["modes"]["authors"][0]["M_t"])


# --------------------------------------------------------------------------------------------------
# (b) every stage under torchrun (through the .sh launcher), and NAPO training equal to one process


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def sasrec_dir(work):
    import sasrec

    sasrec.train_sasrec("lastfm", work / "sasrec", epochs=1, max_train_samples=2000, verbose=False)
    return work / "sasrec"


@pytest.fixture(scope="module")
def sft_two(small_model, work):
    """SFT with NPROC=2 through sft.sh: 16 rows, per-device batch 4 -> 2 optimizer steps."""
    out = work / "sft"
    r = _run(["bash", REPO / "sft.sh", "--max_train_samples", 16, "--batch_size", 4, "--output_dir", out,
              "--logging_steps", 1, "--lora_dropout", 0.0], work, NPROC="2", BASE_MODEL=small_model)
    return out, r


def test_sft_two_processes(sft_two):
    out, r = sft_two
    assert (out / "final_checkpoint" / "adapter_config.json").exists()
    assert r.stdout.count("saved adapter") == 1  # rank 0 saves, alone
    assert len(_train_steps(_run_info(out))) == 2  # the 16 rows were split over the 2 processes


def test_dpo_two_processes(small_model, sft_two, work):
    out = work / "dpo"
    r = _run(["bash", REPO / "dpo.sh", "--max_train_samples", 16, "--batch_size", 4, "--output_dir", out,
              "--logging_steps", 1], work, NPROC="2", BASE_MODEL=small_model,
             SFT_ADAPTER=str(sft_two[0] / "final_checkpoint"))
    assert (out / "final_checkpoint" / "adapter_config.json").exists()
    assert r.stdout.count("saved adapter") == 1
    assert len(_train_steps(_run_info(out))) == 2


@pytest.fixture(scope="module")
def napo_runs(small_model, sft_two, sasrec_dir, work):
    """NAPO (sharing + user margin, reference model with precomputed reference log-probs) on the same 16 rows:
    one process x batch 8 (plain python, no launcher) and 2 processes x batch 4 (softmax_dpo.sh, NPROC=2)."""
    common = ["--base_model", small_model, "--start_adapter", sft_two[0] / "final_checkpoint",
              "--sasrec_checkpoint", sasrec_dir, "--max_train_samples", 16, "--logging_steps", 1,
              "--learning_rate", 1e-2, "--warmup_ratio", 0.0, "--reference", True,
              "--precompute_ref_log_probs", True]
    _run([sys.executable, REPO / "softmax_dpo.py", *common, "--batch_size", 8, "--output_dir", work / "napo1"], work)
    r = _run(["bash", REPO / "softmax_dpo.sh", *common, "--batch_size", 4, "--output_dir", work / "napo2"], work,
             NPROC="2")
    return work / "napo1", work / "napo2", r


def test_napo_two_processes_train_like_one(napo_runs):
    """Same global batches, same per-step loss, metrics and running mean: the data is split over the ranks in
    the one-process order, the pool is shared over the global batch, the reference log-probs gathered in
    dataset order, and DDP's averaged gradient equals the one-process gradient (step 2 follows an update)."""
    one_dir, two_dir, r = napo_runs
    assert (two_dir / "final_checkpoint" / "adapter_config.json").exists()
    assert r.stdout.count("saved adapter") == 1
    one, two = _train_steps(_run_info(one_dir)), _train_steps(_run_info(two_dir))
    assert len(one) == len(two) == 2
    for step, (a, b) in enumerate(zip(one, two)):
        for key in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "logps/chosen", "napo/M_bar",
                    "napo/equivalent_negatives", "napo/gamma_mean", "napo/gamma_min", "napo/gamma_max"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), f"step {step + 1} {key}"
        assert b["napo/equivalent_negatives"] > 3 + 2 * 3  # global batch 8 -> 4 neighbours (local 4 -> 2)
    assert two[1]["rewards/chosen"] != 0.0  # the policy moved away from the reference after step 1
    assert _run_info(two_dir)["M_bar"] == pytest.approx(_run_info(one_dir)["M_bar"], rel=1e-6)


# --------------------------------------------------------------------------------------------------
# (c) inference: 2 processes give exactly the 1-process predictions and metrics


def test_inference_two_processes_equal_one(small_model, napo_runs, work):
    adapter = napo_runs[1] / "final_checkpoint"
    args = ["--max_test_samples", 20, "--batch_size", 4, "--progress", False]  # 5 batches: 3 + 2 per rank
    _run([sys.executable, REPO / "inference.py", "--base_model", small_model, "--adapter", adapter,
          "--output_dir", work / "ev1", *args], work)
    _run(["bash", REPO / "inference.sh", *args], work, NPROC="2", BASE_MODEL=small_model, ADAPTER=str(adapter),
         OUTPUT_DIR=str(work / "ev2"))
    m1, m2 = (json.loads((work / d / "metrics.json").read_text()) for d in ("ev1", "ev2"))
    assert (m1["processes"], m2["processes"]) == (1, 2)
    for m in (m1, m2):
        m.pop("seconds"), m.pop("processes")
    assert m1 == m2
    assert {"ranking", "generative", "constrained", "popularity"} <= set(m1) and m1["n_rows"] == 20
    p1, p2 = ((work / d / "predictions.jsonl").read_text() for d in ("ev1", "ev2"))
    assert p1 == p2  # same rows, same order, same scores and outputs, byte for byte
