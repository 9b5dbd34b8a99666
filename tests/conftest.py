"""Shared test fixtures: small models built locally into a temporary cache (never the user's .cache)."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tests build small models from the dataset in about a minute (a 150-step pretraining, list prompts as often
# as windows, so the embeddings carry item popularity and the item-token model answers from the list:
# tests/test_list_recall.py); item-token and pure-BPE variants.
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, pretrain_epochs=1, pretrain_recall=1.0, pretrain_lr=5e-3, pretrain_max_steps=150,
             probe_rows=100)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    os.environ["NAPO_CACHE"] = str(tmp_path_factory.mktemp("napo_cache"))
    yield


@pytest.fixture(scope="session")
def small_model(tmp_path_factory):
    """A 2-layer Llama + item-token tokenizer for LastFM (briefly pretrained), as a local model folder."""
    import modeling

    return str(modeling.build_tiny("lastfm", tmp_path_factory.mktemp("small_model"), **SMALL))


@pytest.fixture(scope="session")
def small_bpe_model(tmp_path_factory):
    """The same without whole-title tokens, as --base_model tiny-bpe builds it: every title spans several BPE
    tokens, as in real LLMs."""
    import modeling

    return str(modeling.build_tiny("lastfm", tmp_path_factory.mktemp("small_bpe"), **{**modeling.TINY_BPE, **SMALL}))
