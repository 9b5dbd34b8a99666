"""List recall: does a model answer with one of the candidates its prompt lists?

`list_recall_probe(model, tokenizer, catalog)` (and `python list_recall.py probe --model DIR|tiny [--adapter A]`):
on 500 content-free prompts in the project's templates (modeling.list_prompt: random titles as candidates and
history), the model's probability of answering with one of the candidates,
P(answer ∈ list) = Σ over the 20 candidates of P(title + EOS | prompt), and the same mass on the history's
titles (which a model that copies without reading the list would name). Chance: 20/4,606 ≈ 0.004.
And whether it picks from the list the way its own sequence knowledge ranks the list: the share of prompts
whose top candidate (by P(title + EOS | prompt)) is also the top candidate of the model's continuation of the
prompt's history written as a listening window (modeling.window_teacher; chance 1/20).
The embedded model's build runs it and records it in napo_build.json (modeling.build_tiny).

`window_ranking(model, tokenizer, catalog, rows)` (`python list_recall.py window --model tiny`): on evaluation
rows, the HR@1 of ranking each row's candidates by the model's continuation of the row's history written as a
listening window, beside the HR@1 of its answer after the row's prompt (first answer token; both read from
one forward each). The first is what the model's sequence knowledge alone scores; the build's "distill" loss
teaches the second to follow it (a diagnostic on test rows: nothing here trains).
"""
from __future__ import annotations

import json
import random

import data_interface as di
import modeling


def list_recall_probe(model, tokenizer, catalog, rows=500, seed=12345, batch_size=50) -> dict:
    """On `rows` content-free prompts (random candidate and history titles, the project's templates), the
    model's probability of answering with one of the candidates: P(answer ∈ list) = Σ_c P(title_c + EOS),
    its mean over prompts and the share of prompts where it is ≥ 0.5; the same mass on the history's
    titles (which a model that copies without reading the list would name); and the share of prompts whose
    top candidate is the window continuation's top candidate (see the module's docstring)."""
    import scoring

    rng = random.Random(seed)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    p_in, p_hist, agree = [], [], 0
    win_first = modeling.window_first_tokens(tokenizer, catalog)
    for start in range(0, rows, batch_size):
        prompts, answers, n_hist, windows = [], [], [], []
        for _ in range(min(batch_size, rows - start)):
            text, cands, hist = modeling.list_prompt(catalog, rng)
            n_hist.append(len(hist))
            windows.append(modeling.ListDoc([], tokenizer(di.quote_titles(catalog, hist) + modeling.WINDOW_NEXT,
                                                          add_special_tokens=False)["input_ids"],
                                            [win_first[c] for c in cands]))
            hist = hist + [hist[0]] * (10 - len(hist))  # the same N answers per prompt
            p_ids, a_ids = modeling.encode_prompt_answers(tokenizer, text, [di.answer_text(catalog, i) for i in cands + hist])
            prompts.append(p_ids)
            answers.append(a_ids)
        lp = scoring.answer_logps(model, prompts, answers, pad_token_id=tokenizer.pad_token_id).to(device)
        probs = lp.float().exp().cpu()
        teacher = modeling.window_teacher(model, windows, tokenizer.pad_token_id).cpu()
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
    copy head's lift (the answer's logits less modeling.lm_head_logits; 0 = the same lift for every candidate,
    so the LM head alone ranks), and answer_lm_std, the LM head's logits; both None for a plain model."""
    import torch

    win_first = modeling.window_first_tokens(tokenizer, catalog)
    ans_first = modeling.answer_first_tokens(tokenizer, catalog)
    prefix = modeling.answer_prefix(tokenizer, catalog)  # the answer is chosen after it (tiny-bpe: the space)
    hits, rank_sum, corr = {"window": 0, "answer": 0}, {"window": 0, "answer": 0}, 0.0
    spread = {"answer_copy_lift_std": 0.0, "answer_lm_std": 0.0}
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        windows = [tokenizer(di.quote_titles(catalog, r["history_ids"]) + modeling.WINDOW_NEXT,
                             add_special_tokens=False)["input_ids"] for r in batch]
        prompts = [modeling.encode_prompt_answers(tokenizer, r["prompt"], [])[0] + prefix for r in batch]
        target = torch.tensor([r["candidate_ids"].index(r["target_id"]) for r in batch])
        ranks = {}
        lm = modeling.lm_head_logits(model, prompts, [[ans_first[c] for c in r["candidate_ids"]] for r in batch],
                                     tokenizer.pad_token_id)
        spread = None if lm is None else spread
        for seqs, first, name in ((windows, win_first, "window"), (prompts, ans_first, "answer")):
            logp = modeling.choice_logps(model, seqs, [[first[c] for c in r["candidate_ids"]] for r in batch],
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


def probe(model="tiny", dataset="lastfm", rows=500, adapter=None):
    """CLI: the list-recall probe of a base model (`tiny`, `smollm2-135m` or a folder), optionally with an adapter."""
    m, tok, _ = modeling.load_base_model(model, dataset, quantize="none", for_training=False)
    if adapter:
        m = modeling.load_adapter(m, adapter)
    result = {"model": model, "adapter": adapter, **list_recall_probe(m, tok, di.load_catalog(dataset), int(rows))}
    print(json.dumps(result))
    return result


def window(model="tiny", dataset="lastfm", adapter=None, split="test", protocol="clean", max_test_samples=500, seed=0):
    """CLI: window_ranking of a base model (optionally with an adapter) on the first N rows of a split."""
    catalog = di.load_catalog(dataset)
    rows = di.eval_rows(catalog, split, protocol, seed, max_test_samples)
    m, tok, _ = modeling.load_base_model(model, dataset, quantize="none", for_training=False)
    if adapter:
        m = modeling.load_adapter(m, adapter)
    m.eval()
    result = {"model": model, "adapter": adapter, "split": split, "protocol": protocol,
              **window_ranking(m, tok, catalog, rows)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    import cli

    cli.run({"probe": cli.validated(probe), "window": cli.validated(window)})
