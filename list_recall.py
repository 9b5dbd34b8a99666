"""List recall on the command line: does a model answer with one of the candidates its prompt lists, and does it
rank them as its own sequence knowledge does? (The measures: probes.py.)

    python list_recall.py probe --model tiny [--adapter A]      P(answer ∈ list) on 500 content-free prompts
    python list_recall.py window --model tiny [--adapter A]     window vs answer HR@1 on evaluation rows

The embedded model's build runs the probe and records it in napo_build.json (tiny_build.build_tiny).
"""
from __future__ import annotations

import json

import cli
import data_interface as di
import modeling
import probes


def _load(model, dataset, adapter):
    m, tok, _ = modeling.load_base_model(model, dataset, quantize="none", for_training=False)
    if adapter:
        m = modeling.load_adapter(m, adapter)
    m.eval()
    return m, tok


def probe(model: str = "tiny", dataset: str = "lastfm", rows: int = 500, adapter: str = None):
    """The list-recall probe (probes.list_recall_probe) of a base model, optionally with an adapter; prints JSON.

    Args:
        model: tiny, tiny-nocopy, smollm2-135m or a local model folder.
        dataset: a dataset name under data/ or a dataset folder.
        rows: how many content-free prompts.
        adapter: a LoRA adapter folder to put on the model first.
    """
    m, tok = _load(model, dataset, adapter)
    result = {"model": model, "adapter": adapter, **probes.list_recall_probe(m, tok, di.load_catalog(dataset), int(rows))}
    print(json.dumps(result))
    return result


def window(model: str = "tiny", dataset: str = "lastfm", adapter: str = None, split: str = "test",
           protocol: str = "clean", max_test_samples: int = 500, seed: int = 0):
    """probes.window_ranking of a base model (optionally with an adapter) on the first N rows of a split.

    Args:
        model: tiny, tiny-nocopy, smollm2-135m or a local model folder.
        dataset: a dataset name under data/ or a dataset folder.
        adapter: a LoRA adapter folder to put on the model first.
        split: test, val or train.
        protocol: clean or sdpo (the candidates of each row).
        max_test_samples: the first N rows (-1: all).
        seed: seeds the clean candidates and the prompt templates.
    """
    catalog = di.load_catalog(dataset)
    rows = di.eval_rows(catalog, split, protocol, seed, max_test_samples)
    m, tok = _load(model, dataset, adapter)
    result = {"model": model, "adapter": adapter, "split": split, "protocol": protocol,
              **probes.window_ranking(m, tok, catalog, rows)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    cli.run({"probe": cli.validated(probe), "window": cli.validated(window)})
