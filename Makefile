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
# (as root with apt-get, as on CI, they are installed here; otherwise the message says what to run)
sandbox-check:
	@if ! command -v bwrap >/dev/null || ! command -v setpriv >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap util-linux >/dev/null; \
	  else \
	    echo "the RL code sandbox needs bubblewrap and util-linux (setpriv): apt-get install bubblewrap util-linux" \
	      "(Fedora: dnf install bubblewrap util-linux)"; exit 1; \
	  fi; \
	fi

test: setup-dev sandbox-check
	$(PY) -m pytest tests

bench: setup-dev
	$(PY) bench/model_speed.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
