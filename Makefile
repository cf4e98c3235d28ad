# The two commands of the README: `make demo` (main job) and `make test` (`make test-fast`: without
# the tests marked slow).
# Both create ./.venv and install the package with its dev extras first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.stvr-installed

.PHONY: install demo test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade -q pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/stvr demo

test: $(STAMP)
	$(PY) -m pytest -q

# everything but the tests marked slow (learnability, demo, training runs): under a minute
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/bench_cells.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
