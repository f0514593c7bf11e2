# moon_fast: the two commands are `make test` and `make demo`. Everything else is set up on demand.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch 2.14.1 is a CUDA 13.0 build (needed to compile csrc/); it comes from the local wheel cache here.
TORCH_SPEC ?= torch==2.14.1

export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export MAX_JOBS ?= 2
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export MPLBACKEND ?= Agg
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv build tcmalloc test test-fast demo bench lint env clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; set PYTHON=python3.x"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)" numpy ninja
	MOON_FAST_SKIP_CUDA_BUILD=1 MOON_FAST_SKIP_EMU_BUILD=1 MOON_FAST_SKIP_CPU_BUILD=1 $(PIP) install -q --no-build-isolation -e '.[dev]'
	touch $@

# Builds (incrementally) moon_fast._C with nvcc, moon_fast._C_emu and moon_fast._C_cpu with the host compiler, in place.
# flock: several shells may ask at once.
build: venv
	flock .build.lock $(PY) setup.py -q build_ext --inplace

# Source archives of the GPU peers grouped_gemm and MegaBlocks (benchmarks/peers.sh): tests/test_moe_peers_cpu.py runs
# their Python on the CPU, and a lent GPU builds them from here. Without the package index that test skips.
.peers/.fetched: benchmarks/peers.sh | venv
	(PYTHON=$(PY) bash benchmarks/peers.sh fetch && touch $@) \
	  || echo "warning: could not fetch the peer sources: tests/test_moe_peers_cpu.py will skip"

# tcmalloc (Debian libtcmalloc-minimal4): the malloc the README advises for CPU runs; tests/test_cpu_malloc.py
# checks what it saves. Installed where apt-get runs as root; elsewhere that test says it is missing and skips.
tcmalloc:
	@$(PYTHON) -c "import ctypes.util, sys; sys.exit(ctypes.util.find_library('tcmalloc_minimal') is None)" \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	       && { timeout 300 apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 \
	            || { timeout 300 apt-get update -q >/dev/null 2>&1 \
	                 && timeout 300 apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1; }; }; } \
	  || echo "warning: could not install libtcmalloc-minimal4: tests/test_cpu_malloc.py will skip its tcmalloc checks"

# The oldest Triton pyproject.toml allows (torch 2.11's, which the lent GPU machines run), installed apart from the
# venv's: the offline compile tests (tests/aot_triton.py) compile every kernel with it too, since each Triton
# version generates different code. Without the package index those test cases say it is missing and skip.
MIN_TRITON := $(shell sed -n 's/.*"triton>=\([0-9.]*\).*/\1/p' pyproject.toml)
.triton-min/.installed: pyproject.toml | venv
	rm -rf .triton-min
	($(PIP) install -q --no-deps --target .triton-min "triton==$(MIN_TRITON)" && touch $@) \
	  || { rm -rf .triton-min; echo "warning: could not install triton==$(MIN_TRITON): its compile tests will skip"; }

test: build .peers/.fetched tcmalloc .triton-min/.installed
	$(PY) -m moon_fast.cli env
	$(PY) -m pytest -q tests

test-fast: build
	$(PY) -m pytest -q -m "not slow and not distributed" tests

demo: build
	$(PY) -m moon_fast.cli demo

bench: build
	$(PY) -m moon_fast.cli bench --quick --output bench_results

lint: venv
	$(VENV)/bin/ruff check moon_fast kernels benchmarks tests

env: build
	$(PY) -m moon_fast.cli env

clean:
	rm -rf build moon_fast/*.so .cache
