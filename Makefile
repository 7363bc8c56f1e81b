# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint demo demo-site bench bench-instructions bench-failover clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

demo: $(STAMP)
	$(BIN)/python configs/demo/run_demo.py

# 3 servers on one shared store (SQLite; STORE=postgres for a throw-away PostgreSQL), 3 agents,
# a failover story in numbered steps.
demo-site: $(STAMP)
	$(BIN)/python configs/demo/run_site_demo.py $(if $(STORE),--store $(STORE))

# The metering server beside its baselines (echo ceiling, Redis), SQLite and PostgreSQL stores,
# idle scale, failover storm, profile: ~10 min on 2 cores. BENCH_ARGS=--quick for ~3 min;
# `$(BIN)/python benchmarks/bench.py --help` for running parts (docs/performance.md).
bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)

# Server instructions per request under callgrind: repeatable where timings are not (needs valgrind).
bench-instructions: $(STAMP)
	$(BIN)/python benchmarks/instructions.py $(BENCH_ARGS)

# The agent beside silent preferred servers: heartbeat gaps while probes wait, and one failover.
bench-failover: $(STAMP)
	PYTHONPATH=. $(BIN)/pytest -q -s benchmarks/failover_dark_preferred.py -p tests.conftest

# systemd units, users and directories for a venv at $(PREFIX) (docs/operations.md, "Install
# and run"). The units' /opt/metering is rewritten to $(PREFIX). DESTDIR stages everything
# into a tree (packaging, tests) and then touches nothing on this host; with an empty DESTDIR
# on a host booted with systemd it also creates the users and directories and reloads systemd.
PREFIX ?= /opt/metering
SYSCONFDIR ?= /etc
UNITDIR ?= $(SYSCONFDIR)/systemd/system
SYSUSERSDIR ?= $(SYSCONFDIR)/sysusers.d
TMPFILESDIR ?= $(SYSCONFDIR)/tmpfiles.d
DOCDIR ?= $(PREFIX)/share/doc/metering
SYSTEMD_UNITS := metering-server.service metering-server@.service metering-client.service

.PHONY: install-systemd
install-systemd:
	install -d $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(TMPFILESDIR) $(DESTDIR)$(DOCDIR)
	for unit in $(SYSTEMD_UNITS); do \
	    sed 's|/opt/metering|$(PREFIX)|g' configs/systemd/$$unit >'$(DESTDIR)$(UNITDIR)'/$$unit.tmp && \
	    chmod 0644 '$(DESTDIR)$(UNITDIR)'/$$unit.tmp && \
	    mv -f '$(DESTDIR)$(UNITDIR)'/$$unit.tmp '$(DESTDIR)$(UNITDIR)'/$$unit || exit 1; \
	done
	install -m 0644 configs/systemd/metering.sysusers.conf $(DESTDIR)$(SYSUSERSDIR)/metering.conf
	install -m 0644 configs/systemd/metering.tmpfiles.conf $(DESTDIR)$(TMPFILESDIR)/metering.conf
	install -d $(DESTDIR)$(DOCDIR)/examples
	install -m 0644 docs/*.md docs/*.png $(DESTDIR)$(DOCDIR)/
	install -m 0644 configs/server.toml configs/client.toml $(DESTDIR)$(DOCDIR)/examples/
	@if [ -n "$(DESTDIR)" ]; then \
	    echo "install-systemd: staged in $(DESTDIR); on the target host run:" \
	        "systemd-sysusers; systemd-tmpfiles --create; systemctl daemon-reload"; \
	elif [ -d /run/systemd/system ]; then \
	    set -x; \
	    systemd-sysusers $(SYSUSERSDIR)/metering.conf && \
	    systemd-tmpfiles --create $(TMPFILESDIR)/metering.conf && \
	    systemctl daemon-reload; \
	else \
	    echo "install-systemd: systemd is not running here; once it is, run:" \
	        "systemd-sysusers; systemd-tmpfiles --create; systemctl daemon-reload"; \
	fi

clean:
	rm -rf $(VENV) demo-state .pytest_cache *.egg-info
