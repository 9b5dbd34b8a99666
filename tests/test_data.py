"""Tests of data_interface.py: data integrity, byte parity with the published S-DPO files, the candidate
leak, candidate/prompt/row invariants, error handling on bad input, other datasets and .gz files.

Offline and light (CPU, a few seconds): LastFM checks use a few hundred rows; error cases use tiny synthetic
dataset folders built in tmp_path. Only the repo's own copy of the data is read (data/lastfm and
data/sdpo_reference.sha256), never ../shared.
"""

import gzip
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import data_interface as di  # noqa: E402
from data_interface import DataError  # noqa: E402

LASTFM = REPO / "data" / "lastfm"
REFERENCE_SUMS = REPO / "data" / "sdpo_reference.sha256"
N_ROWS = {"train": 47_872, "val": 2_767, "test": 2_495}
N_ITEMS = 4_606
FEW = 200  # rows per split for the invariant checks


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_sums(path) -> dict:
    """`<sha256>  <name>` lines -> {basename: sha256}."""
    sums = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[Path(name.strip()).name] = digest
    return sums


def run_py(args, env_extra=None, cwd=REPO):
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def cat():
    return di.load_catalog("lastfm")


def quoted(catalog, ids):
    """The expected prompt text for a list of items (written here, not with di.quote_titles)."""
    return ", ".join('"' + catalog.names[i] + '"' for i in ids)


def split_titles(text):
    assert text.startswith('"') and text.endswith('"'), text[:80]
    return text[1:-1].split('", "')


def parse_prompt(prompt):
    """-> (template index, history titles, candidate titles), recovered from the prompt text alone
    (templates may name the history and the candidates in either order)."""
    for t, tpl in enumerate(di.TEMPLATES):
        first, second = ("history", "candidates") if tpl.index("{history}") < tpl.index("{candidates}") \
            else ("candidates", "history")
        pre, rest = tpl.split("{" + first + "}")
        mid, post = rest.split("{" + second + "}")
        if prompt.startswith(pre) and prompt.endswith(post):
            body = prompt[len(pre):len(prompt) - len(post)]
            a, sep, b = body.partition(mid)
            assert sep, prompt
            parts = {first: split_titles(a), second: split_titles(b)}
            return t, parts["history"], parts["candidates"]
    raise AssertionError(f"prompt matches no template: {prompt[:100]!r}")


def title_ids(catalog, titles):
    return [catalog.name_to_id[t] for t in titles]  # LastFM names are unique (checked below)


# --------------------------------------------------------------------------------------------------
# Synthetic datasets (30 items) for loader and error tests

SYN_N = 30  # items; the padding id is 30


def syn_row(history, nxt, pad=SYN_N, width=10, len_seq=None):
    return {"seq": list(history) + [pad] * (width - len(history)),
            "len_seq": len(history) if len_seq is None else len_seq, "next": nxt}


def syn_rows(offset):
    """6 rows, 4 kept (len_seq >= 3). Line 1 is all padding with len_seq 1, as in LastFM (dropped)."""
    o = offset
    return [
        {"seq": [SYN_N] * 10, "len_seq": 1, "next": o},
        syn_row([o, o + 1], o + 2),
        syn_row([o, o + 1, o + 2], o + 3),
        syn_row([5, 3, 9], 12),                      # not sorted: checks history order in prompts
        syn_row([o + 1, o + 2, o + 3, o + 4, o + 5], o + 6),
        syn_row(list(range(20, 30)), 0),
    ]


def write_lines(path, lines, gz=False):
    text = "".join(line + "\n" for line in lines)
    if gz:
        with gzip.open(str(path) + ".gz", "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        Path(path).write_text(text, encoding="utf-8")


def make_dataset(folder, n_items=SYN_N, gz=False, names=None):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"Item-{i:02d}" for i in range(n_items)]
    write_lines(folder / "id2name.txt", [f"{i}::{nm}" for i, nm in enumerate(names)], gz=gz)
    for split, offset in (("train", 0), ("val", 4), ("test", 8)):
        write_lines(folder / f"{split}.jsonl", [json.dumps(r) for r in syn_rows(offset)], gz=gz)
    return folder


# --------------------------------------------------------------------------------------------------
# 1. Data integrity


def test_lastfm_files_match_checksums():
    sums = read_sums(LASTFM / "SHA256SUMS")
    assert set(sums) == {"id2name.txt", "train.jsonl", "val.jsonl", "test.jsonl"}
    for name, digest in sums.items():
        assert sha256_file(LASTFM / name) == digest, name


def test_lastfm_counts_items_and_padding(cat):
    assert cat.n_items == N_ITEMS and cat.pad_id == N_ITEMS
    assert len(set(cat.names)) == N_ITEMS  # unique names: titles map back to ids
    for split, n in N_ROWS.items():
        rows = di.load_split(cat, split)
        assert len(rows) == n, split
        assert [r.index for r in rows[:5]] == [0, 1, 2, 3, 4]
        assert all(len(r.history) >= 3 and cat.pad_id not in r.history for r in rows)
        # the kept rows are exactly the file's rows with len_seq >= 3, in order (counted independently)
        with open(LASTFM / f"{split}.jsonl") as f:
            raw = [json.loads(line) for line in f]
        kept = [o for o in raw if o["len_seq"] >= 3]
        assert len(kept) == n
        for r, o in zip(rows[:50], kept[:50]):
            assert r.history == o["seq"][:o["len_seq"]] and r.target == o["next"]


# --------------------------------------------------------------------------------------------------
# 2. Byte parity with the published S-DPO files


def test_export_cli_test_split_matches_sdpo_reference(tmp_path):
    out = tmp_path / "lastfm-test.json"
    res = run_py(["data_interface.py", "export", "--dataset", "lastfm", "--split", "test",
                  "--protocol", "sdpo", "--output", str(out)])
    assert res.returncode == 0, res.stderr
    assert sha256_file(out) == read_sums(REFERENCE_SUMS)["lastfm-test.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lastfm-test.json"]  # no temp file left


def test_export_inprocess_val_split_matches_sdpo_reference(tmp_path):
    out = tmp_path / "sub" / "lastfm-val.json"
    di.export(dataset="lastfm", split="val", protocol="sdpo", output=str(out))
    assert sha256_file(out) == read_sums(REFERENCE_SUMS)["lastfm-val.json"]
    recs = json.loads(out.read_text())
    assert len(recs) == N_ROWS["val"]
    assert set(recs[0]) == {"historyList", "itemList", "trueSelection"}


def test_clean_export_differs_from_published(tmp_path, cat):
    sdpo = di.sdpo_json_records(cat, "val", "sdpo", max_samples=20)
    clean = di.sdpo_json_records(cat, "val", "clean", max_samples=20)
    assert [r["trueSelection"] for r in sdpo] == [r["trueSelection"] for r in clean]
    assert all(a["itemList"] != b["itemList"] for a, b in zip(sdpo, clean))


# --------------------------------------------------------------------------------------------------
# 3. The leak


def test_seeded_candidate_heuristic_leak(cat):
    rows = di.load_split(cat, "test")[:300]
    leak = di.seeded_candidate_heuristic(cat, rows, di.split_candidates(cat, rows, "test", "sdpo"))
    clean = di.seeded_candidate_heuristic(cat, rows, di.split_candidates(cat, rows, "test", "clean"))
    assert leak == 1.0
    assert clean < 0.12  # chance is 1/20


# --------------------------------------------------------------------------------------------------
# 4. Candidate invariants


@pytest.mark.parametrize("protocol", ["sdpo", "clean"])
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_candidate_invariants(cat, split, protocol):
    rows = di.load_split(cat, split)[:FEW]
    for r, cands in zip(rows, di.split_candidates(cat, rows, split, protocol)):
        assert len(cands) == di.NUM_CANDIDATES == 20
        assert len(set(cands)) == 20
        assert cands.count(r.target) == 1
        assert not set(cands) & set(r.history)
        assert all(isinstance(c, int) and 0 <= c < cat.n_items for c in cands)


def test_sdpo_candidates_follow_published_rule_and_keep_global_rng(cat):
    r = di.load_split(cat, "test")[7]
    pool = [i for i in range(cat.n_items) if i not in set(r.history) | {r.target}]
    rng = random.Random(r.target)  # random.seed(x) and Random(x) give the same stream
    expected = rng.sample(pool, 19) + [r.target]
    random.Random(r.target).shuffle(expected)
    random.seed(123)
    before = [random.random() for _ in range(3)]
    random.seed(123)
    got = di.row_candidates(cat, r, "test", "sdpo")
    after = [random.random() for _ in range(3)]
    assert got == expected
    assert before == after  # the global RNG stream is not disturbed


def test_clean_differs_between_splits_for_same_row(cat):
    for r in di.load_split(cat, "train")[:50]:
        per_split = [di.row_candidates(cat, r, s, "clean") for s in di.SPLITS]
        assert per_split[0] != per_split[1] and per_split[1] != per_split[2] and per_split[0] != per_split[2]
    val = di.eval_rows(cat, "val", "clean", max_samples=30)
    test = di.eval_rows(cat, "test", "clean", max_samples=30)
    assert all(a["candidate_ids"] != b["candidate_ids"] for a, b in zip(val, test))


def test_clean_deterministic_for_seed_and_changes_with_seed(cat):
    rows = di.load_split(cat, "test")[:50]
    a = di.split_candidates(cat, rows, "test", "clean", seed=0)
    b = di.split_candidates(cat, rows, "test", "clean", seed=0)
    c = di.split_candidates(cat, rows, "test", "clean", seed=1)
    assert a == b
    assert all(x != y for x, y in zip(a, c))
    assert di.eval_rows(cat, "test", "clean", seed=3, max_samples=20) == \
        di.eval_rows(cat, "test", "clean", seed=3, max_samples=20)
    # sdpo ignores the seed: it is the published, target-seeded list
    assert di.split_candidates(cat, rows, "test", "sdpo", seed=0) == \
        di.split_candidates(cat, rows, "test", "sdpo", seed=5)


def _prompt_candidates_by_epoch(cat, out, n):
    """Epoch-major rows -> [epoch][row] candidate id lists parsed from the prompts."""
    return [[title_ids(cat, parse_prompt(o["prompt"])[2]) for o in out[e * n:(e + 1) * n]]
            for e in range(len(out) // n)]


@pytest.mark.parametrize("maker", ["sft", "pref"])
def test_training_candidates_per_epoch(cat, maker):
    n = 40
    rows = di.load_split(cat, "train")[:n]

    def build(protocol):
        if maker == "sft":
            return di.sft_rows(cat, "train", protocol, epochs=2, max_samples=n)
        return di.preference_rows(cat, "train", protocol, num_negatives=3, epochs=2, max_samples=n)

    clean = build("clean")
    assert len(clean) == 2 * n
    e0, e1 = _prompt_candidates_by_epoch(cat, clean, n)
    assert all(a != b for a, b in zip(e0, e1))  # re-drawn each epoch
    for e, lists in enumerate((e0, e1)):
        assert lists == [di.row_candidates(cat, r, "train", "clean", 0, e) for r in rows]

    s0, s1 = _prompt_candidates_by_epoch(cat, build("sdpo"), n)
    assert s0 == s1 == di.split_candidates(cat, rows, "train", "sdpo")


def test_stable_seed_is_a_documented_stable_value():
    expected = int.from_bytes(hashlib.sha256(b"candidates|test|5|0|1").digest()[:8], "big") >> 1
    assert expected == 3679654956293379355  # computed once; must never change
    assert di.stable_seed("candidates", "test", 5, 0, 1) == expected
    assert 0 <= di.stable_seed("x") < 2 ** 63
    assert di.stable_seed("candidates", "test", 5, 0, 1) != di.stable_seed("candidates", "val", 5, 0, 1)
    code = "import data_interface as d; print(d.stable_seed('candidates', 'test', 5, 0, 1))"
    for hashseed in ("0", "12345"):
        res = run_py(["-c", code], {"PYTHONHASHSEED": hashseed})
        assert res.returncode == 0, res.stderr
        assert int(res.stdout.strip()) == expected


# --------------------------------------------------------------------------------------------------
# 5. Prompts


def test_templates_end_with_answer():
    assert len(di.TEMPLATES) >= 2
    for tpl in di.TEMPLATES:
        assert tpl.endswith("Answer:")
        assert tpl.count("{history}") == 1 and tpl.count("{candidates}") == 1


def test_prompts_list_history_and_candidates(cat):
    rows = di.load_split(cat, "val")[:FEW]
    ev = di.eval_rows(cat, "val", "clean", max_samples=FEW)
    used = set()
    for r, e in zip(rows, ev):
        p = e["prompt"]
        assert p.endswith("Answer:")
        assert e["history_ids"] == r.history and e["target_id"] == r.target
        assert quoted(cat, r.history) in p            # every history title, quoted, oldest first
        assert quoted(cat, e["candidate_ids"]) in p   # every candidate title, quoted, in list order
        t, hist, cands = parse_prompt(p)
        assert title_ids(cat, hist) == r.history
        assert title_ids(cat, cands) == e["candidate_ids"]
        assert t == di.template_for("val", r.index, 0)
        used.add(t)
    assert used == set(range(len(di.TEMPLATES)))     # the seeded choice uses every template


def test_template_choice_is_seeded(cat):
    a = [parse_prompt(e["prompt"])[0] for e in di.eval_rows(cat, "test", "sdpo", seed=0, max_samples=60)]
    b = [parse_prompt(e["prompt"])[0] for e in di.eval_rows(cat, "test", "sdpo", seed=0, max_samples=60)]
    c = [parse_prompt(e["prompt"])[0] for e in di.eval_rows(cat, "test", "sdpo", seed=1, max_samples=60)]
    assert a == b
    assert a != c
    assert [di.template_for("test", i, 0) for i in range(60)] == a


def test_prompt_history_order_oldest_first(tmp_path):
    """Synthetic row seq [5, 3, 9]: the titles appear in exactly that (file) order."""
    c = di.load_catalog(make_dataset(tmp_path / "syn"))
    row = next(r for r in di.load_split(c, "test") if r.history == [5, 3, 9])
    for t in range(len(di.TEMPLATES)):
        p = di.build_prompt(c, row.history, [1, 2], template=t)
        pos = [p.index('"Item-05"'), p.index('"Item-03"'), p.index('"Item-09"')]
        assert pos == sorted(pos)
        # the project's templates list the candidates first and end with the history, then the question
        assert p.index('"Item-01"') < p.index('"Item-02"') < p.index('"Item-05"')
        assert p.endswith("Answer:")


# --------------------------------------------------------------------------------------------------
# 6. SFT and preference rows


def test_sft_rows(cat):
    rows = di.load_split(cat, "train")[:FEW]
    out = di.sft_rows(cat, "train", "clean", max_samples=FEW)
    assert len(out) == FEW
    for r, o in zip(rows, out):
        assert set(o) >= {"prompt", "completion"}
        assert o["completion"] == " " + cat.names[r.target]
        _, hist, cands = parse_prompt(o["prompt"])
        assert title_ids(cat, hist) == r.history
        assert r.target in title_ids(cat, cands)


@pytest.mark.parametrize("protocol", ["clean", "sdpo"])
@pytest.mark.parametrize("k", [1, 3, 19])
def test_preference_rows(cat, protocol, k):
    n = 60
    rows = di.load_split(cat, "train")[:n]
    out = di.preference_rows(cat, "train", protocol, num_negatives=k, max_samples=n)
    assert len(out) == n
    for r, o in zip(rows, out):
        assert o["history_ids"] == r.history and o["target_id"] == r.target
        assert o["chosen"] == " " + cat.names[r.target]
        _, _, cand_titles = parse_prompt(o["prompt"])
        non_target = {" " + t for t in cand_titles} - {o["chosen"]}
        assert len(non_target) == 19
        assert len(o["rejected"]) == k == len(set(o["rejected"]))
        assert set(o["rejected"]) <= non_target
        assert o["chosen"] not in o["rejected"]
        assert [" " + cat.names[i] for i in o["negative_ids"]] == o["rejected"]
        assert r.target not in o["negative_ids"]
        if k == 19:
            assert set(o["rejected"]) == non_target
    assert out == di.preference_rows(cat, "train", protocol, num_negatives=k, max_samples=n)  # seeded


@pytest.mark.parametrize("k", [0, 20, -1])
def test_preference_rows_bad_num_negatives(cat, k):
    import cli

    with pytest.raises(cli.OptionError, match="--num_negatives"):
        di.preference_rows(cat, "train", "clean", num_negatives=k, max_samples=5)


# --------------------------------------------------------------------------------------------------
# 7. Bad input: one-line DataError naming the file/line/flag, nothing written


def _bad_line(folder, split, lineno, text):
    """Replace line `lineno` (1-based) of a split file."""
    path = folder / f"{split}.jsonl"
    lines = path.read_text().splitlines()
    lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n")


PAD = SYN_N
BAD_CASES = {
    # name: (mutation, export kwargs, substrings the message must contain)
    "missing_id2name": (lambda f: (f / "id2name.txt").unlink(), {}, ["id2name.txt", "not found"]),
    "missing_split": (lambda f: (f / "test.jsonl").unlink(), {}, ["test.jsonl", "not found"]),
    "malformed_json": (lambda f: _bad_line(f, "test", 3, '{"seq": [1, 2, 3'), {}, ["test.jsonl:3"]),
    "missing_key": (lambda f: _bad_line(f, "test", 4, '{"seq": [1, 2, 3], "len_seq": 3}'), {},
                    ["test.jsonl:4", "next"]),
    "unknown_id_in_seq": (lambda f: _bad_line(f, "test", 5, json.dumps(syn_row([1, 99, 2], 4))), {},
                          ["test.jsonl:5", "unknown item id 99"]),
    "unknown_id_in_next": (lambda f: _bad_line(f, "test", 3, json.dumps(syn_row([1, 2, 3], 77))), {},
                           ["test.jsonl:3", "unknown item id 77"]),
    "unknown_id_in_padded_tail": (lambda f: _bad_line(f, "test", 3, json.dumps(
        {"seq": [1, 2, 3, 99999] + [PAD] * 6, "len_seq": 3, "next": 4})), {},
        ["test.jsonl:3", "unknown item id 99999"]),
    "negative_id": (lambda f: _bad_line(f, "test", 3, json.dumps(syn_row([1, -2, 3], 4))), {},
                    ["test.jsonl:3", "unknown item id -2"]),
    "padding_only_history": (lambda f: _bad_line(f, "test", 4, json.dumps(syn_row([PAD] * 4, 4))), {},
                             ["test.jsonl:4", "only padding"]),
    "padding_inside_history": (lambda f: _bad_line(f, "test", 6, json.dumps(syn_row([1, PAD, 2], 4))), {},
                               ["test.jsonl:6", "padding id 30 inside"]),
    "len_seq_too_long": (lambda f: _bad_line(f, "test", 3, json.dumps(syn_row([1, 2, 3], 4, width=3,
                                                                            len_seq=5))), {},
                         ["test.jsonl:3", "len_seq"]),
    "duplicate_item_id": (lambda f: (f / "id2name.txt").write_text("0::A\n1::B\n1::C\n"), {},
                          ["id2name.txt:3", "duplicate"]),
    "ids_not_from_zero": (lambda f: (f / "id2name.txt").write_text(
        "".join(f"{i}::Item-{i}\n" for i in range(1, SYN_N + 1))), {}, ["id2name.txt", "0.."]),
    "id_gap": (lambda f: (f / "id2name.txt").write_text(
        "".join(f"{i}::Item-{i}\n" for i in range(SYN_N + 1) if i != 17)), {}, ["id2name.txt", "17"]),
    "no_separator": (lambda f: (f / "id2name.txt").write_text("0::A\n1 B\n"), {}, ["id2name.txt:2"]),
    "bad_protocol": (lambda f: None, {"protocol": "leaky"}, ["--protocol", "leaky"]),
    "bad_split": (lambda f: None, {"split": "dev"}, ["--split", "dev"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_raises_one_line_error_and_writes_nothing(tmp_path, case):
    mutate, kwargs, needles = BAD_CASES[case]
    folder = make_dataset(tmp_path / "ds")
    mutate(folder)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = dict(dataset=str(folder), split="test", protocol="sdpo", output=str(out_dir / "x.json"))
    args.update(kwargs)
    with pytest.raises(DataError) as info:
        di.export(**args)
    msg = str(info.value)
    assert "\n" not in msg and msg.strip() == msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    if any(n.endswith((".txt", ".jsonl")) or ".jsonl:" in n or ".txt:" in n for n in needles):
        assert str(folder.resolve()) in msg  # the full path of the file
    assert list(out_dir.iterdir()) == []


def test_bad_dataset_name():
    with pytest.raises(DataError, match="--dataset"):
        di.load_catalog("no_such_dataset_xyz")


def test_failed_write_leaves_no_temp_file(tmp_path):
    folder = make_dataset(tmp_path / "ds")
    out_dir = tmp_path / "out"
    (out_dir / "x.json").mkdir(parents=True)  # the target is a folder: the final rename fails
    with pytest.raises((OSError, DataError)):
        di.export(dataset=str(folder), split="test", protocol="sdpo", output=str(out_dir / "x.json"))
    assert [p.name for p in out_dir.iterdir()] == ["x.json"]


def test_cli_bad_input_single_error_line(tmp_path):
    folder = make_dataset(tmp_path / "ds")
    _bad_line(folder, "test", 3, "not json at all")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    res = run_py([str(REPO / "data_interface.py"), "export", "--dataset", str(folder), "--split", "test",
                  "--protocol", "sdpo", "--output", str(out_dir / "x.json")])
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error:") and "test.jsonl:3" in lines[0]
    assert list(out_dir.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# 8. Other datasets laid out the same way; .gz files


def _check_synthetic(folder):
    c = di.load_catalog(str(folder))
    assert c.n_items == SYN_N and c.pad_id == SYN_N and c.name == "syn"
    assert c.names[7] == "Item-07"
    for split, offset in (("train", 0), ("val", 4), ("test", 8)):
        rows = di.load_split(c, split)
        assert [r.index for r in rows] == [0, 1, 2, 3]
        assert [r.history for r in rows] == [[offset, offset + 1, offset + 2], [5, 3, 9],
                                             list(range(offset + 1, offset + 6)), list(range(20, 30))]
        assert [r.target for r in rows] == [offset + 3, 12, offset + 6, 0]
        for protocol in di.PROTOCOLS:
            for r, cands in zip(rows, di.split_candidates(c, rows, split, protocol)):
                assert len(set(cands)) == 20 and r.target in cands and not set(cands) & set(r.history)
                assert all(0 <= x < SYN_N for x in cands)
    assert len(di.preference_rows(c, "train", "clean", num_negatives=19, epochs=2)) == 8
    return c


def test_synthetic_folder_dataset_loads(tmp_path):
    folder = make_dataset(tmp_path / "syn")
    _check_synthetic(folder)
    out = tmp_path / "out.json"
    di.export(dataset=str(folder), split="val", protocol="sdpo", output=str(out))
    recs = json.loads(out.read_text())
    assert len(recs) == 4 and recs[1]["historyList"] == "Item-05::Item-03::Item-09"


def test_pad_id_follows_id2name(tmp_path):
    """A dataset with 25 items pads with 25; the LastFM pad id 4606 (or 30) is an unknown id there."""
    folder = tmp_path / "small"
    folder.mkdir()
    write_lines(folder / "id2name.txt", [f"{i}::Song {i}" for i in range(25)])
    ok = [json.dumps(syn_row([1, 2, 3], 4, pad=25)), json.dumps(syn_row([3, 2, 1, 0], 24, pad=25))]
    for split in di.SPLITS:
        write_lines(folder / f"{split}.jsonl", ok)
    c = di.load_catalog(str(folder))
    assert (c.n_items, c.pad_id) == (25, 25)
    assert [r.history for r in di.load_split(c, "val")] == [[1, 2, 3], [3, 2, 1, 0]]
    write_lines(folder / "test.jsonl", ok + [json.dumps(syn_row([1, 25, 3], 4, pad=25))])
    with pytest.raises(DataError, match=r"test\.jsonl:3: padding id 25"):
        di.load_split(c, "test")
    # rows padded with another dataset's padding id (30) do not belong to this catalog
    write_lines(folder / "train.jsonl", ok + [json.dumps(syn_row([1, 2, 3], 4, pad=30))])
    with pytest.raises(DataError, match=r"train\.jsonl:3: unknown item id 30"):
        di.load_split(c, "train")


def test_gzip_variants_load(tmp_path):
    folder = make_dataset(tmp_path / "syn", gz=True)
    assert not (folder / "id2name.txt").exists() and (folder / "id2name.txt.gz").exists()
    assert not (folder / "train.jsonl").exists() and (folder / "train.jsonl.gz").exists()
    c = _check_synthetic(folder)
    plain = di.load_catalog(str(make_dataset(tmp_path / "plain" / "syn")))
    assert c.names == plain.names
    for split in di.SPLITS:
        assert di.sdpo_json_records(c, split) == di.sdpo_json_records(plain, split)
