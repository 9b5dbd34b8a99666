"""Bad input fails fast and clearly: every case ends, before any model is loaded or any file is
written, with exit status 2 and one last line `error: ...` naming the flag, file or row."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cli
import data_interface as di
import modeling
import pretrain_data
import tiny_build
from conftest import SMALL, cli_error

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def adapter(small_model, tmp_path_factory):
    """An SFT adapter (2 steps, checkpoint-2 kept) of the small model, and another base model with the same
    shapes and tokenizer (another seed, no pretraining): only the weights differ."""
    import sft

    root = tmp_path_factory.mktemp("cli")
    final = sft.main(base_model=small_model, output_dir=str(root / "sft"), max_train_samples=16, batch_size=8,
                     logging_steps=1, save_steps=2)
    other = tiny_build.build_tiny("lastfm", root / "other", **{**SMALL, "seed": 1, "pretrain_epochs": 0})
    return {"root": root, "final": final, "ckpt": str(root / "sft" / "checkpoint-2"), "model": small_model,
            "other": str(other)}


# --------------------------------------------------------------------------------------------------
# Flags


def test_unknown_flag_suggests_the_nearest_and_runs_nothing(capsys, no_models, tmp_path):
    import softmax_dpo
    import sft

    out = tmp_path / "out"
    last = cli_error(capsys, sft.main, ["--max_train_sample", 8, "--output_dir", out])
    assert last == "error: unknown flag --max_train_sample (did you mean --max_train_samples?)"
    last = cli_error(capsys, softmax_dpo.main, ["--num_negative", 7, "--output_dir", out])
    assert "unknown flag --num_negative" in last and "--num_negatives?" in last
    last = cli_error(capsys, sft.main, ["--max-train-sample=8"])  # fire's other spellings are parsed too
    assert "--max_train_sample " in last
    last = cli_error(capsys, sft.main, ["--max_train_samples", 8, "16"])  # a stray word never becomes a flag's value
    assert "unexpected argument '16'" in last
    assert not out.exists()


@pytest.mark.parametrize("script,argv,needle", [
    ("sft", ["--batch_size", "sixteen"], "--batch_size 'sixteen': expected an integer"),
    ("sft", ["--batch_size", 2.5], "--batch_size 2.5: expected an integer"),
    ("inference", ["--batch_size", 0], "--batch_size 0: must be >= 1"),
    ("softmax_dpo", ["--learning_rate", "nan"], "--learning_rate 'nan': expected a finite number"),
    ("softmax_dpo", ["--beta", "inf"], "--beta 'inf': expected a finite number"),
    ("softmax_dpo", ["--num_negatives", 20], "--num_negatives 20: must be between 1 and 19"),
    ("softmax_dpo", ["--share_negatives", "yes"], "--share_negatives 'yes': expected True or False"),
    ("softmax_dpo", ["--margin_mode", "users"], "--margin_mode 'users': choose one of"),
    ("softmax_dpo", ["--margin_mode", "author"], "--margin_mode 'author': choose one of user, batch, authors, none"),
    ("dpo", ["--warmup_ratio", 1.5], "--warmup_ratio 1.5: must be between 0 and 1"),
    ("inference", ["--protocol", "leaky"], "--protocol 'leaky': choose one of clean, sdpo"),
    ("inference", ["--max_test_samples", -2], "--max_test_samples -2: must be >= -1"),
    ("sft", ["--lr_scheduler_type", "cosin"], "(did you mean cosine?)"),
])
def test_options_checked_by_type_and_range(capsys, no_models, tmp_path, small_model, script, argv, needle):
    import importlib

    main = importlib.import_module(script).main
    out = tmp_path / "out"
    args = ["--base_model", small_model, "--output_dir", out, *argv]
    if script in ("dpo", "softmax_dpo"):
        args += ["--start_adapter", tmp_path]  # exists; never reached
    last = cli_error(capsys, main, args)
    assert needle in last, last
    assert not out.exists(), "nothing is written (no start.json, no output folder)"


def test_margin_mode_authors_is_accepted(capsys, no_models, tmp_path, small_model):
    """`--margin_mode authors` passes the one check of options (cli.RULES, NAPOConfig.validate): the run stops
    only at the next bad flag."""
    import softmax_dpo
    from napo_config import NAPOConfig

    NAPOConfig(margin_mode="authors").validate()
    cli.check_options({"margin_mode": "authors"})
    out = tmp_path / "out"
    last = cli_error(capsys, softmax_dpo.main, ["--base_model", small_model, "--output_dir", out,
                                                "--start_adapter", tmp_path, "--margin_mode", "authors",
                                                "--gamma0", -1])
    assert "--gamma0 -1" in last and "margin_mode" not in last, last
    assert not out.exists()


def test_python_calls_are_checked_too(no_models, tmp_path):
    import sft

    with pytest.raises(cli.OptionError, match="--learning_rate 'nan'"):
        sft.main(output_dir=str(tmp_path / "o"), learning_rate="nan")
    with pytest.raises(cli.OptionError, match="--num_negatives 0"):
        di.preference_rows(di.load_catalog("lastfm"), num_negatives=0)
    assert not (tmp_path / "o").exists()


def test_every_project_error_is_a_napo_error():
    import benchmark
    import napo_losses
    import sasrec
    import scoring

    for cls in (di.DataError, modeling.ModelError, scoring.ScoringInputError, sasrec.SASRecError,
                napo_losses.NAPOLossError, benchmark.BenchmarkError, cli.OptionError):
        assert issubclass(cls, cli.NapoError), cls


def _run(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, timeout=120, **kw)


def test_entry_scripts_end_in_one_error_line(tmp_path):
    """The real processes: exit status 2, last line `error: ...`, nothing written (reproduce.py and benchmark.py
    included)."""
    cases = [
        ([sys.executable, REPO / "sft.py", "--max_train_sample", 8, "--output_dir", tmp_path / "o"],
         "error: unknown flag --max_train_sample (did you mean --max_train_samples?)"),
        ([sys.executable, REPO / "reproduce.py", "--test_rows", "many", "--out", tmp_path / "o"],
         "error: --test_rows 'many': expected an integer"),
        ([sys.executable, REPO / "reproduce.py", "--thread", 2], "(did you mean --threads?)"),
        ([sys.executable, REPO / "reproduce.py", "baseline", "--kind", "most_popular", "--seed", -1],
         "--seed -1: must be >= 0"),
        ([sys.executable, REPO / "benchmark.py", "--batch_size", 0, "--json", tmp_path / "o" / "b.json"],
         "error: --batch_size 0: must be >= 1"),
        ([sys.executable, REPO / "benchmark.py", "--ks", "1,3,20"], "error: --ks 20: must be between 1 and 19"),
        ([sys.executable, REPO / "sasrec.py", "train", "--output_dir", tmp_path / "o", "--lr", "nan"],
         "error: --lr 'nan': expected a finite number"),
    ]
    for args, needle in cases:
        r = _run(args, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stderr)
        last = r.stderr.strip().splitlines()[-1]
        assert needle in last and last.startswith("error: "), (args, last)
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag", ["--adapter", "--resume_from_checkpoint"])  # the new name and the old one
def test_inference_sh_takes_the_adapter_flag(tmp_path, flag):
    missing = tmp_path / "no_adapter_here"
    r = _run(["bash", REPO / "inference.sh", flag, missing, "--max_test_samples", 2], cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == f"error: --adapter '{missing}': no such folder"


# --------------------------------------------------------------------------------------------------
# Paths and data: checked before any model is loaded


def test_missing_or_wrong_adapter_fails_before_the_model_loads(capsys, no_models, tmp_path, small_model, adapter):
    import inference
    import sft

    out = tmp_path / "out"
    base = ["--base_model", small_model, "--output_dir", out]
    last = cli_error(capsys, inference.main, base + ["--adapter", tmp_path / "missing"])
    assert "--adapter" in last and "missing" in last and "no such folder" in last
    last = cli_error(capsys, inference.main, base + ["--adapter", tmp_path])
    assert "adapter_config.json missing" in last
    # the old spelling still works, with a deprecation warning
    last = cli_error(capsys, inference.main, base + ["--resume_from_checkpoint", tmp_path])
    assert "adapter_config.json missing" in last
    # SFT continues only from a Trainer checkpoint of its own (checkpoint-N), not from a final adapter
    last = cli_error(capsys, sft.main, base + ["--resume_from_checkpoint", adapter["final"], "--max_train_samples", 8])
    assert "not a Trainer checkpoint" in last
    assert not out.exists()


def test_adapter_on_another_base_model_is_refused(capsys, no_models, tmp_path, adapter):
    import dpo
    import inference
    import softmax_dpo
    import sft

    rec = json.loads((Path(adapter["final"]) / modeling.BASE_RECORD).read_text())
    assert rec["fingerprint"] == modeling.base_fingerprint(adapter["model"])
    assert modeling.base_fingerprint(adapter["other"]) != rec["fingerprint"]  # same shapes, other weights
    assert (Path(adapter["ckpt"]) / modeling.BASE_RECORD).exists(), "checkpoint-N records its base model too"
    modeling.check_adapter(adapter["final"], base=adapter["model"])  # the right base passes
    out = tmp_path / "out"
    for main, flags in ((inference.main, []), (dpo.main, []), (softmax_dpo.main, ["--sasrec_checkpoint", tmp_path])):
        rows = ["--max_test_samples" if main is inference.main else "--max_train_samples", 8]
        flag = "--adapter" if main is inference.main else "--start_adapter"
        last = cli_error(capsys, main, ["--base_model", adapter["other"], flag,
                                        adapter["final"], "--output_dir", out, *rows, *flags])
        assert adapter["other"] in last and str(rec["path"]) in last, last
        assert rec["fingerprint"] in last and modeling.base_fingerprint(adapter["other"]) in last
    last = cli_error(capsys, sft.main, ["--base_model", adapter["other"], "--resume_from_checkpoint",
                                        adapter["ckpt"], "--output_dir", out, "--max_train_samples", 8])
    assert adapter["other"] in last and "fingerprint" in last
    assert not out.exists()
    # the loader itself refuses too (a Python caller that skipped the stage's checks)
    with pytest.raises(modeling.ModelError, match="fingerprint"):
        from transformers import AutoModelForCausalLM

        modeling.load_adapter(AutoModelForCausalLM.from_pretrained(adapter["other"]), adapter["final"])


def test_adapter_without_record_loads_with_a_warning(capsys, tmp_path, adapter):
    old = tmp_path / "old_adapter"
    shutil.copytree(adapter["final"], old)
    (old / modeling.BASE_RECORD).unlink()
    capsys.readouterr()
    assert modeling.check_adapter(old, base=adapter["other"]) == old
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and modeling.BASE_RECORD in err[0]


def test_malformed_train_line_of_a_new_dataset_names_file_and_line(capsys, no_models, tmp_path):
    """A new dataset folder (a copy of LastFM) with line 5 of train.jsonl cut short: the default model is
    never built; the message names the file and its line, whatever reads the split first."""
    import sft

    folder = tmp_path / "mydata"
    shutil.copytree(REPO / "data" / "lastfm", folder)
    lines = (folder / "train.jsonl").read_text().splitlines(True)
    lines[4] = lines[4][:25] + "\n"
    (folder / "train.jsonl").write_text("".join(lines))
    where = f"{folder / 'train.jsonl'}:5: malformed row"
    last = cli_error(capsys, sft.main, ["--dataset", folder, "--output_dir", tmp_path / "out"])
    assert where in last
    cat = di.load_catalog(folder)
    with pytest.raises(di.DataError, match=":5: malformed row"):
        pretrain_data.user_sequences(cat)  # the pretraining reader shares the validated parser
    with pytest.raises(di.DataError, match=":5: malformed row"):
        tiny_build.tiny_path(folder)  # checked before a build starts (build_tiny is forbidden here)
    assert not (tmp_path / "out").exists()


def test_folder_of_pickles_says_how_to_convert(capsys, no_models, tmp_path):
    import sft

    folder = tmp_path / "papers"
    folder.mkdir()
    shutil.copy(REPO / "data" / "lastfm" / "id2name.txt", folder)
    for name in ("train_data.df", "Val_data.df", "Test_data.df"):
        (folder / name).write_bytes(b"\x80\x04not really a pickle")
    last = cli_error(capsys, sft.main, ["--dataset", folder, "--output_dir", tmp_path / "out"])
    assert "train.jsonl: file not found" in last and "train_data.df" in last
    assert "never loaded" in last and "to_json('train.jsonl'" in last


def test_model_cache_is_keyed_by_content(tmp_path, monkeypatch):
    """The same data under another folder name reuses the model (no rebuild); the temporary folder of a build
    killed earlier (its process is gone) is removed by the next build, a live one's is kept; a cache folder
    of the older layout (tiny-<dataset>-<key>) is reused."""
    monkeypatch.setenv("NAPO_CACHE", str(tmp_path / "cache"))
    models = tmp_path / "cache" / "models"
    opts = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                intermediate_size=64, pretrain_epochs=0)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale, live = models / f"tiny-0123456789ab.tmp{gone.pid}", models / f"tiny-ba9876543210.tmp{os.getppid()}"
    for d in (stale, live):
        d.mkdir(parents=True)
        (d / "config.json").write_text("{half a build")
    p1 = tiny_build.tiny_path("lastfm", **opts)
    assert not stale.exists() and live.exists()
    assert p1.parent == models and p1.name.startswith("tiny-") and "lastfm" not in p1.name

    def rebuilt(*a, **k):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(tiny_build, "build_tiny", rebuilt)
    copy = tmp_path / "renamed_copy"
    shutil.copytree(REPO / "data" / "lastfm", copy)
    assert tiny_build.tiny_path(str(copy), **opts) == p1
    legacy = models / f"tiny-lastfm-{p1.name[len('tiny-'):]}"
    os.replace(p1, legacy)
    assert tiny_build.tiny_path("lastfm", **opts) == legacy
