#!/usr/bin/env bash
# Evaluate an adapter (default: every stage's final adapter that exists, else the SFT one) on the test split.
#   ADAPTER=output/napo/final_checkpoint bash inference.sh        one adapter
#   bash inference.sh --max_test_samples 200                        extra arguments go to inference.py
# Environment overrides: BASE_MODEL DATASET ADAPTER OUTPUT_DIR PROTOCOL MAX_TEST_SAMPLES NPROC
set -euo pipefail
source "$(dirname "$0")/launch.sh"
run_one() {  # adapter, output dir
  launch inference.py --base_model "${BASE_MODEL:-tiny}" --dataset "${DATASET:-lastfm}" \
    --resume_from_checkpoint "$1" --output_dir "$2" --protocol "${PROTOCOL:-clean}" \
    --max_test_samples "${MAX_TEST_SAMPLES:--1}" "${@:3}"
}
if [ -n "${ADAPTER:-}" ]; then
  run_one "$ADAPTER" "${OUTPUT_DIR:-$(dirname "$ADAPTER")/eval_${PROTOCOL:-clean}}" "$@"
else
  found=0
  for stage in sft dpo sdpo napo; do
    a="output/$stage/final_checkpoint"
    if [ -d "$a" ]; then found=1; run_one "$a" "output/$stage/eval_${PROTOCOL:-clean}" "$@"; fi
  done
  [ "$found" = 1 ] || { echo "error: no adapter under output/*/final_checkpoint; set ADAPTER=..." >&2; exit 1; }
fi
