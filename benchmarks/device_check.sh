#!/usr/bin/env bash
# The GPU check, as one script for a lent device (the device tool's `run`): builds the CUDA
# extension against the device's own torch, runs the CUDA tests and the GPU benchmarks,
# and writes everything to $OUT. Usage on the device: bash benchmarks/device_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/dpface-device}
mkdir -p "$OUT"
python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" | tee "$OUT/env.txt"
# Only the extension: the device image has its torch; --no-deps keeps pip off the network.
start=$(date +%s)
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
echo "build rc=$? in $(( $(date +%s) - start )) s" | tee -a "$OUT/env.txt"
python3 -c "import dpface.ops as o; print(o.report())" | tee -a "$OUT/env.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_ops_cuda.py tests/test_ops.py \
    tests/test_fused_head.py -k "not trainer" > "$OUT/tests.log" 2>&1
echo "tests rc=$?" | tee -a "$OUT/env.txt"
tail -3 "$OUT/tests.log"
timeout 300 python3 benchmarks/bench_gpu_fused.py --out "$OUT/fused_gpu.json" > "$OUT/bench.log" 2>&1
echo "bench rc=$?" | tee -a "$OUT/env.txt"
tail -8 "$OUT/bench.log"
