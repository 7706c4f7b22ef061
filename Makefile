# vmc: `make demo` sets everything up and runs the demo; `make test` runs the whole suite.
# Both install what is missing (apt packages, the guest kernel, the guest agent) and are
# idempotent; caches live outside the repo (~/.cache/vmc, ~/.local/share/vmc).

SHELL := /bin/bash
CARGO ?= cargo
TARGET := x86_64-unknown-linux-gnu
ASSETS ?= $(or $(VMC_ASSETS),$(or $(XDG_DATA_HOME),$(HOME)/.local/share)/vmc)
CACHE ?= $(or $(VMC_CACHE),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/vmc)
GUEST_BIN := target/$(TARGET)/release-guest/vmc-guest
VMC := target/release/vmc
DEMO_ROOTFS := $(CACHE)/busybox-rootfs

.PHONY: all setup deps kernel guest build demo test check rootfs clean

all: build

setup: deps kernel guest build rootfs

deps:
	@scripts/deps.sh

kernel: deps
	@kernels/build.sh >/dev/null

# The guest agent: a static binary (glibc with crt-static; --target keeps
# build scripts and proc macros dynamic).
guest:
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --profile release-guest -p vmc-guest --target $(TARGET)
	@mkdir -p $(ASSETS)
	@cmp -s $(GUEST_BIN) $(ASSETS)/vmc-guest || { cp $(GUEST_BIN) $(ASSETS)/.vmc-guest.tmp && mv -f $(ASSETS)/.vmc-guest.tmp $(ASSETS)/vmc-guest; }

build:
	$(CARGO) build --release

rootfs:
	@scripts/busybox-rootfs.sh $(DEMO_ROOTFS)

demo: setup
	@echo '$$ vmc import $(DEMO_ROOTFS).tar busybox      # a base image (busybox, from Debian)'
	@$(VMC) inspect busybox >/dev/null 2>&1 || { tar -C $(DEMO_ROOTFS) -cf $(DEMO_ROOTFS).tar . && $(VMC) import $(DEMO_ROOTFS).tar busybox >/dev/null; }
	@echo '$$ vmc build -t hello-app examples/hello      # the RUN step executes in a microVM'
	@$(VMC) build -t hello-app examples/hello
	@echo '$$ vmc run --rm hello-app'
	@time $(VMC) run --rm hello-app

check:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

test: setup check
	$(CARGO) test --release -- --test-threads=4

clean:
	$(CARGO) clean
