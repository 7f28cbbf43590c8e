#!/usr/bin/env bash
# test-nbd-kernel.sh: host-side entry point of the kernel NBD client test.
#
# Boots the test VM (run-vm.sh) and runs nbd-kernel.sh in it: the Linux kernel's nbd client against
# thinline's NBD server (ext4, multi-connection, discard, clean shutdown, image file contents).
#
# Exit status: 0 pass; 1 fail; 77 skip (only with THINLINE_ALLOW_SKIP=1 and missing prerequisites:
# without it, missing prerequisites are a failure telling you to run tests/scripts/install-deps.sh).
#
# Environment:
#   THINLINE_BIN          the thinline binary (default <repo>/target/release/thinline; from a cargo
#                         integration test pass env!("CARGO_BIN_EXE_thinline"))
#   THINLINE_NBD_SERVER   "thinline" (default) or "qemu-nbd" (stand-in server, to test the harness)
#   SERVER_CMD            full server command override (see nbd-kernel.sh); wins over the above
#   THINLINE_ALLOW_SKIP=1 skip (exit 77) instead of failing when the kernel/qemu are missing
#   KEEP_WORKDIR=1        keep the temporary work directory even on success
#   VERBOSE=1             stream the VM console to stderr while it runs
#   VM_TIMEOUT, VM_MEM, VM_SMP, VM_CPU, THINLINE_KERNEL_DIR: see run-vm.sh
#   IMG_DIR, NBD_CONNECTIONS, EXPECT_HOLE, NBD_TIMEOUT: see nbd-kernel.sh
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
repo=$(cd "$here/../.." && pwd -P)
name=nbd-kernel

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
for tool in qemu-system-x86_64 busybox modprobe cpio nbd-client nbdinfo mkfs.ext4 e2fsck blkdiscard \
            losetup; do
  command -v "$tool" >/dev/null 2>&1 || missing_prereq "$tool not found"
done

server=${THINLINE_NBD_SERVER:-thinline}
if [ -z "${SERVER_CMD:-}" ]; then
  case "$server" in
    qemu-nbd)
      command -v qemu-nbd >/dev/null 2>&1 || missing_prereq "qemu-nbd not found"
      # -t: keep serving after the first client leaves; -e 4: four clients (multi-conn);
      # --discard=unmap: punch holes on trim.
      # shellcheck disable=SC2016 # expanded inside the guest
      SERVER_CMD='qemu-nbd -f raw --discard=unmap -t -e 4 -k "$SOCK" "$IMG"'
      ;;
    thinline)
      THINLINE_BIN=${THINLINE_BIN:-$repo/target/release/thinline}
      if [ ! -x "$THINLINE_BIN" ]; then
        echo "FAIL: $name: thinline binary $THINLINE_BIN not found or not executable" \
             "(build it with 'cargo build --release', or set THINLINE_BIN)" >&2
        exit 1
      fi
      ;;
    *) echo "FAIL: $name: unknown THINLINE_NBD_SERVER=$server (thinline or qemu-nbd)" >&2; exit 1 ;;
  esac
fi

# ---- work directory -------------------------------------------------------------------------
workdir=$(mktemp -d "${TMPDIR:-/tmp}/thinline-$name.XXXXXX") || { echo "FAIL: $name: mktemp" >&2; exit 1; }

if [ -n "${THINLINE_BIN:-}" ]; then
  THINLINE_BIN=$(cd "$(dirname "$THINLINE_BIN")" && pwd -P)/$(basename "$THINLINE_BIN")
  # The guest sees the host's files at the same paths, except where it mounts its own file systems.
  case "$THINLINE_BIN" in
    /tmp/*|/run/*|/mnt/*|/proc/*|/sys/*|/dev/*)
      cp "$THINLINE_BIN" "$workdir/thinline"
      THINLINE_BIN=/mnt/thinline ;;
  esac
fi

shq() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }
{
  echo "# written by test-nbd-kernel.sh"
  [ -n "${THINLINE_BIN:-}" ] && echo "THINLINE_BIN=$(shq "$THINLINE_BIN")"
  [ -n "${SERVER_CMD:-}" ] && echo "SERVER_CMD=$(shq "$SERVER_CMD")"
  for v in IMG_DIR NBD_CONNECTIONS EXPECT_HOLE NBD_TIMEOUT; do
    [ -n "${!v:-}" ] && echo "$v=$(shq "${!v}")"
  done
} >"$workdir/nbd-kernel.env"

# ---- run ------------------------------------------------------------------------------------
echo "$name: kernel $kver, server: ${SERVER_CMD:-$THINLINE_BIN}, work dir $workdir"
start=$(date +%s)
"$here/run-vm.sh" "$here/nbd-kernel.sh" "$workdir"
rc=$?
elapsed=$(( $(date +%s) - start ))

if [ "$rc" = 0 ] && grep -q 'nbd-kernel: ALL PASSED' "$workdir/console.log"; then
  grep -aE '^(PASS|FAIL|SUMMARY)' "$workdir/console.log" | tr -d '\r'
  echo "PASS: $name (${elapsed}s)"
  [ "${KEEP_WORKDIR:-0}" = 1 ] || rm -rf "$workdir"
  exit 0
fi

{
  echo "FAIL: $name (run-vm.sh exit $rc after ${elapsed}s); work dir kept: $workdir"
  echo "---- console.log (last 120 lines) ----"
  tail -n 120 "$workdir/console.log" | tr -d '\r'
  if [ -s "$workdir/qemu.log" ]; then
    echo "---- qemu.log ----"
    tail -n 40 "$workdir/qemu.log"
  fi
  echo "----"
} >&2
exit 1
