# segflow: the two commands of the quick start are `make demo` and `make test`.
# Both create .venv when needed and install the pinned set from constraints.txt.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.segflow-installed
# Test processes (pytest-xdist): one per logical CPU by default; TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= logical
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1

.PHONY: demo test test-all bench install browser serve clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), f"segflow needs Python >= 3.11, found {sys.version}"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/segflow demo --out demo-out

test: $(STAMP) browser
	$(PYTEST)

test-all: $(STAMP) browser
	$(PYTEST) -m "not gpu"

# The Prefect UI test (tests/ui) drives a headless Chromium. Install Debian's where we may (root with
# apt-get; `apt-get update` only if the first try fails); otherwise say so. Never fails the build.
APT_CHROMIUM := DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null 2>&1
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium for the browser test (tests/ui)"; \
	  $(APT_CHROMIUM) || { apt-get update >/dev/null 2>&1 && $(APT_CHROMIUM); } \
	  || echo "chromium could not be installed: the browser test (tests/ui) will be skipped"; \
	else echo "no chromium, and no root apt-get to install it: the browser test (tests/ui) will be skipped"; fi

bench: $(STAMP)
	$(BIN)/python bench/throughput.py

# A Prefect server on 127.0.0.1:4200, the process work pool, every deployment of
# deployments/prefect.yaml and a worker (see README, "Deployments and schedules").
serve: $(STAMP)
	deployments/serve.sh

clean:
	rm -rf $(VENV) demo-out bench/out .pytest_cache test-artifacts
