#!/usr/bin/env bash
# Stage 2a — DPO with TRL's own DPOTrainer (1 negative), starting from the SFT adapter.
# Environment overrides: BASE_MODEL DATASET SFT_ADAPTER OUTPUT_DIR PROTOCOL MAX_TRAIN_SAMPLES EPOCHS BATCH_SIZE LR BETA NPROC
set -euo pipefail
source "$(dirname "$0")/launch.sh"
launch dpo.py \
  --base_model "${BASE_MODEL:-tiny}" --dataset "${DATASET:-lastfm}" \
  --resume_from_checkpoint "${SFT_ADAPTER:-output/sft/final_checkpoint}" \
  --output_dir "${OUTPUT_DIR:-output/dpo}" --protocol "${PROTOCOL:-clean}" \
  --max_train_samples "${MAX_TRAIN_SAMPLES:-2048}" --num_train_epochs "${EPOCHS:-1}" \
  --batch_size "${BATCH_SIZE:-8}" --learning_rate "${LR:-1e-4}" --beta "${BETA:-1.0}" "$@"
