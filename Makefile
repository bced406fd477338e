# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export MESHCTL_HOME ?= $(CURDIR)/.state/demo

.PHONY: demo test test-deps venv down status clean bench bench-quick bench-deps bench-peer-hop bench-test soak fuzz

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

test: $(STAMP) test-deps
	$(BIN)/python -m pytest -n 2 tests

# Optional system tools some tests use (a real Redis through the mesh). Installed from
# Debian when running as root with apt-get; a failed install never fails the run, the
# test that needs the tool skips and says why.
test-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    mkdir -p .state; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server; } \
	      >.state/test-deps.log 2>&1 || echo "redis-server could not be installed (.state/test-deps.log); its test will skip"; \
	  else echo "redis-server is missing and cannot be installed here (needs root and apt-get); its test will skip"; fi; }

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
	$(BIN)/python bench/peer_hop.py --write

# The benchmark scripts' own tests (parsing, cleanup on SIGTERM); they need the bench tools.
bench-test: bench-deps $(STAMP)
	$(BIN)/python -m pytest -q -n 2 bench

# The hop between two sidecars alone: pooled HTTP/1.1 vs HTTP/1.1 over h2 (docs/peer-transport.md).
bench-peer-hop: $(STAMP)
	$(BIN)/python bench/peer_hop.py --write

# Long runs (docs/reliability.md). soak: ShopFast's real traffic mix for SOAK_SECONDS
# (600 s) at SOAK_RATE rps (auto: the highest rate the demo holds on this machine, found
# first), with a live split change, a certificate rotation and a rolling restart; then
# docs/reliability.md is regenerated from the results.
# fuzz: 100,000 sidecar request-path cases, 40,000 control-API cases and the manifest
# loader's properties; each test is bounded by FUZZ_TIMEOUT seconds.
SOAK_SECONDS ?= 600
SOAK_RATE ?= auto
FUZZ_TIMEOUT ?= 7200

soak: $(STAMP)
	SOAK_SECONDS=$(SOAK_SECONDS) SOAK_RATE=$(SOAK_RATE) $(BIN)/python bench/soak.py; \
	status=$$?; $(BIN)/python -m tests.reliability; exit $$status

fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -n 2 --timeout $(FUZZ_TIMEOUT) \
		tests/test_sidecar_fuzz.py tests/test_fuzz_control.py \
		"tests/test_manifest.py::test_random_structures_raise_only_manifest_errors" \
		"tests/test_manifest.py::test_mutated_good_manifests_raise_only_manifest_errors" \
		"tests/test_manifest.py::test_random_text_raises_only_manifest_errors"
