# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export MESHCTL_HOME ?= $(CURDIR)/.state/demo

.PHONY: demo test venv down status clean bench-quick

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/meshctl up -f templates/shopfast.yaml
	@echo
	@echo "ShopFast is up. Open http://127.0.0.1:8080/ in a browser."
	@echo "Try next (with $(BIN) on PATH, MESHCTL_HOME=$(MESHCTL_HOME)):"
	@echo "  meshctl status               every instance, its state and ports"
	@echo "  meshctl logs -f              all logs, interleaved"
	@echo "  python demo-services/loadgen.py --url http://127.0.0.1:8080 --rps 20"
	@echo "  meshctl down                 stop everything"

down: $(STAMP)
	$(BIN)/meshctl down

status: $(STAMP)
	$(BIN)/meshctl status

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 tests

clean:
	rm -rf $(VENV) .state .pytest_cache .hypothesis
