# The two commands a newcomer needs: `make demo` and `make test`.
# Both run `make install` first, so either alone works on a fresh Debian machine.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEB_PACKAGES := fuse3 fio memcached postmark sqlite3 gcc python3-dev libfuse3-dev libssl-dev pkg-config util-linux iproute2 iptables

.PHONY: install demo test test-python lint clean check-wheel

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml src/memlend/_native.c src/memlend/_native_read.c
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,bench]'
	@touch $@

demo: install
	$(BIN)/memlend demo

test: install
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup tests

# The same suite on the Python hot path (the C extension turned off; CI runs both).
test-python: install
	MEMLEND_NATIVE=0 $(BIN)/python -m pytest -q -n 2 --dist loadgroup tests

# The package as a user gets it: a wheel built from this tree, installed into a fresh
# virtual environment, run from outside the repository (CI runs it after the tests).
WHEEL_DIR := build/wheel-check
check-wheel: install
	rm -rf $(WHEEL_DIR) && mkdir -p $(WHEEL_DIR)
	$(BIN)/pip wheel -q --no-deps -w $(WHEEL_DIR) .
	$(PYTHON) -m venv $(WHEEL_DIR)/venv
	$(WHEEL_DIR)/venv/bin/pip install -q $(WHEEL_DIR)/memlend-*.whl
	cd / && $(CURDIR)/$(WHEEL_DIR)/venv/bin/memlend --help > /dev/null
	cd / && v1=$$($(CURDIR)/$(WHEEL_DIR)/venv/bin/memlend --version) && \
	  v2=$$($(CURDIR)/$(WHEEL_DIR)/venv/bin/memlend lend --version) && \
	  echo "$$v1 / $$v2" && [ "$$v1" = "$$v2" ]
	cd / && $(CURDIR)/$(WHEEL_DIR)/venv/bin/python -c "import importlib.resources as r; \
	  assert r.files('memlend.bench').joinpath('readcheck.c').is_file(); \
	  import memlend.bench.run, memlend.fs.daemon, memlend.lender.server; \
	  import memlend.native as n; assert n.lib is not None, n.description"
	cd / && ! $(CURDIR)/$(WHEEL_DIR)/venv/bin/python -c "import matplotlib" 2>/dev/null
	rm -rf $(WHEEL_DIR)
	@echo "wheel check: ok"

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
