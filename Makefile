# Two commands from a fresh clone: `make sample` and `make test`. Each creates .venv first
# when it is missing. torch is pinned to the 2.13.0 CPU build: an open range can pull a
# multi-GB CUDA build instead.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install sample test bench evaluate clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

sample: $(STAMP)
	$(PY) sample.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

bench: $(STAMP)
	$(PY) bench.py $(ARGS)

evaluate: $(STAMP)
	$(PY) evaluate.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
