PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install lint docs chromium clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the project's metadata or pins change.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/explainkit demo --out runs/demo --overwrite

# Regenerate docs/cli.md from the commands (tests check it is current).
docs: $(STAMP)
	EXPLAINKIT_LOAD_PLUGINS= $(BIN)/python -m cogapp -r docs/cli.md

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The report's browser test needs Chromium: install Debian's package when we can (root + apt).
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get install -y -q chromium >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)) \
	  || echo "chromium not installed: the report's browser test will be skipped"; }

# pytest exits 5 when it collects nothing; that is a failure here (the suite always has tests).
# Two workers: most tests wait on a CLI subprocess starting, so two cores run two at once;
# a test module stays on one worker, so its module fixtures are built once.
test: $(STAMP) lint chromium
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) build *.egg-info
