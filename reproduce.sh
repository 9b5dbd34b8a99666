#!/usr/bin/env bash
# The method comparison, ablations, protocol leak and plots in one command (see reproduce.py for the table).
#   bash reproduce.sh                          everything (embedded model, seed 0, full LastFM test split)
#   bash reproduce.sh --quick                  plumbing check on a small model and a few rows
#   bash reproduce.sh --methods sft,sdpo,napo  a subset;  --sft_rows/--pref_rows/--test_rows N: scale
#   bash reproduce.sh --seeds 0,1,2            each seed's chain (seed N in results/runs/seed<N>)
# Each finished stage is recorded in results/records/ (commit it): a fresh clone skips the recorded stages.
# Finished stages are skipped, so an interrupted run continues. Then: python reproduce.py readme
# One torch thread per stage by default: on this shared 2-core CPU, 2 threads were measured several times
# slower under contention (export OMP_NUM_THREADS=2 on an idle machine).
set -euo pipefail
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1  # the offline environment: cache.py
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "${PYTHON:-python3}" reproduce.py run "$@"
