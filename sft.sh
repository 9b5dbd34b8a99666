#!/usr/bin/env bash
# Stage 1 — SFT (LoRA, answer-only loss). CPU default: the embedded model, 8,192 train rows, 1 epoch.
# Environment overrides: BASE_MODEL DATASET OUTPUT_DIR PROTOCOL MAX_TRAIN_SAMPLES EPOCHS BATCH_SIZE LR NPROC
# Extra arguments go to sft.py (python sft.py --help lists them all).
set -euo pipefail
source "$(dirname "$0")/launch.sh"
launch sft.py \
  --base_model "${BASE_MODEL:-tiny}" --dataset "${DATASET:-lastfm}" \
  --output_dir "${OUTPUT_DIR:-output/sft}" --protocol "${PROTOCOL:-clean}" \
  --max_train_samples "${MAX_TRAIN_SAMPLES:-8192}" --num_train_epochs "${EPOCHS:-1}" \
  --batch_size "${BATCH_SIZE:-16}" --learning_rate "${LR:-1e-3}" "$@"
