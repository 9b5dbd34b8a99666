#!/usr/bin/env bash
# Evaluate an adapter (default: every stage's final adapter that exists, else the SFT one) on the test split.
#   ADAPTER=output/napo/final_checkpoint bash inference.sh        one adapter
#   bash inference.sh --adapter output/napo/final_checkpoint       the same
#   bash inference.sh --max_test_samples 200                        extra arguments go to inference.py
# Environment overrides: BASE_MODEL DATASET ADAPTER OUTPUT_DIR PROTOCOL MAX_TEST_SAMPLES NPROC
set -euo pipefail
source "$(dirname "$0")/launch.sh"
# --adapter X (or =X) among the arguments names the adapter, like ADAPTER=X (--resume_from_checkpoint: its old name)
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --adapter=*|--resume_from_checkpoint=*) ADAPTER="${1#*=}"; shift ;;
    --adapter|--resume_from_checkpoint)
      [ $# -ge 2 ] || { echo "error: $1 needs a value (the adapter folder)" >&2; exit 2; }
      ADAPTER="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
# every option's default is inference.py's (python inference.py --help); set here: the adapter and output folder
env_flags BASE_MODEL=base_model DATASET=dataset PROTOCOL=protocol MAX_TEST_SAMPLES=max_test_samples
run_one() {  # adapter, output dir, extra arguments
  launch inference.py --adapter "$1" --output_dir "$2" ${ENV_FLAGS[@]+"${ENV_FLAGS[@]}"} "${@:3}"
}
# the output folder is named after the protocol (clean: inference.py's default)
if [ -n "${ADAPTER:-}" ]; then
  run_one "$ADAPTER" "${OUTPUT_DIR:-$(dirname "$ADAPTER")/eval_${PROTOCOL:-clean}}" ${args[@]+"${args[@]}"}
else
  found=0
  for stage in sft dpo sdpo napo; do
    a="output/$stage/final_checkpoint"
    if [ -d "$a" ]; then found=1; run_one "$a" "output/$stage/eval_${PROTOCOL:-clean}" ${args[@]+"${args[@]}"}; fi
  done
  [ "$found" = 1 ] || { echo "error: no adapter under output/*/final_checkpoint; set ADAPTER=... or pass --adapter" >&2; exit 2; }
fi
