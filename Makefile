# The two commands of the README: `make run` (the main job) and `make test`.
# Both create .venv/ from pyproject.toml on first use and reinstall when it
# changes.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

run: $(STAMP)
	$(VENV)/bin/python experiments/finetune.py --preset gemma3_270m_arc_easy

test: $(STAMP)
	$(VENV)/bin/python -m pytest -n 2 -q
