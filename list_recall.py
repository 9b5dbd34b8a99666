"""List recall: does a model answer with one of the candidates its prompt lists?

`list_recall_probe(model, tokenizer, catalog)` (and `python list_recall.py probe --model DIR|tiny [--adapter A]`):
on 500 content-free prompts in the project's templates (modeling.list_prompt: random titles as candidates and
history), the model's probability of answering with one of the candidates,
P(answer ∈ list) = Σ over the 20 candidates of P(title + EOS | prompt), and the same mass on the history's
titles (which a model that copies without reading the list would name). Chance: 20/4,606 ≈ 0.004.
The embedded model's build runs it and records it in napo_build.json (modeling.build_tiny).
"""
from __future__ import annotations

import json
import random

import data_interface as di
import modeling


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
            text, cands, hist = modeling.list_prompt(catalog, rng)
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

    cli.run({"probe": cli.validated(probe)})
