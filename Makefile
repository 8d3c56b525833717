# Two commands for a new user: `make run` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PRESET ?= digits

.PHONY: run test unit nbval lab clean-runs

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name realfake-kit --display-name "realfake-kit (.venv)" >/dev/null
	touch $(STAMP)

## make run: every notebook on the embedded default (scikit-learn digits) into runs/$(PRESET)/
run: $(STAMP)
	$(BIN)/realfake run --preset $(PRESET)

## make test: unit tests, then every notebook at smoke size under nbval
test: unit nbval

unit: $(STAMP)
	$(BIN)/python -m pytest tests --durations=10 -q

nbval: $(STAMP)
	rm -rf runs/smoke
	REALFAKE_PRESET=smoke MPLBACKEND=Agg $(BIN)/python -m pytest --nbval-lax --nbval-kernel-name realfake-kit \
	    --nbval-cell-timeout 900 notebooks/ --durations=10 -q

## make lab: JupyterLab on notebooks/ with the kit's kernel
lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

clean-runs:
	rm -rf runs/
