#!/usr/bin/env bash
# The project's one GPU verification, made to fit a GPU loan: every path `auto` can pick, checked
# against the fp64 reference and timed, in at most 8 minutes on an H100/H200.
#
#   bash benchmarks/gpu_verify.sh OUT_DIR          # on the GPU machine, from the repository root
#   bash benchmarks/gpu_verify.sh --cpu OUT_DIR    # the same flow on tiny sizes, no GPU (CI)
#
# Runs without installing fgattn (PYTHONPATH), with the python3 that holds torch, Triton and timm
# ($PYTHON to choose another). Four steps, each in its own process with its own timeout (together
# 480 s), sharing one Triton cache in OUT_DIR; what a step did is kept when its timeout cuts it, and
# OUT_DIR/verify.md is written whatever ran (benchmarks/gpu_verify.py says what each step does).
# Paste verify.md into benchmarks/README.md.
set -uo pipefail

cpu=""
if [ "${1:-}" = "--cpu" ]; then
  cpu="--cpu"
  shift
fi
out=${1:?usage: gpu_verify.sh [--cpu] OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="$out/triton_cache"
py=${PYTHON:-python3}
verify="$PWD/benchmarks/gpu_verify.py"

if [ -n "$cpu" ]; then
  export TRITON_INTERPRET=1
  # the whole flow in a few minutes of 2 CPU cores
  limits=(300 120 600 60)
else
  "$py" -c "import torch; torch.cuda.get_device_capability()" >/dev/null 2>&1 || {
    echo "gpu_verify.sh: torch sees no CUDA GPU here; use --cpu for the dry run" >&2
    exit 2
  }
  export TRITON_PRINT_AUTOTUNING=1
  # seconds per step: precompile, tma, cells, verdicts (sum 480)
  limits=(150 40 270 20)
fi

{
  date -u +%FT%TZ
  [ -z "$cpu" ] && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  git rev-parse --short HEAD 2>/dev/null
} 2>&1 | tee "$out/machine.txt"

steps=(precompile tma cells verdicts)
for i in "${!steps[@]}"; do
  step=${steps[$i]}
  start=$SECONDS
  timeout --kill-after=5 "${limits[$i]}" "$py" "$verify" "$step" "$out" $cpu \
    > "$out/$step.log" 2>&1
  status=$?
  echo "gpu_verify: $step: exit $status in $((SECONDS - start)) s (limit ${limits[$i]} s)" \
    | tee -a "$out/steps.txt"
done
tail -n 40 "$out/verify.md" 2>/dev/null
