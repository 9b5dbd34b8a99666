# Sourced by the stage scripts: run a Python entry point with one process, or with N under torchrun.
#   NPROC=4 bash sft.sh ...     -> torchrun --standalone --nproc_per_node 4 sft.py ...  (GPUs: NCCL; CPU: gloo)
#   LAUNCHER="accelerate launch --multi_gpu --num_processes 4" bash sft.sh ...   -> any other launcher
#   (accelerate's `--cpu` starts ONE process unless given an MPI hostfile; for N CPU processes use NPROC=N,
#   or `--multi_gpu --num_processes N`, which also runs on gloo when there is no GPU.)
# Every argument after the script name is forwarded, so `bash sft.sh --max_train_samples 64` works, and a
# flag given twice takes its last value (the script's defaults come first, yours after).
NAPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONUNBUFFERED=1  # the offline environment: cache.py
export PYTHONPATH="$NAPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"

launch() {
  local script="$NAPO_DIR/$1"; shift
  if [ -n "${LAUNCHER:-}" ]; then
    $LAUNCHER "$script" "$@"
  elif [ "${NPROC:-1}" -gt 1 ]; then
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" "$script" "$@"
  else
    "$PYTHON" "$script" "$@"
  fi
}

# env_flags VAR=flag ...: sets ENV_FLAGS to "--flag value" for each environment variable VAR that is set and not
# empty. An unset one adds nothing, so the Python script's own default applies: the defaults are written once,
# in each script's main() signature (`python X.py --help`); a .sh script states only what it sets differently.
env_flags() {
  ENV_FLAGS=()
  local pair var
  for pair in "$@"; do
    var="${pair%%=*}"
    if [ -n "${!var:-}" ]; then ENV_FLAGS+=("--${pair#*=}" "${!var}"); fi
  done
}
