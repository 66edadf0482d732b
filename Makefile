# joynode: the two commands are `make run` and `make test`; both install what is
# missing first and are safe to repeat.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= joynode.toml

.PHONY: install system-deps run test lint typecheck pytest clean

install: $(STAMP)

# Debian packages the Python deps build against (fastecdsa, under libp2p, needs GMP).
system-deps:
	@dpkg -s libgmp-dev >/dev/null 2>&1 || { \
	  echo "installing libgmp-dev"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgmp-dev; }

$(STAMP): setup.cfg pyproject.toml | system-deps
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[dev]'
	@# trio-typing (pulled in by libp2p and multiaddr) ships trio-stubs for an old
	@# trio; mypy would prefer them over trio 0.35's own inline types. Runtime code
	@# only needs the trio_typing module, so drop the stale stubs.
	rm -rf $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/trio-stubs
	@touch $(STAMP)

run: install
	$(BIN)/joynode keys generate --config $(CONFIG)
	exec $(BIN)/joynode run --config $(CONFIG)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/pytest

# pytest exits 5 when it collects no tests; make treats that as a failure too.
test: lint typecheck pytest

clean:
	rm -rf $(VENV) .joynode .mypy_cache .pytest_cache .ruff_cache .hypothesis
