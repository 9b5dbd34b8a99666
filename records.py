"""The committed records of a run: each finished stage's copy under results/records/seed<N>/<method>/ (its
command, wall time and small outputs; an evaluation's per-row results), written the moment the stage ends and,
with --commit_records, git-committed at once, so that a fresh clone skips the stage and still reports it.
`stage` is a reproduce.Stage.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import cache
from methods import PROTOCOLS

REPO_DIR = cache.REPO_DIR
ROW_KEYS = ("index", "target_id", "top1_id", "generated_id", "constrained_id")  # per-row results committed


def read_json(path):
    """A JSON file's content; None when it is missing or damaged."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def save_record(stage, rec: dict, records) -> None:
    """Copy a finished stage's record into the committed folder `records` (<records>/<method>/stage_<name>.json,
    written last, so its presence means the rest is there): the command, its wall time and the stage's small
    outputs: an evaluation's metrics.json ("metrics") and, under the claims' protocol (`clean`), its per-row
    results for the paired verdicts (<name>.rows.json: index, target_id, top1_id and the decoded ids, ~40-60 KB
    for the 2,495 test rows, where predictions.jsonl, with every candidate's score, is ~2 MB); a training
    stage's napo_run.json ("run": its options and log_history; the adapter stays uncommitted). Committed, these let a fresh clone skip the stage and still report it (collect)."""
    done = read_json(REPO_DIR / stage.done_file)
    rec = dict(rec)
    if stage.name != "train":  # an evaluation (test or the sweep's validation)
        rec["metrics"] = done
        preds = (REPO_DIR / stage.done_file).parent / "predictions.jsonl"
        if preds.exists() and stage.name == f"eval_{PROTOCOLS[0]}":  # the claims' protocol: the paired verdicts
            rows = [json.loads(line) for line in preds.read_text().splitlines() if line.strip()]
            keys = [k for k in ROW_KEYS if rows and k in rows[0]]
            cache.atomic_write_text(stage.rows_file(records), json.dumps(
                {k: [r[k] for r in rows] for k in keys}, separators=(",", ":")) + "\n")
    elif stage.name == "train" and stage.module != "sasrec":
        rec["run"] = done
    cache.atomic_write_text(stage.committed_file(records), json.dumps(rec, indent=1) + "\n")


def commit_record(stage, records, seed) -> None:
    """--commit_records: git-commit a stage's committed record (and its per-row results) the moment it is saved,
    those files only (`git commit --only`: whatever else is staged or changed stays as it is), so a run on a
    machine that goes away keeps every stage it finished. A failure (no git, a busy index) is a warning."""
    files = [str(p) for p in (stage.committed_file(records), stage.rows_file(records)) if p.exists()]
    cwd = Path(files[0]).parent
    try:
        for cmd in (["git", "add", "--", *files],
                    ["git", "commit", "-q", "--only", "-m", f"records: {stage.key} (seed {seed})", "--", *files]):
            subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        why = (getattr(e, "stderr", None) or str(e)).strip().splitlines()
        print(f"warning: could not commit the record of {stage.key}: {why[-1] if why else e}", flush=True)
