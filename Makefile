# Two commands on a fresh machine:
#   make demo   (Python 3.11+ and pip) installs vtp into .venv and transcribes a sample video
#   make test   installs vtp with its test extras into .venv, provisions redis-server and a Chromium
#               (tests/provision.py: found, or installed, or one line saying what to install), then
#               runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SAMPLE ?= examples/sample.mp4
OUT ?= out

.PHONY: demo test install provision bench clean

# The demo needs vtp alone; the tests add their extras (torch CPU, a browser driver, ...).
$(BIN)/.installed-demo: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e .
	touch $@

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[test,bench]'
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed-demo
	@test -f "$(SAMPLE)" || { echo "no sample video at $(SAMPLE): run 'make demo SAMPLE=path/to/video'"; exit 2; }
	$(BIN)/vtp transcribe "$(SAMPLE)" -o $(OUT)/
	@echo; head -n 12 $(OUT)/$$(basename "$(SAMPLE)" | sed 's/\.[^.]*$$//').srt

# redis-server and Chromium: found, installed (apt-get as root; Playwright's download otherwise),
# or a one-line stop before the suite starts: checked once before the pip install (a missing
# redis-server stops at once) and once after it. `make provision DRY=1` only says what it would do.
provision:
	$(PYTHON) tests/provision.py --before-install $(if $(DRY),--dry-run)
	@$(MAKE) --no-print-directory install
	$(BIN)/python tests/provision.py $(if $(DRY),--dry-run)

test: provision
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python -m bench.cpu_vs_peers --write docs/benchmarks.md

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
