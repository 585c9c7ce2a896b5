# Two entry points: `make run` (the main job) and `make test`. Both set up what they need first.
PYTHON ?= python3
STAMP := .setup-done
TEACHER ?= smollm2-135m
HYBRID ?= runs/smollm2-hybrid

.PHONY: setup run test

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
