#!/usr/bin/env bash
# The GPU peers of issue 4 that are not on the GPU image: grouped_gemm (Trevor Gale's CUTLASS / cuBLAS grouped
# GEMM) and MegaBlocks (its dropless sort / histogram / gather / scatter, with grouped_gemm for the GEMMs),
# plus stanford-stk, which MegaBlocks imports. The lent GPU machine cannot reach the package index, so:
#
#   bash benchmarks/peers.sh fetch     # where the index is reachable (make test does it): the three source
#                                      # archives into .peers/ (ignored by git; about 1 MB); then carry
#                                      # ".peers" to the GPU machine
#   bash benchmarks/peers.sh build     # there: builds and installs them for this GPU (gpu_check.sh runs this
#                                      # when .peers/ is present)
#
# The build installs with --no-deps: both packages pin old torch versions (megablocks 0.10: torch 2.7.0) that
# their code does not need. Two things the source archives do not do on CUDA 13, patched here:
#   - megablocks' csrc/cumsum.h passes CUB's `debug_synchronous` argument, which CUB (CCCL 3, CUDA 13)
#     removed: "no instance of overloaded function DeviceScan::ExclusiveSum" (the call is otherwise the same);
#   - grouped_gemm's setup.py compiles with nvcc -std=c++17; recent torch headers (2.14.1 here) require C++20
#     ("#error C++20 or later compatible compiler is required to use PyTorch"): -std=c++20;
#   - without TORCH_CUDA_ARCH_LIST, both setup.py files ask the GPU for its architecture, which fails on a
#     machine without one: set it (gpu_check.sh sets it to the GPU's).
# grouped_gemm builds its default: per-expert cuBLAS GEMMs from host-side group sizes (what MegaBlocks gets
# from `pip install grouped_gemm`); GROUPED_GEMM_CUTLASS=1 builds its CUTLASS grouped kernel (sm80 tiles)
# instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=${PEERS:-.peers}
PY=${PYTHON:-python3}
VERSIONS="grouped_gemm==0.3.0 megablocks==0.10.0 stanford-stk==0.7.1"

fetch() {
  mkdir -p "$PEERS"
  # --no-build-isolation: pip reads each archive's metadata by running its setup.py, which imports torch;
  # in an isolated build it would try to install the pinned torch.
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
    $PY -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$PEERS" $VERSIONS
  ls -l "$PEERS"
}

build() {
  [[ -n ${TORCH_CUDA_ARCH_LIST:-} ]] || { echo "peers.sh build: set TORCH_CUDA_ARCH_LIST (e.g. 9.0)" >&2; exit 2; }
  local work
  work=$(mktemp -d)
  for archive in "$PEERS"/*.tar.gz; do tar -xzf "$archive" -C "$work"; done
  local mb gg
  mb=$(echo "$work"/megablocks-*) gg=$(echo "$work"/grouped_gemm-*)
  sed -i -z 's/stream,\s*debug_synchronous)/stream)/g' "$mb/csrc/cumsum.h"
  sed -i 's/-std=c++17/-std=c++20/' "$gg/setup.py"
  if grep -q 'debug_synchronous)' "$mb/csrc/cumsum.h" || ! grep -q 'std=c++20' "$gg/setup.py"; then
    echo "peers.sh: a patch for CUDA 13 / torch >= 2.10 did not apply (see the header)" >&2; exit 1
  fi
  # Where the toolkit lacks the cuBLAS / cuSPARSE headers torch's CUDA headers include, pip's nvidia
  # packages have them (as for moon_fast's own build, setup.py).
  local inc
  inc=$($PY -c "import glob, nvidia; print(':'.join(sorted({d for p in nvidia.__path__ for d in glob.glob(p + '/*/include')})))" 2>/dev/null || true)
  export CPLUS_INCLUDE_PATH=${inc}${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}
  for pkg in stanford_stk grouped_gemm megablocks; do
    echo "peers.sh: building $pkg for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
    $PY -m pip install -q --no-deps --no-build-isolation --no-index "$work"/${pkg}-*/
  done
  rm -rf "$work"
  $PY -c "import grouped_gemm.ops, megablocks.ops; print('peers.sh: grouped_gemm and megablocks import')"
}

case ${1:-} in
  fetch) fetch ;;
  build) build ;;
  *) echo "usage: bash benchmarks/peers.sh fetch|build" >&2; exit 2 ;;
esac
