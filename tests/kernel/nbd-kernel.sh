#!/bin/sh
# nbd-kernel.sh: guest side of the kernel NBD client test (run inside the VM by run-vm.sh; see
# test-nbd-kernel.sh for the host side).
#
# The Linux kernel's nbd client (nbd-client + nbd.ko) against an NBD server serving a sparse
# 256 MiB raw image on a unix socket inside the guest: ext4 on it, single and multiple (-C 4)
# connections, raw writes, discard (reads zero, image file gets a hole), clean SIGTERM shutdown of
# the server, and the image file itself holding exactly what the device showed. Then TLS:
# nbd-client with certificates against `thinline serve --tls require --tls-ca` on loopback TCP
# (read back, write, refusals of clients without TLS, trusting another CA, or without a client
# certificate; certificates made by test-nbd-kernel.sh in WORKDIR/tls). Then the agent:
# `vdi attach --device` on a directory SR, a snapshot of the mounted, written device, detach.
#
# Configuration (environment, or a file nbd-kernel.env in the work directory, which is sourced):
#   THINLINE_BIN  the thinline binary (default target/release/thinline of this repository)
#   SERVER_CMD    the server command, run with `sh -c "exec $SERVER_CMD"`, with $SOCK and $IMG set
#                 (default: "$THINLINE_BIN" serve --socket "$SOCK" "$IMG"). For a stand-in:
#                 qemu-nbd -f raw --discard=unmap -t -e 4 -k "$SOCK" "$IMG"
#                 (-t: survive the first disconnect; -e 4: multi-conn; no --cache=none: the
#                 guest's tmpfs has no O_DIRECT)
#   IMG_DIR       where the image lives (default /tmp: tmpfs in the guest, supports holes)
#   NBD_CONNECTIONS  connections for the second session (default 4)
#   EXPECT_HOLE   1 (default): the discarded range must be deallocated in the image file
#   NBD_TIMEOUT   nbd-client -timeout (default 60 s), so a wedged server fails instead of hanging
set -u

[ -f /mnt/nbd-kernel.env ] && . /mnt/nbd-kernel.env
. "${THINLINE_GUEST_LIB:-${THINLINE_KERNEL_TESTS:-/work/main/tests/kernel}/guest-lib.sh}"

THINLINE_BIN=${THINLINE_BIN:-${THINLINE_KERNEL_TESTS:-/work/main/tests/kernel}/../../target/release/thinline}
IMG_DIR=${IMG_DIR:-/tmp}
NBD_CONNECTIONS=${NBD_CONNECTIONS:-4}
EXPECT_HOLE=${EXPECT_HOLE:-1}
NBD_TIMEOUT=${NBD_TIMEOUT:-60}
# shellcheck disable=SC2016 # expanded by the sh -c below
SERVER_CMD=${SERVER_CMD:-'"$THINLINE_BIN" serve --socket "$SOCK" "$IMG"'}

SOCK=/run/t.sock
IMG=$IMG_DIR/nbd-kernel.img
DEV=/dev/nbd0
MNT=/tmp/m
SIZE=$((256 * 1024 * 1024))
MiB=$((1024 * 1024))
FS_SIZE_MIB=192               # ext4 covers [0, 192 MiB); the tail is used raw
RAW_OFF=$((200 * MiB))        # raw write + later discard range, outside the file system
RAW_LEN=$((8 * MiB))
SERVER_LOG=/mnt/server.log
export THINLINE_BIN SOCK IMG

SPID=
cleanup() {
  set +e
  mountpoint -q "$MNT" 2>/dev/null && umount "$MNT"
  [ -n "${LOOPDEV:-}" ] && losetup -d "$LOOPDEV" 2>/dev/null
  if [ "$(cat /sys/block/nbd0/size 2>/dev/null || echo 0)" != 0 ]; then nbd-client -d "$DEV" >/dev/null 2>&1; fi
  if [ -n "$SPID" ] && kill -0 "$SPID" 2>/dev/null; then kill -KILL "$SPID" 2>/dev/null; fi
  if [ -n "${TPID:-}" ] && kill -0 "$TPID" 2>/dev/null; then kill -KILL "$TPID" 2>/dev/null; fi
  if [ "$TL_FAIL" -gt 0 ] && [ -s "$SERVER_LOG" ]; then
    echo "---- server log (tail) ----"; tail -n 40 "$SERVER_LOG"; echo "----"
  fi
  if [ "$TL_FAIL" -gt 0 ] && [ -s "${TLS_LOG:-}" ]; then
    echo "---- TLS server log (tail) ----"; tail -n 40 "$TLS_LOG"; echo "----"
  fi
}
trap cleanup EXIT

connect() { # extra nbd-client args...
  nbd-client -unix "$SOCK" "$DEV" -b 4096 -timeout "$NBD_TIMEOUT" "$@"
}

disconnect() {
  nbd-client -d "$DEV" && nbd_wait_disconnected "$DEV" 30
}

count_conns() { # accepted connections on $SOCK (entries in /proc/net/unix minus the listener)
  n=$(awk -v p="$SOCK" '$NF == p' /proc/net/unix | wc -l)
  echo $((n > 0 ? n - 1 : 0))
}

write_files() {
  mkdir -p "$MNT/dir/sub" &&
  dd if=/dev/urandom of="$MNT/big.bin" bs=1M count=6 status=none &&
  dd if=/dev/urandom of="$MNT/odd.bin" bs=1234567 count=1 status=none &&
  head -c 100000 /dev/urandom >"$MNT/dir/sub/small.bin" &&
  echo "thinline kernel nbd test" >"$MNT/dir/hello.txt" &&
  for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16; do
    head -c $((i * 4099)) /dev/urandom >"$MNT/dir/f$i" || return 1
  done &&
  sync
}

sums_ok() { # DIR
  (cd "$1" && sha256sum --quiet -c /tmp/sums)
}

copy_device() { # $DEV -> /tmp/devcopy (sparse), two readers in parallel (one per guest CPU)
  rm -f /tmp/devcopy
  truncate -s "$SIZE" /tmp/devcopy
  half=$((SIZE / MiB / 2))
  dd if="$DEV" of=/tmp/devcopy bs=1M count="$half" iflag=direct conv=sparse,notrunc status=none &
  p1=$!
  dd if="$DEV" of=/tmp/devcopy bs=1M skip="$half" seek="$half" iflag=direct conv=sparse,notrunc \
    status=none || { wait "$p1"; return 1; }
  wait "$p1"
}

holes_blocks() { stat -c %b "$IMG"; }   # allocated 512-byte blocks

tl_log "nbd-kernel: kernel $(uname -r), server: $SERVER_CMD"

# ---- modules -----------------------------------------------------------------------------
require "load modules nbd loop ext4" load_modules nbd loop ext4
[ -b "$DEV" ] || die "$DEV exists"

# ---- server ------------------------------------------------------------------------------
mkdir -p "$IMG_DIR" "$MNT"
rm -f "$IMG" "$SOCK"
truncate -s "$SIZE" "$IMG" || die "create sparse image $IMG"
tl_log "starting server"
sh -c "exec $SERVER_CMD" >"$SERVER_LOG" 2>&1 &
SPID=$!
require "server answers on $SOCK" wait_for_socket_server "$SOCK" 60 "$SPID"
check "nbdinfo size is 256 MiB" test "$(nbdinfo --size "nbd+unix:///?socket=$SOCK")" = "$SIZE"

# ---- session 1: one connection ----------------------------------------------------------
tl_log "session 1: nbd-client, one connection"
require "nbd-client connect" quietly connect
check "device size is 256 MiB" test "$(bytes_of "$DEV")" = "$SIZE"
check "device is 4096-byte logical blocks" test "$(blockdev --getss "$DEV")" = 4096

require "mkfs.ext4 (${FS_SIZE_MIB} MiB)" mkfs.ext4 -q -F -b 4096 "$DEV" "${FS_SIZE_MIB}M"
require "mount ext4" mount -t ext4 "$DEV" "$MNT"
require "write files" write_files
(cd "$MNT" && find . -type f | sort | xargs sha256sum) >/tmp/sums
tl_log "$(wc -l </tmp/sums) files, $(du -sk "$MNT" | cut -f1) KiB"
check "read back files before umount" sums_ok "$MNT"
require "umount" umount "$MNT"
check "e2fsck -fn clean after session 1" quietly e2fsck -fn "$DEV"

# raw writes outside the file system, then read them back through a fresh page cache
dd if=/dev/urandom of=/tmp/raw.bin bs=1M count=$((RAW_LEN / MiB)) status=none
RAW_SHA=$(sha256sum </tmp/raw.bin | cut -d' ' -f1)
require "raw write at ${RAW_OFF}" dd if=/tmp/raw.bin of="$DEV" bs=1M seek=$((RAW_OFF / MiB)) \
  oflag=direct conv=fsync status=none
check "raw read back" test "$(sha_range "$DEV" "$RAW_OFF" "$RAW_LEN")" = "$RAW_SHA"
check "never-written range after it reads zero" is_zero "$DEV" $((RAW_OFF + RAW_LEN)) $((4 * MiB))
check "never-written last 4 MiB read zero" is_zero "$DEV" $((SIZE - 4 * MiB)) $((4 * MiB))

require "nbd-client -d" quietly disconnect

# ---- session 2: multiple connections ----------------------------------------------------
tl_log "session 2: nbd-client -C $NBD_CONNECTIONS"
require "nbd-client connect -C $NBD_CONNECTIONS" quietly connect -C "$NBD_CONNECTIONS"
check "server sees $NBD_CONNECTIONS connections" test "$(count_conns)" = "$NBD_CONNECTIONS"
check "device size is 256 MiB (multi-conn)" test "$(bytes_of "$DEV")" = "$SIZE"
require "mount ext4 again" mount -t ext4 "$DEV" "$MNT"
check "files intact after reconnect" sums_ok "$MNT"
# parallel writers over the multiple connections
PIDS=
for i in 1 2 3 4; do
  dd if=/dev/urandom of="$MNT/par$i.bin" bs=256k count=16 oflag=direct status=none &
  PIDS="$PIDS $!"
done
wait_ok=0
for j in $PIDS; do wait "$j" || wait_ok=1; done
check "parallel writes" test "$wait_ok" = 0
sync
(cd "$MNT" && sha256sum par*.bin) >>/tmp/sums
echo 3 >/proc/sys/vm/drop_caches
check "all files read back (multi-conn)" sums_ok "$MNT"
require "umount (multi-conn)" umount "$MNT"
check "e2fsck -fn clean after session 2" quietly e2fsck -fn "$DEV"
check "raw range intact" test "$(sha_range "$DEV" "$RAW_OFF" "$RAW_LEN")" = "$RAW_SHA"

# discard the raw range: must read back as zeroes and leave a hole in the image
BLK_BEFORE=$(holes_blocks)
require "blkdiscard ${RAW_LEN} at ${RAW_OFF}" blkdiscard -f -o "$RAW_OFF" -l "$RAW_LEN" "$DEV"
check "discarded range reads zero" is_zero "$DEV" "$RAW_OFF" "$RAW_LEN"
check "discarded range reads zero (O_DIRECT)" \
  test "$(sha_range "$DEV" "$RAW_OFF" "$RAW_LEN")" = "$(head -c "$RAW_LEN" /dev/zero | sha256sum | cut -d' ' -f1)"
BLK_AFTER=$(holes_blocks)
tl_log "image allocated: $((BLK_BEFORE / 2)) KiB before discard, $((BLK_AFTER / 2)) KiB after"
if [ "$EXPECT_HOLE" = 1 ]; then
  check "image file shrank by the discarded range" test $((BLK_BEFORE - BLK_AFTER)) -ge $((RAW_LEN / 512))
fi

# a copy of the whole device as the kernel reads it (sparse in tmpfs), to compare with the image file
tl_log "copying the device"
require "copy of $DEV" copy_device
require "nbd-client -d (multi-conn)" quietly disconnect

# ---- server shutdown --------------------------------------------------------------------
tl_log "stopping server with SIGTERM"
stop_process "$SPID" 30
rc=$?
SPID=
check "server exits 0 on SIGTERM" test "$rc" = 0

# ---- the image file itself ----------------------------------------------------------------
check "image size unchanged" test "$(stat -c %s "$IMG")" = "$SIZE"
check "image file == device content (cmp)" cmp "$IMG" /tmp/devcopy
rm -f /tmp/devcopy
check "image discarded range is zero" is_zero "$IMG" "$RAW_OFF" "$RAW_LEN"
LOOPDEV=$(losetup -r -f --show "$IMG") || die "losetup -r $IMG"
check "e2fsck -fn image via loop" quietly e2fsck -fn "$LOOPDEV"
if mount -t ext4 -o ro "$LOOPDEV" "$MNT"; then
  check "files in the image (loop mount)" sums_ok "$MNT"
  umount "$MNT"
else
  fail "loop mount of the image"
fi
losetup -d "$LOOPDEV"; LOOPDEV=

# ---- TLS: the kernel client through nbd-client's STARTTLS proxy --------------------------------
# nbd-client does the TLS handshake itself (a forked GnuTLS proxy on a socketpair; the kernel gets
# the plain end), so this is the kernel's nbd over TLS as users run it. `thinline serve --tls
# require --tls-ca` on TCP (loopback), certificates made by test-nbd-kernel.sh in WORKDIR/tls:
# attach with a client certificate, read the export back, write, check the image file; then
# clients that must not attach: no TLS at all, trusting another CA, no client certificate; then a
# good client again, with two connections. The server must stay up throughout and exit 0.
TLS=/mnt/tls
TLS_IMG=/tmp/tls.img
TLS_EXPECTED=/tmp/tls-expected.img
TLS_SIZE=$((4 * MiB))
TLS_PORT=10809
TLS_LOG=/mnt/tls-server.log
TLS_OUT=/tmp/nbd-client-tls.out

# nbd-client over TCP to the TLS server with the given TLS options; its output in $TLS_OUT.
tls_connect() { # [nbd-client options...]
  timeout 120 nbd-client 127.0.0.1 "$TLS_PORT" "$DEV" -N tls -b 4096 -timeout "$NBD_TIMEOUT" "$@" \
    >"$TLS_OUT" 2>&1
}
good_client() { # [more options...]
  tls_connect -cacertfile "$TLS/ca-cert.pem" -certfile "$TLS/client-cert.pem" \
    -keyfile "$TLS/client-key.pem" -tlshostname localhost "$@" && return 0
  _rc=$?; cat "$TLS_OUT"; return $_rc
}
# The attach must fail and leave the device unconfigured; what nbd-client said goes to the log.
refused() { # WHY [nbd-client options...]
  _why=$1; shift
  _t0=$(cut -d' ' -f1 /proc/uptime)
  if tls_connect "$@"; then
    cat "$TLS_OUT"; disconnect >/dev/null 2>&1; return 1
  fi
  _t1=$(cut -d' ' -f1 /proc/uptime)
  tl_log "$_why: refused after $(awk -v a="$_t0" -v b="$_t1" 'BEGIN { printf "%.1f", b - a }') s;" \
    "nbd-client said: $(tr '\n' ' ' <"$TLS_OUT" | cut -c1-200)"
  test "$(cat /sys/block/nbd0/size)" = 0
}
said_requires_tls() { grep -q "requires TLS" "$TLS_OUT"; }
server_alive() { kill -0 "$TPID" 2>/dev/null; }
tls_conns() { # established server-side connections on $TLS_PORT (/proc/net/tcp, ports in hex)
  awk -v p="$(printf ':%04X' "$TLS_PORT")" '$4 == "01" && substr($2, length($2) - 4) == p' \
    /proc/net/tcp | wc -l
}
sha_of() { sha256sum <"$1" | cut -d' ' -f1; }

TPID=
if [ ! -x "$THINLINE_BIN" ]; then
  fail "TLS section: no thinline binary at $THINLINE_BIN"
elif [ ! -f "$TLS/ca-cert.pem" ]; then
  fail "TLS section: no certificates in $TLS (test-nbd-kernel.sh makes them)"
else
  tl_log "TLS: thinline serve --tls require --tls-ca on 127.0.0.1:$TLS_PORT, nbd-client with TLS"
  # The VM has no network set up, not even lo; busybox (the initramfs's) is there for sure.
  require "loopback up" busybox ip link set lo up
  head -c "$TLS_SIZE" /dev/urandom >"$TLS_IMG"
  cp "$TLS_IMG" "$TLS_EXPECTED"
  "$THINLINE_BIN" serve --listen "127.0.0.1:$TLS_PORT" --tls require \
    --tls-cert "$TLS/server-cert.pem" --tls-key "$TLS/server-key.pem" --tls-ca "$TLS/ca-cert.pem" \
    "tls=$TLS_IMG" >"$TLS_LOG" 2>&1 &
  TPID=$!
  require "TLS server answers libnbd (nbds://)" wait_for_socket_server \
    "nbds://127.0.0.1:$TLS_PORT/tls?tls-certificates=$TLS/client" 60 "$TPID"

  # A good client: the CA, a client certificate, the server's name.
  require "nbd-client attaches with TLS" good_client
  check "TLS device size is 4 MiB" test "$(bytes_of "$DEV")" = "$TLS_SIZE"
  check "TLS device reads the image's bytes" test "$(sha_range "$DEV" 0 "$TLS_SIZE")" = "$(sha_of "$TLS_IMG")"
  head -c "$MiB" /dev/urandom >/tmp/tls-write.bin
  dd if=/tmp/tls-write.bin of="$TLS_EXPECTED" bs=1M seek=2 conv=notrunc status=none
  check "write 1 MiB through TLS" dd if=/tmp/tls-write.bin of="$DEV" bs=1M seek=2 oflag=direct \
    conv=fsync status=none
  check "TLS device reads the write back" test "$(sha_range "$DEV" 0 "$TLS_SIZE")" = "$(sha_of "$TLS_EXPECTED")"
  check "nbd-client -d (TLS)" quietly disconnect
  check "the write landed in the image file" cmp "$TLS_IMG" "$TLS_EXPECTED"

  # Clients that must not attach.
  check "nbd-client without TLS is refused" refused "no TLS"
  check "... and was told the server requires TLS" said_requires_tls
  check "nbd-client trusting another CA refuses the server" refused "another CA" \
    -cacertfile "$TLS/wrong/ca-cert.pem" -certfile "$TLS/client-cert.pem" \
    -keyfile "$TLS/client-key.pem" -tlshostname localhost
  check "nbd-client without a client certificate is refused (--tls-ca)" refused "no client cert" \
    -cacertfile "$TLS/ca-cert.pem" -tlshostname localhost
  check "TLS server still running after the refusals" server_alive

  # A good client again, now with two connections (one TLS proxy each).
  require "nbd-client attaches with TLS again (-C 2)" good_client -C 2
  check "server sees 2 TLS connections" test "$(tls_conns)" = 2
  check "TLS device reads image + write after the refusals" \
    test "$(sha_range "$DEV" 0 "$TLS_SIZE")" = "$(sha_of "$TLS_EXPECTED")"
  check "nbd-client -d (TLS, -C 2)" quietly disconnect

  stop_process "$TPID" 30
  rc=$?
  TPID=
  check "TLS server exits 0 on SIGTERM" test "$rc" = 0
fi

# ---- the agent: vdi attach --device ---------------------------------------------------------
# `thinline vdi attach --device` connects a /dev/nbdN to a VDI served by the SR's daemon; a
# snapshot taken while the file system on it is mounted and written holds what was written
# before it; detach is refused while mounted, then flushes and disconnects.
if [ -x "$THINLINE_BIN" ]; then
  tl_log "agent: vdi attach --device"
  export THINLINE_SR_REGISTRY=/tmp/sr-registry.json
  SR=/tmp/agent-sr
  agent() { "$THINLINE_BIN" "$@"; }
  field() { sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p"; }   # a string field of one JSON line
  uuid_of() { sed -n 's/^{"uuid":"\([^"]*\)".*/\1/p'; }
  attach_device() { agent vdi attach --sr "$SR" "$1" --device --json | field device; }
  detach_refused_while_mounted() { agent vdi detach --sr "$SR" "$VDI" >/dev/null 2>&1; test $? = 13; }
  require "sr create" quietly agent sr create "$SR"
  VDI=$(agent vdi create --sr "$SR" 64M --json | uuid_of)
  require "vdi create" test -n "$VDI"
  ADEV=$(attach_device "$VDI")
  require "vdi attach --device prints /dev/nbdN ($ADEV)" quietly expr "$ADEV" : '/dev/nbd[0-9]*$'
  check "the device is the VDI's 64 MiB" test "$(bytes_of "$ADEV")" = $((64 * MiB))
  check "attaching again answers the same device" test "$(attach_device "$VDI")" = "$ADEV"
  require "mkfs.ext4 on the VDI" mkfs.ext4 -q -F -b 4096 "$ADEV" 32M
  require "mount the VDI" mount -t ext4 "$ADEV" "$MNT"
  require "write files on the VDI" write_files
  (cd "$MNT" && find . -type f | sort | xargs sha256sum) >/tmp/sums
  dd if=/dev/urandom of=/tmp/before.bin bs=1M count=1 status=none
  dd if=/dev/urandom of=/tmp/after.bin bs=1M count=1 status=none
  BEFORE=$(sha256sum </tmp/before.bin | cut -d' ' -f1)
  AFTER=$(sha256sum </tmp/after.bin | cut -d' ' -f1)
  require "raw write at 48 MiB" dd if=/tmp/before.bin of="$ADEV" bs=1M seek=48 oflag=direct status=none
  SNAP=$(agent vdi snapshot --sr "$SR" "$VDI" --json | uuid_of)
  require "vdi snapshot while mounted and written" test -n "$SNAP"
  require "raw write after the snapshot" dd if=/tmp/after.bin of="$ADEV" bs=1M seek=48 oflag=direct status=none
  check "files still read back after the snapshot" sums_ok "$MNT"
  check "vdi detach refused while mounted (VDI_IN_USE)" detach_refused_while_mounted
  require "umount the VDI" umount "$MNT"
  check "e2fsck -fn clean on the VDI" quietly e2fsck -fn "$ADEV"
  check "the VDI holds the write after the snapshot" test "$(sha_range "$ADEV" $((48 * MiB)) "$MiB")" = "$AFTER"
  require "vdi detach" quietly agent vdi detach --sr "$SR" "$VDI"
  check "detach disconnected $ADEV" nbd_wait_disconnected "$ADEV" 5
  SDEV=$(attach_device "$SNAP")
  require "the snapshot attaches as a device ($SDEV)" quietly expr "$SDEV" : '/dev/nbd[0-9]*$'
  check "the snapshot's device is read-only" test "$(blockdev --getro "$SDEV")" = 1
  check "the snapshot holds the write before it" test "$(sha_range "$SDEV" $((48 * MiB)) "$MiB")" = "$BEFORE"
  require "vdi detach the snapshot" quietly agent vdi detach --sr "$SR" "$SNAP"
  ADEV=$(attach_device "$VDI")
  require "mount the VDI again" mount -t ext4 "$ADEV" "$MNT"
  check "files intact after detach and attach" sums_ok "$MNT"
  umount "$MNT"
  require "vdi detach again" quietly agent vdi detach --sr "$SR" "$VDI"
  check "sr destroy" quietly agent sr destroy --sr "$SR" --force
else
  fail "agent section: no thinline binary at $THINLINE_BIN"
fi

tl_summary || exit 1
echo "nbd-kernel: ALL PASSED"
