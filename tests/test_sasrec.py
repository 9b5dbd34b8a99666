"""Tests of sasrec.py on small synthetic catalogs written in the dataset layout (offline, CPU, seconds)."""
import json
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import data_interface as di  # noqa: E402
import sasrec  # noqa: E402

N_ITEMS = 40


def write_dataset(folder: Path, n_items=N_ITEMS, n_rows=(1500, 200, 200), seed=0) -> Path:
    """A dataset with a strong deterministic pattern: next item = (last history item + 1) mod n."""
    folder.mkdir(parents=True)
    (folder / "id2name.txt").write_text("".join(f"{i}::Artist {i}\n" for i in range(n_items)))
    rng = random.Random(seed)
    for split, n in zip(di.SPLITS, n_rows):
        lines = []
        for _ in range(n):
            last = rng.randrange(n_items)
            nxt = (last + 1) % n_items
            others = [i for i in range(n_items) if i not in (last, nxt)]  # target never in the history
            hist = rng.sample(others, rng.randint(2, 9)) + [last]
            seq = hist + [n_items] * (10 - len(hist))
            lines.append(json.dumps({"seq": seq, "len_seq": len(hist), "next": nxt}))
        lines.append(json.dumps({"seq": [1, 2] + [n_items] * 8, "len_seq": 2, "next": 3}))  # dropped row
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


FAST = dict(epochs=12, batch_size=64, lr=5e-3, dropout=0.1, patience=100, verbose=False)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "synth")


@pytest.fixture(scope="module")
def trained(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "sasrec"
    model, info = sasrec.train_sasrec(str(synth), output_dir=out, **FAST)
    return model, info, out


def random_model(n_items=N_ITEMS, seed=0):
    torch.manual_seed(seed)
    return sasrec.SASRec(sasrec.SASRecConfig(n_items=n_items)).eval()


def test_shapes_and_left_padding():
    m = random_model()
    hists = [[1, 2, 3], list(range(10)), list(range(12))]  # 12 ids: keeps the newest 10
    ids = m.pad(hists)
    assert ids.shape == (3, 10)
    assert ids[0].tolist() == [N_ITEMS] * 7 + [1, 2, 3]
    assert ids[2].tolist() == list(range(2, 12))
    h = m.user_vectors(hists)
    assert h.shape == (3, 64)
    assert m.item_scores(h).shape == (3, N_ITEMS)
    assert m.item_emb_out.weight.shape == (N_ITEMS, 64) and m.item_emb_out.bias.shape == (N_ITEMS,)
    w, b = m.output_layer()
    assert w is m.item_emb_out.weight and b is m.item_emb_out.bias and m.config["n_items"] == N_ITEMS
    assert torch.isfinite(h).all()
    with pytest.raises(ValueError, match="history 1"):
        m.pad([[1, 2], []])
    with pytest.raises(ValueError, match="outside"):
        m.pad([[1, N_ITEMS]])


def test_user_vector_ignores_padding_and_batch():
    m = random_model()
    short = [5, 9, 2]
    alone = m.user_vectors([short])
    batched = m.user_vectors([list(range(10)), short, [7, 8, 9, 10, 11]])
    assert torch.allclose(alone[0], batched[1], atol=1e-6)
    # A tensor padded on the right (as a collator does), or wider than max_len, gives the same vectors.
    right = torch.tensor([[5, 9, 2] + [N_ITEMS] * 9, list(range(12))])
    h_tensor = m.user_vectors(right)
    assert torch.allclose(h_tensor, m.user_vectors([short, list(range(2, 12))]), atol=1e-6)
    assert m.pad(right)[0].tolist() == [N_ITEMS] * 7 + short
    with pytest.raises(ValueError, match="only padding"):
        m.pad(torch.full((1, 4), N_ITEMS))
    # Padding keys are masked: whatever the padding embedding holds, h does not move.
    with torch.no_grad():
        m.item_emb.weight[m.pad_id].normal_(std=5.0)
    assert torch.allclose(m.user_vectors([short])[0], alone[0], atol=1e-6)
    # ... while a real item in the history does matter (the check above could fail).
    assert not torch.allclose(m.user_vectors([[4, 5, 9, 2]])[0], alone[0], atol=1e-3)


def test_score_candidates_equals_gathered_item_scores():
    m = random_model()
    hists = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
    cands = [[3, 0, 39, 17], [1, 2, 11, 5]]
    full = m.item_scores(m.user_vectors(hists))
    expected = full.gather(1, torch.tensor(cands))
    assert torch.allclose(m.score_candidates(hists, cands), expected, atol=1e-5)
    # the same as h_u . w_e + b_e done by hand for one entry
    h = m.user_vectors(hists)
    manual = h[1] @ m.item_emb_out.weight[11] + m.item_emb_out.bias[11]
    assert torch.allclose(m.score_candidates(hists, cands)[1, 2], manual, atol=1e-5)


def test_training_learns_the_pattern(trained, synth):
    model, info, _ = trained
    assert info["val_metric"]["value"] > 0.9  # chance is 0.05 with 20 candidates
    catalog = di.load_catalog(synth)
    res = sasrec.evaluate_sasrec(model, catalog, split="test", protocol="clean")
    assert res["model"] == "sasrec" and res["protocol"] == "clean" and res["n_rows"] == 200
    assert res["ranking"]["hr@1"] > 0.9
    assert set(res["popularity"]) >= {"top1_popularity_pct", "hr@1_tail"}


def test_save_load_round_trip(trained, synth, tmp_path):
    model, info, out = trained
    cfg = json.loads((out / sasrec.CONFIG_FILE).read_text())
    assert cfg["n_items"] == N_ITEMS and cfg["dataset"] == "synth" and len(cfg["fingerprint"]) == 16
    assert cfg["epochs_run"] == FAST["epochs"] and cfg["val_metric"]["value"] == info["val_metric"]["value"]
    catalog = di.load_catalog(synth)
    loaded = sasrec.load_sasrec(out, catalog)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    hists, cands = [[1, 2, 3], [9, 8, 7, 6]], [[4, 0, 1, 2], [7, 10, 30, 33]]
    with torch.no_grad():
        assert torch.equal(model.score_candidates(hists, cands), loaded.score_candidates(hists, cands))
    assert torch.equal(sasrec.load_sasrec(out / sasrec.WEIGHTS_FILE).item_emb_out.bias, loaded.item_emb_out.bias)

    other = di.load_catalog(write_dataset(tmp_path / "other", n_items=N_ITEMS + 1, n_rows=(30, 30, 30)))
    with pytest.raises(ValueError, match=f"{N_ITEMS} items.*{N_ITEMS + 1} items") as err:
        sasrec.load_sasrec(out, other)
    assert "\n" not in str(err.value) and str(out) in str(err.value)


def test_corrupt_weights_are_rejected(trained, tmp_path):
    _, _, out = trained
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / sasrec.CONFIG_FILE).write_bytes((out / sasrec.CONFIG_FILE).read_bytes())
    (copy / sasrec.WEIGHTS_FILE).write_bytes((out / sasrec.WEIGHTS_FILE).read_bytes()[:-100])
    with pytest.raises(ValueError, match="do not match"):
        sasrec.load_sasrec(copy)
    with pytest.raises(ValueError, match="not a SASRec checkpoint"):
        sasrec.load_sasrec(tmp_path)


def test_same_seed_same_weights(synth):
    kw = dict(FAST, epochs=2, max_train_samples=300)
    torch.set_num_threads(2)
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    a, _ = sasrec.train_sasrec(str(synth), seed=3, **kw)
    # the caller's thread count and global RNG stream are untouched by training
    assert torch.get_num_threads() == 2 and torch.equal(torch.rand(3), expected_draw)
    b, _ = sasrec.train_sasrec(str(synth), seed=3, **kw)
    c, _ = sasrec.train_sasrec(str(synth), seed=4, **kw)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["item_emb_out.weight"], sc["item_emb_out.weight"])


def test_get_or_train_caches(synth, tmp_path, monkeypatch):
    monkeypatch.setenv("NAPO_CACHE", str(tmp_path / "cache"))
    kw = dict(epochs=1, max_train_samples=200, verbose=False)
    first = sasrec.get_or_train_sasrec(str(synth), **kw)
    folders = [p for p in (tmp_path / "cache" / "sasrec").iterdir() if p.suffix != ".lock"]  # cache.build_once's lock
    assert len(folders) == 1 and folders[0].name.startswith("synth-")  # no temporary folder left behind
    assert (folders[0] / sasrec.WEIGHTS_FILE).exists()

    def no_training(*a, **k):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(sasrec, "train_sasrec", no_training)
    second = sasrec.get_or_train_sasrec(str(synth), **kw)
    assert torch.equal(first.item_emb_out.weight, second.item_emb_out.weight)


def test_train_cli_writes_metrics_for_both_protocols(synth, tmp_path, capsys):
    out = tmp_path / "run"
    sasrec.train(str(synth), output_dir=str(out), epochs=1, max_train_samples=200, time_budget_s=None)
    for protocol in di.PROTOCOLS:
        res = json.loads((out / f"metrics_{protocol}.json").read_text())
        assert res["protocol"] == protocol and res["split"] == "test" and 0.0 <= res["ranking"]["hr@1"] <= 1.0
    assert capsys.readouterr().out.count("sasrec test [") == 2
    sasrec.evaluate(str(out), protocol="sdpo")
    assert "[sdpo]" in capsys.readouterr().out
