# The two Quick-start commands (README): `make run` and `make test`.
# Both create .venv with Python 3.11 and install the project into it when needed.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test down

$(BIN)/huiying: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required (nameko 2.14 and eventlet)"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip "setuptools<81" wheel
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

run: $(BIN)/huiying
	$(BIN)/huiying up
	$(BIN)/huiying directory load data/longgang-directory.yaml
	@scripts/next-steps

test: $(BIN)/huiying
	@scripts/check-test-services
	$(BIN)/python -m pytest $(PYTEST_ARGS)

down: $(BIN)/huiying
	$(BIN)/huiying down
