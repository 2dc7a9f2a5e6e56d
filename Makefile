# make bench: set up .venv and run the main job (verification against dense attention + throughput table)
# make test:  set up .venv, build the extension and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0a
export MAX_JOBS ?= 2

.PHONY: venv build test compile-check bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.deps

# build: the editable install runs only when a build input changed since the last one: csrc/ (files, and folders
# for added or removed files), setup.py, pyproject.toml, a package __init__.py, the installed requirements, or the
# build configuration below ($(VENV)/.build-config is rewritten only when it differs), or when the extension is
# missing. The build itself reuses build/ninja-*/ (see setup.py): only changed objects recompile. The terminal gets
# one line per compiled object and a ptxas summary; the whole output is in $(VENV)/build.log; PTXAS=1 adds the
# per-kernel register/spill table.
BUILD_CONFIG := MOGA_BUILD_CUDA=$(MOGA_BUILD_CUDA) MOGA_BUILD_EXT=$(MOGA_BUILD_EXT) MOGA_BUILD_DIR=$(MOGA_BUILD_DIR) \
	TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST) CUDA_HOME=$(CUDA_HOME) PYTHON=$(PYTHON)
BUILD_INPUTS := setup.py pyproject.toml $(shell find csrc -print 2>/dev/null) \
	$(shell find python kernels -name __init__.py 2>/dev/null)
ifeq ($(MOGA_BUILD_EXT),0)
EXT_BUILT := yes
else
EXT_BUILT := $(wildcard python/moga/_C*.so)
endif
ifeq ($(EXT_BUILT),)
.PHONY: $(VENV)/.built  # no extension in place: build whatever the stamp says
endif

$(VENV)/.build-config: FORCE | $(BIN)/python
	@echo '$(BUILD_CONFIG)' | cmp -s - $@ || echo '$(BUILD_CONFIG)' > $@

$(VENV)/.built: $(BUILD_INPUTS) $(VENV)/.deps $(VENV)/.build-config
	@echo "building moga (a build input changed or the extension is missing; unchanged objects are reused) ..."
	@$(BIN)/python bench/build_log.py --log $(VENV)/build.log $(if $(PTXAS),--ptxas-table) -- \
		$(BIN)/pip install -v --no-build-isolation -e .
	@touch $@

build: venv $(VENV)/.built
	@$(BIN)/python -c "import moga; print('moga', moga.__version__, 'backends:', moga.available_backends())"

FORCE:

lint: venv
	$(BIN)/ruff check python kernels tests bench examples setup.py

test: build lint
	$(BIN)/python -m pytest -q -ra
	@$(MAKE) --no-print-directory compile-check

# The compile check under the venv's Triton (torch's pin) and under the GPU machine's (TRITON_GPU, installed beside
# it with --target, used through PYTHONPATH; kept in the venv between runs). Both run and report; any failing row
# of either fails the target. Tables: $(VENV)/compile_check-triton-*.json. See docs/kernels.md.
TRITON_GPU ?= 3.6.0
TRITON_GPU_DIR := $(VENV)/triton-$(TRITON_GPU)

$(TRITON_GPU_DIR)/.installed: | $(BIN)/python
	$(BIN)/pip install -q --no-deps --upgrade --target $(TRITON_GPU_DIR) triton==$(TRITON_GPU)
	touch $@

compile-check: venv $(TRITON_GPU_DIR)/.installed
	@rc=0; \
	$(BIN)/python bench/compile_check.py --json $(VENV)/compile_check-triton-venv.json || rc=1; \
	PYTHONPATH=$(abspath $(TRITON_GPU_DIR)) $(BIN)/python bench/compile_check.py --expect-triton $(TRITON_GPU) \
		--json $(VENV)/compile_check-triton-$(TRITON_GPU).json || rc=1; \
	exit $$rc

bench: build
	$(BIN)/moga bench --quick

clean:
	rm -rf build python/moga/_C*.so *.egg-info python/*.egg-info $(VENV)/.built $(VENV)/.build-config
