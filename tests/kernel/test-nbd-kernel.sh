#!/usr/bin/env bash
# test-nbd-kernel.sh: host-side entry point of the kernel NBD client test.
#
# Boots the test VM (run-vm.sh) and runs nbd-kernel.sh in it: the Linux kernel's nbd client against
# thinline's NBD server (ext4, multi-connection, discard, clean shutdown, image file contents).
#
# Exit status: 0 pass; 1 fail; 77 skip (see host-lib.sh).
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
# shellcheck source=tests/kernel/host-lib.sh
. "$here/host-lib.sh"

need_guest_kernel
need_tools qemu-system-x86_64 busybox modprobe cpio nbd-client nbdinfo mkfs.ext4 e2fsck blkdiscard \
  losetup

server=${THINLINE_NBD_SERVER:-thinline}
if [ -z "${SERVER_CMD:-}" ]; then
  case "$server" in
    qemu-nbd)
      need_tools qemu-nbd
      # -t: keep serving after the first client leaves; -e 4: four clients (multi-conn);
      # --discard=unmap: punch holes on trim.
      # shellcheck disable=SC2016 # expanded inside the guest
      SERVER_CMD='qemu-nbd -f raw --discard=unmap -t -e 4 -k "$SOCK" "$IMG"'
      ;;
    thinline) need_thinline_bin ;;
    *) echo "FAIL: $name: unknown THINLINE_NBD_SERVER=$server (thinline or qemu-nbd)" >&2; exit 1 ;;
  esac
fi

make_workdir
write_guest_env THINLINE_BIN SERVER_CMD IMG_DIR NBD_CONNECTIONS EXPECT_HOLE NBD_TIMEOUT
run_guest "server: ${SERVER_CMD:-$THINLINE_BIN}" 120
