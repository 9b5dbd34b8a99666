"""`python X.py --help` prints a line of help for every flag of every entry script: fire reads each function's
docstring (its `Args:` section), so every parameter of every command must be described there."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fire import docstrings

REPO = Path(__file__).resolve().parents[1]
ENTRIES = {  # script -> its commands (None: the script's one function)
    "sft": {None: "main"}, "dpo": {None: "main"}, "softmax_dpo": {None: "main"}, "inference": {None: "main"},
    "sasrec": {"train": "train", "evaluate": "evaluate"}, "data_interface": {"export": "export", "heuristic": "heuristic"},
    "list_recall": {"probe": "probe", "window": "window"}, "tiny_build": {"build": "build"},
    "benchmark": {"training": "main", "build": "build"},
    "reproduce": {c: c for c in ("run", "sweep", "report", "readme", "commands", "baseline")},
    "plots": {"results": "draw_results"}, "framework_diagram": {None: "draw_framework"},
}


@pytest.mark.parametrize("script", sorted(ENTRIES))
def test_every_flag_has_a_line_of_help(script):
    import importlib
    import inspect

    module = importlib.import_module(script)
    for command, name in ENTRIES[script].items():
        fn = getattr(module, name)
        info = docstrings.parse(inspect.getdoc(fn) or "")
        described = {a.name: a.description for a in info.args or []}
        params = [p for p in inspect.signature(fn).parameters.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        missing = [p.name for p in params if not (described.get(p.name) or "").strip()]
        assert not missing, f"{script} {command or ''}: no help for --{', --'.join(missing)}"


def test_help_prints_the_training_options_once_with_their_help():
    """`python dpo.py --help` (fire's own help screen) shows a common training option and a stage's own, with help."""
    r = subprocess.run([sys.executable, str(REPO / "dpo.py"), "--help"], capture_output=True, text=True,
                       env={**os.environ, "PAGER": "cat"}, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    text = r.stdout + r.stderr  # fire writes its help screen to stderr when it has no terminal
    assert "--start_adapter" in text and "the LoRA adapter this stage starts from" in text
    assert "--beta" in text and "sigmoid" in text and "Default: 8" in text  # dpo's own batch size
    assert "GROUP" not in text and text.count("--learning_rate") == 1


@pytest.mark.parametrize("script", ["gpu_check", "smollm2_check", "memory_estimate"])
def test_argparse_scripts_have_a_line_of_help_for_every_flag(script, monkeypatch):
    """The three argparse scripts: every flag of their parser carries a help text (`--help` prints it)."""
    import argparse
    import importlib

    seen = {}

    def grab(self, args=None, namespace=None):
        seen["parser"] = self
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    with pytest.raises(SystemExit):
        importlib.import_module(script).parse_args([])
    flags = [a for a in seen["parser"]._actions if a.option_strings and a.dest != "help"]
    assert flags and not [a.option_strings[-1] for a in flags if not (a.help or "").strip()]
