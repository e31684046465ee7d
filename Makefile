# One command to run the app, one to run the tests; both set up .venv first and skip work already done.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP := $(VENV)/.dev-installed
BROWSER_STAMP := $(VENV)/.browser-installed
PORT ?= 8501
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: run test lint venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(RUNTIME_STAMP): requirements.txt | $(BIN)/python
	$(BIN)/pip install -r requirements.txt
	touch $@

$(DEV_STAMP): requirements-dev.txt $(RUNTIME_STAMP)
	$(BIN)/pip install -r requirements-dev.txt
	touch $@

# Debian's Chromium for the end-to-end test; Playwright never downloads a browser of its own.
$(BROWSER_STAMP): scripts/ensure_chromium.sh | $(BIN)/python
	bash scripts/ensure_chromium.sh
	touch $@

venv: $(DEV_STAMP)

run: $(RUNTIME_STAMP)
	$(BIN)/streamlit run streamlit_app.py --server.port $(PORT)

lint: $(DEV_STAMP)
	$(BIN)/ruff check .

test: $(DEV_STAMP) $(BROWSER_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
