"""Preference stages end to end on a small locally built model: SFT -> DPO -> S-DPO -> NAPO -> inference,
bad options fail before training, and a killed NAPO run resumes to the same adapter."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data_interface as di
import modeling
import scoring
import tokens

REPO = Path(__file__).resolve().parents[1]
N_TRAIN = 48


@pytest.fixture(scope="module")
def stages(small_model, tmp_path_factory):
    """Train SFT once, then a small SASRec, shared by the tests of this module."""
    import sasrec
    import sft

    root = tmp_path_factory.mktemp("pref")
    adapter = sft.main(base_model=small_model, output_dir=str(root / "sft"), max_train_samples=256,
                       batch_size=16, learning_rate=3e-3, logging_steps=50)
    sr_dir = root / "sasrec"
    sasrec.train_sasrec("lastfm", str(sr_dir), epochs=1, max_train_samples=4000)
    return {"root": root, "model": small_model, "sft": adapter, "sasrec": str(sr_dir)}


def reward_accuracy_on(model_dir, adapter, rows):
    """Share of rows whose positive log-prob beats every negative's (reference-free rewards, beta > 0)."""
    model, tok, _ = modeling.load_base_model(model_dir)
    model = modeling.load_adapter(model, adapter).eval()
    enc = [tokens.encode_prompt_answers(tok, r["prompt"], [r["chosen"]] + r["rejected"]) for r in rows]
    with torch.no_grad():
        lp = scoring.answer_logps(model, [p for p, _ in enc], [a for _, a in enc], pad_token_id=tok.pad_token_id)
    return (lp[:, 0] > lp[:, 1:].max(1).values).float().mean().item()


def test_dpo_sdpo_napo_then_inference(stages):
    import dpo
    import inference
    import softmax_dpo

    root, model = stages["root"], stages["model"]
    common = dict(base_model=model, start_adapter=stages["sft"], max_train_samples=N_TRAIN,
                  batch_size=8, logging_steps=1)
    dpo.main(output_dir=str(root / "dpo"), learning_rate=1e-3, **common)
    softmax_dpo.main(output_dir=str(root / "sdpo"), share_negatives=False, margin_mode="none", reference=True,
                     learning_rate=1e-3, **common)
    softmax_dpo.main(output_dir=str(root / "napo"), sasrec_checkpoint=stages["sasrec"], learning_rate=3e-3,
                     num_train_epochs=4, protocol="sdpo", **common)
    for stage in ("dpo", "sdpo", "napo"):
        adapter = root / stage / "final_checkpoint"
        assert (adapter / "adapter_config.json").exists(), stage
        assert not (adapter / "ref").exists(), "only the trained adapter is saved, not TRL's frozen copy"
        res = inference.main(base_model=model, adapter=str(adapter),
                             output_dir=str(root / f"eval_{stage}"), max_test_samples=16, progress=False)
        assert res["n_rows"] == 16 and 0.0 <= res["ranking"]["hr@1"] <= 1.0
    # NAPO logged its own metrics with the standard names
    log = json.loads((root / "napo" / "final_checkpoint" / "napo_run.json").read_text())["log_history"]
    keys = set().union(*log)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
              "logps/rejected", "napo/gamma_mean", "napo/gamma_min", "napo/gamma_max", "napo/M_bar",
              "napo/equivalent_negatives"):
        assert k in keys, k
    # B=8, rho=0.7 -> k=4 neighbours: up to 3 + 4*3 = 15 equivalent negatives per example
    eq = [h["napo/equivalent_negatives"] for h in log if "napo/equivalent_negatives" in h]
    assert 3 < max(eq) <= 15
    # reward accuracy on the NAPO training slice rises above its starting value (the SFT model's)
    rows = di.preference_rows(di.load_catalog("lastfm"), "train", "sdpo", 3, 0, 1, N_TRAIN)
    before = reward_accuracy_on(model, stages["sft"], rows)
    after = reward_accuracy_on(model, str(root / "napo" / "final_checkpoint"), rows)
    assert after > before


def test_authors_mode_trains(stages, tmp_path, monkeypatch):
    """`--margin_mode authors` through the real trainer: each row's dataset index reaches the pool (row_id), the
    pool is unfiltered (B=8, rho=0.7: int(0.7*7) = 4 neighbours, exactly 3 + 4*3 = 15 negatives every step), and
    the first running mean starts from 0 (M_bar_1 = 0.1 * M_1, whose sign is M_1's)."""
    import napo_trainer
    import softmax_dpo

    seen, objective = [], napo_trainer.authors_objective

    def recording(*a, **kw):
        seen.append(a[-1] if len(a) == 8 else kw.get("row_ids"))
        return objective(*a, **kw)

    monkeypatch.setattr(napo_trainer, "authors_objective", recording)
    out = tmp_path / "authors"
    softmax_dpo.main(base_model=stages["model"], start_adapter=stages["sft"], output_dir=str(out),
                     sasrec_checkpoint=stages["sasrec"], margin_mode="authors", max_train_samples=16, batch_size=8,
                     logging_steps=1, learning_rate=1e-3)
    info = json.loads((out / "final_checkpoint" / "napo_run.json").read_text())
    assert info["napo"]["margin_mode"] == "authors"
    assert len(seen) == 2 and sorted(int(i) for ids in seen for i in ids) == list(range(16))  # every row once
    log = [h for h in info["log_history"] if "napo/equivalent_negatives" in h]
    assert len(log) == 2 and all(h["napo/equivalent_negatives"] == 15 for h in log)
    first = log[0]
    assert first["napo/M_bar"] == pytest.approx(0.1 * first["napo/S_mean"], rel=1e-4)
    assert first["napo/gamma_mean"] == pytest.approx(1.0 - 0.3 * 0.9 * first["napo/S_mean"], abs=1e-4)


def test_bad_options_fail_before_training(stages, tmp_path):
    import cli
    import softmax_dpo

    common = dict(base_model=stages["model"], start_adapter=stages["sft"], max_train_samples=8,
                  sasrec_checkpoint=stages["sasrec"])
    with pytest.raises(cli.OptionError, match="--num_negatives 0"):
        softmax_dpo.main(output_dir=str(tmp_path / "a"), num_negatives=0, **common)
    with pytest.raises(cli.OptionError, match="--num_negatives 20"):
        softmax_dpo.main(output_dir=str(tmp_path / "a"), num_negatives=20, **common)
    with pytest.raises(cli.OptionError, match="--rho 1.5"):
        softmax_dpo.main(output_dir=str(tmp_path / "a"), rho=1.5, **common)
    with pytest.raises(cli.OptionError, match="missing'?: no such folder"):
        softmax_dpo.main(**{**common, "start_adapter": str(tmp_path / "missing")}, output_dir=str(tmp_path / "a"))
    with pytest.raises(cli.OptionError, match="missing'?: no such folder"):
        softmax_dpo.main(**common, resume_from_checkpoint=str(tmp_path / "missing"), output_dir=str(tmp_path / "a"))
    with pytest.raises(modeling.ModelError, match="adapter_config.json"):
        softmax_dpo.main(**{**common, "start_adapter": str(tmp_path)}, output_dir=str(tmp_path / "a"))
    with pytest.raises(modeling.ModelError, match="not a Trainer checkpoint"):
        softmax_dpo.main(**common, resume_from_checkpoint=str(tmp_path), output_dir=str(tmp_path / "a"))
    with pytest.raises(modeling.ModelError, match="--start_adapter is required"):
        softmax_dpo.main(**{**common, "start_adapter": None}, output_dir=str(tmp_path / "a"))
    assert not (tmp_path / "a").exists(), "nothing is written before the options are checked"


def test_sasrec_of_another_dataset_is_refused(stages, tmp_path):
    """A SASRec checkpoint with another item count -> one line on stderr, exit code != 0, no training."""
    import sasrec

    small = tmp_path / "other"
    small.mkdir()
    (small / "id2name.txt").write_text("".join(f"{i}::Artist {i}\n" for i in range(30)))
    rows = [{"seq": [1, 2, 3] + [30] * 7, "len_seq": 3, "next": 4}] * 20
    (small / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (small / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    other = tmp_path / "sasrec_other"
    sasrec.train_sasrec(str(small), str(other), epochs=1)
    r = subprocess.run([sys.executable, str(REPO / "softmax_dpo.py"), "--base_model", stages["model"],
                        "--start_adapter", stages["sft"], "--sasrec_checkpoint", str(other),
                        "--output_dir", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "30" in last and "4606" in last
    assert not (tmp_path / "out").exists()


def test_killed_run_resumes_to_the_same_adapter(stages, tmp_path, monkeypatch):
    """NAPO (sharing + margin, LoRA dropout on): stop after step 2 of 4, resume from checkpoint-2, and end
    with the same adapter weights (1e-6) as an uninterrupted run with the same seed."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    import napo_trainer
    import softmax_dpo

    common = dict(base_model=stages["model"], start_adapter=stages["sft"], max_train_samples=32,
                  batch_size=8, sasrec_checkpoint=stages["sasrec"], save_steps=2, learning_rate=3e-3,
                  logging_steps=1)
    softmax_dpo.main(output_dir=str(tmp_path / "full"), **common)

    class StopAfter2(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                control.should_training_stop = True
                control.should_save = True

    orig_init = napo_trainer.NAPOTrainer.__init__

    def init_with_stop(self, *a, **kw):
        orig_init(self, *a, **kw)
        self.add_callback(StopAfter2())

    monkeypatch.setattr(napo_trainer.NAPOTrainer, "__init__", init_with_stop)
    softmax_dpo.main(output_dir=str(tmp_path / "killed"), **common)
    monkeypatch.setattr(napo_trainer.NAPOTrainer, "__init__", orig_init)
    ckpt = tmp_path / "killed" / "checkpoint-2"
    assert (ckpt / "napo_state.json").exists()
    softmax_dpo.main(**{**common, "resume_from_checkpoint": str(ckpt)}, output_dir=str(tmp_path / "killed"))

    a = load_file(tmp_path / "full" / "final_checkpoint" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "final_checkpoint" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    start = load_file(Path(stages["sft"]) / "adapter_model.safetensors")
    assert any((a[k] - start[k]).abs().max() > 1e-4 for k in a), "training changed the adapter"
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    full_log = json.loads((tmp_path / "full" / "final_checkpoint" / "napo_run.json").read_text())
    res_log = json.loads((tmp_path / "killed" / "final_checkpoint" / "napo_run.json").read_text())
    assert full_log["M_bar"] == pytest.approx(res_log["M_bar"], abs=1e-9)


def test_sft_continues_from_an_adapter(stages, tmp_path):
    """`sft.py --start_adapter A` trains A further (the continued-SFT control): the same LoRA tensors, changed;
    its first loss is the trained adapter's, below a fresh SFT's on the same rows and seed; start.json and
    napo_run.json record A; a missing adapter fails in one line before anything is written."""
    from safetensors.torch import load_file

    import sft

    common = dict(base_model=stages["model"], max_train_samples=32, batch_size=8, learning_rate=3e-3,
                  logging_steps=1, seed=1)
    cont = Path(sft.main(output_dir=str(tmp_path / "cont"), start_adapter=stages["sft"], **common))
    fresh = Path(sft.main(output_dir=str(tmp_path / "fresh"), **common))
    a = load_file(cont / "adapter_model.safetensors")
    start = load_file(Path(stages["sft"]) / "adapter_model.safetensors")
    assert a.keys() == start.keys()
    assert any((a[k] - start[k]).abs().max() > 1e-4 for k in a), "training changed the adapter"

    def first_loss(folder):
        return [e["loss"] for e in json.loads((folder / "napo_run.json").read_text())["log_history"] if "loss" in e][0]

    assert first_loss(cont) < first_loss(fresh) - 0.1, (first_loss(cont), first_loss(fresh))
    assert json.loads((tmp_path / "cont" / "start.json").read_text())["start_adapter"] == str(Path(stages["sft"]).resolve())
    assert json.loads((cont / "napo_run.json").read_text())["start_adapter"] == str(stages["sft"])

    out = tmp_path / "missing"
    r = subprocess.run([sys.executable, str(REPO / "sft.py"), "--base_model", stages["model"], "--output_dir",
                        str(out), "--start_adapter", str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().startswith("error:") and "--start_adapter" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
