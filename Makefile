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

.PHONY: demo test lint install clean backends backends-test

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

# The optional parts the tests exercise: parquet / datasets inputs, TRL in-process (Python >= 3.11:
# on 3.10 the `trl` extra's marker installs no TRL and its tests skip saying so),
# lm-evaluation-harness; and gguf (extra `real`), for the GGUF rebuild of `ideal suite prepare real`.
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
# IDEAL_EXTRAS_REQUIRED: an extra installed above that fails to import fails its tests (never a
# quiet skip); one that installs nothing on this Python skips them with the reason.
test: lint $(PEER_STAMP) $(EXTRAS_STAMP)
	IDEAL_PEER_CHECK=1 IDEAL_EXTRAS_REQUIRED=1 IDEAL_TEST_THREADS=$(THREADS) OMP_NUM_THREADS=$(THREADS) \
		MKL_NUM_THREADS=$(THREADS) HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
		$(PY) -m pytest $(PYTEST_ARGS)

# The external trainers (README: "LLaMA-Factory and axolotl"), each in a virtual environment of
# its own: their pins of transformers, peft, trl, accelerate and datasets clash with ours.
# requirements/<tool>.txt pins every package to what was tested; an install that fails is tried
# once more (a registry hiccup), then stops `make`. The import at the end is the proof.
LLAMAFACTORY_VENV ?= .venv-llamafactory
AXOLOTL_VENV ?= .venv-axolotl
LLAMAFACTORY ?= llamafactory==0.9.5
AXOLOTL ?= axolotl==0.19.0

# $(call tool_venv,VENV,REQUIREMENT,CONSTRAINTS,MODULE TO IMPORT)
define tool_venv
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/pip install --quiet -c $(3) "$(2)" || \
		{ echo "make: installing $(2) failed; trying once more"; \
		  $(1)/bin/pip install --quiet -c $(3) "$(2)"; }
	$(1)/bin/python -c "import $(4)"
	touch $(1)/.installed
endef

$(LLAMAFACTORY_VENV)/.installed: requirements/llamafactory.txt
	$(call tool_venv,$(LLAMAFACTORY_VENV),$(LLAMAFACTORY),requirements/llamafactory.txt,llamafactory.data)

$(AXOLOTL_VENV)/.installed: requirements/axolotl.txt
	$(call tool_venv,$(AXOLOTL_VENV),$(AXOLOTL),requirements/axolotl.txt,axolotl.cli.config)

backends: $(LLAMAFACTORY_VENV)/.installed $(AXOLOTL_VENV)/.installed

# Each tool for real (tests/test_tools.py): the parity check and a one-round `ideal run` through
# its preset. A tool that cannot be run is a failure here, never a silent skip.
backends-test: $(PEER_STAMP) $(EXTRAS_STAMP) backends
	IDEAL_TOOLS_REQUIRED=1 IDEAL_LLAMAFACTORY_VENV=$(LLAMAFACTORY_VENV) \
		IDEAL_AXOLOTL_VENV=$(AXOLOTL_VENV) IDEAL_TEST_THREADS=$(THREADS) \
		OMP_NUM_THREADS=$(THREADS) MKL_NUM_THREADS=$(THREADS) HF_HUB_OFFLINE=1 \
		TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -m tools tests/test_tools.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(LLAMAFACTORY_VENV) $(AXOLOTL_VENV) build dist src/*.egg-info .pytest_cache \
		.ruff_cache
