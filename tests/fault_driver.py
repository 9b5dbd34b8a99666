"""Run an entry script's CLI and SIGKILL the process at a chosen point (for tests/test_faults.py).

    python tests/fault_driver.py POINT SCRIPT [script arguments...]

POINT
  step:N         a training stage, at the end of optimizer step N
  saved:N        a training stage, once checkpoint-N is complete (after its napo_base.json)
  final_saved    save_final: the adapter, tokenizer and napo_run.json are in the temporary folder, not renamed yet
  batch:N        inference, before scoring batch N (1-based)
  after:NAME     right after the file NAME (e.g. predictions.jsonl) was put in place (atomic_write_text)
  replace:NAME   right before the rename that puts NAME (a file or folder) in place
The kill is a real SIGKILL of this process: no `finally`, no atexit, no flush of anything.
"""
import importlib
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cache  # noqa: E402
import cli  # noqa: E402
import stage  # noqa: E402


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str) -> None:
    kind, _, arg = point.partition(":")
    if kind in ("step", "saved"):
        n, make = int(arg), stage.base_record_callback

        def with_kill(info):
            cb = make(info)

            class Kill(type(cb)):
                def on_step_end(self, args, state, control, **kw):
                    if kind == "step" and state.global_step == n:
                        die()

                def on_save(self, args, state, control, **kw):
                    super().on_save(args, state, control, **kw)
                    if kind == "saved" and state.global_step == n:
                        die()

            return Kill()

        stage.base_record_callback = with_kill
    elif kind in ("final_saved", "after"):
        write = cache.atomic_write_text

        def write_then_die(path, text):
            write(path, text)
            p = Path(path)
            if kind == "after" and p.name == arg or \
                    kind == "final_saved" and p.name == "napo_run.json" and ".tmp" in p.parent.name:
                die()

        cache.atomic_write_text = write_then_die
    elif kind == "replace":
        replace = os.replace

        def die_before(src, dst):
            if Path(dst).name == arg:
                die()
            replace(src, dst)

        os.replace = die_before
    elif kind == "batch":
        import scoring

        score, calls = scoring.answer_logps, [0]

        def counted(*a, **k):
            calls[0] += 1
            if calls[0] == int(arg):
                die()
            return score(*a, **k)

        scoring.answer_logps = counted
    else:
        raise SystemExit(f"fault_driver: unknown point {point!r}")


if __name__ == "__main__":
    point, script, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    install(point)
    cli.run(importlib.import_module(script).main, argv=argv)
