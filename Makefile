# Two entry points for users: `make demo` and `make test`. Both run `make setup` first,
# which is idempotent and installs everything aiovmm needs on a fresh Debian machine.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
DEBS    := gcc make libxen-dev xenstore-utils lvm2 binutils iproute2 iputils-ping curl
NATIVE  := aiovmm/_native/preempt.so
WEBDEBS := chromium chromium-driver openssl

.PHONY: setup demo test bench guests clean debs web-test-deps

setup: debs $(STAMP) $(NATIVE) guests

debs:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# The control plane's web-page test drives Debian's chromium (tests/control/test_web.py).
web-test-deps:
	@missing=""; for p in $(WEBDEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

$(NATIVE): csrc/preempt.c
	mkdir -p aiovmm/_native
	gcc -O2 -shared -fPIC -Wall -o $@ $<

guests:
	$(MAKE) -C guests

demo: setup
	$(VPY) examples/demo.py

test: setup web-test-deps
	$(VPY) -m pytest -q tests

bench: setup
	for b in bench/*.py; do echo "== $$b"; $(VPY) $$b || exit 1; done

clean:
	rm -rf guests/build aiovmm/_native
