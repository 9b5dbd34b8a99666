"""tiny_model.py: the embedded model's copy head — exact lift, the same logits through every path (full
forward, cached greedy decoding, shared-prompt scoring with its 4-D mask), saved and loaded, left alone by LoRA."""
import random

import pytest
import torch

import data_interface as di
import inference
import modeling
import scoring
import tiny_model
import pretrain_data
import tiny_build
import tokens


@pytest.fixture(scope="module", params=[(False, False, False), (True, False, False), (True, True, False),
                                        (True, True, True)],
                ids=["copy", "copy+next", "copy+next+match", "copy+next+match+entries"])
def small(request):
    """A small random napo_tiny whose votes are strong (bias +2, lift e^2), so any path that mishandles
    them shows; without and with the next-token votes (copy_next), those only from continuations of
    the query's own token (copy_next_match), and along the list's entries (copy_open_ids / copy_close_ids /
    copy_start_ids: tokens.list_delimiters)."""
    torch.manual_seed(0)
    catalog = di.load_catalog("lastfm")
    tok = tiny_build.build_tiny_tokenizer(catalog, 2000, True)
    cfg = tiny_model.TinyCopyConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, copy_bias=2.0, copy_log_scale=2.0,
        copy_next=request.param[0], copy_next_match=request.param[1],
        **dict(zip(("copy_open_ids", "copy_close_ids", "copy_start_ids"),
                   tokens.list_delimiters(tok) if request.param[2] else ())))
    model = tiny_model.TinyCopyForCausalLM(cfg).eval()
    rng = random.Random(0)
    prompts = [pretrain_data.list_prompt(catalog, rng) for _ in range(3)]
    return model, tok, catalog, prompts


def test_lift_is_exact_and_only_on_tokens_in_the_context(small):
    model, tok, _, prompts = small
    cfg = model.config
    opening, closing, starts = cfg.copy_open_ids or [], cfg.copy_close_ids or [], cfg.copy_start_ids or []
    ids = tok(prompts[0][0])["input_ids"]
    if not closing:  # the last token also occurs earlier (a continuation to copy)
        ids = torch.tensor([ids + ids[5:6]])
    else:  # with entries: a listed entry's title, after another entry start than in the list (they count as one);
        # the same title also once after a token that is no start (its continuation only matches on one token)
        k = next(k for k in range(1, len(ids) - 1) if ids[k + 1] in closing and ids[k - 1] in starts)
        other = next(t for t in starts if t != ids[k - 1] and t not in closing)
        assert ids[-1] not in starts
        ids = torch.tensor([ids + [ids[k], ids[k + 1], other, ids[k]]])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, -1]
        plain = model.lm_head(model.model(input_ids=ids).last_hidden_state)[0, -1]
        h = model.model(input_ids=ids).last_hidden_state
        w = model.copy_votes(h[:, -1:], model.copy_key(h), torch.ones(1, 1, ids.shape[1], dtype=torch.bool))[0, 0]
        if opening:  # only an entry's first piece votes: the position right after an opening token
            firsts = torch.tensor([False] + [t in opening for t in ids[0, :-1].tolist()])
            assert 0 < int(firsts.sum()) < len(firsts)
            w = w * firsts
        expect = torch.zeros(len(tok)).index_add(0, ids[0], w)
        if model.config.copy_next:  # position j votes for its token with the key of position j - 1, by hand
            q = model.copy_next_query(h[0, -1])
            k = model.copy_next_key(h[0, :-1])  # the predecessors of positions 1..T-1
            g = model.copy_next_gate
            w2 = torch.sigmoid(k @ q / k.shape[-1] ** 0.5 + g[0]) * g[1].exp()
            if model.config.copy_next_match:  # only where the predecessor's token is the query's (the last) token
                match = ids[0, :-1] == ids[0, -1]
                assert 0 < int(match.sum()) < len(match)  # the mask both keeps and drops votes here
                if starts:  # and where the predecessor's predecessor is the query's predecessor, starts as one
                    canon = lambda t: -1 if t in starts else t  # noqa: E731
                    two = torch.tensor([False] + [canon(t) == canon(int(ids[0, -2])) for t in ids[0, :-2].tolist()])
                    assert 0 < int((match & two).sum()) < int(match.sum())  # the second token drops a vote here
                    match = match & two
                w2 = w2 * match
            voted = ids[0, 1:].clone()
            if closing:  # a vote for a closing token is one for EOS
                voted[torch.tensor([t in closing for t in voted.tolist()])] = tok.eos_token_id
            expect = expect.index_add(0, voted, w2)
    lift = logits - plain
    seen = set(ids[0].tolist()) | ({tok.eos_token_id} if closing else set())
    absent = [t for t in range(len(tok)) if t not in seen]
    assert lift[absent].abs().max() == 0  # a token not in the context is not touched
    assert torch.allclose(lift, expect, atol=1e-5)
    lifted = [t for t in seen if expect[t] > 0]  # (with entries only entries' first pieces and continuations)
    assert len(lifted) == len(seen) or opening
    assert lift[lifted].min() > 0.5  # and the votes are strong enough to matter in the tests below
    if closing:
        assert lift[tok.eos_token_id] > 0.5 and (lift[closing] == 0).all()  # the entry's end voted EOS


def test_cached_greedy_decoding_equals_full_forwards(small):
    """inference.generate (left padding, KV cache: the copy keys ride on the cache) == greedy decoding by a
    full forward per step, row by row."""
    model, tok, _, prompts = small
    ids = [tok(p)["input_ids"] for p, _, _ in prompts]
    assert len({len(i) for i in ids}) > 1  # padding is exercised
    got = inference.generate(model, tok, ids, 4)
    for row, out in zip(ids, got):
        x, seq = torch.tensor([row]), []
        for _ in range(4):
            with torch.no_grad():
                t = int(model(input_ids=x, use_cache=False).logits[0, -1].argmax())
            if t == tok.eos_token_id:
                break
            seq.append(t)
            x = torch.cat([x, torch.tensor([[t]])], 1)
        assert out == tokens.decode(tok, seq).strip()


def test_shared_prompt_scoring_equals_one_row_per_answer(small):
    """scoring.answer_logps packs 20+ answers behind one prompt with a 4-D mask: the copy head must see
    exactly what each answer sees (votes from another answer's tokens would change the scores)."""
    model, tok, catalog, prompts = small
    p_ids, a_ids = zip(*[tokens.encode_prompt_answers(tok, p, [di.answer_text(catalog, i) for i in c[:6]])
                         for p, c, _ in prompts])
    shared = scoring.answer_logps(model, list(p_ids), list(a_ids), pad_token_id=tok.pad_token_id)
    naive = scoring.answer_logps(model, list(p_ids), list(a_ids), pad_token_id=tok.pad_token_id, shared=False)
    assert torch.allclose(shared, naive, atol=1e-4)


def test_saved_model_loads_as_napo_tiny_and_lora_leaves_the_head_alone(small, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok, _, prompts = small
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is tiny_model.TinyCopyForCausalLM
    ids = torch.tensor([tok(prompts[1][0])["input_ids"]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    from peft import get_peft_model

    peft = get_peft_model(loaded, modeling.lora_config())
    trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("copy_" in n for n in trainable)


def test_trl_fused_lm_head_goes_through_the_copy_head(small):
    """TRL's SFT/DPO trainers patch `model.forward` with a fused LM head that would skip the copy head: the
    patch is declined and fused_lm_head=True is answered from the logits of the labelled positions only —
    the same loss, log-probs, entropy and top-1 as the full forward, on a padded batch, with `labels` or
    pre-shifted `shift_labels`, and the same gradient."""
    from trl.trainer.utils import add_fused_lm_head

    model, tok, _, prompts = small
    rows = [tok(p[0])["input_ids"] for p in prompts[:2]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :width - 8] = -100  # score a few positions near the end of each row (and none of the padding)
    assert len(rows[0]) != len(rows[1]) and (labels != -100).sum() > 4
    ref = model(input_ids=ids, attention_mask=mask, labels=labels)
    ref.loss.backward()
    ref_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    assert "forward" not in vars(model)
    shifted = labels[:, 1:]
    logp = ref.logits[:, :-1].detach().log_softmax(-1)
    lp = logp.gather(-1, shifted.clamp(min=0)[..., None])[..., 0].masked_fill(shifted == -100, 0.0)
    ent = (-(logp.exp() * logp).sum(-1)).masked_fill(shifted == -100, 0.0)
    top = (logp.argmax(-1) == shifted) & (shifted != -100)
    fused = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert torch.allclose(fused.loss, ref.loss, atol=1e-5)
    assert torch.allclose(fused.log_probs, lp, atol=1e-5) and torch.allclose(fused.entropy, ent, atol=1e-4)
    assert torch.equal(fused.is_top1, top) and torch.equal(fused.label_mask, shifted != -100)
    fused.loss.backward()
    assert torch.allclose(model.lm_head.weight.grad, ref_grad, atol=1e-5)
    model.zero_grad()
    # pre-shifted labels (TRL under sequence parallelism): (B, L), scored without shifting
    pre = torch.nn.functional.pad(shifted, (0, 1), value=-100)
    with torch.no_grad():
        again = model(input_ids=ids, attention_mask=mask, shift_labels=pre, fused_lm_head=True)
    assert torch.allclose(again.log_probs[:, :-1], lp, atol=1e-5) and torch.allclose(again.loss, ref.loss, atol=1e-5)


def test_sft_trainer_trains_the_model_that_is_evaluated(small_model, tmp_path):
    """The SFT stage's own trainer (sft.build_trainer) computes the loss of the model's own forward."""
    import sft

    model, tok, info = modeling.load_base_model(small_model, quantize="none")
    catalog = di.load_catalog("lastfm")
    train = sft.tokenized_sft_dataset(tok, di.sft_rows(catalog, "train", max_samples=8), 512, "train")
    trainer = sft.build_trainer(model, tok, info, train, output_dir=str(tmp_path / "sft"), batch_size=8,
                                gradient_accumulation_steps=1, learning_rate=1e-3, cutoff_len=512, seed=0,
                                report_to="none", warmup_ratio=0.0, lr_scheduler_type="constant", max_grad_norm=0.3,
                                logging_steps=1, save_steps=0)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        own = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            labels=batch["labels"]).loss
        assert torch.allclose(trainer.compute_loss(trainer.model, dict(batch)), own, atol=1e-5)
