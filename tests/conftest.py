"""Shared test fixtures: small models built locally into a temporary cache (never the user's .cache)."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: one torch thread per worker, so 2 workers share 2
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"  # cores without oversubscribing them
import cache  # noqa: E402,F401  (the offline environment, before any test imports transformers)

# Tests build small models from the dataset in about a minute (a 150-step pretraining, list prompts as often
# as windows, so the embeddings carry item popularity and the item-token model answers from the list:
# tests/test_list_recall.py); item-token and pure-BPE variants.
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, pretrain_epochs=1, pretrain_recall=1.0, pretrain_lr=5e-3, pretrain_max_steps=150,
             probe_rows=100)


def cli_error(capsys, target, argv, default=None) -> str:
    """Run an entry point's CLI in this process; it must exit 2 with one last line `error: ...`, no traceback."""
    import cli

    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.run(target, argv=[str(a) for a in argv], default=default)
    assert info.value.code == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "\n" not in last
    return last


@pytest.fixture
def no_models(monkeypatch):
    """Loading or building any model (the LLM, the embedded build, SASRec) fails the test."""
    import modeling
    import sasrec
    import tiny_build

    def forbidden(*a, **k):
        raise AssertionError("a model was loaded or built before the bad input was reported")

    for mod, name in ((modeling, "load_base_model"), (tiny_build, "build_tiny"), (sasrec, "get_or_train_sasrec"),
                      (sasrec, "load_sasrec"), (sasrec, "train_sasrec")):
        monkeypatch.setattr(mod, name, forbidden)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    os.environ["NAPO_CACHE"] = str(tmp_path_factory.mktemp("napo_cache"))
    yield


@pytest.fixture(scope="session")
def small_model(tmp_path_factory):
    """A 2-layer Llama + item-token tokenizer for LastFM (briefly pretrained), as a local model folder."""
    import tiny_build

    return str(tiny_build.build_tiny("lastfm", tmp_path_factory.mktemp("small_model"), **SMALL))


@pytest.fixture(scope="session")
def small_bpe_model(tmp_path_factory):
    """The same without whole-title tokens, as tiny_build's research recipe tiny-bpe builds it: every title spans several BPE
    tokens, as in real LLMs."""
    import tiny_build

    return str(tiny_build.build_tiny("lastfm", tmp_path_factory.mktemp("small_bpe"), **{**tiny_build.TINY_BPE, **SMALL}))
