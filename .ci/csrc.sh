#!/usr/bin/env bash
# CI leg for csrc/ (no GPU): build lora_kernels/_csrc*.so with PyPI's CUDA 13.0 nvcc, check its SASS
# (sm_80 + sm_90 + PTX, no spills, registers, main-loop instructions per weight element), run its tests.
# Runs inside the activated project venv. The nvcc wheels go to a cache folder outside the clone.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC_DIR=${LORA_KERNELS_NVCC_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/lora-kernels/nvcc-13.0.88}
NVCC=$NVCC_DIR/nvidia/cu13/bin/nvcc
if ! "$NVCC" --version 2>/dev/null | grep -q "V13.0.88"; then
  # Pinned: unpinned nvvm/crt (13.5) emit PTX that ptxas 13.0 rejects. pip's own cache keeps the wheels.
  python -m pip install -q --upgrade --target "$NVCC_DIR" nvidia-cuda-nvcc==13.0.88 "nvidia-nvvm==13.0.*" \
    "nvidia-cuda-crt==13.0.*" "nvidia-cuda-runtime==13.0.*" nvidia-cuda-cccl
fi
start=$(date +%s)
LORA_KERNELS_BUILD_CSRC=1 LORA_KERNELS_NVCC="$NVCC" python -m pip install -q --no-deps -e .
SO=$(ls lora_kernels/_csrc*.so)
echo "built $SO in $(($(date +%s) - start)) s"
CUOBJDUMP=$(python -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump'))")
ELF=$("$CUOBJDUMP" --list-elf "$SO")
for arch in sm_80 sm_90; do grep -q "$arch" <<<"$ELF" || { echo "no $arch SASS in $SO"; exit 1; }; done
"$CUOBJDUMP" --list-ptx "$SO" | grep -q "sm_90.ptx" || { echo "no compute_90 PTX in $SO"; exit 1; }
TMP=$(mktemp -d)
"$CUOBJDUMP" --dump-resource-usage "$SO" >"$TMP/res.txt"
"$CUOBJDUMP" --dump-sass "$SO" >"$TMP/sass.txt"
# Instructions per weight element in the main loop (per lane) of the default shared-table kernels;
# blocksize 64 scales each decoded pair (+0.5); the exact decode (the default) multiplies each element in fp32: see
# csrc/README.md.
python csrc/sass_count.py "$TMP/sass.txt" --resources "$TMP/res.txt" --budget 3.0 --budget-prescaled 3.2 \
  --budget-exact 4.2 --budget-async-table 3.5 --budget-async-exact 4.5
python -c "import lora_kernels as lk; s = lk.backends()['csrc']; print('csrc:', s); assert s['found'], s"
python -m pytest -q tests/test_csrc_build.py tests/test_csrc_decode.py tests/test_csrc_loader.py tests/test_csrc_library.py \
  tests/test_csrc_gpu.py tests/test_csrc_model.py tests/test_sass_count.py
