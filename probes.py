"""Probes of a model's list recall: does it answer with one of the candidates its prompt lists, and does it rank
them as its own sequence knowledge does? (The CLI: list_recall.py; the embedded model's build runs the probe.)

* `list_recall_probe`: on 500 content-free prompts in the project's templates (pretrain_data.list_prompt: random
  titles as candidates and history), P(answer ∈ list) = Σ over the 20 candidates of P(title + EOS | prompt)
  (chance 20/4,606 ≈ 0.004), the same mass on the history's titles, and the share of prompts whose top candidate
  is also the top candidate of the model's continuation of the prompt's history written as a listening window
  (window_choice_logps; chance 1/20).
* `window_ranking`: on evaluation rows, the HR@1 of ranking each row's candidates by that window continuation
  (what the sequence knowledge alone scores) beside the HR@1 of the answer after the row's prompt; for a
  copy-head model also how the answer's candidate logits split into the copy head's lift and the LM head's.
* `choice_logps` / `lm_head_logits`: the next-token log-probs (or the LM head's own logits) at chosen tokens.
"""
from __future__ import annotations

import random

import torch

import data_interface as di
import pretrain_data
import scoring
import tokens


def right_padded(model, seqs: list[list[int]], pad_token_id):
    """(ids, attention mask, (rows, last real positions)) of token-id lists, right padded, on the model's device."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_token_id)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for j, q in enumerate(seqs):
        ids[j, :len(q)] = torch.tensor(q)
        mask[j, :len(q)] = 1
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    return ids, mask, (torch.arange(len(seqs), device=device), mask.sum(1) - 1)


def choice_logps(model, seqs: list[list[int]], choices, pad_token_id, renormalise=True) -> torch.Tensor:
    """(n, k) log-probs of the next token after each sequence at that row's k choice tokens (`choices`: (n, k)
    token ids), renormalised over them (one no-gradient forward, right padding, read at each row's last real
    position)."""
    ids, mask, last = right_padded(model, seqs, pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    logp = logits[last].float().log_softmax(-1).gather(-1, torch.as_tensor(choices, device=ids.device))
    return logp.log_softmax(-1) if renormalise else logp


def lm_head_logits(model, seqs: list[list[int]], choices, pad_token_id) -> torch.Tensor | None:
    """(n, k) the LM head's own logits (without the copy head's lift) at each row's k choice tokens (`choices`:
    (n, k) token ids), read at its last position as choice_logps reads the model's (right padding, no gradient,
    an adapter included); None for a model without a copy head (a plain Llama: its logits are the LM head's).
    The model's logits less these are the copy head's lift."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(core, "copy_query"):
        return None
    ids, mask, last = right_padded(model, seqs, pad_token_id)
    with torch.no_grad():
        h = core.model(input_ids=ids, attention_mask=mask).last_hidden_state[last]
        return core.lm_head(h).float().gather(-1, torch.as_tensor(choices, device=ids.device))


def window_choice_logps(model, windows: list[list[int]], window_first: list[list[int]], pad_token_id) -> torch.Tensor:
    """(n, 20) log-probs over each prompt's candidates (renormalised) of the model's next title after the prompt's
    history written as a window (`windows`: token ids of `"A", "B"` + tokens.WINDOW_NEXT; `window_first`: the
    candidates' first tokens in that position, tokens.window_first_tokens)."""
    return choice_logps(model, windows, window_first, pad_token_id)


def list_recall_probe(model, tokenizer, catalog, rows=500, seed=12345, batch_size=50) -> dict:
    """On `rows` content-free prompts (random candidate and history titles, the project's templates), the
    model's probability of answering with one of the candidates: P(answer ∈ list) = Σ_c P(title_c + EOS),
    its mean over prompts and the share of prompts where it is ≥ 0.5; the same mass on the history's
    titles (which a model that copies without reading the list would name); and the share of prompts whose
    top candidate is the window continuation's top candidate (see the module's docstring)."""
    rng = random.Random(seed)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    p_in, p_hist, agree = [], [], 0
    win_first = tokens.window_first_tokens(tokenizer, catalog)
    for start in range(0, rows, batch_size):
        prompts, answers, n_hist, windows, firsts = [], [], [], [], []
        for _ in range(min(batch_size, rows - start)):
            text, cands, hist = pretrain_data.list_prompt(catalog, rng)
            n_hist.append(len(hist))
            windows.append(tokenizer(di.quote_titles(catalog, hist) + tokens.WINDOW_NEXT,
                                     add_special_tokens=False)["input_ids"])
            firsts.append([win_first[c] for c in cands])
            hist = hist + [hist[0]] * (10 - len(hist))  # the same N answers per prompt
            p_ids, a_ids = tokens.encode_prompt_answers(tokenizer, text, [di.answer_text(catalog, i) for i in cands + hist])
            prompts.append(p_ids)
            answers.append(a_ids)
        lp = scoring.answer_logps(model, prompts, answers, pad_token_id=tokenizer.pad_token_id).to(device)
        probs = lp.float().exp().cpu()
        teacher = window_choice_logps(model, windows, firsts, tokenizer.pad_token_id).cpu()
        agree += int((probs[:, :di.NUM_CANDIDATES].argmax(1) == teacher.argmax(1)).sum())
        for row, nh in zip(probs, n_hist):
            p_in.append(row[:di.NUM_CANDIDATES].sum().item())
            p_hist.append(row[di.NUM_CANDIDATES:di.NUM_CANDIDATES + nh].sum().item())
    model.train(was_training)
    return {"rows": rows, "p_answer_in_list": sum(p_in) / rows, "share_rows_p_ge_0.5": sum(p >= 0.5 for p in p_in) / rows,
            "p_answer_in_history": sum(p_hist) / rows, "top1_agrees_with_window": agree / rows}


def window_ranking(model, tokenizer, catalog, rows: list[dict], batch_size=50) -> dict:
    """On eval rows (data_interface.eval_rows), the candidates ranked by the window continuation and by the
    answer, by their first tokens (see the module's docstring): each one's HR@1 and the target's mean rank
    (1..20), and answer_rank_corr, the mean over rows of the two rankings' rank correlation (Spearman; 1: the
    answer ranks as the window does, negative: against it). For a copy-head model also how the answer's logits
    over the candidates split (mean over rows of the standard deviation over the 20): answer_copy_lift_std, the
    copy head's lift (the answer's logits less lm_head_logits; 0 = the same lift for every candidate,
    so the LM head alone ranks), and answer_lm_std, the LM head's logits; both None for a plain model."""
    win_first = tokens.window_first_tokens(tokenizer, catalog)
    ans_first = tokens.answer_first_tokens(tokenizer, catalog)
    prefix = tokens.answer_prefix(tokenizer, catalog)  # the answer is chosen after it (tiny-bpe: the space)
    hits, rank_sum, corr = {"window": 0, "answer": 0}, {"window": 0, "answer": 0}, 0.0
    spread = {"answer_copy_lift_std": 0.0, "answer_lm_std": 0.0}
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        windows = [tokenizer(di.quote_titles(catalog, r["history_ids"]) + tokens.WINDOW_NEXT,
                             add_special_tokens=False)["input_ids"] for r in batch]
        prompts = [tokens.encode_prompt_answers(tokenizer, r["prompt"], [])[0] + prefix for r in batch]
        target = torch.tensor([r["candidate_ids"].index(r["target_id"]) for r in batch])
        ranks = {}
        lm = lm_head_logits(model, prompts, [[ans_first[c] for c in r["candidate_ids"]] for r in batch],
                                     tokenizer.pad_token_id)
        spread = None if lm is None else spread
        for seqs, first, name in ((windows, win_first, "window"), (prompts, ans_first, "answer")):
            logp = choice_logps(model, seqs, [[first[c] for c in r["candidate_ids"]] for r in batch],
                                         tokenizer.pad_token_id).cpu()
            hits[name] += int((logp.argmax(1) == target).sum())
            rank_sum[name] += int((logp > logp.gather(1, target[:, None])).sum()) + len(batch)
            ranks[name] = logp.argsort(1).argsort(1).double()  # 0 = lowest
            if name == "answer" and spread is not None:  # the lift: the answer's logits less the LM head's (up
                # to the log-softmax's constant per row, which the spread ignores)
                spread["answer_copy_lift_std"] += float((logp - lm.cpu()).std(1).sum())
                spread["answer_lm_std"] += float(lm.cpu().std(1).sum())
        a, b = (ranks[k] - ranks[k].mean(1, keepdim=True) for k in ("window", "answer"))
        corr += float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).sum())
    n = len(rows)
    return {"rows": n, "window_hr1": hits["window"] / n, "answer_hr1": hits["answer"] / n,
            "window_mean_rank": rank_sum["window"] / n, "answer_mean_rank": rank_sum["answer"] / n,
            "answer_rank_corr": corr / n,
            **{k: None if spread is None else spread[k] / n for k in ("answer_copy_lift_std", "answer_lm_std")}}
