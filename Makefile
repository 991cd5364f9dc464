# The two README commands. Each sets itself up on a fresh machine: creates .venv when missing, installs the pinned
# dependencies (torch held at the CPU build 2.13.0 by constraints.txt), then runs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint setup clean bench bench-quick peers gpu-check

$(STAMP): requirements.lock constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -r requirements.lock
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m quantune.demo --out outputs/demo --overwrite

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -x --durations=15

# The benchmark report (not part of `make test`): the peers first (torchao, optimum-quanto, bitsandbytes).
peers: $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -r benchmarks/requirements.txt

bench: peers
	$(BIN)/quantune bench --out docs/bench --readme README.md --overwrite

bench-quick: peers
	$(BIN)/quantune bench --quick --out outputs/bench_quick --overwrite

# The GPU check (not part of `make test`): needs CUDA, says so and exits 0 without it. It uses the venv's python
# when there is one, else python3 (a GPU machine's own PyTorch with the project's wheels installed).
gpu-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY)) benchmarks/gpu_check.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) outputs .pytest_cache
