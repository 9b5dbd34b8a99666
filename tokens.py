"""Tokens: the one tokenization every stage shares, and decoding.

* `encode_prompt_answers`: a prompt's token ids and each answer's (+ EOS), as the model sees prompt + answer
  written together; SFT, the preference stages, ranking and the probes all score these same tokens.
* `answer_tokens` / `answer_prefix` / `answer_first_tokens`: what every answer starts with after "Answer:" and
  where it is chosen; `window_first_tokens`: each title as it continues a listening window (`"A", "B"` +
  WINDOW_NEXT); `list_delimiters`: the tokens that open and close a quoted list entry.
* `decode` / `decode_many`: token ids back to text, the tokenizer's tables read once per batch (byte-level
  tokenizers with added whole-title tokens decoded correctly, "Björk" included).
"""
from __future__ import annotations

import data_interface as di

WINDOW_NEXT = ', "'  # what follows a window's last title when it goes on: `"A", "B"` + `, "` + next title


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


def answer_tokens(tokenizer, catalog) -> tuple[list[int], list[list[int]]]:
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
    return answer_tokens(tokenizer, catalog)[0]


def answer_first_tokens(tokenizer, catalog) -> list[int]:
    """Each item's first answer token after answer_prefix, as it follows a prompt's final "Answer:"."""
    prefix, answers = answer_tokens(tokenizer, catalog)
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
