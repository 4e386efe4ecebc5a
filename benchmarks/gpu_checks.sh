#!/usr/bin/env bash
# The GPU evidence, on a machine where MLX runs on CUDA (the lent H100/H200 after staging MLX's
# CUDA backend: ../shared/device/README.md). Logs go to $OUT (default ./gpu-logs).
#
#   bash benchmarks/gpu_checks.sh tests       # GPU kernel tests, end to end, compiled steps, transformers parity
#   bash benchmarks/gpu_checks.sh e2e         # only the end-to-end tests
#   bash benchmarks/gpu_checks.sh kernels     # kernel benchmark against MLX's own ops
#   bash benchmarks/gpu_checks.sh streaming   # the streaming benchmark at GPU shapes
#
# Several parts may be given at once; each part runs under its own time limit.
set -uo pipefail
OUT=${OUT:-gpu-logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# pytest is not part of the GPU image: install it from wheels staged next to MLX's, if any.
if ! python3 -m pytest --version >/dev/null 2>&1 && ls /root/mlxstage/pytest-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /root/mlxsite /root/mlxstage/{pytest,pluggy,iniconfig}-*.whl
fi

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device(), mx.device_info().get('device_name', ''))"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

for part in "$@"; do
  case "$part" in
    e2e)  # only the end-to-end tests (the kernel tests take ~4 min of their own)
      timeout 560 python3 -m pytest -q -p no:cacheprovider -rs --durations=8 \
        tests/test_kernels_gpu.py::test_tiny_model_end_to_end tests/test_gpu_end_to_end.py \
        tests/test_compiled.py tests/test_transformers_parity.py > "$OUT/tests-e2e.log" 2>&1
      echo "e2e rc=$?"; tail -15 "$OUT/tests-e2e.log" ;;
    tests)
      # The first float32 quantized matmuls compile for minutes on a fresh machine: long limits.
      timeout 560 python3 -m pytest -q -p no:cacheprovider -rs --durations=5 \
        tests/test_kernels_gpu.py tests/test_gpu_end_to_end.py tests/test_compiled.py \
        tests/test_transformers_parity.py \
        > "$OUT/tests-gpu.log" 2>&1
      echo "tests rc=$?"; tail -5 "$OUT/tests-gpu.log" ;;
    kernels)
      timeout 330 python3 benchmarks/kernels.py > "$OUT/kernels.log" 2>&1
      echo "kernels rc=$?"; tail -40 "$OUT/kernels.log" ;;
    streaming)  # 6 layers (5.4 GB): a third of it leaves room for the ~1 GB the CUDA runtime holds
      timeout 560 python3 -m benchmarks.streaming --workdir /root/flash-moe-bench --hidden 4096 \
        --intermediate 1024 --experts 128 --layers ${LAYERS:-6} --top-k 10 --tokens ${TOKENS:-12} --runs ${RUNS:-3} --threads 16 \
        --prefill 128 1024 --out "$OUT/streaming.txt" > "$OUT/streaming.log" 2>&1
      echo "streaming rc=$?"; tail -40 "$OUT/streaming.log" ;;
    *) echo "unknown part: $part"; exit 2 ;;
  esac
done
