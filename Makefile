# Two commands do everything on a fresh machine; both create .venv themselves.
#   make demo   set up, then run the main job on the built-in default
#   make test   set up with the dev extras, then run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test setup setup-dev bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev

demo: setup
	$(PY) -m nemotron3 demo

test: setup-dev
	$(PY) -m pytest tests

bench: setup-dev
	$(PY) bench/model_speed.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
