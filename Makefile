# The two commands a newcomer runs: `make run` (the main job on the embedded default) and
# `make test`. Each does its own set-up; `make install` does the set-up alone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TOOLKIT := $(VENV)/bin/toolkit
STAMP := $(VENV)/.installed

.PHONY: install run test bench lint clean-generated

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install-system-packages.sh
	bash scripts/install-system-packages.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

run: install
	$(TOOLKIT) scrape fashion-mnist --test-split
	$(TOOLKIT) train fashion-mnist
	$(TOOLKIT) evaluate fashion-mnist --data scrape/fashion-mnist-test
	@echo "Serving the dashboards: open the URLs printed below (they carry the access token): fashion-mnist.ipynb is the classifier, clean.ipynb the cleaning app; Ctrl-C stops"
	$(TOOLKIT) serve

test: install
	$(PY) -m pytest -q -ra -n 2 --dist loadfile

bench: install
	@for script in bench/*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

lint: install
	$(VENV)/bin/ruff check toolkit tests bench
