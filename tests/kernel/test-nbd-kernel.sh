#!/usr/bin/env bash
# test-nbd-kernel.sh: host-side entry point of the kernel NBD client test.
#
# Boots the test VM (run-vm.sh) and runs nbd-kernel.sh in it: the Linux kernel's nbd client against
# thinline's NBD server (ext4, multi-connection, discard, clean shutdown, image file contents, TLS
# with the certificates made here by openssl, the agent's `vdi attach --device`).
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
  losetup openssl

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

# make_tls_certificates DIR: what the guest's TLS steps use (made here: key generation is slow
# under TCG): a CA, a server certificate for localhost / 127.0.0.1 and a client certificate it
# signed, client/ for libnbd (ca-cert.pem, client-cert.pem, client-key.pem), and wrong/ca-cert.pem,
# another CA that signed neither.
make_tls_certificates() {
  if ! mkdir -p "$1" || ! (
    cd "$1" || exit 1
    set -e
    exec 2>openssl.log
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca-key.pem -out ca-cert.pem -days 30 \
      -subj '/CN=thinline kernel test CA'
    openssl req -newkey rsa:2048 -nodes -keyout server-key.pem -out server.csr -subj '/CN=localhost'
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >server.ext
    openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
      -out server-cert.pem -days 30 -extfile server.ext
    openssl req -newkey rsa:2048 -nodes -keyout client-key.pem -out client.csr -subj '/CN=client'
    printf 'extendedKeyUsage=clientAuth\n' >client.ext
    openssl x509 -req -in client.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
      -out client-cert.pem -days 30 -extfile client.ext
    chmod 600 server-key.pem client-key.pem
    mkdir -p client wrong
    cp ca-cert.pem client-cert.pem client-key.pem client/
    openssl req -x509 -newkey rsa:2048 -nodes -keyout wrong/ca-key.pem -out wrong/ca-cert.pem \
      -days 30 -subj '/CN=another CA'
  ); then
    echo "FAIL: $name: openssl could not make the TLS certificates in $1:" >&2
    cat "$1/openssl.log" >&2
    exit 1
  fi
}

make_workdir
make_tls_certificates "$workdir/tls"
write_guest_env THINLINE_BIN SERVER_CMD IMG_DIR NBD_CONNECTIONS EXPECT_HOLE NBD_TIMEOUT
run_guest "server: ${SERVER_CMD:-$THINLINE_BIN}" 120
