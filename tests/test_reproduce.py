"""reproduce.py: one command runs the stages of the selected methods, skips the finished ones on a second
invocation, and writes summary.json, results.md, the plots and the README's results section."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import data_interface as di
import report
import reproduce

REPO = Path(__file__).resolve().parents[1]
METHODS = ("sft", "sdpo", "napo")
TEST_ROWS = 16


def _run_quick(model, root):
    cmd = [sys.executable, str(REPO / "reproduce.py"), "--quick", f"--methods={','.join(METHODS)}",
           f"--base_model={model}", f"--out={root / 'runs'}", f"--results_dir={root / 'results'}",
           f"--assets_dir={root / 'assets'}", "--threads=1", "--sft_rows=64", "--pref_rows=32",
           f"--test_rows={TEST_ROWS}"]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout, time.time() - t0


@pytest.fixture(scope="module")
def quick_run(small_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce")
    stdout, seconds = _run_quick(small_model, root)
    return {"root": root, "model": small_model, "stdout": stdout, "seconds": seconds}


def test_quick_run_writes_summary_table_and_plots(quick_run):
    root = quick_run["root"]
    s = json.loads((root / "results" / "summary.json").read_text())
    for m in METHODS:
        e = s["methods"][m]
        for p in ("clean", "sdpo"):
            ev = e["eval"][p]
            assert ev["protocol"] == p and ev["n_rows"] == TEST_ROWS
            assert 0.0 <= ev["ranking"]["hr@1"] <= 1.0 and "popularity" in ev
            assert e["stages"][f"eval_{p}"]["command"].startswith("python inference.py ")
        assert e["stages"]["train"]["seconds"] > 0 and e["stages"]["train"]["done"]
    # the dependency of NAPO (SASRec) was trained, not evaluated; unselected methods are absent
    assert s["methods"]["sasrec"]["stages"]["train"]["done"] and not s["methods"]["sasrec"]["eval"]
    assert "dpo" not in s["methods"]
    napo_cmd = s["methods"]["napo"]["stages"]["train"]["command"]
    assert napo_cmd.startswith("python softmax_dpo.py ") and "--share_negatives=True" in napo_cmd
    assert "--sasrec_checkpoint=" in napo_cmd and "--resume_from_checkpoint=" in napo_cmd
    # equivalent negatives come from the training logs: S-DPO = K; NAPO (B=16, rho=0.7) up to 3 + 10*3
    assert s["methods"]["sdpo"]["equivalent_negatives"] == 3
    assert 3 < s["methods"]["napo"]["equivalent_negatives"] <= 33
    assert s["methods"]["napo"]["curves"]["napo/gamma_mean"]
    claims = {c["id"]: c for c in s["claims"]}
    assert claims["napo>sdpo"]["verdict"] in ("supported", "not supported", "inconclusive")
    assert claims["c"]["verdict"] == "not run"  # no fixed-margin run in this subset
    md = (root / "results" / "results.md").read_text()
    assert "| NAPO (`napo`) | clean |" in md and "## Claims" in md
    for name in report.FIGURES:
        assert (root / "assets" / name).stat().st_size > 10_000, name


def test_second_run_skips_finished_stages(quick_run):
    root = quick_run["root"]
    outputs = sorted(p for p in (root / "runs").rglob("*") if p.is_file() and "logs" not in p.parts)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in outputs}
    summary = (root / "results" / "summary.json").read_bytes()
    n_stages = quick_run["stdout"].count(" done in ")
    stdout, seconds = _run_quick(quick_run["model"], root)
    assert stdout.count("done already, skipped") == n_stages > 0
    assert "running" not in stdout
    after = sorted(p for p in (root / "runs").rglob("*") if p.is_file() and "logs" not in p.parts)
    assert after == outputs and {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in after} == before
    assert (root / "results" / "summary.json").read_bytes() == summary
    assert seconds < quick_run["seconds"]


def test_readme_generator_fills_the_markers(quick_run, tmp_path, monkeypatch):
    root = quick_run["root"]
    dirs = dict(results_dir=str(root / "results"), assets_dir=str(root / "assets"))
    # a further run (another base model) is appended from its own results folder, with its command
    monkeypatch.setattr(reproduce, "EXTRA_RUNS", [(str(root / "results"), "Another model", "bash other.sh")])
    readme = tmp_path / "README.md"
    readme.write_text("# NAPO\n\nintro\n\n<!-- results:start -->\nold numbers\n<!-- results:end -->\n\nfooter\n")
    reproduce.readme(readme_path=str(readme), **dirs)
    text = readme.read_text()
    assert text.startswith("# NAPO\n\nintro\n\n<!-- results:start -->\n")
    assert text.endswith("<!-- results:end -->\n\nfooter\n")
    assert "old numbers" not in text
    section = text.split("<!-- results:start -->")[1].split("<!-- results:end -->")[0]
    assert "| NAPO (`napo`) | clean |" in section and "Does this run support NAPO's claims?" in section
    # method -> command: the table's row and the full command lines, in the order they run
    assert "| `napo` | `softmax_dpo.py` | `sft` | `--num_negatives=3 --share_negatives=True" in section
    lines = section.split("```bash\n")[1].split("```")[0].splitlines()
    assert len(lines) == len(reproduce.plan(json.loads((root / "results" / "summary.json").read_text())["settings"]))
    assert lines[0].startswith("python sasrec.py train ")
    assert any(ln.startswith("python softmax_dpo.py ") and "/napo --" in ln for ln in lines)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", section)
    assert len(links) == len(report.FIGURES) and all((readme.parent / link).exists() for link in links)
    extra = section.split("### Another model")[1]
    assert "```bash\nbash other.sh\n```" in extra and "| NAPO (`napo`) | clean |" in extra
    assert "NAPO is more accurate than S-DPO" in extra and "**all stages**" in extra
    reproduce.readme(readme_path=str(readme), **dirs)
    assert readme.read_text() == text  # regenerating changes nothing
    plain = tmp_path / "plain.md"
    plain.write_text("no markers here\n")
    target = Path(reproduce.readme(readme_path=str(plain), **dirs))
    assert plain.read_text() == "no markers here\n"
    assert target == root / "results" / "README_results.md" and "| NAPO (`napo`) |" in target.read_text()


def test_plan_dependencies_and_stale_stages(tmp_path):
    out = tmp_path / "runs"
    settings = reproduce.resolve_settings(base_model="tiny", out=str(out))
    stages = reproduce.plan(settings, "napo_k7")
    assert [s.key for s in stages] == ["sasrec:train", "sft:train", "napo_k7:train", "napo_k7:eval_clean",
                                       "napo_k7:eval_sdpo"]
    train = stages[2]
    assert "--num_negatives=7" in train.command_line() and "--max_train_samples=2048" in train.command_line()
    assert train.deps == ["sft:train", "sasrec:train"]
    # sweeps and ablations are evaluated by ranking only; the main methods by all three modes
    assert all("--generative=False --constrained=False" in s.command_line() for s in stages[3:])
    main_eval = next(s for s in reproduce.plan(settings, "napo") if s.key == "napo:eval_clean")
    assert "--generative=True --constrained=True" in main_eval.command_line()
    assert {s.method for s in reproduce.plan(settings)} == set(reproduce.METHODS)
    with pytest.raises(di.DataError, match="--methods: unknown nope"):
        reproduce.plan(settings, "napo,nope")
    # todo -> done (no record: trusted; record with the same command) -> stale (another command, or a
    # dependency ran again)
    ev = stages[3]
    assert reproduce.stage_state(ev, out, set()) == "todo"
    ev.done_file.parent.mkdir(parents=True)
    ev.done_file.write_text("{}")
    assert reproduce.stage_state(ev, out, set()) == "done"
    ev.record_file(out).write_text(json.dumps({"command": ev.command_line()}))
    assert reproduce.stage_state(ev, out, set()) == "done"
    assert reproduce.stage_state(ev, out, {"napo_k7:train"}) == "stale"
    ev.record_file(out).write_text(json.dumps({"command": ev.command_line().replace("=clean", "=sdpo")}))
    assert reproduce.stage_state(ev, out, set()) == "stale"


def test_baselines_show_the_leak_and_run_as_subprocess_stages(tmp_path):
    assert reproduce.baseline("seeded_candidates", "sdpo", test_rows=40)["ranking"]["hr@1"] == 1.0
    assert reproduce.baseline("seeded_candidates", "clean", test_rows=40)["ranking"]["hr@1"] < 0.3
    out = tmp_path / "runs"
    settings = reproduce.resolve_settings(out=str(out), test_rows=16)
    st = next(s for s in reproduce.plan(settings, "most_popular") if s.name == "eval_sdpo")
    reproduce.run_stage(st, out, isolate=True, threads=1)
    res = json.loads(st.done_file.read_text())
    assert res["n_rows"] == 16 and res["protocol"] == "sdpo" and res["model"] == "most_popular"
    assert (out / "logs" / "most_popular.eval_sdpo.log").read_text().startswith("python reproduce.py baseline ")


def _write_predictions(out, method, hits, top1=None):
    rows = [{"index": i, "target_id": 10, "top1_id": 10 if h else (top1 or 11)} for i, h in enumerate(hits)]
    path = out / method / "eval_clean" / "predictions.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_claim_verdicts_follow_the_paired_numbers(tmp_path):
    """Verdicts from per-row predictions: a clear gain is supported, identical runs are inconclusive, a clear
    loss is not supported, and a missing run is reported as not run."""
    out = tmp_path / "runs"
    pop = di.target_popularity(di.load_catalog("lastfm"))
    popular, rare = max(range(len(pop)), key=pop.__getitem__), min(range(len(pop)), key=pop.__getitem__)
    n = 400
    _write_predictions(out, "napo", [i % 2 == 0 for i in range(n)], top1=rare)            # HR@1 0.50
    _write_predictions(out, "sdpo", [i % 4 == 0 for i in range(n)], top1=popular)         # 0.25
    _write_predictions(out, "napo_fixed_margin", [i % 2 == 0 for i in range(n)])          # same as NAPO
    _write_predictions(out, "napo_batch_margin", [i % 4 != 3 for i in range(n)])          # 0.75
    summary = {"settings": {"out": str(out), "dataset": "lastfm"}, "methods": {}}
    v = {c["id"]: c for c in report.claims(summary)}
    assert v["napo>sdpo"]["verdict"] == "supported" and "0.5000 vs 0.2500" in v["napo>sdpo"]["evidence"]
    assert v["c"]["verdict"] == "inconclusive"
    assert v["d"]["verdict"] == "not supported"
    assert v["e"]["verdict"] == "supported"  # NAPO's misses go to a rare item, S-DPO's to the most popular
    assert v["a"]["verdict"] == "not run" and v["b"]["verdict"] == "not run"


def test_defaults_have_one_source():
    """NAPO's defaults live in napo_config.NAPOConfig and each stage's in its function's signature; the flags of
    softmax_dpo.py and the tables of reproduce.py read them from there."""
    import inspect
    from dataclasses import asdict

    import softmax_dpo
    from napo_config import NAPOConfig

    params = inspect.signature(softmax_dpo.main).parameters
    assert {k: params[k].default for k in asdict(NAPOConfig())} == asdict(NAPOConfig())
    assert reproduce.NAPO.items() <= asdict(NAPOConfig()).items()
    for stage, table in reproduce.STAGE_FLAGS.items():
        defaults = reproduce.stage_defaults(stage)
        flags = reproduce.stage_flags(stage, quick=False)
        assert all(flags[k] == defaults[k] for k, v in table.items() if v is reproduce.DEFAULT)
    assert reproduce.stage_flags("softmax_dpo", quick=False)["beta"] == NAPOConfig().beta
    assert [m for m in reproduce.METHODS if reproduce.needs_sasrec(m)] == [
        m for m, s in reproduce.METHODS.items()
        if s["stage"] == "softmax_dpo" and not (s["flags"].get("share_negatives") is False
                                                and s["flags"].get("margin_mode") == "none")]


def test_equal_budgets_for_preference_methods_and_sft_continued(tmp_path):
    """Every preference method and SFT continued train on the same rows, with the same batch, accumulation and
    epochs (so the same number of optimizer steps); SFT continued starts from the SFT adapter."""
    for quick in (False, True):
        settings = reproduce.resolve_settings(base_model="tiny-bpe", out=str(tmp_path / "runs"), quick=quick)
        stages = {s.key: s for s in reproduce.plan(settings)}
        controlled = [m for m, spec in reproduce.METHODS.items() if "start" in spec]
        assert "sft_cont" in controlled and "dpo" in controlled and "napo_alpha3" in controlled
        budgets = set()
        for m in controlled:
            st = stages[f"{m}:train"]
            effective = {**reproduce.stage_defaults(st.module), **st.kwargs}
            budgets.add(tuple(effective[k] for k in ("max_train_samples", "batch_size", "num_train_epochs",
                                                     "gradient_accumulation_steps")))
        assert budgets == {(settings["pref_rows"], 16, 1, 1)}, budgets
    cont = stages["sft_cont:train"]
    assert cont.module == "sft" and cont.deps == ["sft:train"]
    assert cont.kwargs["start_adapter"].endswith("runs/sft/final_checkpoint")
    assert "resume_from_checkpoint" not in cont.kwargs
    assert stages["sft:train"].kwargs["max_train_samples"] == settings["sft_rows"] != settings["pref_rows"]
    # SFT continued is a main method: evaluated by ranking, generation and constrained decoding
    assert "--generative=True --constrained=True" in stages["sft_cont:eval_clean"].command_line()
