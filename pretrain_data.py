"""The embedded model's pretraining documents and batches (its build: tiny_build.py).

Each epoch's documents (pretraining_docs), deterministic for the build options:
* listening windows: each train user's sequence cut into windows of `window` items (the cut shifts every
  epoch), written the way prompts write histories (`"A", "B", ...`), scored on every token — knowledge of the
  domain (train users only; val/test users are disjoint);
* content-free list prompts (a `recall` fraction of the windows' count on top, at least `list_min` of them:
  list_prompt_count): random titles as the 20
  candidates and as the history, a template of the project, and as the answer a uniform pick among the
  candidates — the generic skill of answering from a given list, which a real LLM brings from web text; no user,
  no popularity; scored on the answer's first token by the list loss (pretrain_loss.py);
* copy documents (tiny-bpe's recipe only: `dense_copy` per window): a list, then `Again:` and the same list.
Then encoded (encode_doc), cut into batches of PRETRAIN_BATCH documents in shuffled order (every batch mixes
lengths and kinds), and packed several documents to a row behind a block-diagonal causal mask (pack_batch).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

import data_interface as di
import tokens

PRETRAIN_BATCH = 32  # documents per build step


def user_sequences(catalog: di.ItemCatalog, split="train") -> list[list[int]]:
    """Each user's whole listening sequence, rebuilt from the consecutive rows of a split: a row whose
    history is empty starts a user; every row contributes its `next` item."""
    path = catalog.path / f"{split}.jsonl"
    seqs: list[list[int]] = []
    for lineno, seq, len_seq, nxt in di.split_records(catalog, split):  # the validated parser: file:line errors
        if not 0 <= nxt < catalog.n_items:
            raise di.DataError(f"{path}:{lineno}: unknown item id {nxt} (id2name has 0..{catalog.n_items - 1})")
        if len_seq <= 1 and all(x == catalog.pad_id for x in seq) or not seqs:
            seqs.append([])
        seqs[-1].append(nxt)
    return seqs


def list_prompt(catalog, rng: random.Random, history=(3, 10)) -> tuple[str, list[int], list[int]]:
    """A content-free prompt in the project's format: random titles as the candidates and as the history
    (disjoint), a random template. Returns (prompt, candidate ids, history ids). No user, no popularity."""
    n = rng.randint(*history)
    items = rng.sample(range(catalog.n_items), di.NUM_CANDIDATES + n)
    cands, hist = items[:di.NUM_CANDIDATES], items[di.NUM_CANDIDATES:]
    return di.build_prompt(catalog, hist, cands, rng.randrange(len(di.TEMPLATES))), cands, hist


def list_prompt_count(recall, n_windows, list_min=None) -> int:
    """The list prompts of an epoch: a `recall` fraction of its windows, at least `list_min` (None: no floor).
    The list skill comes from these content-free prompts, whose use does not depend on the dataset's size: without
    the floor a 1,000-row dataset got ~20 per epoch and a build that never learned to answer from the list."""
    return max(int(recall * n_windows), list_min or 0)


def windows(seq: list[int], epoch: int, window: int) -> list[tuple[int, int]]:
    """(start, end) of the listening windows of one user's sequence in an epoch (the cut shifts every epoch;
    windows of fewer than 2 items are left out)."""
    shift = (epoch * 7) % window
    starts = [0] + list(range(shift or window, len(seq), window))
    return [(a, b) for a, b in zip(starts, starts[1:] + [len(seq)]) if b - a >= 2]


def window_counts(catalog, epochs, window) -> list[int]:
    """The number of listening windows of each pretraining epoch."""
    seqs = user_sequences(catalog, "train")
    return [sum(len(windows(s, epoch, window)) for s in seqs) for epoch in range(epochs)]


def pretraining_docs(catalog, epochs, window, recall, seed, dense_copy=None, list_min=None) -> list[list[tuple]]:
    """The documents of each pretraining epoch (see the module's docstring), as (text, answer, candidate ids):
    answer None for a window (scored on every token), candidates None for a copy document (scored on its
    repeat, weighted with the windows)."""
    rng = random.Random(seed)
    seqs = user_sequences(catalog, "train")
    out = []
    for epoch in range(epochs):
        docs = [(di.quote_titles(catalog, s[a:b]), None, None) for s in seqs for a, b in windows(s, epoch, window)]
        n_windows = len(docs)
        for _ in range(list_prompt_count(recall, n_windows, list_min)):
            prompt, cands, _ = list_prompt(catalog, rng)
            docs.append((prompt, di.answer_text(catalog, rng.choice(cands)), cands))
        for _ in range(int((dense_copy or 0) * n_windows)):
            listed = di.quote_titles(catalog, rng.sample(range(catalog.n_items), rng.randint(5, 15)))
            docs.append((f"Options: {listed}. Again:", f" {listed}", None))
        rng.shuffle(docs)
        out.append(docs)
    return out


@dataclass
class ListDoc:
    """What a list prompt's loss needs beyond its tokens (pretrain_loss.flat_pretrain_loss): its candidates'
    first answer tokens, and which answer token is the first one (first_at: the length of tokens.answer_prefix,
    0 for `tiny`, 1 for tiny-bpe)."""
    cand_first: list[int]
    first_at: int = 0


def encode_doc(tokenizer, first_tokens, text, answer, cands, first_at=0, unscored=()):
    """(ids, labels, ListDoc or None) of one pretraining document: every token and EOS of a window; the
    answer and EOS of a list prompt (its prompt tokens are -100). first_tokens: tokens.answer_first_tokens;
    first_at: len(answer_prefix). unscored: tokens a copy document's repeat does not score (copy_entries: the
    entries' closing tokens, which its copy head reads as the answer's end, EOS)."""
    if answer is None:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return ids, ids, None
    prompt, (ans,) = tokens.encode_prompt_answers(tokenizer, text, [answer])
    if cands is None:  # a copy document: scored on its answer, with the windows
        return prompt + ans, [-100] * len(prompt) + [-100 if t in unscored else t for t in ans], None
    return prompt + ans, [-100] * len(prompt) + ans, ListDoc([first_tokens[c] for c in cands], first_at)


def shuffled_batches(encoded, batch_size, rng) -> list[list]:
    """Consecutive documents (in their shuffled order) in batches of `batch_size`, the batches then shuffled:
    every batch mixes lengths and kinds (batches sorted by length cost the sequence knowledge: docs/history.md)."""
    batches = [encoded[i:i + batch_size] for i in range(0, len(encoded), batch_size)]
    rng.shuffle(batches)
    return batches


def pretrain_batches(tokenizer, catalog, opts: dict, first_tokens=None) -> list[list[tuple]]:
    """Every build step's documents, encoded (encode_doc), in order: pretraining_docs' epochs cut into
    shuffled_batches of PRETRAIN_BATCH (deterministic for the options). first_tokens: answer_first_tokens, if
    the caller has them already."""
    rng = random.Random(opts["seed"] + 1)
    first_tokens = first_tokens or tokens.answer_first_tokens(tokenizer, catalog)
    at = len(tokens.answer_prefix(tokenizer, catalog))
    unscored = set(tokens.list_delimiters(tokenizer)[1]) if opts.get("copy_entries") else set()
    return [b for docs in pretraining_docs(catalog, opts["pretrain_epochs"], opts["pretrain_window"],
                                           opts["pretrain_recall"], opts["seed"], opts.get("pretrain_dense_copy"),
                                           opts.get("pretrain_list_min"))
            for b in shuffled_batches([encode_doc(tokenizer, first_tokens, *d, first_at=at, unscored=unscored)
                                       for d in docs], PRETRAIN_BATCH, rng)]


@dataclass
class PackedBatch:
    """A batch of pretraining documents packed several to a row (pack_batch)."""
    ids: torch.Tensor      # (R, W) token ids, pad_token_id after the last document of a row
    pos: torch.Tensor      # (R, W) position ids, restarting at 0 for every document
    allowed: torch.Tensor  # (R, 1, W, W) bool: causal within a document, nothing across documents
    keep: torch.Tensor     # (R, W) bool: the positions that predict a label
    targets: torch.Tensor  # (n,) those labels, in row-major order of keep
    doc: torch.Tensor      # (n,) the batch index of each one's document
    rows_padded: int       # R * W, for the profile


def pack_batch(batch, pad_token_id, width=None) -> PackedBatch:
    """Pack a batch's documents (ids, labels, ...) into R rows of `width` positions (default: twice the longest
    document's length; first fit, longest first; deterministic), each document on its own positions 0..len-1 and attending only to itself:
    every document is computed as in a padded row of its own (RoPE sees the same positions, the copy head
    the same mask), but the batch has ~8% padding instead of ~44% and keeps its mix of lengths and kinds
    (`python benchmark.py build`: half the time per step).
    Only the positions that predict a label are projected to logits (a list prompt's: its answer and EOS)."""
    width = width or 2 * max(len(e[0]) for e in batch)
    rows: list[list[int]] = []
    room: list[int] = []
    for j in sorted(range(len(batch)), key=lambda j: (-len(batch[j][0]), j)):
        n = len(batch[j][0])
        r = next((r for r, free in enumerate(room) if free >= n), None)
        if r is None:
            rows.append([])
            room.append(width)
            r = len(rows) - 1
        rows[r].append(j)
        room[r] -= n
    R = len(rows)
    ids = torch.full((R, width), pad_token_id)
    pos = torch.zeros((R, width), dtype=torch.long)
    seg = torch.full((R, width), -1)
    keep = torch.zeros((R, width), dtype=torch.bool)
    targets, docs = [], []
    for r, members in enumerate(rows):
        at = 0
        for j in members:
            e, lab = batch[j][0], batch[j][1]
            n = len(e)
            ids[r, at:at + n] = torch.tensor(e)
            pos[r, at:at + n] = torch.arange(n)
            seg[r, at:at + n] = j
            for t in range(n - 1):  # position t predicts lab[t + 1]
                if lab[t + 1] != -100:
                    keep[r, at + t] = True
                    targets.append(lab[t + 1])
                    docs.append(j)
            at += n
    ar = torch.arange(width)
    allowed = (ar[:, None] >= ar[None, :])[None] & (seg[:, :, None] == seg[:, None, :])
    return PackedBatch(ids, pos, allowed[:, None], keep, torch.tensor(targets), torch.tensor(docs), R * width)

