# The course's two commands (see README):  `make lab`  and  `make test`.
# Both create .venv on first use from requirements.txt (exact pins) and compile the
# `sru` package's small C++ op once for this environment.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.dmn-installed

.PHONY: setup lab lint test notebooks clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -e .
	$(PY) -m dmn_lib.setup_check
	touch $(STAMP)

# (JupyterLab refuses to run as root unless told: containers often are root)
lab: setup
	$(VENV)/bin/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root)

# ruff: the style rules of pyproject.toml ([tool.ruff]); `make test` (and so CI) runs it first
lint: setup
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest

clean-venv:
	rm -rf $(VENV)
