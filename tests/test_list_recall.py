"""list_recall.py: the probe, and the research build whose model answers with one of the listed candidates."""
import json
import math

import pytest

import data_interface as di
import list_recall
import modeling

# big enough for the readout to tell 20 listed titles from the 4,606 others (64 dimensions are not), small
# enough to build in seconds
RECALL = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
              intermediate_size=256, pretrain_steps=60, probe_rows=100, spread=0.0)


@pytest.fixture(scope="module")
def recall_builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("recall")
    with_skill = list_recall.build("lastfm", root / "copy", **RECALL)
    without = list_recall.build("lastfm", root / "plain", **{**RECALL, "copy_init": False})
    return (json.loads((with_skill / "napo_build.json").read_text()),
            json.loads((without / "napo_build.json").read_text()), with_skill)


def test_build_records_list_recall_above_a_plain_model(recall_builds):
    """The build prints and records P(answer in list) on content-free prompts; with the copy-ready start it is
    far above what the same training reaches from a standard initialisation (chance: 20/4,606 = 0.004)."""
    copy, plain, _ = recall_builds
    p, q = copy["list_recall_probe"], plain["list_recall_probe"]
    assert p["rows"] == 100
    assert p["p_answer_in_list"] >= 0.5, p
    assert q["p_answer_in_list"] < 0.05, q
    assert p["p_answer_in_history"] < 0.1, p  # it answers from the candidates, not from the history
    assert copy["pretrain"]["seconds_steps"] > 0 and copy["pretrain"]["steps"] == 60


def test_probe_measures_mass_on_the_list(recall_builds):
    """The probe's figure is the mass on the list: recomputed by hand for a few prompts with the model."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, path = recall_builds
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    catalog = di.load_catalog("lastfm")
    probe = list_recall.list_recall_probe(model, tok, catalog, rows=4, seed=7)
    rng = random.Random(7)
    masses = []
    for _ in range(4):
        prompt, cands, _ = list_recall.list_prompt(catalog, rng)
        ids = tok(prompt)["input_ids"]
        assert ids[0] == tok.bos_token_id
        total = 0.0
        for c in cands:
            _, (ans,) = modeling.encode_prompt_answers(tok, prompt, [di.answer_text(catalog, c)])
            seq = torch.tensor([ids + ans])
            with torch.no_grad():
                logp = model(seq).logits[0].log_softmax(-1)
            total += math.exp(sum(logp[len(ids) - 1 + j, t].item() for j, t in enumerate(ans)))
        masses.append(total)
    assert probe["p_answer_in_list"] == pytest.approx(sum(masses) / 4, abs=1e-4)


def test_unknown_build_option_is_an_error_before_anything_is_written(tmp_path):
    with pytest.raises(modeling.ModelError, match="--pretrain_epochs"):
        list_recall.build("lastfm", tmp_path / "x", pretrain_epochs=1)
    assert not (tmp_path / "x").exists()
