# Two commands for a fresh machine: `make run` (the main job, offline) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: run test setup clean

$(PY):
	python3 -m venv $(VENV)
	. $(VENV)/bin/activate && bash scripts/setup.sh

setup: $(PY)

run: $(PY)
	$(PY) train.py experiment=offline $(ARGS)

# a pytest-xdist worker per core (at most 4), each test file on one worker (its module fixtures built once)
test: $(PY)
	$(PY) -m pytest -n auto --maxprocesses 4 --dist loadfile $(ARGS)

clean:
	rm -rf outputs multirun
