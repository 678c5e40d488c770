#!/usr/bin/env bash
# One device call that does a session's GPU work: the GPU tests at real shapes, then the quick benchmark
# sweep; everything lands under $OUT (commit the CSV/PNG/MD into benchmarks/results/ afterwards).
# From the project root, after ../shared/gpu/wheels.sh has put bitsandbytes into .whl/ (carry .whl):
#   LORA_KERNELS_COMMIT=<git rev-parse --short=12 HEAD> bash benchmarks/gpu_session.sh
# TEST_S, PROBE_S, SWEEP_S, CSRC_TEST_S, CSRC_BENCH_S and BENCH_S bound the parts (seconds); with the defaults they fit
# one 10-minute call, machine start not included.
set -u
: "${OUT:?set OUT to the folder whose files come back}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}  # this tree's package, without an install
export LORA_KERNELS_COMMIT=${LORA_KERNELS_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton, bitsandbytes as b; print('torch', torch.__version__, 'triton', triton.__version__, 'bnb', b.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
# At most 8 files come back from a device call: the csrc tests share gpu-tests.log, the sweep shares probe.txt.
timeout "${TEST_S:-120}" python3 -m pytest -q -rs --durations=15 -p no:cacheprovider tests/test_gpu.py > "$OUT/gpu-tests.log" 2>&1
echo "gpu tests: exit $?"; tail -n 25 "$OUT/gpu-tests.log"
# host time per layer call and the kernel table of one forward + backward (benchmarks/gpu_probe.py)
timeout "${PROBE_S:-60}" python3 benchmarks/gpu_probe.py --pieces 1024x1024x16 --fwdbwd 4096x4096x4096 \
  > "$OUT/probe.txt" 2>&1
echo "probe: exit $?"; grep -E "pieces|===" "$OUT/probe.txt"
# the fused 4-bit forward per config, code lookup from registers (configs.CODE_REGS) and gathered, pipelined
# (the autotune list) and one stage, beside dequantize + cuBLAS: the data for configs.DEQUANT_PATH_MIN_M
timeout "${SWEEP_S:-45}" python3 benchmarks/gpu_probe.py --sweep 8192x8192x1,8192x8192x16,8192x8192x4096 \
  --configs 16x64x128w4s4,16x64x128w4s1,128x128x64w8s3 --code regs,gather >> "$OUT/probe.txt" 2>&1
echo "sweep: exit $?"; grep -A7 "=== sweep" "$OUT/probe.txt"
# csrc/ (only when lora_kernels/_csrc*.so was built on the CPU machine and carried): tests, then timings
if ls lora_kernels/_csrc*.so >/dev/null 2>&1; then
  # the register ring first, then the cp.async pipeline (not yet run on a GPU) in a process of its own: a fault
  # there ends its CUDA context, and must not take the ring's results with it
  { echo "=== tests/test_csrc_gpu.py"
    timeout "${CSRC_TEST_S:-75}" bash -c 'python3 -m pytest -q -rs -p no:cacheprovider tests/test_csrc_gpu.py -k "not async";
      echo "=== tests/test_csrc_gpu.py -k async"; python3 -m pytest -q -rs -p no:cacheprovider tests/test_csrc_gpu.py -k async'
  } >> "$OUT/gpu-tests.log" 2>&1
  echo "csrc tests: exit $?"; tail -n 5 "$OUT/gpu-tests.log"
  timeout "${CSRC_BENCH_S:-120}" python3 csrc/bench_decode.py --warps-sweep 8192x8192 --csv "$OUT/csrc-decode.csv" 2>&1 \
    | grep -v -i warn
  echo "csrc bench: exit ${PIPESTATUS[0]}"
fi
timeout "${BENCH_S:-150}" python3 -m lora_kernels.cli bench --quick --time-limit $(( ${BENCH_S:-150} - 60 )) \
  --csv "$OUT/bench.csv" --plot "$OUT/bench.png" --markdown "$OUT/bench.md" > "$OUT/bench.log" 2>&1
echo "bench: exit $?"; tail -c 6000 "$OUT/bench.log"
