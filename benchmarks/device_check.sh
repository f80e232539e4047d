#!/usr/bin/env bash
# The GPU check, as one script for a lent device (the device tool's `run`; about 8 minutes
# on one H200): builds the CUDA extension against the device's own torch, runs the CUDA
# tests and the ops' self-check, runs every C entry point under compute-sanitizer memcheck,
# then benchmarks the reference, fused and chunked heads. Everything lands in $OUT:
# env.txt, build.log, tests.log, memcheck.log, heads.json, heads.md.
#
#   run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=600)
#
# The device image lacks webdataset (dpface imports it): carry its wheels in .whl/ (the
# device tool's README says how to download them); they are installed first. Time limits
# below keep the whole script inside one 10-minute call.
set -uo pipefail
OUT=${OUT:-/tmp/dpface-device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
step() { echo "== $* ($(date +%T))" | tee -a "$OUT/env.txt"; }

step environment
python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), \
torch.cuda.get_device_capability())" 2>&1 | tee -a "$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1 | tee -a "$OUT/env.txt"

step "build (this GPU's arch only)"
cap=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
start=$(date +%s)
TORCH_CUDA_ARCH_LIST="$cap" MAX_JOBS=16 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
echo "build rc=$? in $(( $(date +%s) - start )) s" | tee -a "$OUT/env.txt"
python3 -m dpface.cli kernels --check 2>&1 | tee -a "$OUT/env.txt"

step "CUDA tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider -x tests/unit/test_ops_cuda.py tests/integration/test_selfcheck.py \
  tests/unit/test_ops.py > "$OUT/tests.log" 2>&1
echo "tests rc=$?" | tee -a "$OUT/env.txt"
tail -3 "$OUT/tests.log" | tee -a "$OUT/env.txt"

step "compute-sanitizer memcheck"
arch="sm_${cap/./}"
CUDA_BIN=$(dirname "$(command -v nvcc)")
nvcc -std=c++17 -O2 -arch="$arch" -I kernels/csrc/cuda -I kernels/csrc tests/integration/cuda_memcheck.cu \
  kernels/csrc/cuda/*.cu -o /tmp/cuda_memcheck > "$OUT/memcheck.log" 2>&1
SAN=$(command -v compute-sanitizer || echo "$CUDA_BIN/../compute-sanitizer/compute-sanitizer")
timeout 60 "$SAN" --tool memcheck --error-exitcode 9 /tmp/cuda_memcheck >> "$OUT/memcheck.log" 2>&1
echo "memcheck rc=$?" | tee -a "$OUT/env.txt"
tail -3 "$OUT/memcheck.log" | tee -a "$OUT/env.txt"

step "benchmark: reference vs fused vs chunked"
timeout 240 python3 benchmarks/bench_gpu_fused.py --out "$OUT/heads.json" --table "$OUT/heads.md" \
  > "$OUT/bench.log" 2>&1
echo "bench rc=$?" | tee -a "$OUT/env.txt"
cat "$OUT/heads.md" 2>/dev/null
step done
