# Two entry points for users: `make demo` and `make test`. Both run `make setup` first,
# which is idempotent and installs everything aiovmm needs on a fresh Debian machine.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
DEBS    := gcc make cmake ninja-build patch libxen-dev xenstore-utils lvm2 binutils iproute2 iputils-ping curl \
	   liblzo2-dev lz4 lzop zstd xz-utils bzip2 cpio iperf3 e2fsprogs
NATIVE  := aiovmm/_native/preempt.so aiovmm/_native/kvm.so aiovmm/_native/atomic.so
UNICORN := aiovmm/_native/unicorn/libunicorn.so.2

WEBDEBS := chromium chromium-driver openssl

.PHONY: xen-utils pvgrub setup demo test bench mutants guests linux clean debs web-test-deps

setup: debs $(STAMP) $(NATIVE) $(UNICORN) guests linux xen-utils pvgrub

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

# setup.py builds them (with its flags) for wheels too; --inplace puts them in the tree.
$(NATIVE) &: csrc/preempt.c csrc/kvm.c csrc/atomic.c setup.py | $(STAMP)
	$(VPY) setup.py -q build_ext --inplace

# Unicorn 2.1.4 built from its PyPI source release with csrc/unicorn/*.patch (x86 only), in
# aiovmm/_native/unicorn/, which vcpu_engine.py loads instead of the wheel's library: the
# patches remove Unicorn's two largest costs in a Linux boot, every guest store through the
# slow path and a helper call at every translated block (csrc/unicorn/README.md).
UNICORN_VER := 2.1.4
UNICORN_SRC := build/unicorn-$(UNICORN_VER)
# A failed download, patch or build does not stop setup: the engine then loads the wheel's
# library (slower; tests/test_unicorn_patched.py says so), and the next setup tries again.
$(UNICORN): csrc/unicorn/*.patch | $(STAMP)
	@rm -rf $(UNICORN_SRC) build/unicorn-dl && mkdir -p build/unicorn-dl
	@if $(VPY) -m pip download -q --no-binary :all: --no-deps unicorn==$(UNICORN_VER) -d build/unicorn-dl \
	  && tar xzf build/unicorn-dl/unicorn-$(UNICORN_VER).tar.gz -C build \
	  && (for p in csrc/unicorn/*.patch; do patch -s -d $(UNICORN_SRC)/src -p1 < $$p || exit 1; done) \
	  && cmake -S $(UNICORN_SRC)/src -B $(UNICORN_SRC)/build -G Ninja -DCMAKE_BUILD_TYPE=Release \
	       -DUNICORN_ARCH=x86 -DUNICORN_BUILD_TESTS=OFF >/dev/null \
	  && ninja -C $(UNICORN_SRC)/build unicorn >/dev/null \
	  && mkdir -p $(dir $(UNICORN)) \
	  && cp $(UNICORN_SRC)/build/libunicorn.so.2 $(UNICORN).tmp && mv $(UNICORN).tmp $(UNICORN); then \
	  echo "patched Unicorn $(UNICORN_VER) built: $(UNICORN)"; \
	else \
	  rm -f $(UNICORN).tmp; \
	  echo "WARNING: the patched Unicorn was not built: the engine uses the wheel's library (slower)" >&2; \
	fi
	@rm -rf $(UNICORN_SRC) build/unicorn-dl

guests:
	$(MAKE) -C guests

# Debian's kernel and busybox (apt-get download + dpkg-deb -x, never installed) and the
# Linux test initramfs, in guests/build/linux/ (guests/linux/build.py; idempotent).
linux: $(STAMP)
	$(VPY) guests/linux/build.py

# Xen's verify-stream-v2 (checks aiovmm's save files): Debian's xen-utils-4.17 unpacked,
# never installed (installing it would pull in the Xen hypervisor and grub).
XENUTILS := guests/build/xen-utils/usr/lib/xen-4.17/bin/verify-stream-v2
xen-utils: $(XENUTILS)
$(XENUTILS):
	rm -rf guests/build/xen-utils.dl && mkdir -p guests/build/xen-utils.dl
	cd guests/build/xen-utils.dl && apt-get download -q xen-utils-4.17 2>&1 | grep -v unsandboxed || true
	dpkg-deb -x guests/build/xen-utils.dl/xen-utils-4.17_*.deb guests/build/xen-utils
	rm -rf guests/build/xen-utils.dl

# PV-GRUB2 (docs/guests.md): Debian's prebuilt grub-x86_64-xen.bin from grub-xen-host, unpacked,
# never installed (installing it would pull in grub's host tools and update the host's boot).
# The image carries its modules and a memdisk config that searches every disk for
# /boot/grub/grub.cfg; grub-xen-bin (the loose modules) is not needed to boot it.
PVGRUB := guests/build/pvgrub/usr/lib/grub-xen/grub-x86_64-xen.bin
pvgrub: $(PVGRUB)
$(PVGRUB):
	rm -rf guests/build/pvgrub.dl && mkdir -p guests/build/pvgrub.dl
	cd guests/build/pvgrub.dl && apt-get download -q grub-xen-host 2>&1 | grep -v unsandboxed || true
	dpkg-deb -x guests/build/pvgrub.dl/grub-xen-host_*.deb guests/build/pvgrub
	rm -rf guests/build/pvgrub.dl

demo: setup
	$(VPY) examples/demo.py

# --durations=25: every CI log lists the slowest setups and tests (the suite's budget is
# 15 minutes on 2 cores; see where the time goes before it is exceeded).
# -n $(TEST_JOBS) --dist loadfile (pytest-xdist): one worker per core, each test file whole on
# one worker (a module's shared Linux guests stay shared, its tests keep their order). The
# suite is CPU-bound in one process (the emulated vCPUs): a second worker uses the second
# core. --no-loadscope-reorder hands the files out in collection order, so the many small
# xenstore files come last and even out the end (by default the few-test modules, the Linux
# ones, would all come last). TEST_JOBS=0 runs the suite in one process.
TEST_JOBS ?= 2
test: setup web-test-deps
	$(VPY) -m pytest -q -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder --durations=25 tests

bench: setup
	for b in bench/*.py; do [ $$b = bench/mutants.py ] && continue; echo "== $$b"; $(VPY) $$b || exit 1; done

# Mutation run over the security checks (~30-40 min on 2 cores): does the suite notice when a
# check is removed or weakened? MUTANTS="-m ring -m xenstore" for some modules.
mutants: setup
	$(VPY) bench/mutants.py $(MUTANTS)

clean:
	rm -rf guests/build aiovmm/_native build
