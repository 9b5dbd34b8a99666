#!/usr/bin/env bash
# Stage 2b — NAPO by default (K=3, rho=0.7, gamma0=1, alpha=0.3, m=0.9, beta=1, reference-free);
# `bash softmax_dpo.sh --share_negatives False --margin_mode none --reference True` is plain S-DPO.
# Environment overrides: BASE_MODEL DATASET SFT_ADAPTER OUTPUT_DIR PROTOCOL MAX_TRAIN_SAMPLES EPOCHS BATCH_SIZE LR BETA K NPROC
set -euo pipefail
source "$(dirname "$0")/launch.sh"
launch softmax_dpo.py \
  --base_model "${BASE_MODEL:-tiny}" --dataset "${DATASET:-lastfm}" \
  --resume_from_checkpoint "${SFT_ADAPTER:-output/sft/final_checkpoint}" \
  --output_dir "${OUTPUT_DIR:-output/napo}" --protocol "${PROTOCOL:-clean}" \
  --max_train_samples "${MAX_TRAIN_SAMPLES:-2048}" --num_train_epochs "${EPOCHS:-1}" \
  --batch_size "${BATCH_SIZE:-16}" --learning_rate "${LR:-1e-4}" --beta "${BETA:-1.0}" \
  --num_negatives "${K:-3}" "$@"
