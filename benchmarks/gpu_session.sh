#!/usr/bin/env bash
# The tests and measurements that need a GPU, in two steps that each fit a 10-minute call:
#
#   bash benchmarks/gpu_session.sh tests  OUT_DIR   # GPU tests of the Triton kernels
#   bash benchmarks/gpu_session.sh bench  OUT_DIR   # every implementation vs auto, model overheads
#   bash benchmarks/gpu_session.sh kernels OUT_DIR  # issue 11's sizes and targets (kernel_targets.py)
#
# Runs from the repository root without installing fgattn (PYTHONPATH), with the python3 that holds
# torch, Triton and timm. Each step writes its logs and JSON to OUT_DIR (default: $OUT, else
# ./gpu_session_out) and never stops at the first failure: what ran is recorded. Paste the
# figures into benchmarks/README.md with the GPU model and date that gpu.txt records.
set -uo pipefail

step=${1:?usage: gpu_session.sh tests|bench|kernels [OUT_DIR]}
out=${2:-${OUT:-gpu_session_out}}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

"$py" -c "import torch; torch.cuda.get_device_capability()" >/dev/null 2>&1 || {
  echo "gpu_session.sh: torch sees no CUDA GPU; nothing to do here" >&2
  exit 2
}

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$py" -c "import torch, triton, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda,
    'triton', triton.__version__, 'timm', timm.__version__, 'gpu', torch.cuda.get_device_name())"
  git rev-parse --short HEAD 2>/dev/null
} 2>&1 | tee "$out/gpu.txt"

case "$step" in
tests)
  # Two runs, 180 + 380 s at most: the flash-shaped and Gram kernels autotune at each new shape.
  timeout 180 "$py" -m pytest -q -p no:cacheprovider --junitxml="$out/gpu_tests.xml" \
    tests/test_triton_kernels_gpu.py tests/test_triton_kernels.py 2>&1 \
    | tee "$out/gpu_tests.log" | tail -20
  timeout 380 "$py" -m pytest -q -p no:cacheprovider --junitxml="$out/gpu_tests_new.xml" \
    tests/test_triton_flash.py tests/test_triton_tma.py tests/test_triton_gram.py 2>&1 \
    | tee "$out/gpu_tests_new.log" | tail -30
  ;;
bench)
  # 240 + 120 + 150 s at most, so the step ends within 9 minutes. bench_channel_attention.py
  # rewrites its JSON after each size: a run cut short by its timeout keeps what it measured
  # ("complete": false). First the quick size (B=32 C=2048 L=196), every op, bf16 and fp32, with
  # the extras (compiled eager, FlexAttention, unpadded SDPA), whose compiling takes most of it.
  timeout 240 "$py" benchmarks/bench_channel_attention.py --quick --dtype bf16 fp32 \
    --out "$out/bench_channel_attention_quick.json" 2>&1 | tee "$out/bench_channel_attention_quick.log"
  # Then self attention over the rule table's grid in bf16, without the extras that compile
  # afresh for every size.
  timeout 120 "$py" benchmarks/bench_channel_attention.py --ops self --dtype bf16 --batch 32 \
    --channels 512 2048 --length 49 196 784 --extras sdpa_unpadded_default \
    --out "$out/bench_channel_attention_grid_bf16.json" 2>&1 | tee "$out/bench_channel_attention_grid_bf16.log"
  timeout 150 "$py" benchmarks/bench_models.py --json "$out/bench_models.json" 2>&1 \
    | tee "$out/bench_models.log"
  ;;
kernels)
  # Issue 11: the Triton kernels against cuDNN / mem-efficient SDPA / eager at its target sizes
  # (B=32, C=2048), with the configs the autotuner picks printed. 300 + 120 + 100 s at most.
  export TRITON_PRINT_AUTOTUNING=1
  timeout 300 "$py" benchmarks/bench_channel_attention.py --ops self cross contrastive \
    --dtype bf16 --batch 32 --channels 2048 --length 196 784 --extras none \
    --out "$out/kernels_bf16.json" 2>&1 | tee "$out/kernels_bf16.log"
  timeout 120 "$py" benchmarks/bench_channel_attention.py --ops self --dtype fp32 --batch 32 \
    --channels 2048 --length 196 --extras none --out "$out/kernels_fp32.json" 2>&1 \
    | tee "$out/kernels_fp32.log"
  timeout 100 "$py" benchmarks/bench_channel_attention.py --ops self --dtype fp32 --tf32 \
    --batch 32 --channels 2048 --length 196 --extras none --out "$out/kernels_tf32.json" 2>&1 \
    | tee "$out/kernels_tf32.log"
  "$py" benchmarks/kernel_targets.py "$out"/kernels_*.json 2>&1 | tee "$out/kernel_targets.md"
  ;;
*)
  echo "gpu_session.sh: unknown step '$step' (tests, bench or kernels)" >&2
  exit 2
  ;;
esac
