# The README's two commands. torch is pinned to the local CPU build first, so that no later
# requirement can pull a multi-GB CUDA build on a CPU machine.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench browser

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/unrelearn demo --out unrelearn-demo

# The report's browser test needs Debian's Chromium; installed here where it is missing.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium || \
	   (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium)) >/dev/null

test: setup browser
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q
