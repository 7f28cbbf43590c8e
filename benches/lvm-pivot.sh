#!/usr/bin/env bash
# The LVM SR's clone of a template, read inside the test VM (a Debian kernel under qemu's software
# emulation, tests/kernel/run-vm.sh): fio 4 KiB random read at queue depth 1 and 32 and 1 MiB
# sequential read, O_DIRECT, on
#
#   proxy-cold   a clone whose external origin is the template's proxy over /dev/nbdN, with
#                nothing of the template cached (a new template record, so a new cache, per job)
#   proxy-warm   the same with every block cached (read once through the clone first)
#   pivoted      that clone after `vdi pivot` (its origin the local cache, no proxy)
#   thin-snapshot  the control: a dm-thin snapshot (`vdi snapshot`) of another thin volume
#                holding the template's bytes, every block of it shared
#   plain-thin   a thin volume of the same pool holding the template's bytes (never snapshotted)
#
# in ROUNDS rounds, and prints a Markdown table: the median of each, and its ratio to plain-thin
# (the median, then every round's): each run but proxy-cold is followed by the same job
# on the plain thin volume and divided by it, since the emulated machine's speed drifts and
# neighbouring runs drift together; proxy-cold is divided by its round's plain-thin median. Everything lives in the guest's memory (the loop device's file and
# the template's file are on tmpfs), so the figures compare the paths, not disks; software
# emulation makes them slow and noisy (compare ratios, not absolute numbers).
#
# Usage: benches/lvm-pivot.sh
# Environment: ROUNDS (3), RUNTIME seconds per job (6), SIZE_MIB of the template (128),
#   THINLINE_BIN (default target/release/thinline, built if missing), RESULTS_DIR (default
#   target/bench-results/lvm-pivot-DATE).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
repo=$(cd "$here/.." && pwd -P)
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
export THINLINE_BIN=${THINLINE_BIN:-$repo/target/release/thinline}
[ -x "$THINLINE_BIN" ] || (cd "$repo" && cargo build --release --locked -q)
results=${RESULTS_DIR:-$repo/target/bench-results/lvm-pivot-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$results"
workdir=$(mktemp -d "${TMPDIR:-/tmp}/thinline-lvm-pivot.XXXXXX")
{
  echo "RUNTIME=${RUNTIME:-6}"
  echo "ROUNDS=${ROUNDS:-3}"
  echo "SIZE_MIB=${SIZE_MIB:-128}"
} >"$workdir/lvm-pivot.env"
VM_MEM=${VM_MEM:-4096} VM_TIMEOUT=${VM_TIMEOUT:-3600} \
  "$repo/tests/kernel/run-vm.sh" "$here/lib/lvm-pivot-guest.sh" "$workdir" || true
if ! grep -q "lvm-pivot: DONE" "$workdir/console.log"; then
  tail -n 60 "$workdir/console.log" >&2
  echo "lvm-pivot: the guest did not finish; work dir kept: $workdir" >&2
  exit 1
fi
cp "$workdir/lvm-pivot.md" "$workdir/lvm-pivot.jsonl" "$workdir/console.log" "$results/"
echo "# $(date -u +%Y-%m-%d), $(nproc) CPUs, guest kernel $(cat /var/cache/thinline/kernel/ready 2>/dev/null), $("$THINLINE_BIN" --version)"
cat "$results/lvm-pivot.md"
echo "(results in $results)"
rm -rf "$workdir"
