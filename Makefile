# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export MESHCTL_HOME ?= $(CURDIR)/.state/demo

.PHONY: demo test venv down status clean bench bench-quick bench-deps

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

# Benchmarks (bench/run.py): the mesh's two-sidecar path against nginx direct and an
# mTLS HAProxy pair. BENCH_ARGS=--ref HEAD benchmarks the last commit, not the work tree.
BENCH_TOOLS := wrk haproxy nginx h2load
BENCH_ARGS ?=

bench-deps: $(STAMP)
	@missing=; for tool in $(BENCH_TOOLS); do command -v $$tool >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then apt-get update && apt-get install -y wrk haproxy nginx-light nghttp2-client; fi
	@test -x $(BIN)/py-spy || $(BIN)/pip install --quiet py-spy

bench-quick: bench-deps $(STAMP)
	$(BIN)/python bench/run.py --quick $(BENCH_ARGS)

bench: bench-deps $(STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)
