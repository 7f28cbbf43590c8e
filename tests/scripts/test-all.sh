#!/usr/bin/env bash
# The whole test suite, as CI runs it: install the test dependencies (Debian packages,
# the guest kernel), check formatting and lints, run every test (unit, integration with
# real NBD clients, hostile clients, the kernel VM test), a bounded fuzz run, compile
# the benchmarks, and build, install and remove the Debian package.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ "$(id -u)" = 0 ]; then
  tests/scripts/install-deps.sh
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  sudo tests/scripts/install-deps.sh
else
  echo "test-all: not root and no passwordless sudo: assuming the dependencies are installed" >&2
fi

# Free disk space is printed with every step: a full disk is the first thing to rule out
# when a step fails on a fresh machine.
step() { printf '\n=== %s (disk free: %s)\n' "$*" "$(df -h --output=avail . | tail -n 1 | tr -d ' ')"; }

# CI builds once, from scratch: incremental compilation would only add about 2 GB of caches.
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL=0; fi

step "cargo fmt --check"
cargo fmt --all -- --check
step "layout: no import cycles, no overlong files"
python3 tests/scripts/check-layout.py
step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
step "rustdoc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked -q
step "tests (nextest)"
cargo nextest run --workspace --locked --profile ci
step "doc tests"
cargo test --workspace --doc --locked -q
step "benchmarks compile"
cargo bench --workspace --no-run --locked -q
step "Debian package: built, installed, served through a unit's command, removed"
tests/scripts/package-smoke.sh
if [ -x tests/scripts/fuzz-smoke.sh ]; then
  step "fuzz smoke run"
  tests/scripts/fuzz-smoke.sh
fi
step "all tests passed"
