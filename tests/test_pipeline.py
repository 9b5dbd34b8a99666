"""End to end on a small locally built model: SFT -> inference, metrics files, model building."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import data_interface as di
import modeling
import tiny_build
import tokens

REPO = Path(__file__).resolve().parents[1]


def test_builder_is_deterministic(tmp_path):
    """Same options -> the same weights and tokenizer, byte for byte (state hash), pretraining included."""
    opts = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                intermediate_size=64, pretrain_epochs=1, pretrain_max_steps=3)
    a = tiny_build.build_tiny("lastfm", tmp_path / "a", **opts)
    b = tiny_build.build_tiny("lastfm", tmp_path / "b", **opts)
    ia, ib = (json.loads((p / "napo_build.json").read_text()) for p in (a, b))
    assert ia["state_sha256"] == ib["state_sha256"]
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    c = tiny_build.build_tiny("lastfm", tmp_path / "c", **{**opts, "seed": 1})
    assert json.loads((c / "napo_build.json").read_text())["state_sha256"] != ia["state_sha256"]


def test_tokenizer_item_tokens_and_bpe(small_model, small_bpe_model):
    cat = di.load_catalog("lastfm")
    tok = modeling.load_tokenizer(small_model)
    bpe = modeling.load_tokenizer(small_bpe_model)
    row = di.eval_rows(cat, "test", "clean", max_samples=1)[0]
    answers = [di.answer_text(cat, c) for c in row["candidate_ids"]]
    p1, a1 = tokens.encode_prompt_answers(tok, row["prompt"], answers)
    p2, a2 = tokens.encode_prompt_answers(bpe, row["prompt"], answers)
    # item tokens: every title is one token + EOS; BPE: titles span several tokens
    assert all(len(a) == 2 for a in a1)
    assert max(len(a) for a in a2) > 3
    for ids, a in zip(a2, answers):
        assert tokens.decode(bpe, ids).strip() == a.strip() and ids[-1] == bpe.eos_token_id
    # prompts and answers round-trip through both tokenizers, non-ASCII titles included
    assert tokens.decode(tok, p1) == row["prompt"] and tokens.decode(bpe, p2) == row["prompt"]
    for title in ("Björk", "倖田來未", 'Lee "Scratch" Perry', "Mötley Crüe"):
        for t in (tok, bpe):
            _, (ids,) = tokens.encode_prompt_answers(t, row["prompt"], [" " + title])
            assert tokens.decode(t, ids).strip() == title


def test_colon_space_tokenizes_an_answer_as_the_listed_title():
    """tiny-bpe's tokenizer (colon_space): after its first token (the space after "Answer:") every answer is
    a run of the prompt's own tokens — what the copy head can copy; the plain BPE tokenizer writes a listed
    title's first piece differently from the answer's (Robert vs ĠRobert), so almost none is."""
    cat = di.load_catalog("lastfm")
    rows = di.eval_rows(cat, "test", "clean", max_samples=20)

    def verbatim(tok, skip):
        hits = total = 0
        for r in rows:
            p, answers = tokens.encode_prompt_answers(tok, r["prompt"], [di.answer_text(cat, c) for c in r["candidate_ids"]])
            assert tokens.decode(tok, p) == r["prompt"]  # the prompt still round-trips
            flat = "," + ",".join(map(str, p)) + ","
            for a in answers:
                total += 1
                hits += ("," + ",".join(map(str, a[skip:-1])) + ",") in flat
        return hits / total

    spaced = tiny_build.build_tiny_tokenizer(cat, 2000, item_tokens=False, colon_space=True)
    _, (a,) = tokens.encode_prompt_answers(spaced, "Answer:", [" Robert Miles"])
    assert spaced.convert_ids_to_tokens(a[:2]) == ["Ġ", "Robert"]
    assert verbatim(spaced, 1) >= 0.98
    # the build's list loss chooses the answer after the space every answer starts with, at the title's first piece
    assert spaced.convert_ids_to_tokens(tokens.answer_prefix(spaced, cat)) == ["Ġ"]
    first = tokens.answer_first_tokens(spaced, cat)
    robert = cat.names.index("Robert Miles")
    assert spaced.convert_ids_to_tokens([first[robert]]) == ["Robert"] and len(set(first)) > 100
    item_tok = tiny_build.build_tiny_tokenizer(cat, 2000, item_tokens=True)
    assert tokens.answer_prefix(item_tok, cat) == []  # whole-title tokens absorb the space
    assert verbatim(tiny_build.build_tiny_tokenizer(cat, 2000, item_tokens=False), 0) < 0.1


def test_cache_is_built_once_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPO_CACHE", str(tmp_path))
    opts = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                intermediate_size=64, pretrain_epochs=0)
    p1 = tiny_build.tiny_path("lastfm", **opts)
    mtime = (p1 / "model.safetensors").stat().st_mtime_ns
    p2 = tiny_build.tiny_path("lastfm", **opts)
    assert p1 == p2 and (p2 / "model.safetensors").stat().st_mtime_ns == mtime
    assert not [p for p in (tmp_path / "models").iterdir() if ".tmp" in p.name]


def test_bad_model_options(tmp_path):
    with pytest.raises(modeling.ModelError, match="--base_model"):
        modeling.resolve_base_model(str(tmp_path / "nope"))
    with pytest.raises(modeling.ModelError, match="--quantize"):
        modeling.load_base_model("tiny", quantize="8bit")
    with pytest.raises(modeling.ModelError, match="adapter_config.json"):
        modeling.check_adapter(tmp_path)


def test_sft_then_inference_beats_untrained(small_model, tmp_path):
    """SFT on a slice raises the ranking HR@1 of a fixed test slice above the untrained model's, and
    inference writes complete metrics.json / predictions.jsonl."""
    import inference
    import sft

    n_test = 128
    base = inference.main(base_model=small_model, output_dir=str(tmp_path / "eval_base"),
                          max_test_samples=n_test, generative=False, constrained=False, progress=False)
    adapter = sft.main(base_model=small_model, output_dir=str(tmp_path / "sft"), max_train_samples=1280,
                       batch_size=16, learning_rate=5e-3, logging_steps=5, lora_dropout=0.0)
    assert (Path(adapter) / "adapter_config.json").exists()
    res = inference.main(base_model=small_model, adapter=adapter, output_dir=str(tmp_path / "eval"),
                         max_test_samples=n_test, batch_size=8, progress=False)
    assert res["ranking"]["hr@1"] > base["ranking"]["hr@1"] + 0.05
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["n_rows"] == n_test and m["protocol"] == "clean"
    for key in ("hr@1", "hr@3", "hr@5", "hr@10", "ndcg@3", "ndcg@5", "ndcg@10", "mrr"):
        assert 0.0 <= m["ranking"][key] <= 1.0
    for key in ("valid_ratio", "hr@1", "hr@1_valid"):
        assert 0.0 <= m["generative"][key] <= 1.0
    assert {"top1_popularity_pct", "target_popularity_pct", "hr@1_tail"} <= set(m["popularity"])
    preds = [json.loads(l) for l in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [p["index"] for p in preds] == list(range(n_test))
    assert all(len(p["scores"]) == 20 and p["target_id"] in p["candidate_ids"] for p in preds)
    # constrained decoding always spells exactly one candidate
    assert m["constrained"]["valid_ratio"] == 1.0


def test_shell_scripts_forward_arguments(small_model, tmp_path):
    """`bash inference.sh --flag` reaches inference.py; paths come from env/arguments (run from another folder)."""
    env = {**os.environ, "BASE_MODEL": small_model, "PROTOCOL": "sdpo", "OUTPUT_DIR": str(tmp_path / "ev")}
    subprocess.run(["bash", str(REPO / "sft.sh"), "--max_train_samples", "16", "--output_dir",
                    str(tmp_path / "sft"), "--logging_steps", "1"], check=True, cwd=tmp_path, env=env)
    env["ADAPTER"] = str(tmp_path / "sft" / "final_checkpoint")
    subprocess.run(["bash", str(REPO / "inference.sh"), "--max_test_samples", "8", "--generative", "False",
                    "--constrained", "False", "--progress", "False"], check=True, cwd=tmp_path, env=env)
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["n_rows"] == 8 and m["protocol"] == "sdpo" and "generative" not in m


def test_inference_bad_flags_fail_in_one_line(small_model, tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "inference.py"), "--base_model", small_model,
                        "--protocol", "leaky", "--output_dir", str(tmp_path / "x")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("error: --protocol 'leaky'")
    assert not (tmp_path / "x").exists()
