# The whole set-up: `make demo` runs the main job, `make test` the test suite. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fluxrl demo --out demo_out

test: $(STAMP)
	MUJOCO_GL=$${MUJOCO_GL:-osmesa} $(BIN)/python -m pytest -n 2 -q --durations=20

clean:
	rm -rf $(VENV) demo_out
