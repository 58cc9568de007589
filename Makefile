# Two entry points (see README): `make demo` and `make test`. Both create .venv when missing.
# torch is installed first and pinned: on CPU-only machines `torch==2.13.0` is a local CPU build,
# while an unpinned torch would pull a multi-GB CUDA build. Override with `make TORCH=torch==X.Y`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# torch/OpenMP threads of the tests (`make test THREADS=2`): the tolerances hold for any count.
THREADS ?= 1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PEER_STAMP := $(VENV)/.installed-peer
EXTRAS_STAMP := $(VENV)/.installed-extras

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# Test-only peer: kronfluence 1.0.1 declares torchvision, whose PyPI build breaks `import transformers`
# beside the CPU torch, so it is installed without its dependencies plus the ones it really imports.
$(PEER_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --no-deps kronfluence==1.0.1
	$(PY) -m pip install --quiet einops einconv opt-einsum
	touch $(PEER_STAMP)

# The optional parts the tests exercise: parquet / datasets inputs, TRL in-process,
# lm-evaluation-harness; and
# gguf (extra `real`, issue 18), for the GGUF rebuild of `ideal suite prepare real`.
# They resolve beside the pinned torch and transformers without changing them.
$(EXTRAS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[formats,trl,lm-eval,real]"
	touch $(EXTRAS_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ideal demo $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

# One torch/OpenMP thread by default: two threads on a busy 2-core machine run 7-20x slower than
# one. The suite reads IDEAL_TEST_THREADS (tests/conftest.py), so THREADS=2 really runs 2.
test: lint $(PEER_STAMP) $(EXTRAS_STAMP)
	IDEAL_PEER_CHECK=1 IDEAL_TEST_THREADS=$(THREADS) OMP_NUM_THREADS=$(THREADS) \
		MKL_NUM_THREADS=$(THREADS) HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
		$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
