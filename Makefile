# make test | make unit | make lint | make run DIR=... | make bench | make chaos
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Tests side by side: most wait on a server, a client or a timeout, not on
# the CPU (2 cores here); those marked `alone` still get the machine alone.
JOBS   ?= 4

.PHONY: test unit lint run bench chaos clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,lint]'
	touch $(STAMP)

# Compiled once here (and for the bench), or every server and client started
# compiles the package anew where PYTHONDONTWRITEBYTECODE is set.
test: $(STAMP)
	$(PY) -m compileall -q osproject
	$(PY) -m pytest -n $(JOBS) --dist worksteal

# The in-process tests alone (no server, no client started): seconds.
unit: $(STAMP)
	$(PY) -m pytest -m unit

# ruff and mypy, with their settings in pyproject.toml.
lint: $(STAMP)
	$(PY) -m ruff check
	$(PY) -m mypy

# Start a private server, check DIR, stop the server; exit with the client's status.
run: $(STAMP)
	@test -n "$(DIR)" || { echo "usage: make run DIR=/path/to/tree" >&2; exit 2; }
	@tmp=$$(mktemp -d); \
	$(PY) bin/integrity-server --fifo "$$tmp/server.fifo" 2>"$$tmp/server.err" & \
	server=$$!; \
	trap 'kill -TERM $$server 2>/dev/null; wait $$server; rm -rf "$$tmp"' EXIT INT TERM; \
	$(PY) -m osproject.wait_for_fifo "$$tmp/server.fifo" $$server \
	  || { cat "$$tmp/server.err" >&2; exit 2; }; \
	$(PY) bin/integrity-client --fifo "$$tmp/server.fifo" "$(DIR)"

bench: $(STAMP)
	$(PY) -m compileall -q osproject
	$(PY) tests/bench.py

chaos: $(STAMP)
	$(PY) tests/chaos_demo.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
	find osproject -name __pycache__ -prune -exec rm -rf {} +
