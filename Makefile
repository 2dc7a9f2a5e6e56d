# make bench: set up .venv and run the main job (verification against dense attention + throughput table)
# make test:  set up .venv, build the extension and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0a
export MAX_JOBS ?= 2

.PHONY: venv build test bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.deps

build: venv
	@$(BIN)/pip install -v --no-build-isolation -e . > $(VENV)/build.log 2>&1 || { tail -80 $(VENV)/build.log; exit 1; }
	@grep -E "Compiling entry function|Used [0-9]+ registers|spill stores" $(VENV)/build.log | sed "s/^ *//" || true
	$(BIN)/python -c "import moga; print('moga', moga.__version__, 'backends:', moga.available_backends())"

lint: venv
	$(BIN)/ruff check python kernels tests bench examples setup.py

test: build lint
	$(BIN)/python -m pytest -q -ra
	$(BIN)/python bench/compile_check.py

bench: build
	$(BIN)/moga bench --quick

clean:
	rm -rf build python/moga/_C*.so *.egg-info python/*.egg-info
