# make demo: set up .venv, pretrain a teacher, prune a heterogeneous student, compare KD with CE-only (2 CPU processes).
# make test: set up .venv, run the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
DEMO := demo_out

# Install only when requirements.txt is newer than the last install: a second run installs nothing.
# pip compiles the bytecode on one core; compileall uses them all (2 min 42 s -> 1 min 58 s on 2 cores). The one
# file it skips is torch's Python 3.12 syntax test, which pip also fails to compile and ignores.
$(INSTALLED): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile -r requirements.txt
	$(PY) -m compileall -q -j 0 -x 'py312_intrinsics' $(VENV)/lib >/dev/null
	touch $@

.PHONY: setup demo test clean
setup: $(INSTALLED)

# Each stage of the demo skips itself when its output is complete: a second run only redoes what changed.
demo: $(INSTALLED)
	OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false $(PY) -m tools.demo --out $(DEMO)

test: $(INSTALLED)
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -q -p no:cacheprovider

clean:
	rm -rf $(DEMO)
