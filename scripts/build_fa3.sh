#!/usr/bin/env bash
# Build FlashAttention-3 (flash-attention's hopper/ folder, package flash_attn_3, module flash_attn_interface) for
# what wanalpha runs on it: `generate --attention fa3` / `fa3-fp8` — forward only, head sizes 64 and 128, bf16 and
# FP8 (e4m3), Hopper (sm_90a). Four kernel instantiations instead of the full build's hundreds: minutes, not hours.
#
#   scripts/build_fa3.sh /path/to/flash-attention [OUT_DIR]
#
# Needs a CUDA toolkit (nvcc 12.3 or newer; with 13.x, CCCL's headers come from the toolkit), the PyTorch it is
# built against, and flash-attention's csrc/cutlass submodule checked out (`git submodule update --init
# csrc/cutlass`). Writes a wheel into OUT_DIR (default: ./dist); `pip install` it beside PyTorch.
set -euo pipefail
if [ $# -lt 1 ] || [ ! -f "$1/hopper/setup.py" ]; then
  echo "error: $0 needs a flash-attention checkout (with hopper/setup.py) as its first argument" >&2
  exit 2
fi
repo=$(cd "$1" && pwd)
out=$(mkdir -p "${2:-dist}" && cd "${2:-dist}" && pwd)
if [ ! -d "$repo/csrc/cutlass/include/cute" ]; then
  echo "error: $repo/csrc/cutlass is empty; run: git -C $repo submodule update --init csrc/cutlass" >&2
  exit 2
fi
for feature in BACKWARD SPLIT PAGEDKV APPENDKV LOCAL SOFTCAP PACKGQA VARLEN CLUSTER SM80 FP16 HDIM96 HDIM192 \
  HDIM256 HDIMDIFF64 HDIMDIFF192; do
  export "FLASH_ATTENTION_DISABLE_$feature=TRUE"
done
export FLASH_ATTENTION_FORCE_BUILD=TRUE MAX_JOBS="${MAX_JOBS:-$(nproc)}"
cd "$repo/hopper"
python -m pip wheel --no-build-isolation --no-deps -w "$out" .
echo "built: $(ls "$out"/flash_attn_3-*.whl)"
