# The two commands of the README: `make run` and `make test`. Both set up .venv on first use.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: run test bench docs

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/trackalert -C conf/trackalert.conf -D

test: $(VENV)/.installed
	$(PY) -m pytest -q

# Issue 9's workload with an empty and with the starter policies, then raw ingest (empty log and
# 5 million events). Side by side with another commit: $(PY) bench/compare.py --against REV.
bench: $(VENV)/.installed
	$(PY) bench/workload.py --policy empty
	$(PY) bench/workload.py --policy starter
	$(PY) bench/ingest.py

docs: $(VENV)/.installed
	$(PY) -m trackalert.lua.docs > docs/lua-api.md
