"""gpu_check on a CPU: its flags, the no-CUDA stop, and the report it writes (stand-in stages, no torch work)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import gpu_check

REPO = Path(__file__).resolve().parents[1]


def _args(tmp_path, *extra):
    return ["--dry_run", "--output", str(tmp_path / "report.json"), "--work_dir", str(tmp_path / "work"), *extra]


@pytest.mark.parametrize("flags, message", [
    (["--models", "tiny,llama"], "--models 'tiny,llama': 'llama' is not one of tiny, smollm2-135m"),
    (["--precisions", "fp8"], "--precisions 'fp8': 'fp8' is not one of bf16, 4bit"),
    (["--sft_steps", "0"], "--sft_steps 0: must be >= 1"),
    (["--test_rows", "many"], "argument --test_rows: invalid int value: 'many'"),
    (["--tiny_pretrain_steps", "-2"], "--tiny_pretrain_steps -2: must be >= 1, or -1 for the full build"),
    (["--output", "report.txt"], "--output 'report.txt': the report is a .json file"),
    (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
])
def test_bad_flags_are_one_line(flags, message, capsys):
    assert gpu_check.main(flags) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [f"error: gpu_check: {message}"]


def test_flags_parse_and_dedupe():
    args = gpu_check.parse_args(["--models", "tiny, tiny", "--precisions", "4bit,bf16", "--tiny_pretrain_steps", "-1"])
    assert args.models == ["tiny"] and args.precisions == ["4bit", "bf16"] and args.tiny_pretrain_steps == -1


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_without_cuda_the_script_stops_at_once(tmp_path):
    """One line, exit 1, nothing installed (a wheels folder is there), no report written."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    env = {**os.environ, "PYTHON": sys.executable, "NAPO_GPU_WHEELS": str(wheels),
           "NAPO_GPU_SITE": str(tmp_path / "site")}
    p = subprocess.run(["bash", str(REPO / "gpu_check.sh"), "--output", str(tmp_path / "r.json")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert p.stdout == ""
    assert p.stderr.splitlines() == ["error: gpu_check needs an NVIDIA GPU (torch.cuda.is_available() is False)"]
    assert not (tmp_path / "site").exists() and not (tmp_path / "r.json").exists()
    # bad flags are caught by the same first step, before CUDA is looked at
    p = subprocess.run(["bash", str(REPO / "gpu_check.sh"), "--models", "x"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.splitlines() == [
        "error: gpu_check: --models 'x': 'x' is not one of tiny, smollm2-135m"]


RUN_KEYS = {"model", "precision", "stage", "status", "error", "wall_s", "steps", "step_s", "tokens", "tokens_per_s",
            "peak_gpu_mem_gib", "metrics"}


def test_dry_run_writes_the_report_schema(tmp_path, capsys):
    assert gpu_check.main(_args(tmp_path)) == 0
    assert "wrote" in capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["schema"] == gpu_check.SCHEMA and report["status"] == "complete" and report["dry_run"] is True
    assert set(report) >= {"started", "finished", "total_s", "budget_s", "within_budget", "args", "environment",
                           "runs", "counts"}
    env = report["environment"]
    assert set(env) >= {"python", "packages", "differs_from_requirements", "unmet_requirements", "cuda", "gpu"}
    assert set(env["packages"]) >= {"torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes"}
    # sasrec, then per model: build + 2 precisions x 7 stages
    assert len(report["runs"]) == 1 + 2 * (1 + 2 * len(gpu_check.PER_PRECISION))
    assert report["counts"] == {"ok": len(report["runs"])}
    for run in report["runs"]:
        assert set(run) >= RUN_KEYS
    stages = [(r["model"], r["precision"], r["stage"]) for r in report["runs"]]
    assert stages[:3] == [("-", "-", "sasrec"), ("tiny", "-", "build"), ("tiny", "bf16", "sft")]
    assert ("smollm2-135m", "4bit", "shared_vs_naive") == stages[-1]
    sft = next(r for r in report["runs"] if r["stage"] == "sft")
    assert sft["steps"] == 32 and sft["tokens_per_s"] > 0
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


class _Failing(gpu_check.DryStages):
    def build(self, model):
        if model == "smollm2-135m":
            raise gpu_check.Skip(gpu_check.SMOLLM2_MISSING)
        return super().build(model)

    def napo(self, ctx):
        raise RuntimeError("CUDA out of memory\nsecond line")


def test_a_failing_stage_is_recorded_and_the_rest_go_on(tmp_path):
    args = gpu_check.parse_args(_args(tmp_path, "--precisions", "bf16"))
    report = gpu_check.run_check(args, _Failing(args))
    assert json.loads((tmp_path / "report.json").read_text()) == report
    by = {(r["model"], r["stage"]): r for r in report["runs"]}
    napo = by["tiny", "napo"]
    assert napo["status"] == "error" and napo["error"] == "RuntimeError: CUDA out of memory"
    assert napo["traceback"] and napo["wall_s"] is not None
    # inference falls back to the SFT adapter, and every other tiny stage ran
    assert by["tiny", "rank"]["status"] == "ok" and by["tiny", "rank"]["adapter"] == by["tiny", "sft"]["adapter"]
    assert all(r["status"] == "ok" for (m, s), r in by.items() if m == "tiny" and s != "napo")
    # SmolLM2 without its wheel: skipped with the reason, stages after it too
    assert by["smollm2-135m", "build"]["status"] == "skipped" and "93 MB" in by["smollm2-135m", "build"]["error"]
    assert by["smollm2-135m", "sft"]["status"] == "skipped"
    assert report["status"] == "complete" and report["counts"]["error"] == 1


def test_report_is_written_whole_or_not_at_all(tmp_path):
    path = tmp_path / "r.json"
    gpu_check.write_report(path, {"a": 1})
    with pytest.raises(TypeError):
        gpu_check.write_report(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_unmet_requirements_names_what_is_missing(monkeypatch):
    from importlib import metadata

    reqs = {"fakepkg": ["numpy>=1.0", "numpy<1.0", "not-a-real-package-xyz>=1", 'other; extra == "dev"']}
    monkeypatch.setattr(metadata, "requires", lambda d: reqs[d])
    out = gpu_check.unmet_requirements(["fakepkg"])
    assert len(out) == 2
    assert out[0].startswith("fakepkg needs numpy<1.0 (found ")
    assert out[1] == "fakepkg needs not-a-real-package-xyz>=1 (missing)"


def test_carried_wheels_are_pinned_like_the_project():
    """The check runs the project's pins of everything it carries (only the machine's own packages differ)."""
    carried = gpu_check._pins("requirements-gpu-check.txt")
    pins = gpu_check._pins("requirements.txt", "requirements-gpu.txt")
    assert {"trl", "peft", "datasets", "fire", "bitsandbytes", "gguf"} <= set(carried)
    for name, ver in carried.items():
        if name in pins:
            assert pins[name] == ver, name
