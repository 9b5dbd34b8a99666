#!/usr/bin/env bash
# Stage 1 — SFT (LoRA, answer-only loss). Every option's default is sft.py's (python sft.py --help lists them);
# this script sets only what differs: 8,192 train rows instead of all 47,872, so SFT takes about 2 minutes on a CPU.
# Environment overrides: BASE_MODEL DATASET OUTPUT_DIR PROTOCOL MAX_TRAIN_SAMPLES EPOCHS BATCH_SIZE LR NPROC
# Extra arguments go to sft.py.
set -euo pipefail
source "$(dirname "$0")/launch.sh"
env_flags BASE_MODEL=base_model DATASET=dataset OUTPUT_DIR=output_dir PROTOCOL=protocol EPOCHS=num_train_epochs \
  BATCH_SIZE=batch_size LR=learning_rate
launch sft.py --max_train_samples "${MAX_TRAIN_SAMPLES:-8192}" ${ENV_FLAGS[@]+"${ENV_FLAGS[@]}"} "$@"
