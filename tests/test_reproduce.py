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
    assert "--sasrec_checkpoint=" in napo_cmd and "--start_adapter=" in napo_cmd
    # equivalent negatives come from the training logs: S-DPO = K; NAPO (B=16, rho=0.7) up to 3 + 10*3
    assert s["methods"]["sdpo"]["equivalent_negatives"] == 3
    assert 3 < s["methods"]["napo"]["equivalent_negatives"] <= 33
    assert s["methods"]["napo"]["curves"]["napo/gamma_mean"]
    claims = {c["id"]: c for c in s["claims"]}
    assert claims["napo>sdpo"]["verdict"] in ("supported", "refuted", "inconclusive")
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
    ev.record_file(out).write_text(json.dumps({"command": ev.command_line(), "base": ev.base}))
    assert ev.base == reproduce.base_identity("tiny", "lastfm")
    assert reproduce.stage_state(ev, out, set()) == "done"
    assert reproduce.stage_state(ev, out, {"napo_k7:train"}) == "stale"
    # the same command on another build of `tiny` (or a record that does not say which)
    for other in ({"command": ev.command_line(), "base": "tiny-000000000000"}, {"command": ev.command_line()}):
        ev.record_file(out).write_text(json.dumps(other))
        assert reproduce.stage_state(ev, out, set()) == "stale"
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
    loss is refuted, and a missing run is reported as not run."""
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
    assert v["d"]["verdict"] == "refuted"
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
    # NAPO = NAPOConfig's defaults, but for the settings chosen on validation (TUNED)
    assert {k: v for k, v in reproduce.NAPO.items() if k not in reproduce.TUNED["napo"]}.items() \
        <= asdict(NAPOConfig()).items()
    assert reproduce.NAPO.items() >= reproduce.TUNED["napo"].items()
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
        settings = reproduce.resolve_settings(base_model="tiny-nocopy", out=str(tmp_path / "runs"), quick=quick)
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


def test_seeds_flag_and_folders(tmp_path):
    """--seeds 0,1,2 runs each seed's chain in its own folder (seed 0 in the run folder itself, as before);
    --seed N stays one seed; bad seeds are a one-line error naming the flag, before anything runs."""
    out = tmp_path / "runs"
    settings = reproduce.resolve_settings(out=str(out), seeds=(0, 2), results_dir=str(tmp_path / "results"))
    assert settings["seeds"] == [0, 2] and settings["seed"] == 0
    runs = reproduce.seed_runs(settings)
    assert [r["seed"] for r in runs] == [0, 2]
    assert [Path(r["out"]) for r in runs] == [out, out / "seed2"]
    assert [Path(r["records"]) for r in runs] == [tmp_path / "results" / "records" / "seed0",
                                                   tmp_path / "results" / "records" / "seed2"]
    sft2 = reproduce.plan(runs[1], "sft")[0]
    assert "--seed=2" in sft2.command_line() and f"--output_dir={out / 'seed2' / 'sft'} " in sft2.command_line()
    assert reproduce.resolve_settings(out=str(out), seed=3)["seeds"] == [3]
    assert reproduce.resolve_settings(out=str(out), seeds="1,0")["seeds"] == [1, 0]
    assert reproduce.resolve_settings(out=str(out))["records"] == "results/records"
    with pytest.raises(di.DataError, match=r"--seeds 0,0: give distinct seeds"):
        reproduce.resolve_settings(seeds=(0, 0))
    with pytest.raises(di.DataError, match=r"--seed 2 and --seeds 0,1: give one of them"):
        reproduce.resolve_settings(seed=2, seeds="0,1")
    for argv, message in ((["--seeds", "0,x"], "error: --seeds 0,x: 'x' is not a whole number >= 0"),
                          (["--seeds=0,-1"], "error: --seeds 0,-1: '-1' is not a whole number >= 0"),
                          (["--methods", "sft,nope"], "error: --methods: unknown nope")):
        r = subprocess.run([sys.executable, str(REPO / "reproduce.py"), *argv, "--dry_run", f"--out={out}"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.startswith(message), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()


def _fake_stage(ran, hits_of=None):
    """run_stage without a model: writes each stage's final output (and an evaluation's predictions, with the
    hits of `hits_of` {method: [0/1 per row]}) and remembers which stage ran."""
    hits_of = hits_of or {"sft": [1, 0, 0, 0], "sdpo": [1, 1, 0, 0], "dpo": [1, 1, 1, 0]}

    def run_stage(stage, out, isolate, threads):
        ran.append(stage.key)
        done = reproduce.REPO_DIR / stage.done_file
        done.parent.mkdir(parents=True, exist_ok=True)
        if stage.name != "train":
            hits = hits_of.get(stage.method, [0, 0, 0, 0])
            preds = [{"index": i, "target_id": 7, "top1_id": 7 if h else 9, "scores": [0.0] * 20} for i, h in
                     enumerate(hits)]
            (done.parent / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
            done.write_text(json.dumps({"n_rows": 4, "protocol": stage.kwargs["protocol"],
                                        "ranking": {"hr@1": sum(hits) / 4}}))
        else:
            done.write_text(json.dumps({"stage": stage.module, "train_rows": 4, "log_history": [
                {"loss": 1.0, "step": 1}, {"train_runtime": 2.0, "step": 1}]}))
        return 1.5
    return run_stage


def test_committed_records_let_a_fresh_clone_continue(tmp_path, monkeypatch):
    """A finished stage is copied into the committed records (command, wall time, metrics, per-row results,
    training log). On a fresh clone (no run folder) a recorded evaluation is skipped; a recorded training stage
    runs again only when a stage that still has to run needs its adapter, and its rerun leaves the recorded
    stages alone; a record made by another command does not count."""
    ran = []
    monkeypatch.setattr(reproduce, "run_stage", _fake_stage(ran))
    settings = reproduce.resolve_settings(base_model="tiny", out=str(tmp_path / "runs"),
                                          results_dir=str(tmp_path / "results"), seeds="0")
    one = reproduce.seed_runs(settings)[0]
    records = tmp_path / "results" / "records" / "seed0"
    assert reproduce.run_seed(one, "sdpo", False, None, False, False) == {}
    assert ran == ["sft:train", "sdpo:train", "sdpo:eval_clean", "sdpo:eval_sdpo"]
    rec = json.loads((records / "sdpo" / "stage_eval_clean.json").read_text())
    assert rec["seconds"] == 1.5 and rec["metrics"]["ranking"]["hr@1"] == 0.5
    assert rec["command"] == reproduce.plan(one, "sdpo")[2].command_line()
    assert json.loads((records / "sdpo" / "eval_clean.rows.json").read_text()) == {
        "index": [0, 1, 2, 3], "target_id": [7, 7, 7, 7], "top1_id": [7, 7, 9, 9]}  # no scores: small
    assert json.loads((records / "sft" / "stage_train.json").read_text())["run"]["train_rows"] == 4
    sft_record = (records / "sft" / "stage_train.json").read_text()

    import shutil

    shutil.rmtree(tmp_path / "runs")  # a fresh clone: only the committed records
    ran.clear()
    assert reproduce.run_seed(one, "sdpo", False, None, False, False) == {} and ran == []
    stages = reproduce.plan(one, "sdpo,dpo")
    states = reproduce.plan_states(stages, tmp_path / "runs", one["records"])
    assert states == {"sft:train": "restore", "sdpo:train": "done", "sdpo:eval_clean": "done",
                      "sdpo:eval_sdpo": "done", "dpo:train": "todo", "dpo:eval_clean": "todo",
                      "dpo:eval_sdpo": "todo"}
    assert reproduce.run_seed(one, "sdpo,dpo", False, None, False, False) == {}
    assert ran == ["sft:train", "dpo:train", "dpo:eval_clean", "dpo:eval_sdpo"]
    assert (records / "sft" / "stage_train.json").read_text() == sft_record  # the restore keeps its record
    # the summary reads what the run folder lacks from the records; the paired verdicts their per-row results
    shutil.rmtree(tmp_path / "runs")
    methods = reproduce.collect_seed(one)
    assert methods["sdpo"]["eval"]["clean"]["ranking"]["hr@1"] == 0.5
    sdpo_eval = next(st for st in stages if st.key == "sdpo:eval_clean")
    assert methods["sdpo"]["stages"]["eval_clean"] == {"command": sdpo_eval.command_line(), "done": True,
                                                       "seconds": 1.5, "finished_at": rec["finished_at"]}
    assert methods["sdpo"]["train_rows"] == 4
    p = report.paired(one, "dpo", "sdpo")
    assert (p["n"], p["diff"], p["a_mean"], p["b_mean"]) == (4, 0.25, 0.75, 0.5)
    # a record made by another command (say, another learning rate) does not count: that stage and the ones
    # after it run
    path = records / "sdpo" / "stage_train.json"
    path.write_text(path.read_text().replace("--learning_rate=", "--learning_rate=9"))
    ran.clear()
    reproduce.run_seed(one, "sdpo", False, None, False, False)
    assert ran == ["sft:train", "sdpo:train", "sdpo:eval_clean", "sdpo:eval_sdpo"]
    # nor one made by the same command on another build of `tiny` (its recipe changed since): the record says
    # which build (modeling.tiny_name), and a fresh clone with another recipe runs the stages again
    base = reproduce.base_identity("tiny", "lastfm")
    assert base.startswith("tiny-") and json.loads(path.read_text())["base"] == base
    shutil.rmtree(tmp_path / "runs")
    for f in list(records.glob("*/stage_*.json")):
        f.write_text(f.read_text().replace(f'"{base}"', '"tiny-000000000000"'))
    ran.clear()
    reproduce.run_seed(one, "sdpo", False, None, False, False)
    assert ran == ["sft:train", "sdpo:train", "sdpo:eval_clean", "sdpo:eval_sdpo"]
    # a stage done in the run folder before records existed gets its record on the next run, without running
    shutil.rmtree(records / "sdpo")
    ran.clear()
    reproduce.run_seed(one, "sdpo", False, None, False, False)
    assert ran == [] and (records / "sdpo" / "stage_eval_sdpo.json").exists()
    assert (records / "sdpo" / "eval_clean.rows.json").exists()
    assert not (records / "sdpo" / "eval_sdpo.rows.json").exists()  # per-row results: the claims' protocol only


def test_gamma_spread_from_the_training_log():
    logs = [{"loss": 1.0, "step": 5, "napo/gamma_mean": 1.0, "napo/gamma_min": 0.5, "napo/gamma_max": 1.5,
             "napo/gamma_clamped": 0.0},
            {"loss": 0.9, "step": 10, "napo/gamma_mean": 2.0, "napo/gamma_min": 1.0, "napo/gamma_max": 4.0,
             "napo/gamma_clamped": 0.5},
            {"loss": 0.8, "step": 15, "napo/gamma_mean": 3.0, "napo/gamma_min": 0.0, "napo/gamma_max": 3.0,
             "napo/gamma_clamped": 0.25}]
    g = reproduce.gamma_spread(logs)
    assert g == {"min": 0.0, "max": 4.0, "mean": 2.0, "std": 1.0, "range": (1.0 + 3.0 + 3.0) / 3,
                 "clamped": 0.25, "logged_steps": 3}
    assert reproduce.gamma_spread([{"loss": 1.0, "step": 1}]) is None  # S-DPO: no margin
    info = reproduce.training_info({"log_history": logs + [{"train_runtime": 30.0, "step": 15}]})
    assert info["gamma"] == g and info["steps"] == 15


def test_two_seeds_summary_mean_std_and_pooled_verdicts(tmp_path, monkeypatch):
    """--seeds 0,1 (stages faked, no model): each seed's chain in its own folder, and the summary holds each
    seed's numbers, their mean ± std, and verdicts pooled over the seeds' rows."""
    ran = []
    monkeypatch.setattr(reproduce, "run_stage", _fake_stage(ran))
    results = tmp_path / "results"
    summary = reproduce.run(methods="sft,sdpo", seeds="0,1", out=str(tmp_path / "runs"), results_dir=str(results),
                            isolate=False, plots=False)
    assert ran == ["sft:train", "sft:eval_clean", "sft:eval_sdpo", "sdpo:train", "sdpo:eval_clean",
                   "sdpo:eval_sdpo"] * 2
    assert (tmp_path / "runs" / "seed1" / "sdpo" / "eval_clean" / "metrics.json").exists()
    assert (results / "records" / "seed1" / "sdpo" / "stage_eval_clean.json").exists()
    e = summary["methods"]["sdpo"]
    assert set(e["seeds"]) == {"0", "1"} and e["seeds"]["1"]["eval"]["clean"]["ranking"]["hr@1"] == 0.5
    assert e["eval"]["clean"]["ranking"]["hr@1"] == 0.5 and e["eval_std"]["clean"]["ranking"]["hr@1"] == 0.0
    assert e["eval"]["clean"]["n_seeds"] == 2 and e["stages"]["train"]["seconds"] == 3.0  # 1.5 s per seed
    claims = {c["id"]: c for c in summary["claims"]}
    assert "n=8 rows over 2 seeds" in claims["sdpo>sft"]["evidence"]  # 2 seeds x 4 rows: +0.25 each
    md = (results / "results.md").read_text()
    assert "seeds 0, 1" in md and "| S-DPO (K=3) (`sdpo`) | clean | 2 | 0.5000 ± 0.0000 |" in md
    saved = json.loads((tmp_path / "runs" / reproduce.SETTINGS_FILE).read_text())
    assert saved["seeds"] == [0, 1]
    # a fresh clone: the report comes back from the committed records alone
    import shutil

    shutil.rmtree(tmp_path / "runs")
    again = reproduce.report(out=str(tmp_path / "runs"), results_dir=str(results), seeds="0,1", plots=False)
    assert again["methods"]["sdpo"]["eval"] == e["eval"] and again["claims"] == summary["claims"]


def test_validation_sweep_reads_only_the_validation_split(tmp_path, monkeypatch):
    """reproduce.py sweep: every candidate of a family is trained from the SFT adapter on the method's rows and
    evaluated on the validation split only; sweep.json / sweep.md hold each result and the choice: the highest
    validation HR@1, ties to the smaller learning rate (then the smaller beta)."""
    ran = []
    hits = {"sweep_dpo_lr3e-05_beta0.1": [1, 0, 0, 0], "sweep_dpo_lr0.0003_beta1.0": [1, 1, 1, 0],
            "sweep_sft_cont_lr0.0001": [1, 1, 0, 0], "sweep_sft_cont_lr0.001": [1, 1, 0, 0],
            "sweep_start": [1, 1, 1, 1]}  # the start is better than every candidate, and is never chosen
    monkeypatch.setattr(reproduce, "run_stage", _fake_stage(ran, hits))
    results = tmp_path / "results"
    res = reproduce.sweep(families="dpo,sft_cont", out=str(tmp_path / "runs"), results_dir=str(results),
                          val_rows=4, isolate=False)
    assert len(res["candidates"]) == 1 + 6 + 3 and res["chosen"] == {"dpo": "sweep_dpo_lr0.0003_beta1.0",
                                                                  "sft_cont": "sweep_sft_cont_lr0.0001"}
    assert ran[0] == "sft:train" and not any(":eval_" in k for k in ran)
    stages = reproduce.plan(reproduce.seed_runs(res["settings"])[0], list(reproduce.sweep_candidates("dpo,sft_cont")),
                            reproduce.sweep_candidates("dpo,sft_cont"))
    evals = [st for st in stages if st.module == "inference"]
    assert len(evals) == 1 + 9 and all("--split=val --max_test_samples=4 " in st.command_line() for st in evals)
    assert all("--protocol=clean" in st.command_line() and "--generative=False" in st.command_line() for st in evals)
    train = next(st for st in stages if st.key == "sweep_dpo_lr0.0003_beta1.0:train").command_line()
    assert "--learning_rate=0.0003" in train and "--beta=1.0" in train and train.count("--learning_rate=") == 1
    assert "--max_train_samples=2048" in train and "/runs/sft/final_checkpoint" in train
    row = next(r for r in res["candidates"] if r["method"] == "sweep_sft_cont_lr0.0003")
    assert (row["family"], row["flags"], row["val_hr1"], row["val_rows"]) == ("sft_cont", {"learning_rate": 3e-4},
                                                                               0.0, 4)
    assert json.loads((results / "sweep.json").read_text())["chosen"] == res["chosen"]
    md = (results / "sweep.md").read_text()
    assert "| dpo | **`sweep_dpo_lr0.0003_beta1.0`** | learning_rate=0.0003, beta=1 | 0.7500 | −0.2500 | 4 |" in md
    assert "| start | `sweep_start` |  | 1.0000 |  | 4 |" in md
    assert ("edge of the grid (the best setting may lie beyond it): dpo: learning_rate=0.0003 is the largest value "
            "tried; sft_cont: learning_rate=0.0001 is the smallest value tried.") in md  # beta: two values only
    start = next(st for st in stages if st.key == "sweep_start:val_clean").command_line()
    assert "--adapter=" in start and "/runs/sft/final_checkpoint " in start
    assert "--output_dir=" in start and "/runs/sweep_start/val_clean " in start
    assert not any(st.key == "sweep_start:train" for st in stages) and ran.count("sft:train") == 1
    assert "ties go to the smaller learning rate" in md
    # ties on beta too; rows without a result are left out
    rows = [{"family": "f", "method": m, "flags": {"learning_rate": lr, "beta": b}, "val_hr1": v}
            for m, lr, b, v in (("a", 1e-4, 1.0, 0.5), ("b", 1e-4, 0.1, 0.5), ("c", 3e-5, 1.0, None))]
    assert reproduce.select_sweep(rows)["f"]["method"] == "b"
    with pytest.raises(di.DataError, match="--families: unknown nope"):
        reproduce.sweep_candidates("nope")


def test_commit_records_commits_only_the_records(tmp_path, monkeypatch):
    """--commit_records: each saved record is committed at once, alone: other staged or changed files of the
    repository stay uncommitted."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (tmp_path / "mine.py").write_text("x = 1\n")
    git("add", "mine.py")
    git("commit", "-q", "-m", "start")
    (tmp_path / "mine.py").write_text("x = 2\n")  # someone's work in progress, staged
    git("add", "mine.py")
    ran = []
    monkeypatch.setattr(reproduce, "run_stage", _fake_stage(ran))
    reproduce.run(methods="sft", out=str(tmp_path / "runs"), results_dir=str(tmp_path / "results"), isolate=False,
                  plots=False, commit_records=True)
    log = git("log", "--format=%s").splitlines()
    assert log == ["records: sft:eval_sdpo (seed 0)", "records: sft:eval_clean (seed 0)",
                   "records: sft:train (seed 0)", "start"]
    assert git("show", "--name-only", "--format=", "HEAD~1").split() == [
        "results/records/seed0/sft/eval_clean.rows.json", "results/records/seed0/sft/stage_eval_clean.json"]
    assert git("diff", "--cached", "--name-only").split() == ["mine.py"]  # still staged, not committed
    assert git("show", "HEAD:mine.py") == "x = 1\n"


def test_tuned_settings_are_the_committed_sweeps_choice():
    """TUNED (the flags the methods run with) is what the committed validation sweep chose, for the settings the
    main run uses, and every method of a family runs with its family's choice."""
    sweep = json.loads((reproduce.REPO_DIR / "results" / "sweep.json").read_text())
    assert reproduce.R.sweep_markdown(sweep) == (reproduce.REPO_DIR / "results" / "sweep.md").read_text()
    s = sweep["settings"]
    assert (s["base_model"], s["dataset"], s["pref_rows"], s["sft_rows"], s["quick"]) == (
        "tiny", reproduce.DATASET, reproduce.SCALE["pref_rows"], reproduce.SCALE["sft_rows"], False)
    assert s["val_rows"] == -1 and not any("test" in str(r["command"]) for r in sweep["candidates"])
    flags = {r["method"]: r["flags"] for r in sweep["candidates"]}
    assert set(sweep["chosen"]) == set(reproduce.TUNED) == set(reproduce.SWEEP)
    for fam, m in sweep["chosen"].items():
        assert reproduce.TUNED[fam] == flags[m], fam
    family = {"dpo": "dpo", "sft_cont": "sft_cont"}
    # (the knob study runs every row at its one learning rate, KNOB_LR: not a family's tuned setting)
    tuned = {m: spec for m, spec in reproduce.METHODS.items() if spec.get("group") != "knobs"}
    family.update({m: "sdpo" for m, spec in tuned.items() if spec["label"].startswith("S-DPO")})
    family.update({m: "napo" for m, spec in tuned.items() if spec["label"].startswith("NAPO")})
    assert len([m for m in family if m.startswith("napo")]) >= 10
    for m, fam in family.items():
        run = {k: v for k, v in reproduce.METHODS[m]["flags"].items() if k in reproduce.TUNED[fam]}
        assert run == reproduce.TUNED[fam], m
