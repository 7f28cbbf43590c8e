#!/usr/bin/env bash
# Soak test of crash safety for writable qcow2 images: runs the kill -9 test of
# tests/writable.rs with many rounds (each round: `thinline serve -w` under heavy writes, kill -9
# at a random moment, `qemu-img check` must find no error, `image check --repair` must make it
# clean, every flushed write must be there). Not part of CI (the test command runs 20 rounds).
#
# Usage: tests/scripts/soak-kill.sh [ROUNDS]        (default 300)
#   THINLINE_PROPTEST_SEED=N replays a run (the seed is printed at the start of each run).
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-300}
THINLINE_KILL_ROUNDS=$rounds exec cargo nextest run --locked --test writable \
  --no-capture -E 'test(kill_9_during_heavy_writes)'
