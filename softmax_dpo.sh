#!/usr/bin/env bash
# Stage 2b — NAPO by default (softmax_dpo.py's defaults, the NAPO authors' values, written once in
# napo_config.NAPOConfig; python softmax_dpo.py --help lists them);
# `bash softmax_dpo.sh --share_negatives False --margin_mode none --reference True` is plain S-DPO.
# This script sets only what differs from softmax_dpo.py: the SFT adapter of sft.sh to start from, and 2,048
# train rows instead of all 47,872, so a run takes minutes on a CPU.
# Environment overrides: BASE_MODEL DATASET SFT_ADAPTER OUTPUT_DIR PROTOCOL MAX_TRAIN_SAMPLES EPOCHS BATCH_SIZE LR BETA K NPROC
set -euo pipefail
source "$(dirname "$0")/launch.sh"
env_flags BASE_MODEL=base_model DATASET=dataset OUTPUT_DIR=output_dir PROTOCOL=protocol EPOCHS=num_train_epochs \
  BATCH_SIZE=batch_size LR=learning_rate BETA=beta K=num_negatives
launch softmax_dpo.py --start_adapter "${SFT_ADAPTER:-output/sft/final_checkpoint}" \
  --max_train_samples "${MAX_TRAIN_SAMPLES:-2048}" ${ENV_FLAGS[@]+"${ENV_FLAGS[@]}"} "$@"
