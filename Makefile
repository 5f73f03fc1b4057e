# meshshield — make install | demo | test | bench | lint
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint unit bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/meshshield demo

lint: $(STAMP)
	$(VENV)/bin/ruff check meshshield tests bench
	$(VENV)/bin/mypy --strict meshshield/

test: lint
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) bench/cas_issue.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
