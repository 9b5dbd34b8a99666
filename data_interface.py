"""Data for LLM-based next-item recommendation (LastFM and any dataset laid out like it).

A dataset folder holds
  {train,val,test}.jsonl  one JSON object per line: {"seq": [ids, right-padded], "len_seq": int, "next": int}
  id2name.txt             `id::name`, one item per line (split on the first `::`); ids 0..n-1
The padding id equals the number of items. Rows with len_seq >= 3 are kept (as S-DPO/NAPO do).

Everything a stage needs is built here, once:
  * 20-candidate rows under two protocols (`sdpo`: the published one, seeded by the target, which leaks
    the answer; `clean`: per-row seeds, different per split and, for training, per epoch);
  * prompts from the project's own templates (seeded choice, each ends with "Answer:");
  * SFT rows (prompt/completion) and preference rows (prompt, chosen, K rejected, item ids).

CLI:  python data_interface.py export --dataset lastfm --split test --protocol sdpo --output PATH
      python data_interface.py heuristic --dataset lastfm --split test --protocol sdpo
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import cache
import cli
from errors import DataError  # noqa: F401  (di.DataError for callers)

DATA_DIR = cache.REPO_DIR / "data"
SPLITS = ("train", "val", "test")
PROTOCOLS = ("clean", "sdpo")
NUM_CANDIDATES = 20
MIN_LEN_SEQ = 3


def _check_dataset(name, v):
    load_catalog(v)  # the folder exists and id2name.txt parses (the splits are checked by each stage)
    return v


cli.add_rules(dataset=cli.Rule(check=_check_dataset), protocol=cli.Rule(choices=PROTOCOLS),
              split=cli.Rule(choices=SPLITS))


# --------------------------------------------------------------------------------------------------
# Loading


@dataclass
class Row:
    index: int            # position among the kept rows of its split (0-based)
    history: list[int]    # real item ids, oldest first (no padding)
    target: int


@dataclass
class ItemCatalog:
    name: str             # dataset name (folder name)
    path: Path
    names: list[str]      # names[id]
    name_to_id: dict

    @property
    def n_items(self) -> int:
        return len(self.names)

    @property
    def pad_id(self) -> int:
        return len(self.names)


def resolve_dataset(dataset: str | os.PathLike) -> Path:
    """`lastfm` -> <repo>/data/lastfm; an existing folder path is used as is."""
    p = Path(dataset)
    if p.is_dir():
        return p.resolve()
    if (DATA_DIR / str(dataset)).is_dir():
        return DATA_DIR / str(dataset)
    raise DataError(f"--dataset {dataset!r}: no folder of that name here or under {DATA_DIR}")


def _open_text(path: Path):
    """Open `path`, or `path.gz` when only the compressed copy exists."""
    if path.exists():
        return open(path, encoding="utf-8")
    gz = path.with_name(path.name + ".gz")
    if gz.exists():
        return gzip.open(gz, "rt", encoding="utf-8")
    pickles = sorted(p.name for p in path.parent.glob("*.df")) if path.parent.is_dir() else []
    if pickles:
        raise DataError(
            f"{path}: file not found; this folder holds pickles ({', '.join(pickles)}), which are never loaded "
            "(unpickling runs arbitrary code); convert each, once, where you trust them: python -c \"import pandas "
            "as pd; pd.read_pickle('train_data.df')[['seq', 'len_seq', 'next']].to_json('train.jsonl', "
            "orient='records', lines=True)\" (Val_data.df -> val.jsonl, Test_data.df -> test.jsonl)")
    raise DataError(f"{path}: file not found")


def _lines(path: Path):
    """(line number, line) of a text file (or its .gz copy); a file that cannot be read to its end (a cut-short
    gzip, bytes that are not UTF-8) is a DataError naming it."""
    import zlib

    try:
        with _open_text(path) as f:
            yield from enumerate(f, 1)
    except (EOFError, OSError, UnicodeDecodeError, zlib.error) as e:
        path = path if path.exists() else path.with_name(path.name + ".gz")
        raise DataError(f"{path}: unreadable ({type(e).__name__}: {str(e)[:80]}): a truncated or damaged copy? "
                        "copy the dataset file again") from None


def _empty(path: Path, what: str) -> DataError:
    return DataError(f"{path}: empty (no {what}): a truncated or unfinished copy? copy the dataset file again")


def load_catalog(dataset: str | os.PathLike) -> ItemCatalog:
    folder = resolve_dataset(dataset)
    path = folder / "id2name.txt"
    names: dict[int, str] = {}
    for lineno, line in _lines(path):
        line = line.rstrip("\n").rstrip("\r")
        if not line.strip():
            continue
        if "::" not in line:
            raise DataError(f"{path}:{lineno}: expected `id::name`, got {line[:60]!r}")
        raw_id, name = line.split("::", 1)
        try:
            item_id = int(raw_id)
        except ValueError:
            raise DataError(f"{path}:{lineno}: item id {raw_id[:30]!r} is not an integer") from None
        if item_id in names:
            raise DataError(f"{path}:{lineno}: duplicate item id {item_id}")
        if not name.strip():
            raise DataError(f"{path}:{lineno}: empty name for item id {item_id}")
        names[item_id] = name
    if not names:
        raise _empty(path, "`id::name` lines")
    n = len(names)
    if sorted(names) != list(range(n)):
        missing = next(i for i in range(n) if i not in names)
        raise DataError(f"{path}: item ids must be 0..{n - 1}; id {missing} is missing")
    ordered = [names[i] for i in range(n)]
    name_to_id: dict[str, int] = {}
    for i, nm in enumerate(ordered):
        name_to_id.setdefault(nm, i)  # duplicate names: the first id wins for name lookups
    return ItemCatalog(name=folder.name, path=folder, names=ordered, name_to_id=name_to_id)


_ROW_CACHE: dict = {}


def split_records(catalog: ItemCatalog, split: str):
    """(line number, seq, len_seq, next) of every non-blank line of a split file, short rows included, each
    parsed as integers; a line that does not parse is a DataError naming file:line."""
    if split not in SPLITS:
        raise DataError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    path = catalog.path / f"{split}.jsonl"
    rows = 0
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            seq, len_seq, nxt = obj["seq"], int(obj["len_seq"]), int(obj["next"])
            seq = [int(x) for x in seq]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            cut = "" if line.endswith("\n") else ("; the file's last line is cut short (no newline at its end): a "
                                                  "truncated copy? copy the file again")
            raise DataError(f"{path}:{lineno}: malformed row ({type(e).__name__}: {e}){cut}") from None
        rows += 1
        yield lineno, seq, len_seq, nxt
    if not rows:
        raise _empty(path, "rows")


def load_split(catalog: ItemCatalog, split: str) -> list[Row]:
    """Kept rows (len_seq >= 3) of a split, validated. Cached per (folder, split)."""
    if split not in SPLITS:
        raise DataError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    path = catalog.path / f"{split}.jsonl"
    key = (str(path), catalog.n_items)
    if key in _ROW_CACHE:
        return _ROW_CACHE[key]
    pad, n = catalog.pad_id, catalog.n_items
    rows: list[Row] = []
    for lineno, seq, len_seq, nxt in split_records(catalog, split):
        if len_seq < MIN_LEN_SEQ:
            continue
        if len_seq > len(seq):
            raise DataError(f"{path}:{lineno}: len_seq {len_seq} exceeds the {len(seq)} ids in seq")
        history = seq[:len_seq]
        if all(x == pad for x in history):
            raise DataError(f"{path}:{lineno}: the history holds only padding (id {pad})")
        if pad in history:
            raise DataError(f"{path}:{lineno}: padding id {pad} inside the first len_seq={len_seq} ids")
        for x in history + [nxt]:
            if not 0 <= x < n:
                raise DataError(f"{path}:{lineno}: unknown item id {x} (id2name has 0..{n - 1})")
        for x in seq[len_seq:]:  # the tail: padding (or known ids); anything else is a foreign id
            if not 0 <= x <= pad:
                raise DataError(f"{path}:{lineno}: unknown item id {x} in seq (id2name has 0..{n - 1}, "
                                f"padding id {pad})")
        rows.append(Row(index=len(rows), history=history, target=nxt))
    if not rows:
        raise DataError(f"{path}: no rows with len_seq >= {MIN_LEN_SEQ}")
    _ROW_CACHE[key] = rows
    return rows


def data_fingerprint(catalog: ItemCatalog) -> str:
    """sha256 (first 16 hex digits) of the text of id2name.txt and train.jsonl (a .gz copy hashes alike):
    keys the caches of models built or trained from a dataset."""
    sha = hashlib.sha256()
    for name in ("id2name.txt", "train.jsonl"):
        for _, line in _lines(catalog.path / name):  # the same bytes as the whole text's
            sha.update(line.encode("utf-8"))
    return sha.hexdigest()[:16]


def target_popularity(catalog: ItemCatalog) -> list[int]:
    """Item popularity = how often the item is the target of a kept train row."""
    counts = [0] * catalog.n_items
    for r in load_split(catalog, "train"):
        counts[r.target] += 1
    return counts


# --------------------------------------------------------------------------------------------------
# Candidates


def stable_seed(*parts) -> int:
    """A stable 63-bit integer from its parts (unlike Python's salted hash())."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise DataError(f"--protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    return protocol


def _pool(catalog: ItemCatalog, row: Row) -> list[int]:
    excluded = set(row.history)
    excluded.add(row.target)
    return [i for i in range(catalog.n_items) if i not in excluded]


def row_candidates(catalog: ItemCatalog, row: Row, split: str, protocol: str, seed: int = 0,
                   epoch: int = 0) -> list[int]:
    """The 20 candidate ids of one row: 19 negatives from items outside history and target + the target.

    sdpo : exactly the published rule: random.seed(target); sample 19 from the id-ordered pool; append the
           target; random.seed(target); shuffle. The list is a fingerprint of the target (it leaks it).
    clean: the same pool rule with a private RNG seeded by (split, row index, seed, epoch).
    """
    pool = _pool(catalog, row)
    k = NUM_CANDIDATES - 1
    if len(pool) < k:
        raise DataError(f"{catalog.name}/{split} row {row.index}: only {len(pool)} items can be negatives")
    if protocol == "sdpo":
        state = random.getstate()  # keep the global RNG untouched for callers
        try:
            random.seed(row.target)
            cands = random.sample(pool, k) + [row.target]
            random.seed(row.target)
            random.shuffle(cands)
        finally:
            random.setstate(state)
        return cands
    check_protocol(protocol)
    rng = random.Random(stable_seed("candidates", split, row.index, seed, epoch))
    cands = rng.sample(pool, k) + [row.target]
    rng.shuffle(cands)
    return cands


def split_candidates(catalog, rows, split, protocol, seed=0, epoch=0) -> list[list[int]]:
    return [row_candidates(catalog, r, split, protocol, seed, epoch) for r in rows]


def seeded_candidate_heuristic(catalog: ItemCatalog, rows: list[Row], cands: list[list[int]]) -> float:
    """HR@1 of the no-learning attack on the sdpo protocol: for each candidate c, recompute the negatives the sdpo
    rule would draw for target c and pick the candidate whose set best matches the other 19."""
    hits = 0
    for row, cs in zip(rows, cands):
        best, best_overlap = None, -1
        for c in cs:
            fake = Row(row.index, row.history, c)
            others = set(cs) - {c}
            state = random.getstate()
            random.seed(c)
            negs = set(random.sample(_pool(catalog, fake), NUM_CANDIDATES - 1))
            random.setstate(state)
            overlap = len(negs & others)
            if overlap > best_overlap:
                best, best_overlap = c, overlap
        hits += best == row.target
    return hits / len(rows)


# --------------------------------------------------------------------------------------------------
# Prompts

# Project-written paraphrases. {history} and {candidates} are quoted titles joined by ", ". The candidates
# come first and the history last, right before the question: the answer continues the listening history.
TEMPLATES = [
    "Candidates: {candidates}. A listener played these artists, oldest first: {history}. "
    "Which candidate will the listener play next? Answer:",
    "From these candidates: {candidates}, pick the artist this person is most likely to play next. "
    "Listening history (oldest to newest): {history}. Answer:",
    "Choose one of the candidates {candidates} as the next artist of someone who recently listened to, "
    "in order, {history}. Answer:",
    "Which of the candidates {candidates} comes next for a user who listened to {history} (in this order)? Answer:",
]


def quote_titles(catalog: ItemCatalog, ids: list[int]) -> str:
    return ", ".join(f'"{catalog.names[i]}"' for i in ids)


def build_prompt(catalog: ItemCatalog, history: list[int], candidates: list[int], template: int = 0) -> str:
    tpl = TEMPLATES[template % len(TEMPLATES)]
    return tpl.format(history=quote_titles(catalog, history), candidates=quote_titles(catalog, candidates))


def template_for(split: str, index: int, seed: int, epoch: int = 0) -> int:
    return stable_seed("template", split, index, seed, epoch) % len(TEMPLATES)


def answer_text(catalog: ItemCatalog, item_id: int) -> str:
    """The response: the bare title with a leading space (EOS is added by the tokenizing code)."""
    return " " + catalog.names[item_id]


# --------------------------------------------------------------------------------------------------
# Rows for the stages


def _select(rows: list[Row], max_samples: int | None) -> list[Row]:
    if max_samples is not None and max_samples >= 0:
        return rows[:max_samples]
    return rows


def eval_rows(catalog, split="test", protocol="clean", seed=0, max_samples=None) -> list[dict]:
    """Evaluation rows: prompt, candidate ids and target id (one fixed draw per row)."""
    check_protocol(protocol)
    rows = _select(load_split(catalog, split), max_samples)
    out = []
    for r in rows:
        cands = row_candidates(catalog, r, split, protocol, seed)
        out.append({
            "index": r.index, "protocol": protocol, "split": split,
            "prompt": build_prompt(catalog, r.history, cands, template_for(split, r.index, seed)),
            "history_ids": r.history, "candidate_ids": cands, "target_id": r.target,
        })
    return out


def sft_rows(catalog, split="train", protocol="clean", seed=0, epochs=1, max_samples=None) -> list[dict]:
    """prompt/completion rows. Under `clean` the candidates (and template) are re-drawn for each epoch,
    so `epochs` copies of every row are returned (epoch-major); under `sdpo` the candidates are the same
    every epoch (only the template choice varies)."""
    check_protocol(protocol)
    rows = _select(load_split(catalog, split), max_samples)
    out = []
    for epoch in range(epochs):
        for r in rows:
            cands = row_candidates(catalog, r, split, protocol, seed, epoch)
            out.append({
                "prompt": build_prompt(catalog, r.history, cands, template_for(split, r.index, seed, epoch)),
                "completion": answer_text(catalog, r.target),
            })
    return out


def preference_rows(catalog, split="train", protocol="clean", num_negatives=3, seed=0, epochs=1,
                    max_samples=None) -> list[dict]:
    """Preference rows: prompt, chosen (target title), rejected (K titles drawn, seeded, from the row's 19
    non-target candidates) and the item ids later stages need (history, target, negatives)."""
    check_protocol(protocol)
    cli.check_options({"num_negatives": num_negatives})  # K's one rule: cli.RULES
    rows = _select(load_split(catalog, split), max_samples)
    out = []
    for epoch in range(epochs):
        for r in rows:
            cands = row_candidates(catalog, r, split, protocol, seed, epoch)
            pool = [c for c in cands if c != r.target]
            negs = random.Random(stable_seed("negatives", split, r.index, seed, epoch)).sample(pool, num_negatives)
            out.append({
                "prompt": build_prompt(catalog, r.history, cands, template_for(split, r.index, seed, epoch)),
                "chosen": answer_text(catalog, r.target),
                "rejected": [answer_text(catalog, d) for d in negs],
                "history_ids": r.history, "target_id": r.target, "negative_ids": negs,
            })
    return out


# --------------------------------------------------------------------------------------------------
# Export (S-DPO JSON) and atomic writes


def sdpo_json_records(catalog, split, protocol="sdpo", seed=0, max_samples=None) -> list[dict]:
    rows = _select(load_split(catalog, split), max_samples)
    recs = []
    for r in rows:
        cands = row_candidates(catalog, r, split, protocol, seed)
        recs.append({
            "historyList": "::".join(catalog.names[i] for i in r.history),
            "itemList": [catalog.names[i] for i in cands],
            "trueSelection": catalog.names[r.target],
        })
    return recs


def export(dataset="lastfm", split="test", protocol="sdpo", output=None, seed=0, max_samples=None):
    """Write the S-DPO style JSON of a split (json.dump, indent=4, as published).

    Args:
        dataset: a dataset name under data/ or a dataset folder.
        split: train, val or test.
        protocol: the candidate protocol: sdpo (the published files, byte for byte) or clean.
        output: the JSON file to write (required).
        seed: seeds the clean candidates.
        max_samples: the first N rows (None: all).
    """
    check_protocol(protocol)
    if output is None:
        raise DataError("--output is required")
    catalog = load_catalog(dataset)
    recs = sdpo_json_records(catalog, split, protocol, seed, max_samples)
    cache.atomic_write_text(output, json.dumps(recs, indent=4))
    print(f"wrote {len(recs)} rows ({protocol} protocol, {split}) to {output}")


def heuristic(dataset="lastfm", split="test", protocol="sdpo", seed=0, max_samples=None):
    """Print the HR@1 of the seeded-candidate heuristic (no learning) under a protocol: 1.000 under sdpo.

    Args:
        dataset: a dataset name under data/ or a dataset folder.
        split: train, val or test.
        protocol: the candidate protocol: sdpo or clean.
        seed: seeds the clean candidates.
        max_samples: the first N rows (None: all).
    """
    catalog = load_catalog(dataset)
    rows = _select(load_split(catalog, split), max_samples)
    hr = seeded_candidate_heuristic(catalog, rows, split_candidates(catalog, rows, split, protocol, seed))
    print(json.dumps({"protocol": protocol, "split": split, "n_rows": len(rows), "seeded_candidate_hr@1": hr}))
    return hr


if __name__ == "__main__":
    import cli

    cli.run({"export": cli.validated(export), "heuristic": cli.validated(heuristic)})
