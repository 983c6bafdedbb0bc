# make demo: set up .venv, pretrain a teacher, prune a heterogeneous student, compare KD with CE-only (2 CPU processes).
# make test: set up .venv, run the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
DEMO := demo_out

# Install only when requirements.txt is newer than the last install: a second run installs nothing.
$(INSTALLED): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
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
