"""memory_estimate.py: parameter counts, NF4 weights, activation scaling, the CLI. Pure Python: no torch, no model."""
import ast
import json
import subprocess
import sys

import pytest

import memory_estimate as me

LLAMA = me.PRESETS["llama2-7b"]
SMOL = me.PRESETS["smollm2-135m"]


def opts(*argv):
    return me.parse_args(list(argv))


def rows_by(rows):
    return {(r["stage"], r["checkpointing"]): r for r in rows}


def test_parameter_counts():
    assert me.param_counts(LLAMA)["total"] == pytest.approx(6.74e9, rel=0.01)
    assert me.param_counts(SMOL)["total"] == pytest.approx(134.5e6, rel=0.02)
    assert me.param_counts(SMOL)["lm_head"] == 0  # tied
    assert me.lora_params(LLAMA, 8) == 19_988_480  # r=8 on q,k,v,o,gate,up,down of 32 layers


def test_config_json_gives_the_preset(tmp_path):
    cfg = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
           "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True, "head_dim": 64,
           "model_type": "llama"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert me.load_arch(config=str(path)) == me.Arch(576, 30, 9, 3, 1536, 49152, True, 64)
    assert me.param_counts(me.load_arch(config=str(path))) == me.param_counts(SMOL)


def test_nf4_weights_of_7b():
    for other in (2, 4):  # embeddings/lm_head/norms in bf16 (as loaded) or fp32 (prepare_model_for_kbit_training)
        assert 3.3 < me.weight_bytes(LLAMA, other_bytes=other) / me.GIB < 4.2
    assert me.NF4_BITS == pytest.approx(4.127, abs=1e-3)


def test_shared_scoring_needs_fewer_activations_in_the_token_ratio():
    rows = rows_by(me.estimate(LLAMA, opts("--negatives", "3")))
    shared, naive = rows[("napo_shared", False)], rows[("napo_naive", False)]
    assert shared["tokens"] == 4 * (200 + 4 * 6) and naive["tokens"] == 16 * (200 + 6)
    ratio = shared["tokens"] / naive["tokens"]
    assert shared["activations"] < naive["activations"]
    # the decoder layers' part is linear in tokens (sdpa: no s^2 scores; the mask term is ~0.1%) ...
    layers = shared["activation_parts"]["layers"] / naive["activation_parts"]["layers"]
    assert layers == pytest.approx(ratio, rel=0.01)
    # ... and the logits (the same 4*4*6 answer positions in both) change the total's ratio by a few percent
    assert shared["activations"] / naive["activations"] == pytest.approx(ratio, rel=0.05)


def test_checkpointing_reduces_activations():
    for o in (opts(), opts("--model", "smollm2-135m", "--compute_dtype", "fp32", "--device", "cpu")):
        a = me.load_arch(o.model, o.config)
        rows = rows_by(me.estimate(a, o))
        for stage in ("sft", "dpo", "napo_shared", "napo_naive"):
            assert rows[(stage, True)]["activations"] < rows[(stage, False)]["activations"] / 3
        assert rows[("inference", None)]["lora_optimizer"] < rows[("sft", False)]["lora_optimizer"]


def test_lora_dtype_bf16_halves_lora_and_optimizer():
    fp32, bf16 = rows_by(me.estimate(LLAMA, opts())), rows_by(me.estimate(LLAMA, opts("--lora_dtype", "bf16")))
    assert fp32[("sft", False)]["lora_optimizer"] == 16 * 19_988_480
    assert bf16[("sft", False)]["lora_optimizer"] == 8 * 19_988_480
    assert bf16[("inference", None)]["lora_optimizer"] == fp32[("inference", None)]["lora_optimizer"]


def test_layer_formula_matches_torch_saved_tensors_on_cpu():
    # bytes autograd saved per token and layer, counted with torch.autograd.graph.saved_tensors_hooks on
    # SmolLM2-135M in NF4 + LoRA (r=8, dropout 0.1) on CPU, 2 padded rows of 129 tokens: fp32 72,677;
    # bf16 autocast (fp32 residual after prepare_model_for_kbit_training) 58,343
    fp32 = me.Setting(compute=4, residual=4, mask=4)
    bf16 = me.Setting(compute=2, residual=4, mask=4)
    assert me.layer_bytes(SMOL, 2, 129, fp32) / 258 == pytest.approx(72_677, rel=0.01)
    assert me.layer_bytes(SMOL, 2, 129, bf16) / 258 == pytest.approx(58_343, rel=0.01)


def test_markdown_and_json(capsys):
    assert me.main(["--model", "llama2-7b"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n| ") == 10  # header + 9 rows (4 training stages x on/off + inference)
    assert "| SFT | off | 4 x 206 |" in out
    assert me.main(["--model", "smollm2-135m", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["rows"]) == 9 and data["arch"]["tied"] is True
    for r in data["rows"]:
        assert r["total"] == pytest.approx(r["weights"] + r["lora_optimizer"] + r["activations"])


@pytest.mark.parametrize("argv, words", [
    (["--batch", "0"], "--batch 0"),
    (["--compute_dtype", "fp16"], "invalid choice"),
    (["--prompt_tokens", "600"], "over --cutoff"),
    (["--batch", "four"], "invalid int"),
    (["--model", "llama2-7b", "--config", "x.json"], "not allowed with"),
    (["--config", "/nonexistent/config.json"], "cannot read"),
])
def test_bad_flags_one_error_line(capsys, argv, words):
    assert me.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0]


def test_cli_exit_status_and_no_torch():
    bad = subprocess.run([sys.executable, me.__file__, "--negatives", "-1"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines() == ["error: --negatives -1: must be >= 1"]
    tree = ast.parse(open(me.__file__, encoding="utf-8").read())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"__future__", "argparse", "dataclasses", "json", "sys"}, imported
