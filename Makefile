# Two entry points that work on a fresh machine with Python >= 3.11: `make quickstart` and `make test`.
# Also: `make quickstart-rl` (GRPO from the quickstart's model, built first if missing) and `make test-fast`
# (the suite without the tests marked slow, for iterating).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: quickstart quickstart-rl test test-fast lint format clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e '.[test]'
	touch $@

quickstart: $(VENV)/.installed
	$(PY) -m jaxrl_llm.train --config configs/quickstart.py

runs/quickstart/final/config.json: | $(VENV)/.installed
	$(PY) -m jaxrl_llm.train --config configs/quickstart.py

quickstart-rl: $(VENV)/.installed runs/quickstart/final/config.json
	$(PY) -m jaxrl_llm.train --config configs/quickstart_grpo.py

test: lint
	$(PY) -m pytest -q

test-fast: lint
	$(PY) -m pytest -q -m "not slow"

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed-test
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) runs .pytest_cache
