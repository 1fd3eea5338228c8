# Drover's two entry points:
#   make demo   set up this machine, `drover up` a local cluster, run examples/hello.yml on it
#   make test   set up this machine and run every test (what CI runs)
SHELL := /bin/bash
.DEFAULT_GOAL := help
INIT_TARGET := x86_64-unknown-linux-gnu

help:
	@echo "make demo   - install prerequisites, build, drover up, run examples/hello.yml on the local cluster"
	@echo "make test   - install prerequisites, build images, run all tests"

setup:
	scripts/setup.sh

# drover-init runs inside arbitrary images, so it is linked statically.
# An explicit --target keeps the static flag off build scripts and proc-macros.
init:
	RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target $(INIT_TARGET) -p drover-init

build: init
	cargo build --workspace --all-targets

demo: setup init
	cargo build -p drover-control --bin drover -p drover-agent --bin drover-agent
	target/debug/drover up
	target/debug/drover job create -f examples/hello.yml --compute local --stream

test: setup build
	cargo test --workspace

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

.PHONY: help setup init build demo test lint
