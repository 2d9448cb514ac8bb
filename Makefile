# Two commands do everything on a fresh machine; both create .venv themselves.
#   make demo   set up, then run the main job on the built-in default
#   make test   set up with the dev extras, then run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test setup setup-dev sandbox-check bench clean

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

# the RL code sandbox runs model-written code under bubblewrap (network / file-system / PID isolation) and, as
# root, drops to a fresh uid with setpriv (util-linux); both are OS packages, not pip ones
sandbox-check:
	@command -v bwrap >/dev/null || { echo "bubblewrap is missing: the RL code sandbox needs it." \
	  "Install it with: apt-get install bubblewrap   (Fedora: dnf install bubblewrap)"; exit 1; }
	@command -v setpriv >/dev/null || { echo "setpriv is missing: install util-linux (apt-get install util-linux)"; \
	  exit 1; }

test: setup-dev sandbox-check
	$(PY) -m pytest tests

bench: setup-dev
	$(PY) bench/model_speed.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
