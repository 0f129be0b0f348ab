# Two entry points (see README): `make demo` runs the main job, `make test` runs the whole suite.
# Both create the virtual environment first when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo-output

$(BIN)/xrcam: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(BIN)/xrcam

.PHONY: env demo test lint
env: $(BIN)/xrcam

demo: env
	$(BIN)/xrcam demo $(DEMO_OUT)

test: env
	$(BIN)/ruff check xrcam workflows tests benchmarks
	$(BIN)/ruff format --check xrcam workflows tests benchmarks
	$(BIN)/python -m pytest tests

lint: env
	$(BIN)/ruff check xrcam workflows tests benchmarks
	$(BIN)/ruff format --check xrcam workflows tests benchmarks
