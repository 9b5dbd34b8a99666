"""Tests for scoring.answer_logps: prefix-shared packing vs naive concatenation, on a tiny random Llama (CPU)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from scoring import answer_logps  # noqa: E402

VOCAB = 300
PROMPT_LENS = (5, 17, 30)


def tiny_llama(attn="sdpa", seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, attn_implementation=attn, pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def batch(n, seed=1, prompt_lens=PROMPT_LENS):
    g = torch.Generator().manual_seed(seed)
    rand = lambda k: torch.randint(1, VOCAB, (k,), generator=g).tolist()  # noqa: E731
    prompts = [rand(p) for p in prompt_lens]
    # answer lengths cycle through 1..6, shifted per prompt, so every batch mixes lengths
    answers = [[rand(1 + (i + j) % 6) for j in range(n)] for i in range(len(prompts))]
    return prompts, answers


def reference_logps(model, prompts, answers):
    """Independent reference: one unpadded forward per (prompt, answer), full logits."""
    out = torch.zeros(len(prompts), len(answers[0]))
    with torch.no_grad():
        for b, (p, ans) in enumerate(zip(prompts, answers)):
            for j, a in enumerate(ans):
                logits = model(torch.tensor([p + a]), use_cache=False).logits[0].float()
                lp = torch.log_softmax(logits[len(p) - 1 : -1], -1)
                out[b, j] = lp.gather(-1, torch.tensor(a)[:, None]).sum()
    return out


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("n", [1, 3, 20])
def test_shared_matches_naive(attn, side, n):
    model = tiny_llama(attn)
    prompts, answers = batch(n)
    with torch.no_grad():
        shared = answer_logps(model, prompts, answers, padding_side=side)
        naive = answer_logps(model, prompts, answers, shared=False, padding_side=side)
    assert shared.shape == (3, n) and shared.dtype == torch.float32
    assert torch.isfinite(shared).all() and (shared < 0).all()
    assert (shared - naive).abs().max() < 1e-4
    if n == 3 and side == "right":  # both paths also match the plain one-sequence-at-a-time computation
        ref = reference_logps(model, prompts, answers)
        assert (shared - ref).abs().max() < 1e-4
        assert (naive - ref).abs().max() < 1e-4


def test_answers_do_not_see_each_other():
    model = tiny_llama()
    prompts, answers = batch(4)
    with torch.no_grad():
        base = answer_logps(model, prompts, answers)
        answers[1][2] = [7] * 6  # change one answer (and its length): all other scores must stay put
        new = answer_logps(model, prompts, answers)
    diff = (base - new).abs()
    assert diff[1, 2] > 0.1
    diff[1, 2] = 0
    assert diff.max() < 1e-4  # only rounding: later answers of row 1 moved to other packed indices


def lora_model(attn):
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(attn)
    cfg = LoraConfig(
        r=8, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    model = get_peft_model(model, cfg)
    torch.manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # default init is zero: make the adapter change the outputs
            torch.nn.init.normal_(p, std=0.1)
    return model.eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_lora_gradients_match(attn):
    model = lora_model(attn)
    prompts, answers = batch(5)
    lora = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n, _ in lora)
    grads = {}
    for shared in (True, False):
        model.zero_grad()
        out = answer_logps(model, prompts, answers, shared=shared)
        assert out.requires_grad
        out.sum().backward()
        grads[shared] = {n: p.grad.clone() for n, p in lora}
    with torch.no_grad(), model.disable_adapter():
        base = answer_logps(model, prompts, answers)
    assert (base - out.detach()).abs().max() > 1e-2  # the adapter really matters
    for n, _ in lora:
        g_s, g_n = grads[True][n], grads[False][n]
        assert g_n.norm() > 0, n
        assert (g_s - g_n).norm() / g_n.norm() < 1e-4, n


@pytest.mark.parametrize("shared", [True, False])
def test_chunking_is_identical(shared):
    model = tiny_llama()
    prompts, answers = batch(3)
    with torch.no_grad():
        full = answer_logps(model, prompts, answers, shared=shared)
        for chunk in (1, 2, 100):
            chunked = answer_logps(model, prompts, answers, shared=shared, chunk_size=chunk)
            # chunks are padded to the call's max length, so rows compute identically; the only slack allowed is
            # BLAS rounding (a chunk keeping a single logit row takes a matrix-vector kernel: ~5e-7 seen)
            assert (chunked - full).abs().max() <= 1e-6


def test_training_flag_unchanged():
    model = tiny_llama()
    prompts, answers = batch(2)
    model.train()
    answer_logps(model, prompts, answers)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    answer_logps(model, prompts, answers, shared=False)
    assert not any(m.training for m in model.modules())


def test_trl_fused_lm_head_patch():
    """TRL's DPOTrainer monkey-patches model.forward; without fused_lm_head=True it must behave as before."""
    utils = pytest.importorskip("trl.trainer.utils")
    model = tiny_llama()
    prompts, answers = batch(3)
    with torch.no_grad():
        before = answer_logps(model, prompts, answers)
        utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
        after = answer_logps(model, prompts, answers)
    assert torch.equal(before, after)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bf16_runs_and_is_close(attn):
    model = tiny_llama(attn).to(torch.bfloat16)
    prompts, answers = batch(3)
    with torch.no_grad():
        shared = answer_logps(model, prompts, answers)
        naive = answer_logps(model, prompts, answers, shared=False)
    assert shared.dtype == torch.float32 and torch.isfinite(shared).all()
    assert (shared - naive).abs().max() < 0.1  # bf16 noise only; a mask bug gives errors of order 1


def test_bad_inputs():
    model = tiny_llama()
    prompts, answers = batch(3)
    with pytest.raises(ValueError, match="answers"):
        answer_logps(model, prompts, [answers[0], answers[1][:2], answers[2]])
    answers[2][1] = []
    with pytest.raises(ValueError, match="empty answer"):
        answer_logps(model, prompts, answers)
    with pytest.raises(ValueError, match="empty answer"):
        answer_logps(model, prompts, answers, shared=False)
    _, answers = batch(3)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        answer_logps(model, [[]] + prompts[1:], answers)
    with pytest.raises(ValueError, match="as many"):
        answer_logps(model, prompts[:2], answers)
    with pytest.raises(ValueError, match="padding_side"):
        answer_logps(model, prompts, answers, padding_side="middle")
