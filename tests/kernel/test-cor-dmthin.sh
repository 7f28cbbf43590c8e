#!/usr/bin/env bash
# test-cor-dmthin.sh: host-side entry point of the copy-on-read proxy + dm-thin race test.
#
# Boots the test VM (run-vm.sh) and runs cor-dmthin.sh in it: a slow upstream (nbdkit with the
# delay filter) behind `thinline proxy`, the kernel's nbd-client on the proxy, and /dev/nbd0 as the
# external origin of a dm-thin thin volume. Reads and partial writes of not-yet-cached blocks race
# while the fetches are in flight; afterwards every guest write must be in the thin volume (also
# after re-creating it and its pool) and the proxy's cache must hold exactly the template. In the
# same boot, lvm-blocks.sh runs the LVM SR's building-block test (a test of the kernel test binary,
# KERNEL_TEST_BIN) on loop devices, next to a user's VG that must stay untouched.
#
# Exit status: 0 pass; 1 fail; 77 skip (see host-lib.sh).
#
# Environment:
#   THINLINE_BIN          the thinline binary (default <repo>/target/release/thinline; from a cargo
#                         integration test pass env!("CARGO_BIN_EXE_thinline"))
#   KERNEL_TEST_BIN       the kernel test binary (tests/kernel.rs sets it), copied into the work
#                         directory
#   THINLINE_ALLOW_SKIP=1 skip (exit 77) instead of failing when the kernel/qemu are missing
#   KEEP_WORKDIR=1        keep the temporary work directory even on success
#   VERBOSE=1             stream the VM console to stderr while it runs
#   VM_TIMEOUT            see run-vm.sh (default here 900 s)
#   VM_MEM                see run-vm.sh (default here 2048 MiB)
#   VM_SMP, VM_CPU, THINLINE_KERNEL_DIR: see run-vm.sh
#   RDELAY, NBD_TIMEOUT, PROXY_ARGS, SIMULATE_CLOBBER (negative control): see cor-dmthin.sh
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
repo=$(cd "$here/../.." && pwd -P)
name=cor-dmthin
# shellcheck source=tests/kernel/host-lib.sh
. "$here/host-lib.sh"

need_guest_kernel
need_tools qemu-system-x86_64 busybox modprobe cpio nbd-client nbdinfo nbdkit dmsetup \
  losetup fallocate cmp lvm thin_check fio nginx mkfs.ext4
[ -x /usr/bin/python3 ] || missing_prereq "/usr/bin/python3 not found"
[ -n "$(find /usr/lib -path '*nbdkit/filters/nbdkit-delay-filter.so' -print -quit 2>/dev/null)" ] \
  || missing_prereq "nbdkit's delay filter not found"
need_thinline_bin

make_workdir
# The LVM building-block test (lvm-blocks.sh) is a test of this binary, run in the guest.
[ -x "${KERNEL_TEST_BIN:-}" ] || missing_prereq "KERNEL_TEST_BIN (the kernel test binary, set by tests/kernel.rs) is not set"
cp "$KERNEL_TEST_BIN" "$workdir/kernel-tests" || { echo "FAIL: $name: copy $KERNEL_TEST_BIN" >&2; exit 1; }
KERNEL_TEST_BIN=/mnt/kernel-tests
write_guest_env THINLINE_BIN RDELAY NBD_TIMEOUT PROXY_ARGS SIMULATE_CLOBBER KERNEL_TEST_BIN
export VM_TIMEOUT=${VM_TIMEOUT:-900}
# The guest's /tmp is memory: the LVM SR checks' loop devices and templates live there.
export VM_MEM=${VM_MEM:-2048}
run_guest "thinline $THINLINE_BIN" 150
