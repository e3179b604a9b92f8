# Two entry points for a fresh machine (Python 3.11, CPU):
#   make demo   create .venv, install, distil a student from a teacher on shipped Multi30k en-de
#   make test   create .venv, install, run the test suite
#   make test-fast   the same without the tests marked slow (end to end: training, recipes), in under 2 minutes
# On a CUDA machine, install your CUDA build of torch first and run `pip install -e .[test]`.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Keeps pip on the CPU build of torch (the registry's newest torch pulls gigabytes of CUDA).
export PIP_CONSTRAINT := $(CURDIR)/constraints-cpu.txt

.PHONY: install test test-fast demo clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .[test]
	touch $@

test: install
	$(PY) -m pytest tests -q

test-fast: install
	$(PY) -m pytest tests -q -m "not slow"

demo: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash examples/multi30k-en-de/demo.sh

clean:
	rm -rf $(VENV) work
