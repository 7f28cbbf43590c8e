#!/usr/bin/env bash
# test-cor-dmthin.sh: host-side entry point of the copy-on-read proxy + dm-thin race test.
#
# Boots the test VM (run-vm.sh) and runs cor-dmthin.sh in it: a slow upstream (nbdkit with the
# delay filter) behind `thinline proxy`, the kernel's nbd-client on the proxy, and /dev/nbd0 as the
# external origin of a dm-thin thin volume. Reads and partial writes of not-yet-cached blocks race
# while the fetches are in flight; afterwards every guest write must be in the thin volume (also
# after re-creating it and its pool) and the proxy's cache must hold exactly the template.
#
# Exit status: 0 pass; 1 fail; 77 skip (only with THINLINE_ALLOW_SKIP=1 and missing prerequisites:
# without it, missing prerequisites are a failure telling you to run tests/scripts/install-deps.sh).
#
# Environment:
#   THINLINE_BIN          the thinline binary (default <repo>/target/release/thinline; from a cargo
#                         integration test pass env!("CARGO_BIN_EXE_thinline"))
#   THINLINE_ALLOW_SKIP=1 skip (exit 77) instead of failing when the kernel/qemu are missing
#   KEEP_WORKDIR=1        keep the temporary work directory even on success
#   VERBOSE=1             stream the VM console to stderr while it runs
#   VM_TIMEOUT            see run-vm.sh (default here 400 s)
#   VM_MEM, VM_SMP, VM_CPU, THINLINE_KERNEL_DIR: see run-vm.sh
#   RDELAY, NBD_TIMEOUT, PROXY_ARGS, SIMULATE_CLOBBER (negative control): see cor-dmthin.sh
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
repo=$(cd "$here/../.." && pwd -P)
name=cor-dmthin

missing_prereq() {
  if [ "${THINLINE_ALLOW_SKIP:-0}" = 1 ]; then
    echo "SKIP: $name: $*"
    exit 77
  fi
  echo "FAIL: $name: $* -- run tests/scripts/install-deps.sh (as root) to install the kernel-test" \
       "prerequisites (or set THINLINE_ALLOW_SKIP=1 to skip)" >&2
  exit 1
}

# ---- prerequisites ----------------------------------------------------------------------------
kdir=${THINLINE_KERNEL_DIR:-/var/cache/thinline/kernel}
[ -f "$kdir/ready" ] || missing_prereq "no guest kernel in $kdir"
kver=$(cat "$kdir/ready")
[ -f "$kdir/root/boot/vmlinuz-$kver" ] || missing_prereq "kernel image $kdir/root/boot/vmlinuz-$kver missing"
for tool in qemu-system-x86_64 busybox modprobe cpio nbd-client nbdinfo nbdkit dmsetup \
            losetup fallocate cmp; do
  command -v "$tool" >/dev/null 2>&1 || missing_prereq "$tool not found"
done
[ -x /usr/bin/python3 ] || missing_prereq "/usr/bin/python3 not found"
[ -n "$(find /usr/lib -path '*nbdkit/filters/nbdkit-delay-filter.so' -print -quit 2>/dev/null)" ] \
  || missing_prereq "nbdkit's delay filter not found"

THINLINE_BIN=${THINLINE_BIN:-$repo/target/release/thinline}
if [ ! -x "$THINLINE_BIN" ]; then
  echo "FAIL: $name: thinline binary $THINLINE_BIN not found or not executable" \
       "(build it with 'cargo build --release', or set THINLINE_BIN)" >&2
  exit 1
fi

# ---- work directory -------------------------------------------------------------------------
workdir=$(mktemp -d "${TMPDIR:-/tmp}/thinline-$name.XXXXXX") || { echo "FAIL: $name: mktemp" >&2; exit 1; }

THINLINE_BIN=$(cd "$(dirname "$THINLINE_BIN")" && pwd -P)/$(basename "$THINLINE_BIN")
# The guest sees the host's files at the same paths, except where it mounts its own file systems.
case "$THINLINE_BIN" in
  /tmp/*|/run/*|/mnt/*|/proc/*|/sys/*|/dev/*)
    cp "$THINLINE_BIN" "$workdir/thinline"
    THINLINE_BIN=/mnt/thinline ;;
esac

shq() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }
{
  echo "# written by test-$name.sh"
  echo "THINLINE_BIN=$(shq "$THINLINE_BIN")"
  for v in RDELAY NBD_TIMEOUT PROXY_ARGS SIMULATE_CLOBBER; do
    [ -n "${!v:-}" ] && echo "$v=$(shq "${!v}")"
  done
} >"$workdir/$name.env"

# ---- run ------------------------------------------------------------------------------------
echo "$name: kernel $kver, thinline $THINLINE_BIN, work dir $workdir"
start=$(date +%s)
VM_TIMEOUT=${VM_TIMEOUT:-400} "$here/run-vm.sh" "$here/$name.sh" "$workdir"
rc=$?
elapsed=$(( $(date +%s) - start ))

if [ "$rc" = 0 ] && grep -q "$name: ALL PASSED" "$workdir/console.log"; then
  grep -aE '^(PASS|FAIL|SUMMARY)' "$workdir/console.log" | tr -d '\r'
  echo "PASS: $name (${elapsed}s)"
  [ "${KEEP_WORKDIR:-0}" = 1 ] || rm -rf "$workdir"
  exit 0
fi

{
  echo "FAIL: $name (run-vm.sh exit $rc after ${elapsed}s); work dir kept: $workdir"
  echo "---- console.log (last 150 lines) ----"
  tail -n 150 "$workdir/console.log" | tr -d '\r'
  if [ -s "$workdir/qemu.log" ]; then
    echo "---- qemu.log ----"
    tail -n 40 "$workdir/qemu.log"
  fi
  echo "----"
} >&2
exit 1
