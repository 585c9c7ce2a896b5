# Two entry points: `make run` (the main job) and `make test`. Both set up what they need first.
PYTHON ?= python3
STAMP := .setup-done

.PHONY: setup run test

$(STAMP): pyproject.toml scripts/setup.sh
	PYTHON=$(PYTHON) bash scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	hyla info smollm2-135m
	hyla generate smollm2-135m --chat --prompt "What is the capital of France?" --max-new-tokens 24

test: $(STAMP)
	$(PYTHON) -m pytest -q
