#!/usr/bin/env bash
# Fuzz smoke test: builds the cargo-fuzz targets in fuzz/ and runs each one for a short,
# bounded time. Exits non-zero if any target crashes, hangs, runs out of memory or fails
# to build. Called from the CI test command; also handy before a commit.
#
#   tests/scripts/fuzz-smoke.sh                  # every target, 20 s each
#   FUZZ_SECONDS=300 tests/scripts/fuzz-smoke.sh session
#
# Settings (environment):
#   FUZZ_SECONDS    seconds per target (default 20)
#   FUZZ_SANITIZER  none | address. Default: none when a `-s none` build works (several
#                   times faster), else address.
#   FUZZ_TIMEOUT    seconds one input may take before it counts as a hang (default 30)
#
# The toolchain is stable: RUSTC_BOOTSTRAP=1 lets cargo-fuzz use the nightly-only flags.
# Inputs found go to fuzz/corpus/<target> (kept between runs, not in git); the seeds in
# fuzz/seeds/<target> are read too. A crash leaves its input in fuzz/artifacts/<target>/;
# reproduce it with `RUSTC_BOOTSTRAP=1 cargo fuzz run <target> <file>` in fuzz/.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
fuzz_dir=$root/fuzz
seconds=${FUZZ_SECONDS:-20}
input_timeout=${FUZZ_TIMEOUT:-30}
export RUSTC_BOOTSTRAP=1

log() { printf 'fuzz-smoke: %s\n' "$*" >&2; }

case $seconds in '' | *[!0-9]*) log "FUZZ_SECONDS must be a number of seconds"; exit 2 ;; esac

if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz (about a minute)"
  cargo install cargo-fuzz --locked
fi

cd "$fuzz_dir"
# The image targets start from small images made by qemu-img (not kept in git).
if [ ! -d seeds/qcow2 ] || [ ! -d seeds/vhd ] || [ ! -d seeds/vmdk ]; then
  log "making image seeds with qemu-img"
  seeds/make-image-seeds.sh >/dev/null
fi
mapfile -t all_targets < <(cargo fuzz list)
if [ $# -gt 0 ]; then targets=("$@"); else targets=("${all_targets[@]}"); fi
[ ${#targets[@]} -gt 0 ] || { log "no fuzz targets found in $fuzz_dir"; exit 1; }

sanitizer=${FUZZ_SANITIZER:-}
if [ -z "$sanitizer" ]; then
  log "building the fuzz targets without sanitizer (the first build takes minutes)"
  if cargo fuzz build -s none; then
    sanitizer=none
  else
    log "the build without sanitizer failed; using AddressSanitizer"
    sanitizer=address
  fi
fi
if [ "$sanitizer" != none ]; then
  log "building the fuzz targets (sanitizer: $sanitizer)"
  cargo fuzz build -s "$sanitizer"
fi

failed=()
for target in "${targets[@]}"; do
  corpus=corpus/$target
  mkdir -p "$corpus" "artifacts/$target"
  seeds=()
  [ -d "seeds/$target" ] && seeds=("seeds/$target")
  before=$(find "artifacts/$target" -type f | wc -l)
  log "running $target for ${seconds}s"
  out=$(mktemp)
  status=0
  # The outer timeout only guards against libFuzzer itself wedging.
  timeout --kill-after=30 $((seconds + input_timeout + 120)) \
    cargo fuzz run -s "$sanitizer" "$target" "$corpus" "${seeds[@]}" -- \
    -max_total_time="$seconds" -timeout="$input_timeout" -rss_limit_mb=2048 \
    -print_final_stats=1 >"$out" 2>&1 || status=$?
  after=$(find "artifacts/$target" -type f | wc -l)
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$out" | tail -1)
  if [ "$status" -ne 0 ] || [ "$after" -gt "$before" ]; then
    log "$target FAILED (exit status $status)"
    # The panic or sanitizer report and the failing input, for the CI log.
    grep -E -A12 "panicked at|ERROR: (AddressSanitizer|libFuzzer)|SUMMARY|^Failing input|^Reproduce|Base64:" "$out" | head -120 >&2 || tail -60 "$out" >&2
    failed+=("$target")
  else
    log "$target ok: ${runs:-?} inputs, ${rate:-?} exec/s, corpus $(find "$corpus" -type f | wc -l) files"
  fi
  rm -f "$out"
done

if [ ${#failed[@]} -gt 0 ]; then
  log "crashes in: ${failed[*]} (inputs in $fuzz_dir/artifacts/)"
  exit 1
fi
log "all targets ran ${seconds}s without a crash"
