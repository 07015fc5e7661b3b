# Each target sets itself up: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test soak bench lint clean

# The editable install puts the checkout on sys.path with a plain .pth line, no
# import hook (pyproject.toml's package-dir says why). The stamp depends on this
# Makefile too, so an existing venv reinstalls when the install line changes.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

demo: $(STAMP)
	bash demo/demo.sh

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not soak" $(PYTEST_ARGS)

soak: $(STAMP)
	$(BIN)/python -m pytest -q -m soak $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

lint: $(STAMP)
	$(BIN)/ruff check syncengine cli tests bench

clean:
	rm -rf $(VENV) demo-run bench-run
