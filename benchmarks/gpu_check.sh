#!/usr/bin/env bash
# Everything a lent GPU can check, in steps that fit the device tool's 10-minute calls:
#   build  builds moon_fast._C for this GPU's architecture only (the CPU emulator build is skipped);
#   peers  builds the grouped_gemm and MegaBlocks peers from the source archives in .peers/ (fetched
#          beforehand on a machine with the package index: `bash benchmarks/peers.sh fetch`, then carry
#          ".peers"); skipped without them;
#   tests  runs the tests that run on CUDA: the MoE backends and peers against the reference (gpu-marked),
#          the Triton MoE modes, routing / combine kernels and launch counts, the Triton attention tests and
#          the contrastive tests on the device fixture; then benchmarks/moe_precision.py (16-bit rounding);
#   moe    counts the MoE op's launches per call (benchmarks/moe_launch_count.py), times the Triton MoE
#          grouped GEMMs against dense cuBLAS and the grouped-GEMM peers (benchmarks/moe_gpu_gemm.py, issue
#          4's target; with the SwiGLU backward fused and split, TMA loads and persistent launches on Hopper) and the split's
#          parts (moe_gpu_probes.py);
#   bench  runs `moon-fast bench` at GPU sizes (contrastive, attention, moe, train) with what time is left.
# Everything goes under $OUT (default gpu_results/): env.txt, build.log, peers.log, tests.log, junit.xml,
# moe_precision.txt, moe_launch_count.{log,csv,json}, moe_gpu_gemm.{log,csv,json}, moe_gpu_probes.log,
# bench/{results.csv,results.json,report.md}, summary.txt (appended to by each call).
#
#   bash benchmarks/gpu_check.sh                                # all steps, from the repository root
# Under the device tool's 10-minute calls, on the same warm machine (what a call built and installed stays
# there while the machine is held; it goes back after about 30 s idle, so make the next call at once):
#   STEPS=build,moe bash benchmarks/gpu_check.sh                    # 1: issue 4's target, modes A/B (<= 540 s)
#   STEPS=peers,tests TEST_BUDGET=380 bash benchmarks/gpu_check.sh  # 2: correctness, peers included (<= 580 s)
#   STEPS=bench BENCH_BUDGET=240 bash benchmarks/gpu_check.sh; \
#     python benchmarks/moe_gpu_gemm.py --dtypes bf16 --shapes 16384x8 --out "$OUT/peers"  # 3: peers' rows
#
# Needs: python with torch (CUDA), triton, transformers, numpy; pytest for the tests and open_clip for
# its peer rows (if the image lacks them, put their wheels in $WHEELS, default ./wheels, and they are
# installed offline; without pytest the tests are skipped, without open_clip its rows read "unavailable").
# Budgets (seconds; each step is cut at its limit and the script goes on): BUILD_BUDGET=150 (the build
# took 106 s on a 16-core H100 machine), PEERS_BUDGET=200, TEST_BUDGET=240 (the tests took about 300 s
# there in all: give more to see them all), MOE_BUDGET=240 (50 s there for the 9 rows per shape then; up to
# 26 now, with the split, TMA, persistent and peer rows; plus 60 s for the launch count and 90 s for the probes (with the routing probe);
# moe_gpu_gemm.py saves its rows after each shape, bf16 first), BENCH_BUDGET=40 (shared equally among the
# ops; cases still waiting when an op's share is spent are recorded as skipped; give 230 or more for a useful
# table; the step may take 90 s more). All steps at once take up to about 18 minutes.
# The benchmark measures all cases in one worker process (--process-per-case no: CUDA peak memory is
# max_memory_allocated above each case's own baseline, so sharing a process does not change it) to
# spend the budget on measuring rather than on starting Python; a case that crashes is re-run alone.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-wheels}
BUILD_BUDGET=${BUILD_BUDGET:-150}
TEST_BUDGET=${TEST_BUDGET:-240}
BENCH_BUDGET=${BENCH_BUDGET:-40}
MOE_BUDGET=${MOE_BUDGET:-240}
PEERS_BUDGET=${PEERS_BUDGET:-200}
STEPS=${STEPS:-build,peers,tests,moe,bench}
want() { [[ ",$STEPS," == *",$1,"* ]]; }
mkdir -p "$OUT"
T0=$(date +%s)
say() { echo "[gpu_check $(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/summary.txt"; }

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MOON_FAST_SKIP_EMU_BUILD=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false
export MOON_FAST_CACHE=${MOON_FAST_CACHE:-$PWD/.cache/moon_fast}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
unset TRITON_INTERPRET

# ---------------------------------------------------------------- 0. environment
{ nvidia-smi || true; $PY - <<'PYEOF'
import importlib.metadata as md, sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for d in ("triton", "transformers", "numpy", "pytest", "open_clip_torch", "flash_attn", "megablocks",
          "grouped_gemm"):
    try: print(d, md.version(d))
    except md.PackageNotFoundError: print(d, "not installed")
PYEOF
} > "$OUT/env.txt" 2>&1
# GPU_CHECK_DRY_RUN=1 runs the script's plumbing on a CPU machine (no build, one small test file, the
# gemm self-check benchmark): for checking this script, not the GPU.
DRY=${GPU_CHECK_DRY_RUN:-0}
if [[ $DRY == 1 ]]; then
  ARCH=dry-run
else
  $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { say "no CUDA GPU visible to torch: nothing to check here (see $OUT/env.txt)"; exit 1; }
  ARCH=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
say "GPU $(grep '^python' "$OUT/env.txt" | sed 's/.*gpu //'), arch $ARCH"
if [[ -d "$WHEELS" ]]; then
  $PY -m pip install -q --no-index --find-links "$WHEELS" pytest pytest-timeout open_clip_torch \
    >> "$OUT/env.txt" 2>&1 || say "some wheels in $WHEELS did not install (see env.txt)"
fi

# ---------------------------------------------------------------- 1. build
say "steps: $STEPS"
if ! want build; then
  :
elif [[ $DRY == 1 ]]; then
  say "dry run: build skipped"
else
  say "building moon_fast._C for sm_$ARCH (budget ${BUILD_BUDGET}s)"
  if timeout "$BUILD_BUDGET" $PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1; then
    say "build ok"
  else
    say "build FAILED or timed out (rc $?): the cuda backend will read unavailable; see build.log"
  fi
fi
# Editable install without building again: the moon_fast.kernels package mapping and the CLI.
if [[ $DRY != 1 ]]; then
  MOON_FAST_SKIP_CUDA_BUILD=1 $PY -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT/build.log" 2>&1 \
    || say "pip install -e . failed (see build.log): imports rely on the current directory"
fi
$PY -m moon_fast.cli env > "$OUT/env_moon_fast.txt" 2>&1 || true

# ---------------------------------------------------------------- 1b. peers (grouped_gemm, MegaBlocks)
if want peers && [[ $DRY != 1 ]]; then
  if compgen -G ".peers/*.tar.gz" > /dev/null; then
    say "building the grouped_gemm and MegaBlocks peers from .peers/ (budget ${PEERS_BUDGET}s)"
    PYTHON=$PY timeout "$PEERS_BUDGET" bash benchmarks/peers.sh build > "$OUT/peers.log" 2>&1
    say "peers: rc $?; $(tail -n 1 "$OUT/peers.log")"
  else
    say "peers: no source archives in .peers/ (bash benchmarks/peers.sh fetch, then carry .peers): skipped"
  fi
fi

# ---------------------------------------------------------------- 2. tests on CUDA
if ! want tests; then
  :
elif $PY -c "import pytest" 2>/dev/null; then
  # What runs on the GPU: the gpu-marked tests (MoE backends on CUDA, the contrastive csrc kernels), the
  # Triton attention tests (their device is CUDA when there is one) and the contrastive tests that take
  # the device fixture. Left out: the offline compile checks (CPU-only, Triton-version internals) and the
  # CPU emulator of the csrc kernels (not built here), which CI runs.
  TESTS="tests/test_moe_op.py::test_backend_matches_reference_on_cuda tests/test_moe_op.py::test_triton_modes_match_reference_on_cuda tests/test_moe_triton_parts.py tests/test_bench_launches.py tests/test_attention_triton.py tests/test_attention.py::test_torch_varlen_matches_reference_on_cuda tests/test_contrastive.py tests/test_eval_metrics.py"
  SELECT=(-k "not ahead_of_time and not cuda_emu and not csrc_tile_ops")
  [[ $DRY == 1 ]] && { TESTS=tests/test_bench_flops.py; SELECT=(); }
  say "tests on CUDA: $TESTS (budget ${TEST_BUDGET}s)"
  timeout "$TEST_BUDGET" $PY -m pytest -q -m "not distributed" -p no:cacheprovider "${SELECT[@]}" \
    --junitxml="$OUT/junit.xml" $TESTS > "$OUT/tests.log" 2>&1
  rc=$?
  say "tests: rc $rc; $(tail -n 1 "$OUT/tests.log")"
  # the compiled kernels' 16-bit rounding against the reference's (the interpreter's was mended on the CPU)
  [[ $DRY == 1 ]] || { timeout 45 $PY benchmarks/moe_precision.py --seeds 3 --out "$OUT/moe_precision.txt" \
    > "$OUT/moe_precision.log" 2>&1; say "moe_precision: rc $?"; }
else
  say "pytest is not installed (put its wheel in $WHEELS): tests skipped"
fi

# ---------------------------------------------------------------- 3. issue 4's target: Triton grouped GEMM vs dense
if want moe && [[ $DRY != 1 ]]; then
  say "MoE launches per call (torch ops, Triton launches, CUDA kernels)"
  timeout 60 $PY benchmarks/moe_launch_count.py --out "$OUT" > "$OUT/moe_launch_count.log" 2>&1
  say "moe_launch_count: rc $?"
  say "MoE grouped GEMMs vs dense cuBLAS (budget ${MOE_BUDGET}s)"
  timeout "$MOE_BUDGET" $PY benchmarks/moe_gpu_gemm.py --out "$OUT" > "$OUT/moe_gpu_gemm.log" 2>&1
  say "moe_gpu_gemm: rc $?; $(grep -c '% of dense' "$OUT/moe_gpu_gemm.log") ratios"
  timeout 90 $PY benchmarks/moe_gpu_probes.py > "$OUT/moe_gpu_probes.log" 2>&1
  say "moe_gpu_probes: rc $?; $(grep -E 'split with|routing T=524288' "$OUT/moe_gpu_probes.log")"
fi

# ---------------------------------------------------------------- 4. benchmarks at GPU sizes
if want bench; then
  say "moon-fast bench at GPU sizes (budget ${BENCH_BUDGET}s)"
  timeout $(( BENCH_BUDGET + 90 )) $PY -m moon_fast.cli bench --output "$OUT/bench" --time-budget "$BENCH_BUDGET" \
    --timeout 90 --process-per-case no --warmup 2 --repeats 10 $([[ $DRY == 1 ]] && echo --ops gemm --tiny) \
    > "$OUT/bench.log" 2>&1
  say "bench: rc $?; $(grep -c '' "$OUT/bench/results.csv" 2>/dev/null || echo 0) lines in results.csv"
  [[ -f "$OUT/bench/results.json" ]] && $PY -m moon_fast.cli bench --report "$OUT/bench/results.json" \
    > "$OUT/bench/report.md" 2>> "$OUT/bench.log"
fi
say "done in $(( $(date +%s) - T0 ))s; files under $OUT"
