# vmc: `make demo` sets everything up and runs the demo; `make test` runs the whole suite.
# Both install what is missing (apt packages, the guest kernel, the guest agent) and are
# idempotent; caches live outside the repo (~/.cache/vmc, ~/.local/share/vmc).

SHELL := /bin/bash
CARGO ?= cargo
TARGET := x86_64-unknown-linux-gnu
ASSETS ?= $(or $(VMC_ASSETS),$(or $(XDG_DATA_HOME),$(HOME)/.local/share)/vmc)
CACHE ?= $(or $(VMC_CACHE),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/vmc)
# Cargo's build directory lives with the other caches, so that a fresh clone
# (CI) compiles only what changed; CARGO_TARGET_DIR overrides it.
export CARGO_TARGET_DIR ?= $(CACHE)/target
GUEST_BIN := $(CARGO_TARGET_DIR)/$(TARGET)/release-guest/vmc-guest
VMC := $(CARGO_TARGET_DIR)/release/vmc
DEMO_ROOTFS := $(CACHE)/busybox-rootfs

.PHONY: all setup deps passt kernel guest build demo node-demo node-base test check rootfs clean fresh-check stress audit fuzz

all: build

setup: deps kernel guest build rootfs passt

deps:
	@scripts/deps.sh

# A passt newer than Debian 12's where needed (see the script).
passt: deps
	@scripts/passt.sh $(ASSETS) $(CACHE)

kernel: deps
	@kernels/build.sh >/dev/null

# The guest agent: a static binary (glibc with crt-static; --target keeps
# build scripts and proc macros dynamic).
guest:
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --profile release-guest -p vmc-guest --target $(TARGET)
	@mkdir -p $(ASSETS)
	@cmp -s $(GUEST_BIN) $(ASSETS)/vmc-guest || { t=$(ASSETS)/.vmc-guest.tmp.$$$$; \
		cp $(GUEST_BIN) $$t && cmp -s $(GUEST_BIN) $$t && mv -f $$t $(ASSETS)/vmc-guest || { rm -f $$t; exit 1; }; }

build:
	$(CARGO) build --release
	@ln -sfn $(abspath $(VMC)) vmc
	@ln -sfn $(abspath $(VMC)) vmc-runtime
	@if [ "$(abspath $(CARGO_TARGET_DIR))" != "$(abspath target)" ]; then \
		mkdir -p target/release && ln -sfn $(abspath $(VMC)) target/release/vmc; fi

rootfs:
	@scripts/busybox-rootfs.sh $(DEMO_ROOTFS)

# What a running container gets in each mode (README "Security model").
audit: setup
	@VMC=$(VMC) ROOTFS=$(DEMO_ROOTFS) scripts/audit.sh

demo: setup
	@echo '$$ vmc import $(DEMO_ROOTFS).tar busybox      # a base image (busybox, from Debian)'
	@$(VMC) inspect busybox >/dev/null 2>&1 || { tar -C $(DEMO_ROOTFS) -cf $(DEMO_ROOTFS).tar . && $(VMC) import $(DEMO_ROOTFS).tar busybox >/dev/null; }
	@echo '$$ vmc build -t hello-app examples/hello      # the RUN step executes in a microVM'
	@$(VMC) build -t hello-app examples/hello
	@echo '$$ vmc run --rm hello-app'
	@time $(VMC) run --rm hello-app

# The base image of examples/node-app: Debian bookworm + nodejs (mmdebstrap),
# imported once as debian-node:bookworm.
node-base: setup
	@scripts/node-base.sh $(CACHE)/debian-node.tar
	@$(VMC) inspect debian-node:bookworm >/dev/null 2>&1 || $(VMC) import $(CACHE)/debian-node.tar debian-node:bookworm >/dev/null

# The seed's flow in a namespace container (NODE_MODE=vm for a microVM: on
# this project's kvm_pvm machines node needs about two minutes to start there).
NODE_MODE ?= ns
NODE_PORT ?= 3000
node-demo: node-base
	@echo '$$ cd examples/node-app && vmc build -t my-node-app .'
	@cd examples/node-app && ../../$(VMC) build -t my-node-app .
	@echo '$$ vmc run -d --mode $(NODE_MODE) -p $(NODE_PORT):3000 --name my-node-app my-node-app'
	@$(VMC) rm -f my-node-app >/dev/null 2>&1 || true
	@$(VMC) run -d --mode $(NODE_MODE) -p $(NODE_PORT):3000 --name my-node-app my-node-app
	@echo '$$ curl 127.0.0.1:$(NODE_PORT)'
	@for i in $$(seq 600); do curl -sf 127.0.0.1:$(NODE_PORT) && break; sleep 0.5; done
	@echo '$$ vmc logs my-node-app'
	@$(VMC) logs my-node-app
	@echo '$$ vmc stop -t 120 my-node-app && vmc rm my-node-app'
	@$(VMC) stop -t 120 my-node-app >/dev/null && $(VMC) rm my-node-app >/dev/null

check:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The suite builds its own binaries (scripts/test.sh, profile `ci`).
test: deps kernel guest rootfs passt check
	@CARGO=$(CARGO) scripts/test.sh

# The README's two commands in a clean clone with empty caches (~40 min):
# run it after changing setup scripts.
fresh-check:
	@scripts/fresh-check.sh

# Opt-in stress tests (tests/stress.rs): snapshots made under load, many warm
# runs one after another and at once (an hour or more on 2 cores).
stress: deps kernel guest rootfs passt
	$(CARGO) test --profile ci --test stress -- --ignored --test-threads=1 --nocapture

# Coverage-guided fuzzing (nightly, cargo-fuzz): every target FUZZ_SECONDS
# (default 60) each; the corpora and crashes are replayed by `make test`.
fuzz:
	scripts/fuzz.sh

clean:
	$(CARGO) clean
