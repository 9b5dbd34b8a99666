"""Faults: SFT and inference runs SIGKILLed at several points never leave a partial
final_checkpoint, metrics.json or predictions.jsonl, and a resumed SFT run ends with the same adapter as an
uninterrupted one. The kills are real SIGKILLs of the stage's process (tests/fault_driver.py)."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).resolve().parent / "fault_driver.py"
SFT = dict(max_train_samples=32, batch_size=8, save_steps=2, logging_steps=1, learning_rate=3e-3)  # 4 steps


def killed(point, script, **opts):
    args = [sys.executable, DRIVER, point, script]
    for k, v in opts.items():
        args += [f"--{k}", v]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr[-2000:])


def adapter_weights(folder):
    from safetensors.torch import load_file

    return load_file(Path(folder) / "adapter_model.safetensors")


def assert_complete_or_absent(final: Path):
    """final_checkpoint is absent or whole: its weights load and napo_run.json (written last) parses."""
    if final.exists():
        assert adapter_weights(final)
        json.loads((final / "napo_run.json").read_text())
        assert json.loads((final / "napo_base.json").read_text())["fingerprint"]


def test_killed_sft_leaves_no_partial_adapter_and_resumes_to_the_same_one(small_model, tmp_path):
    import sft

    full = sft.main(base_model=small_model, output_dir=str(tmp_path / "full"), **SFT)
    want = adapter_weights(full)
    for point in ("saved:2", "final_saved", "replace:final_checkpoint"):
        out = tmp_path / point.replace(":", "_")
        if point.startswith("replace"):  # a second run into a folder that holds a finished adapter already
            shutil.copytree(full, out / "final_checkpoint")
        killed(point, "sft", base_model=small_model, output_dir=out, **SFT)
        final = out / "final_checkpoint"
        if point.startswith("replace"):
            assert not final.exists() or adapter_weights(final).keys() == want.keys()
            assert_complete_or_absent(final)
        else:
            assert not final.exists(), point
        assert (out / "checkpoint-2" / "trainer_state.json").exists(), point

    # killed after checkpoint-2: resuming from it ends with the uninterrupted run's adapter
    out = tmp_path / "saved_2"
    assert not (out / "checkpoint-4").exists()
    resumed = sft.main(base_model=small_model, output_dir=str(out), resume_from_checkpoint=str(out / "checkpoint-2"),
                       **SFT)
    got = adapter_weights(resumed)
    assert got.keys() == want.keys()
    start = adapter_weights(out / "checkpoint-2")
    assert any((want[k] - start[k]).abs().max() > 1e-4 for k in want), "steps 3-4 changed the adapter"
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6, rtol=0), k
    log = json.loads((Path(resumed) / "napo_run.json").read_text())["log_history"]
    assert max(h.get("step", 0) for h in log) == 4

    # killed while saving: the temporary folder of the dead run is removed by the next save
    out = tmp_path / "final_saved"
    assert [p.name for p in out.iterdir() if p.name.startswith("final_checkpoint.tmp")]
    again = sft.main(base_model=small_model, output_dir=str(out), resume_from_checkpoint=str(out / "checkpoint-4"),
                     **SFT)
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    for k, v in adapter_weights(again).items():
        assert torch.allclose(v, want[k], atol=1e-6, rtol=0), k


def read_outputs(out: Path):
    """(metrics or None, prediction rows or None), asserting each file is whole and that a metrics.json
    present describes the predictions.jsonl beside it."""
    preds = metrics = None
    if (out / "predictions.jsonl").exists():
        preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    if (out / "metrics.json").exists():
        metrics = json.loads((out / "metrics.json").read_text())
        assert preds is not None and metrics["n_rows"] == len(preds)
    return metrics, preds


def test_killed_inference_leaves_whole_files_or_none(small_model, tmp_path):
    import inference

    out = tmp_path / "eval"
    opts = dict(base_model=small_model, output_dir=str(out), batch_size=4, generative=False, constrained=False,
                progress=False)
    inference.main(max_test_samples=8, **opts)  # an earlier, finished evaluation in the same folder
    assert read_outputs(out)[0]["n_rows"] == 8
    for point, metrics_left in (("batch:2", True), ("after:predictions.jsonl", False), ("replace:metrics.json", False)):
        killed(point, "inference", max_test_samples=16, **opts)
        metrics, preds = read_outputs(out)
        assert (metrics is not None) == metrics_left, point
        if metrics is not None:  # killed before writing: the earlier run's files, untouched
            assert metrics["n_rows"] == 8
        else:  # killed while writing: the new predictions are whole; the done mark is gone
            assert len(preds) == 16
    res = inference.main(max_test_samples=16, **opts)
    metrics, preds = read_outputs(out)
    assert metrics == json.loads(json.dumps(res)) and len(preds) == 16
    assert not [p for p in out.iterdir() if ".tmp" in p.name], "stale temporary files are removed"
