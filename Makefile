# The two commands a newcomer needs: `make demo` and `make test`. Each installs what it needs.
SHELL := /bin/bash
.DEFAULT_GOAL := help
export PATH := $(HOME)/.local/bin:$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export UV_LINK_MODE := copy

# `make server PORT=4300` moves the API and the UI together; DB=postgres gives the server a
# private PostgreSQL cluster under .lab/postgres; WORKERS=2 starts two workers on the pool.
PORT ?= 4200
DB ?= sqlite
WORKERS ?= 1

UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
APT_PACKAGES := openssh-server openssh-client apt-utils dpkg-dev restic xfsprogs postgresql sqlite3 chromium

.PHONY: help demo test server deploy bootstrap uv python-deps node-deps system-deps bench clean

help:
	@echo "make demo    run the main job on the embedded lab (local store, local host); VERBOSE=1 shows the logs live"
	@echo "make test    run the whole test suite (installs everything it needs)"
	@echo "make server  Prefect server + UI + worker + every deployment on http://127.0.0.1:$(PORT) (PORT=...; Ctrl-C stops all)"
	@echo "             DB=postgres: the server on its own PostgreSQL cluster (.lab/postgres); WORKERS=2: two workers"
	@echo "make deploy  register every deployment on PREFECT_API_URL's server (GIT=url [BRANCH=b]: runs clone the code from git)"
	@echo "make bench   run the benchmarks in bench/ (slow; not part of the tests)"

uv:
	@command -v uv >/dev/null 2>&1 || [ -x "$(HOME)/.local/bin/uv" ] || \
	  python3 -m pip install --user --quiet uv 2>/dev/null || \
	  python3 -m pip install --user --quiet --break-system-packages uv

python-deps: uv
	@$(UV) sync --frozen --compile-bytecode --quiet

node-deps:
	@[ -x node_modules/.bin/azurite-blob ] || npm ci --no-audit --no-fund --loglevel=error

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

bootstrap: python-deps node-deps system-deps

demo: python-deps
	@$(UV) run --frozen python -m cli.demo $(if $(VERBOSE),--verbose)

test: bootstrap
	@$(UV) run --frozen pytest -q --numprocesses 2 --dist loadfile

server: python-deps
	@$(UV) run --frozen python -m cli.lab_server --port $(PORT) --db $(DB) --workers $(WORKERS)

deploy: python-deps
	@$(UV) run --frozen python -m cli.deploy $(if $(GIT),--git-repository '$(GIT)') $(if $(BRANCH),--git-branch '$(BRANCH)')

bench: bootstrap
	@$(UV) run --frozen python bench/backup_vs_restic.py
	@$(UV) run --frozen python bench/fanout_vs_ansible.py
	@$(UV) run --frozen python bench/worker_capacity.py
	@$(UV) run --frozen python bench/repo_index.py
	@$(UV) run --frozen python bench/cbt_xfs.py

clean:
	rm -rf .lab .bench .pytest_cache
