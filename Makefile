# make test | make lint | make run DIR=... | make bench | make chaos
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test lint run bench chaos clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,lint]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

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
	$(PY) tests/bench.py

chaos: $(STAMP)
	$(PY) tests/chaos_demo.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
