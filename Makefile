# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export MESHCTL_HOME ?= $(CURDIR)/.state/demo

.PHONY: compile clean-compiled screenshots demo test test-deps screenshots venv down status clean bench bench-quick bench-deps bench-peer-hop bench-test soak fuzz

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# The sidecar's request path compiled with mypyc, in place (tools/compile_proxy.py; the
# modules are listed in meshctl/proxy/build.py). Rebuilds only when a source changed; without
# a C compiler it says so and the .py files run. `make clean-compiled` returns to pure Python.
MYPYC_REQ := mypy==2.4.1
compile: $(STAMP)
	@$(BIN)/python -c "import mypyc" 2>/dev/null || $(BIN)/pip install --quiet '$(MYPYC_REQ)' \
	  || echo "could not install $(MYPYC_REQ): the request path stays pure Python"
	$(BIN)/python tools/compile_proxy.py

clean-compiled:
	$(BIN)/python tools/compile_proxy.py --clean

demo: $(STAMP) compile
	$(BIN)/meshctl up -f templates/shopfast.yaml
	@echo
	@echo "ShopFast is up. Open http://127.0.0.1:8080/ in a browser."
	@echo "Try next (with $(BIN) on PATH, MESHCTL_HOME=$(MESHCTL_HOME)):"
	@echo "  meshctl status               every instance, its state and ports"
	@echo "  meshctl logs -f              all logs, interleaved"
	@echo "  meshctl dashboard            the mesh in your browser, live"
	@echo "  python demo-services/loadgen.py --url http://127.0.0.1:8080 --rps 20"
	@echo "  curl -N http://127.0.0.1:8080/api/orders/feed   the live order feed, streamed through the mesh"
	@echo "  meshctl why --last-failure payments   every decision behind the last failed charge"
	@echo "  meshctl shadow cart v2 --unsafe       compare cart v2's answers with v1's (then: shadow report cart)"
	@echo "  meshctl down                 stop everything"

down: $(STAMP)
	$(BIN)/meshctl down

status: $(STAMP)
	$(BIN)/meshctl status

# The full run uses the compiled request path (`compile`); the request-path tests run again
# on the .py files (MESHCTL_PROXY_BUILD=pure), the build a machine without a C compiler runs.
PURE_TESTS := tests/test_http1.py tests/test_sidecar.py tests/test_pool.py tests/test_retry.py \
	tests/test_sidecar_policy.py tests/test_errors.py tests/test_compiled_build.py
# The HTTP/2 and gRPC tests run twice: with the fast codec (ngh2) in the full run, then with
# the pure-Python fallback (h2) that serves where ngh2 cannot be installed.
H2_TESTS := tests/test_h2conn.py tests/test_ingress_h2.py tests/test_protocols_mesh.py

# mypy first (seconds; [tool.mypy] in pyproject.toml): the sidecar strictly, the agent and the CLI
# in mypy's default mode.
test: $(STAMP) test-deps compile
	$(BIN)/mypy
	$(BIN)/python -m pytest -n 2 tests
	MESHCTL_PROXY_BUILD=pure $(BIN)/python -m pytest -n 2 $(PURE_TESTS)
	MESHCTL_H2_CODEC=h2 $(BIN)/python -m pytest -n 2 $(H2_TESTS)

# Optional system tools some tests use, as command:debian-package pairs (a real Redis and
# Prometheus, nginx behind the ingress for the burst test, Chromium and its WebDriver for
# the dashboard's browser tests). Installed from Debian when running as root with apt-get;
# a failed install never fails the run, the tests that need a tool skip and say why.
TEST_TOOLS := redis-server:redis-server prometheus:prometheus nginx:nginx-light chromium:chromium chromedriver:chromium-driver h2load:nghttp2-client
test-deps:
	@missing=; for pair in $(TEST_TOOLS); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    mkdir -p .state; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	        -o DPkg::Lock::Timeout=300 --no-install-recommends $$missing; } \
	      >.state/test-deps.log 2>&1 || echo "could not install$$missing (.state/test-deps.log); their tests will skip"; \
	  else echo "missing$$missing and cannot install here (needs root and apt-get); their tests will skip"; fi; fi

# docs/dashboard-topology.png: ShopFast under load in the dashboard, taken by the browser test.
screenshots: $(STAMP) test-deps
	MESHCTL_SCREENSHOTS=$(CURDIR)/docs $(BIN)/python -m pytest -q tests/test_dashboard.py -k shopfast

clean:
	rm -rf $(VENV) .state .pytest_cache .hypothesis .mypy_cache
	rm -f meshctl/proxy/*.so meshctl/proxy/_compiled.json

# Benchmarks (bench/run.py): the mesh's two-sidecar path against nginx direct and an
# mTLS HAProxy pair. BENCH_ARGS=--ref HEAD benchmarks the last commit, not the work tree.
BENCH_TOOLS := wrk haproxy nginx h2load
BENCH_ARGS ?=

bench-deps: $(STAMP)
	@missing=; for tool in $(BENCH_TOOLS); do command -v $$tool >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then apt-get update && apt-get install -y wrk haproxy nginx-light nghttp2-client; fi
	@test -x $(BIN)/py-spy || $(BIN)/pip install --quiet py-spy

bench-quick: bench-deps $(STAMP) compile
	$(BIN)/python bench/run.py --quick $(BENCH_ARGS)

bench: bench-deps $(STAMP) compile
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
