"""Damaged artefacts (issue 34): every file the project reads that was cut short, corrupted or emptied (a full disk, a
killed copy, a hand edit) ends in one `error: ...` line naming the file and what to do, before anything is loaded
or written; a damaged cached model or SASRec is reported in one line and rebuilt, never served; an adapter whose
recorded base name already differs from --base_model's is refused before that base is built; a build whose list
probe ends below its recipe's floor stops with an error."""
import json
import shutil
from pathlib import Path

import pytest

import cache
import data_interface as di
import modeling
import pretrain_data
import sasrec
import tiny_build
from conftest import SMALL, cli_error
from errors import DataError, ModelError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(small_model, tmp_path_factory):
    """An SFT adapter of the small model (2 steps) and its checkpoint-2."""
    import sft

    root = tmp_path_factory.mktemp("damaged")
    final = sft.main(base_model=small_model, output_dir=str(root / "sft"), max_train_samples=16, batch_size=8,
                     logging_steps=1, save_steps=2)
    return {"model": small_model, "final": Path(final), "ckpt": root / "sft" / "checkpoint-2"}


def truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def corrupt(path: Path):
    """Overwrite bytes near the start (a safetensors header, a JSON file's opening) keeping the size."""
    data = bytearray(path.read_bytes())
    if path.suffix == ".json":
        data[0:16] = b"{not json at all"
    else:
        data[8:24] = b"\x00garbage\xff\xfe!!!!!!!"
    path.write_bytes(bytes(data))


def empty(path: Path):
    path.write_bytes(b"")


DAMAGES = {"truncated": truncate, "corrupt": corrupt, "empty": empty}


def damaged_copy(src: Path, dst: Path, name: str, damage: str) -> Path:
    shutil.copytree(src, dst)
    DAMAGES[damage](dst / name)
    return dst


# --------------------------------------------------------------------------------------------------
# Adapters and Trainer checkpoints: one error line before anything loads


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json", modeling.BASE_RECORD])
def test_damaged_adapter_is_one_error_line(capsys, no_models, tmp_path, trained, name, damage):
    import dpo
    import inference

    bad = damaged_copy(trained["final"], tmp_path / "adapter", name, damage)
    out = tmp_path / "out"
    base = ["--base_model", trained["model"], "--output_dir", out]
    for main, flags in ((inference.main, ["--adapter", bad, "--max_test_samples", 4]),
                        (dpo.main, ["--start_adapter", bad, "--max_train_samples", 4])):
        last = cli_error(capsys, main, base + flags)
        assert str(bad / name) in last, last
        assert ("truncated" in last or "corrupt" in last or "not valid JSON" in last or "empty" in last), last
        assert "copy the folder again" in last, last
    with pytest.raises(ModelError, match=name):
        modeling.check_adapter(bad)  # the loader's own check (load_adapter calls it)
    assert not out.exists()
    modeling.check_adapter(trained["final"], base=trained["model"])  # the sound adapter passes


@pytest.mark.parametrize("name,damage", [("trainer_state.json", "corrupt"), ("trainer_state.json", "empty"),
                                         ("optimizer.pt", "truncated"), ("scheduler.pt", "empty"),
                                         ("adapter_model.safetensors", "truncated")])
def test_damaged_trainer_checkpoint_is_one_error_line(capsys, no_models, tmp_path, trained, name, damage):
    import sft

    ckpt = damaged_copy(trained["ckpt"], tmp_path / "run" / "checkpoint-2", name, damage)
    out = tmp_path / "out"
    last = cli_error(capsys, sft.main, ["--base_model", trained["model"], "--resume_from_checkpoint", ckpt,
                                        "--output_dir", out, "--max_train_samples", 16])
    assert str(ckpt / name) in last and "--resume_from_checkpoint" in last, last
    assert "delete checkpoint-2" in last, last
    assert not out.exists()


@pytest.mark.parametrize("damage", ["corrupt", "empty"])
def test_damaged_start_record_is_one_error_line(capsys, no_models, tmp_path, trained, damage):
    import softmax_dpo

    run = tmp_path / "run"
    shutil.copytree(trained["ckpt"], run / "checkpoint-2")
    (run / "start.json").write_text(json.dumps({"start_adapter": str(trained["final"])}))
    DAMAGES[damage](run / "start.json")
    last = cli_error(capsys, softmax_dpo.main, ["--base_model", trained["model"], "--output_dir", run,
                                                "--resume_from_checkpoint", "True", "--max_train_samples", 4])
    assert str(run / "start.json") in last and "unreadable" in last and "--start_adapter" in last, last
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-2", "start.json"], "nothing written"


def test_damaged_base_model_folder_is_one_error_line(capsys, no_models, tmp_path, trained):
    import sft

    bad = damaged_copy(Path(trained["model"]), tmp_path / "model", "model.safetensors", "truncated")
    last = cli_error(capsys, sft.main, ["--base_model", bad, "--output_dir", tmp_path / "out"])
    assert str(bad) in last and "model.safetensors is truncated" in last and "copy it again" in last, last
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# An adapter recorded on another built model is refused before --base_model is built


def test_adapter_of_another_build_is_refused_before_the_build(capsys, no_models, monkeypatch, tmp_path, trained):
    import dpo
    import inference
    import sft

    def no_build(*a, **k):
        raise AssertionError("the base model was built or resolved before the adapter was refused")

    monkeypatch.setattr(tiny_build, "tiny_path", no_build)
    monkeypatch.setattr(modeling, "resolve_base_model", no_build)
    fake = tmp_path / "adapter"
    shutil.copytree(trained["final"], fake)
    other = str(cache.cache_root() / "models" / "tiny-0123456789ab")
    rec = {"base_model": "tiny", "path": other, "fingerprint": "0" * 16}
    modeling.write_base_record(fake, rec)
    want = tiny_build.embedded_name("tiny-nocopy", "lastfm")
    out = tmp_path / "out"
    for main, flags in ((inference.main, ["--adapter", fake, "--max_test_samples", 4]),
                        (dpo.main, ["--start_adapter", fake, "--max_train_samples", 4]),
                        (sft.main, ["--start_adapter", fake, "--max_train_samples", 4])):
        last = cli_error(capsys, main, ["--base_model", "tiny-nocopy", "--output_dir", out, *flags])
        assert other in last and want in last and "(--base_model tiny)" in last, last
    ckpt = tmp_path / "run" / "checkpoint-2"
    shutil.copytree(trained["ckpt"], ckpt)
    modeling.write_base_record(ckpt, rec)
    last = cli_error(capsys, sft.main, ["--base_model", "tiny", "--resume_from_checkpoint", ckpt, "--output_dir", out])
    assert other in last and tiny_build.embedded_name("tiny", "lastfm") in last, last
    assert not out.exists()
    # the recorded build is the requested one (also under the older tiny-<dataset>-<key> name): no refusal by name
    for name in (want, f"tiny-lastfm-{want[len('tiny-'):]}"):
        modeling.write_base_record(fake, {**rec, "path": str(Path(other).with_name(name))})
        modeling.check_adapter_base_name(fake, "tiny-nocopy", "lastfm")
    modeling.check_adapter_base_name(trained["final"], "tiny", "lastfm")  # recorded on a folder: by fingerprint


# --------------------------------------------------------------------------------------------------
# The model cache verifies what it serves


@pytest.mark.parametrize("name,damage,needle", [
    ("model.safetensors", "truncated", "model.safetensors is truncated"),
    ("model.safetensors", "corrupt", "model.safetensors is corrupt"),
    ("model.safetensors", "empty", "model.safetensors is empty"),
    ("model.safetensors", "flipped", "holds other weights"),
    ("config.json", "corrupt", "config.json is not valid JSON"),
    ("tokenizer.json", "empty", "tokenizer.json is empty"),
    ("napo_build.json", "corrupt", "napo_build.json is not valid JSON"),
    ("napo_build.json", "missing", "napo_build.json is missing"),
])
def test_cached_model_problems_are_found(tmp_path, small_model, name, damage, needle):
    folder = tmp_path / "tiny-0123456789ab"
    shutil.copytree(small_model, folder)
    assert tiny_build.cached_model_problem(folder) is None
    path = folder / name
    if damage == "flipped":  # the same size, one weight changed: only the state hash tells
        data = bytearray(path.read_bytes())
        data[-5] ^= 0x40
        path.write_bytes(bytes(data))
    elif damage == "missing":
        path.unlink()
    else:
        DAMAGES[damage](path)
    assert needle in tiny_build.cached_model_problem(folder)


def test_file_state_hash_is_the_builds(small_model, tmp_path):
    """The cache check recomputes the build's state_sha256 from the weights file alone, for every recipe's kind
    of model (with the copy head, its next-token votes, a plain Llama): else a sound cache would be rebuilt."""
    quick = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                 intermediate_size=64, pretrain_epochs=0, pretrain_embed_init=None, probe_rows=4)
    folders = [small_model] + [tiny_build.build_tiny("lastfm", tmp_path / r, **{**tiny_build.RECIPES[r], **quick})
                               for r in tiny_build.RECIPES]
    for folder in folders:
        want = json.loads((Path(folder) / "napo_build.json").read_text())["state_sha256"]
        assert tiny_build.file_state_hash(folder) == want, folder
        assert tiny_build.cached_model_problem(folder) is None


def test_damaged_cached_model_is_rebuilt_and_a_stage_runs(capsys, monkeypatch, tmp_path, trained):
    """The issue's case: the cached embedded model with its weights cut short. A stage reports it in one line and
    rebuilds it (the same state hash), instead of a traceback or a misleading fingerprint mismatch; the adapter
    trained on that model then evaluates."""
    import inference
    import sft

    monkeypatch.setenv("NAPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(tiny_build.EMBEDDED, "tiny", SMALL)  # --base_model tiny: the small recipe, quick to build
    cached = tmp_path / "cache" / "models" / tiny_build.tiny_name("lastfm", **SMALL)
    shutil.copytree(trained["model"], cached)  # the same build as the small model
    original = json.loads((cached / "napo_build.json").read_text())["state_sha256"]
    assert modeling.resolve_base_model("tiny") == cached
    size = (cached / "model.safetensors").stat().st_size
    truncate(cached / "model.safetensors")
    capsys.readouterr()
    result = inference.main(base_model="tiny", adapter=str(trained["final"]), output_dir=str(tmp_path / "eval"),
                            max_test_samples=2, generative=False, constrained=False, progress=False)
    err = capsys.readouterr().err
    warn = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert warn == [f"warning: {cached}: damaged cached model (model.safetensors is truncated ({size // 2:,} bytes "
                    f"where its header says {size:,})); rebuilding"], err
    assert result["n_rows"] == 2 and "fingerprint" not in err
    assert json.loads((cached / "napo_build.json").read_text())["state_sha256"] == original
    assert tiny_build.cached_model_problem(cached) is None

    # a training stage, on a cache whose config.json was emptied (rebuilt here by copying, to stay quick)
    empty(cached / "config.json")
    monkeypatch.setattr(tiny_build, "build_tiny", lambda dataset, out, **o: shutil.copytree(trained["model"], out,
                                                                                         dirs_exist_ok=True))
    sft.main(base_model="tiny", output_dir=str(tmp_path / "sft"), max_train_samples=8, batch_size=8, max_steps=1)
    err = capsys.readouterr().err
    assert f"warning: {cached}: damaged cached model (config.json is empty); rebuilding" in err
    assert (tmp_path / "sft" / "final_checkpoint" / "adapter_model.safetensors").exists()


# --------------------------------------------------------------------------------------------------
# SASRec: the cached one is retrained, a given one is an error line


@pytest.mark.parametrize("name,damage", [("sasrec.safetensors", "truncated"), ("sasrec_config.json", "corrupt"),
                                         ("sasrec_config.json", "empty")])
def test_damaged_sasrec(capsys, monkeypatch, tmp_path, trained, name, damage):
    import softmax_dpo

    monkeypatch.setenv("NAPO_CACHE", str(tmp_path / "cache"))
    kw = dict(epochs=1, max_train_samples=256, patience=1, verbose=False)
    sasrec.get_or_train_sasrec("lastfm", **kw)
    folder = next(p for p in (tmp_path / "cache" / "sasrec").iterdir() if p.is_dir())
    given = tmp_path / "given"
    shutil.copytree(folder, given)
    DAMAGES[damage](folder / name)
    capsys.readouterr()
    model = sasrec.get_or_train_sasrec("lastfm", **kw)  # the cached one: reported and retrained
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {folder}: damaged cached SASRec (") and name in err[0], err
    assert sasrec.checkpoint_problem(folder) is None and model.cfg.n_items == di.load_catalog("lastfm").n_items

    DAMAGES[damage](given / name)  # a given one: the error line, after the adapter's checks, before the LLM loads
    monkeypatch.setattr(modeling, "load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    last = cli_error(capsys, softmax_dpo.main, ["--base_model", trained["model"], "--start_adapter", trained["final"],
                                                "--sasrec_checkpoint", given, "--output_dir", out,
                                                "--max_train_samples", 4])
    assert str(given / name) in last and "SASRec checkpoint" in last and "retrain it" in last, last
    assert not out.exists()


# --------------------------------------------------------------------------------------------------
# Dataset files


def small_dataset(folder: Path, rows=300) -> Path:
    folder.mkdir(parents=True)
    for name in ("id2name.txt", "val.jsonl", "test.jsonl"):
        shutil.copy(REPO / "data" / "lastfm" / name, folder)
    lines = (REPO / "data" / "lastfm" / "train.jsonl").read_text().splitlines(True)[:rows]
    (folder / "train.jsonl").write_text("".join(lines))
    return folder


@pytest.mark.parametrize("name,damage,needle", [
    ("train.jsonl", "empty", "train.jsonl: empty (no rows)"),
    ("test.jsonl", "empty", "test.jsonl: empty (no rows)"),
    ("id2name.txt", "empty", "id2name.txt: empty (no `id::name` lines)"),
    ("train.jsonl", "cut", "train.jsonl:300: malformed row"),
    ("train.jsonl", "gzip", "train.jsonl.gz: unreadable (EOFError"),
])
def test_damaged_dataset_file_is_one_error_line(capsys, no_models, tmp_path, name, damage, needle):
    import inference
    import sft

    data = small_dataset(tmp_path / "data")
    path = data / name
    if damage == "cut":  # the last line cut short, as a killed copy leaves it
        path.write_text(path.read_text()[:-30])
    elif damage == "gzip":
        import gzip

        packed = gzip.compress(path.read_bytes())
        path.unlink()
        (data / (name + ".gz")).write_bytes(packed[: len(packed) // 2])
    else:
        empty(path)
    main = inference.main if name == "test.jsonl" else sft.main
    last = cli_error(capsys, main, ["--dataset", data, "--output_dir", tmp_path / "out"])
    assert needle in last and "copy the" in last, last
    if damage == "cut":
        assert "last line is cut short" in last
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError):
        di.load_split(di.load_catalog(data), name.split(".")[0]) if name != "id2name.txt" else di.load_catalog(data)


# --------------------------------------------------------------------------------------------------
# The build's list floor and probe floor


def test_lastfm_builds_keep_their_names():
    """The floor of list prompts never binds on LastFM's recipes (tiny: 1,049+ list prompts an epoch), so it is
    not in their names: the builds, and the records made on them, stay valid."""
    names = {r: tiny_build.tiny_name("lastfm", **tiny_build.RECIPES[r]) for r in tiny_build.RECIPES}
    assert names == {"tiny": "tiny-494293f6b263", "tiny-nocopy": "tiny-65681a19abec", "tiny-bpe": "tiny-c5124c000bf1"}
    assert tiny_build.tiny_name("lastfm", **SMALL) == "tiny-1b58e8ea2db6"
    assert tiny_build.TINY_DEFAULTS["pretrain_list_min"] <= min(
        int(0.4 * n) for n in pretrain_data.window_counts(di.load_catalog("lastfm"), 3, 24))


def test_build_below_its_probe_floor_stops(monkeypatch, tmp_path, capsys):
    import probes

    data = small_dataset(tmp_path / "data")
    monkeypatch.setattr(probes, "list_recall_probe", lambda *a, rows=500, **k: {
        "rows": rows, "p_answer_in_list": 0.5, "p_answer_in_history": 0.0, "share_rows_p_ge_0.5": 0.5,
        "top1_agrees_with_window": 0.05})
    monkeypatch.setattr(tiny_build, "pretrain", lambda *a, **k: None)
    monkeypatch.setenv("NAPO_CACHE", str(tmp_path / "cache"))
    quick = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                 intermediate_size=64, pretrain_embed_init=None, probe_rows=20)
    with pytest.raises(ModelError, match=r"reached P\(answer in list\) 0.500 on 20 content-free prompts, below its "
                                         r"recipe's probe_min 0.9.*nothing was cached.*pretrain_list_min=4000"):
        tiny_build.tiny_path(data, **quick)
    assert not [p for p in (tmp_path / "cache" / "models").iterdir() if not p.name.endswith(".lock")]
    with pytest.raises(ModelError, match="probe_min 0.9"):
        tiny_build.build_tiny(data, tmp_path / "out", **quick)
    assert not (tmp_path / "out").exists()
    # not held to it: tiny-nocopy's recipe (probe_min None); a build cut short on purpose keeps it, with a warning
    tiny_build.build_tiny(data, tmp_path / "nocopy", **{**quick, **tiny_build.EMBEDDED["tiny-nocopy"]})
    capsys.readouterr()
    tiny_build.build_tiny(data, tmp_path / "short", **{**quick, "pretrain_max_steps": 3})
    assert "warning: " in capsys.readouterr().err and (tmp_path / "short" / "napo_build.json").exists()
