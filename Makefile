# Skyport: the two commands are `make run` and `make test` (see README.md).
# Every other target is a step of those two and safe to run again.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= /usr/bin/python3
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
VAR := $(CURDIR)/var
RUN := $(VAR)/run
LOG := $(VAR)/log
IMAGES := $(VAR)/images
NODE_NAME ?= $(shell hostname -s)
export SKYPORT_VAR_DIR := $(VAR)
export SKYPORT_IMAGE_DIR := $(IMAGES)
export CELERY_BROKER_URL ?= redis://127.0.0.1:6379/0
# The web server's flags (tests/security/gunicorn.py runs the same): --capture-output puts what Django
# logs to stderr (every 500 with its request id and traceback) into the error log, web.log.
GUNICORN_FLAGS := -w 3 -k gthread --threads 4 --timeout 120 --capture-output

DEBS := libvirt-daemon-system qemu-system-x86 qemu-utils libvirt-dev pkg-config gcc python3-dev \
	python3-venv busybox-static genisoimage syslinux syslinux-common mtools dosfstools fdisk cpio tini \
	iproute2 iputils-ping crun runc umoci skopeo conmon redis-server sqlite3 procps chromium docker-compose \
	postgresql debootstrap openssh-client curl podman netavark aardvark-dns rabbitmq-server gettext \
	nftables dnsmasq-base nginx-light

.PHONY: help run test setup debs venv host redis libvirtd images test-images migrate catalog messages bootstrap check pytest pytest-pg stop status

help:
	@echo "make run   - install what is missing, start everything on http://127.0.0.1:8000"
	@echo "make test  - the same set-up, then lint, type checks and the whole test suite"
	@echo "make stop  - stop the processes that 'make run' started"

# ---------------------------------------------------------------- set-up steps
debs:
	@missing=$$(for p in $(DEBS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		made_policy=0; \
		if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; made_policy=1; fi; \
		trap '[ $$made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d' EXIT; \
		apt-get update -q; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

venv: debs $(VENV)/.installed

redis: debs
	@mkdir -p $(RUN) $(LOG)
	@if redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then echo "redis: already answering on 127.0.0.1:6379"; else \
		redis-server --bind 127.0.0.1 --port 6379 --daemonize yes --save '' --appendonly yes \
			--pidfile $(RUN)/redis.pid --logfile $(LOG)/redis.log --dir $(VAR); \
		for i in $$(seq 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done; \
		redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null; echo "redis: started"; fi

libvirtd: debs
	@mkdir -p $(LOG)
	compute/host/start-libvirtd.sh $(LOG)/libvirtd.log

host: debs redis libvirtd

images: debs
	@mkdir -p $(IMAGES)
	images/sample_vm/build.sh $(IMAGES) >/dev/null
	images/sample_container/build.sh $(IMAGES) >/dev/null

migrate: venv messages
	$(PY) manage.py migrate --noinput -v0
	$(PY) manage.py collectstatic --noinput -v0

# the UI's translations: locale/*/LC_MESSAGES/django.po -> .mo (msgfmt, Debian's gettext)
messages: venv
	$(PY) manage.py compilemessages -v0 --ignore .venv

catalog: migrate images
	$(PY) manage.py import_sample_images --dir $(IMAGES)

setup: venv host images migrate catalog

bootstrap: migrate
	@$(PY) manage.py bootstrap

# ---------------------------------------------------------------- make run
run: setup
	@mkdir -p $(RUN) $(LOG)
	@$(MAKE) --no-print-directory stop >/dev/null
	@echo "starting control worker, compute worker ($(NODE_NAME)), web server and console relay"
	@setsid $(VENV)/bin/celery -A portal worker -B -Q control -n control@%h --concurrency 2 --loglevel INFO \
		--pidfile $(RUN)/control.pid --logfile $(LOG)/control.log --detach
	@SKYPORT_NODE_NAME=$(NODE_NAME) SKYPORT_NODE_KEY=$$($(PY) manage.py node key $(NODE_NAME)) \
		setsid $(VENV)/bin/celery -A compute.worker worker -Q node.$(NODE_NAME) \
		-n node@$(NODE_NAME) --concurrency 2 --loglevel INFO \
		--pidfile $(RUN)/compute.pid --logfile $(LOG)/compute.log --detach
	@# no proxy under make run: the pages hand out the relay's own port for the console WebSocket
	@SKYPORT_CONSOLE_WS_URL=ws://127.0.0.1:8001 setsid $(VENV)/bin/gunicorn portal.wsgi -b 127.0.0.1:8000 $(GUNICORN_FLAGS) --daemon --pid $(RUN)/web.pid \
		--access-logfile $(LOG)/web-access.log --error-logfile $(LOG)/web.log
	@# the console relay (WebSockets only; docs/console.md)
	@setsid $(VENV)/bin/uvicorn portal.asgi:application \
		--host 127.0.0.1 --port 8001 --no-access-log >>$(LOG)/relay.log 2>&1 </dev/null & echo $$! > $(RUN)/relay.pid
	@for i in $$(seq 100); do curl -fs -o /dev/null http://127.0.0.1:8000/healthz && break; sleep 0.1; done
	@curl -fsS -o /dev/null http://127.0.0.1:8000/healthz || { echo "web server did not start; see $(LOG)/web.log"; exit 1; }
	@$(PY) manage.py bootstrap
	@echo "logs in $(LOG); stop with 'make stop'"

# SIGTERM (a worker finishes its task in hand), 30 s, then SIGKILL to what is still running.
stop:
	@for p in relay web compute control; do \
		f=$(RUN)/$$p.pid; [ -f $$f ] || continue; pid=$$(cat $$f); \
		if kill -0 $$pid 2>/dev/null; then kill -TERM $$pid; \
			for i in $$(seq 300); do kill -0 $$pid 2>/dev/null || break; sleep 0.1; done; \
			if kill -0 $$pid 2>/dev/null; then kill -KILL $$pid; echo "killed $$p ($$pid): still running 30 s after SIGTERM"; \
			else echo "stopped $$p ($$pid)"; fi; fi; \
		rm -f $$f; done

status:
	@for p in redis control compute web relay; do f=$(RUN)/$$p.pid; \
		if [ -f $$f ] && kill -0 $$(cat $$f) 2>/dev/null; then echo "$$p: running (pid $$(cat $$f))"; else echo "$$p: not running"; fi; done

# ---------------------------------------------------------------- make test
# The Debian cloud guest and OCI app images the real-workload tests use (tests/workloads): built
# once per machine into /var/cache/skyport/test-images/<hash of images/debian>/ (two to four
# minutes cold), found in well under a second afterwards; not part of `make run`.
test-images: debs
	@PYTHON=$(PYTHON) images/debian/build.sh --cache

check: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .
	$(PY) manage.py makemigrations --check --dry-run
	SKYPORT_ENV=production SKYPORT_SECRET_KEY=$$(head -c 48 /dev/urandom | base64 | tr -d '\n') \
		$(PY) manage.py check --deploy --fail-level WARNING

# The whole suite on SQLite, one lane (`make test` runs it in three lanes at once: tests/run).
pytest: setup
	mkdir -p test-artifacts
	# the live schemathesis run (~4 min) runs once, in the PostgreSQL pass: the production database,
	# where it found what SQLite hides (date offsets beyond +-15:59)
	$(VENV)/bin/pytest -p no:cacheprovider --junitxml=test-artifacts/junit.xml \
		--ignore=tests/security/test_schemathesis_live.py

# The database-sensitive tests again, on a throwaway PostgreSQL cluster under var/ that the script
# starts and always stops (README "Tests"); without PostgreSQL it skips, or fails when CI is set.
pytest-pg: setup
	VENV=$(VENV) tests/pg/run

# Both of the above in three lanes at once (tests/run): the host lane (libvirt, crun, networks) on
# SQLite, the db lane (portal, web, security, metering, ui on SQLite) and the pg lane (portal, web,
# security on PostgreSQL), the last two ending with a few host tests each.
# The set-up steps after the venv run side by side (-j4: the sample images, migrate and the
# catalog, lint and type checks; ~44 s one after another, ~26 s together), each one's output
# printed whole when it ends.
test:
	@$(MAKE) --no-print-directory -j4 --output-sync=target setup check test-images
	VENV=$(VENV) tests/run
