"""List recall: does a model answer with one of the candidates its prompt lists? A probe, and a research
build of the embedded model that does (an opt-in; the default `--base_model tiny` is unchanged).

Why the default embedded model ignores the list. Its build pretrains on listening windows of the train users,
and a LastFM listening sequence never repeats an artist (0 repeats in 50,800 train events): every window
teaches "never name a title that is already in the context", the opposite of copying from a list. And from a
standard initialisation a model of this size does not discover in-context copying within a build budget:
copying the single option of `Options: "A". Answer:` stayed at P < 0.01 for 300 steps of a fresh 256-d
4-layer model (measured on a 2-core AMD EPYC; a 128-d 2-layer model started after ~200 steps).

The research build (`python list_recall.py build --output_dir DIR`, then `--base_model DIR` in any stage):
* a **copy-ready initialisation** (data-free) of the last attention layer: title tokens share one direction,
  the prompt's final `:` another; queries at `:` look for the title direction, every other query rests on `<s>`
  (an attention sink whose value is zero; the tokenizer starts every sequence with `<s>`), and the value/output
  projections are an identity on the rest of the space, so the attended title is written to the output;
* a short pretraining, each step one batch of each kind: listening windows of the train users (loss on each
  title and EOS), and **content-free list prompts** in the project's templates (random titles as candidates and
  history, no user or popularity signal) with loss −log P(answer ∈ candidates) + `spread` × the cross-entropy
  of a uniform pick over the renormalised candidates (spread = 1: exactly the loss of a uniform pick), then EOS;
  optionally (`domain_batch`) questions without a candidate list built from train users' histories.
* the **probe** (`list_recall_probe`, also `python list_recall.py probe --model DIR|tiny`):
  P(answer ∈ list) = Σ over the 20 candidates of P(title + EOS | prompt), mean over 500 content-free prompts.

Measured (2-core AMD EPYC, 1 torch thread; `python list_recall.py build` with the options named):
* spread 0: P(answer ∈ list) = 1.000 on the probe after 300 steps (6 min), but the model is certain of one
  arbitrary candidate (log P(target) ≈ −32 on real val prompts) and SFT cannot move it (loss flat at 4.2
  per token over 256 steps of `sft.py`);
* spread 1: probe 0.57; after `sft.py --max_train_samples 1024` unconstrained ValidRatio 0.987 on 300 test
  rows, but ranking HR@1 only 0.097: SFT's loss stays flat (2.4 per token through 96 steps of 8,192 rows).
So the copy skill can be built, but not yet together with the ability to learn users in SFT: an open problem.
"""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import data_interface as di
import modeling

SHAPE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
         "bpe_vocab_size")
DEFAULTS = dict(**{k: modeling.TINY_DEFAULTS[k] for k in SHAPE},  # the default embedded model's shape
                pretrain_steps=300, pretrain_lr=1e-3, lm_batch=8, list_batch=8, domain_batch=0, pretrain_window=24,
                copy_init=True, emb_std=0.3, spread=1.0, probe_rows=500, seed=0)
# the copy circuit's scales (copy_ready_init): query, title key, per-title preference key, sink key, output
COPY_SCALES = dict(s_q=1.0, s_k=1.5, s_p=0.0, s_sink=0.5, beta=8.0)
QUERY_TOKEN = ":"  # the last token of every prompt ("... Answer:")
# next-item questions without a candidate list, for the optional domain prompts (train users only)
HISTORY_TEMPLATES = [
    "A listener played these artists, oldest first: {history}. Which artist will the listener play next? Answer:",
    "Listening history (oldest to newest): {history}. Name the artist this person is most likely to play next. Answer:",
]


def build_tokenizer(catalog, bpe_vocab_size=2000):
    """The embedded model's tokenizer (whole-title tokens) that also starts every sequence with <s>."""
    from tokenizers import processors

    tok = modeling.build_tiny_tokenizer(catalog, bpe_vocab_size, item_tokens=True)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    return tok


def title_first_tokens(tokenizer, catalog) -> list[int]:
    """The first token of each title as an answer (" title"): the whole-title token where there is one."""
    enc = tokenizer([di.answer_text(catalog, i) for i in range(catalog.n_items)], add_special_tokens=False)
    return [ids[0] for ids in enc["input_ids"]]


# --------------------------------------------------------------------------------------------------
# Data


def list_prompt(catalog, rng: random.Random, n_candidates=di.NUM_CANDIDATES, history=(3, 10)):
    """A content-free prompt in the project's format: random titles as candidates and as history (disjoint),
    a random template. Returns (prompt, candidate ids, history ids)."""
    hlen = rng.randint(*history)
    items = rng.sample(range(catalog.n_items), n_candidates + hlen)
    cands, hist = items[:n_candidates], items[n_candidates:]
    tpl = di.TEMPLATES[rng.randrange(len(di.TEMPLATES))]
    return tpl.format(candidates=di.quote_titles(catalog, cands), history=di.quote_titles(catalog, hist)), cands, hist


def _windows(seqs, rng, n, window):
    out = []
    for _ in range(n):
        s = seqs[rng.randrange(len(seqs))]
        a = rng.randrange(max(1, len(s) - 2))
        out.append(s[a:a + window])
    return out


def _pad(rows: list[list[int]], pad: int):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, :len(r)] = torch.tensor(r)
        mask[j, :len(r)] = 1
    return ids, mask


# --------------------------------------------------------------------------------------------------
# The copy-ready initialisation


@torch.no_grad()
def copy_ready_init(model, tokenizer, title_ids: list[int], emb_std, seed, **scales):
    """Initialise the embeddings and the last attention layer of a Llama as a copy circuit (data-free; see the
    module docstring). Directions: t (shared by title tokens), a (the query token ":"), c (shared by all
    tokens: a constant every query can read), s (only <s>: the sink). In every head, three of the lowest-
    frequency rotary dimensions (which barely rotate over a prompt, so the scores do not depend on distance)
    carry query·key = s_q·a · s_k·t (title keys, read at ":" only), s_q·a · s_p·r_h (a random per-title
    preference) and s_q·c · s_sink·s (every query finds the sink). Values/outputs: an identity on the space
    orthogonal to t, a, c, s (scaled by beta), split over the key/value heads, so the sink's value is zero."""
    sc = {**COPY_SCALES, **scales}
    s_q, s_k, s_p, s_sink, beta = (sc[k] for k in ("s_q", "s_k", "s_p", "s_sink", "beta"))
    cfg = model.config
    d, H = cfg.hidden_size, cfg.num_attention_heads
    kv = cfg.num_key_value_heads
    hd = d // H
    g = torch.Generator().manual_seed(seed)
    E = model.model.embed_tokens.weight
    norm = emb_std * math.sqrt(d)  # the norm of a random embedding row
    E.normal_(0.0, emb_std, generator=g)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    t, a, c, s = basis[:, 0], basis[:, 1], basis[:, 2], basis[:, 3]
    special = basis[:, :4]
    E -= (E @ special) @ special.T
    E += norm * c
    title_ids = sorted(set(title_ids))
    E[title_ids] += norm * t
    qid = tokenizer.convert_tokens_to_ids(QUERY_TOKEN)
    E[qid] = norm * (a + c)
    E[tokenizer.bos_token_id] = norm * (s + c)
    P = torch.eye(d) - special @ special.T
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    attn = model.model.layers[-1].self_attn
    Wq, Wk, Wv, Wo = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight
    lo_dims = [hd // 2 - 1, hd // 2 - 2, hd // 2 - 3]  # the lowest rotary frequencies
    group = H // kv
    for k in range(kv):
        r = P @ torch.randn(d, generator=g)
        r /= r.norm()
        base = k * hd
        Wk[base + lo_dims[0]] = s_k * t
        Wk[base + lo_dims[1]] = s_p * r
        Wk[base + lo_dims[2]] = s_sink * s
        Wv[base:base + hd] = U[:, base:base + hd].T @ P
        for h in range(k * group, (k + 1) * group):
            Wq[h * hd + lo_dims[0]] = s_q * a
            Wq[h * hd + lo_dims[1]] = s_q * a
            Wq[h * hd + lo_dims[2]] = s_q * c
        Wo[:, k * group * hd:(k * group + 1) * hd] = beta * U[:, base:base + hd]  # one output per value head
    return model


# --------------------------------------------------------------------------------------------------
# Probe


@torch.no_grad()
def list_recall_probe(model, tokenizer, catalog, rows=500, seed=12345, batch_size=50) -> dict:
    """On `rows` content-free prompts (random candidate and history titles, the project's templates), the
    model's probability of answering with one of the candidates: P(answer ∈ list) = Σ_c P(title_c + EOS),
    its mean over prompts and the share of prompts where it is ≥ 0.5; and the same mass on the history's
    titles (which a model that copies without reading the list would name)."""
    import scoring

    rng = random.Random(seed)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    p_in, p_hist = [], []
    for start in range(0, rows, batch_size):
        prompts, answers, n_hist = [], [], []
        for _ in range(min(batch_size, rows - start)):
            text, cands, hist = list_prompt(catalog, rng)
            n_hist.append(len(hist))
            hist = hist + [hist[0]] * (10 - len(hist))  # the same N answers per prompt
            p_ids, a_ids = modeling.encode_prompt_answers(tokenizer, text, [di.answer_text(catalog, i) for i in cands + hist])
            prompts.append(p_ids)
            answers.append(a_ids)
        lp = scoring.answer_logps(model, prompts, answers, pad_token_id=tokenizer.pad_token_id).to(device)
        probs = lp.float().exp().cpu()
        for row, nh in zip(probs, n_hist):
            p_in.append(row[:di.NUM_CANDIDATES].sum().item())
            p_hist.append(row[di.NUM_CANDIDATES:di.NUM_CANDIDATES + nh].sum().item())
    model.train(was_training)
    return {"rows": rows, "p_answer_in_list": sum(p_in) / rows, "share_rows_p_ge_0.5": sum(p >= 0.5 for p in p_in) / rows,
            "p_answer_in_history": sum(p_hist) / rows}


def pretrain(model, tokenizer, catalog, steps, lr, lm_batch, list_batch, window, seed, spread=1.0, domain_batch=0,
             log=print) -> dict:
    """The build's training run (see the module docstring). Returns timings and the last losses."""
    rng = random.Random(seed)
    seqs = modeling.user_sequences(catalog, "train")
    first = title_first_tokens(tokenizer, catalog)
    eos, bos, pad = tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id
    title_tok = torch.tensor(first)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, min(30, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps)))
    head = model.get_output_embeddings()
    model.train()
    t_data = t_step = 0.0
    t0 = time.time()
    hist = {"lm": [], "list_p": [], "eos": []}
    for step in range(1, steps + 1):
        ta = time.time()
        # listening windows: tokens of each window (titles + separators), loss on titles and EOS only
        wins = [di.quote_titles(catalog, w) for w in _windows(seqs, rng, lm_batch, window)]
        lm_rows = [[bos] + ids + [eos] for ids in tokenizer(wins, add_special_tokens=False)["input_ids"]]
        # content-free list prompts + a uniform pick + EOS
        texts, cands, _ = zip(*(list_prompt(catalog, rng) for _ in range(list_batch)))
        pick_rows = [ids + [first[rng.choice(c)], eos] for ids, c in zip(tokenizer(list(texts))["input_ids"], cands)]
        if domain_batch:  # a train user's recent items as a question without candidates; the next item answers
            dom = []
            for _ in range(domain_batch):
                u = seqs[rng.randrange(len(seqs))]
                t = rng.randrange(min(3, len(u) - 1), len(u))
                tpl = HISTORY_TEMPLATES[rng.randrange(len(HISTORY_TEMPLATES))]
                dom.append((tpl.format(history=di.quote_titles(catalog, u[max(0, t - 10):t])), u[t]))
            lm_rows += [ids + [first[y], eos] for ids, (_, y) in zip(tokenizer([p for p, _ in dom])["input_ids"], dom)]
        lm_ids, lm_mask = _pad(lm_rows, pad)
        pk_ids, pk_mask = _pad(pick_rows, pad)
        t_data += time.time() - ta
        tb = time.time()
        h = model.model(input_ids=lm_ids, attention_mask=lm_mask).last_hidden_state[:, :-1]
        tgt = lm_ids[:, 1:]
        keep = lm_mask[:, 1:].bool() & (torch.isin(tgt, title_tok) | (tgt == eos))
        lm_loss = F.cross_entropy(head(h[keep]).float(), tgt[keep])
        h = model.model(input_ids=pk_ids, attention_mask=pk_mask).last_hidden_state
        rows = torch.arange(len(pick_rows))
        ans = torch.tensor([len(r) - 3 for r in pick_rows])  # the ":" ending the prompt
        logp = F.log_softmax(head(h[rows, ans]).float(), -1)
        cand_tok = title_tok[torch.tensor(cands)]
        cand_logp = logp.gather(1, cand_tok)
        list_loss = -torch.logsumexp(cand_logp, -1).mean()
        # spread: the cross-entropy of a uniform pick over the renormalised candidate distribution, so the
        # model keeps its mass spread over the list (spread=1: exactly the loss of a uniform pick)
        spread_loss = -(cand_logp - torch.logsumexp(cand_logp, -1, keepdim=True)).mean()
        eos_loss = F.cross_entropy(head(h[rows, ans + 1]).float(), torch.full((len(pick_rows),), eos))
        loss = lm_loss + list_loss + spread * spread_loss + eos_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        t_step += time.time() - tb
        hist["lm"].append(lm_loss.item())
        hist["list_p"].append(math.exp(-list_loss.item()))
        hist["eos"].append(eos_loss.item())
        if step % 50 == 0 or step == steps:
            tail = {k: sum(v[-50:]) / len(v[-50:]) for k, v in hist.items()}
            log(f"[tiny] build step {step}/{steps}: title loss {tail['lm']:.3f}, P(answer in list) "
                f"{tail['list_p']:.3f}, EOS loss {tail['eos']:.3f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    tail = {k: sum(v[-50:]) / len(v[-50:]) for k, v in hist.items()}
    return {"steps": steps, "seconds_data": round(t_data, 1), "seconds_steps": round(t_step, 1),
            "final_title_loss": round(tail["lm"], 4), "final_batch_p_answer_in_list": round(tail["list_p"], 4)}


def build(dataset="lastfm", output_dir=None, log=print, **overrides):
    """Build the research model into output_dir and record options, timings and the probe in napo_build.json."""
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise modeling.ModelError(f"unknown option(s): {', '.join('--' + k for k in sorted(unknown))}")
    if output_dir is None:
        raise modeling.ModelError("--output_dir is required")
    opts = {**DEFAULTS, **overrides}
    catalog = di.load_catalog(dataset)
    t0 = time.time()
    torch.manual_seed(opts["seed"])
    tokenizer = build_tokenizer(catalog, opts["bpe_vocab_size"])
    model = modeling.new_tiny_llama(tokenizer, opts)
    if opts["copy_init"]:
        copy_ready_init(model, tokenizer, title_first_tokens(tokenizer, catalog), opts["emb_std"], opts["seed"])
    train = {}
    if opts["pretrain_steps"] > 0:
        train = pretrain(model, tokenizer, catalog, opts["pretrain_steps"], opts["pretrain_lr"], opts["lm_batch"],
                         opts["list_batch"], opts["pretrain_window"], opts["seed"], opts["spread"],
                         opts["domain_batch"], log)
    probe = list_recall_probe(model, tokenizer, catalog, opts["probe_rows"]) if opts["probe_rows"] else None
    if probe:
        log(f"[list_recall] probe ({probe['rows']} content-free prompts): P(answer in list) "
            f"{probe['p_answer_in_list']:.3f}, in history {probe['p_answer_in_history']:.3f}", flush=True)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {"builder": "list_recall", "dataset": catalog.name, "options": opts, "copy_scales": COPY_SCALES,
            "data_fingerprint": di.data_fingerprint(catalog), "state_sha256": modeling.state_hash(model),
            "threads": torch.get_num_threads(), "list_recall_probe": probe, "pretrain": train,
            "seconds_total": round(time.time() - t0, 1)}
    di.atomic_write_text(out / "napo_build.json", json.dumps(info, indent=2))
    return out


def probe(model="tiny", dataset="lastfm", rows=500, adapter=None):
    """CLI: the list-recall probe of a base model (`tiny`, `smollm2-135m` or a folder), optionally with an adapter."""
    m, tok, _ = modeling.load_base_model(model, dataset, quantize="none", for_training=False)
    if adapter:
        m = modeling.load_adapter(m, adapter)
    result = {"model": model, "adapter": adapter, **list_recall_probe(m, tok, di.load_catalog(dataset), int(rows))}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    import cli

    cli.run({"build": build, "probe": cli.validated(probe)})
