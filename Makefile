# Drover's two entry points:
#   make demo   set up this machine and run examples/hello.yml with `drover run`
#   make test   set up this machine and run every test (what CI runs)
SHELL := /bin/bash
.DEFAULT_GOAL := help
INIT_TARGET := x86_64-unknown-linux-gnu

help:
	@echo "make demo   - install prerequisites, build, run examples/hello.yml"
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
	cargo build -p drover-control --bin drover
	target/debug/drover run examples/hello.yml

test: setup build
	cargo test --workspace

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

.PHONY: help setup init build demo test lint
