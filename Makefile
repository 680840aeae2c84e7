# Two commands do all the set-up on a machine with only Python 3.10+:
#   make demo   trains a small CNN on scikit-learn's bundled digits and prints the results table
#   make test   the whole suite: notebooks clean and in sync, notebook tests, pytest
# Each creates .venv/ and installs the project with its dev extras on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: demo test install export readme docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/digits.py

# nbdev-export and the README must already match the notebooks: a change here means someone
# edited a generated file or forgot to export.
test: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" tools/unchanged.sh "notebooks are clean (run nbdev-clean)" nbdev-clean
	PATH="$(abspath $(BIN)):$$PATH" tools/unchanged.sh "notebooks and library in sync (run nbdev-export)" nbdev-export
	PATH="$(abspath $(BIN)):$$PATH" tools/unchanged.sh "README.md in sync with nbs/index.ipynb (run make readme)" $(BIN)/python tools/readme.py
	CHANNELSLAST_CB_CACHE=$$(mktemp -d) $(BIN)/nbdev-test --n-workers 2
	$(MAKE) docs
	tools/docs/ensure_chromium.sh
	$(BIN)/python -m pytest

export: $(STAMP)
	$(BIN)/nbdev-clean && $(BIN)/nbdev-export && $(BIN)/python tools/readme.py

readme: $(STAMP)
	$(BIN)/python tools/readme.py

# The docs site from the notebooks, without Quarto: nbdev's proc_nbs -> Markdown -> mkdocs build --strict
# into site/, then every local link and anchor checked (tools/docs/build.py says how).
docs: $(STAMP)
	$(BIN)/python tools/docs/build.py

clean:
	rm -rf $(VENV) _proc _docs _mkdocs site
