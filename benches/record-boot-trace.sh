#!/usr/bin/env bash
# Records the block read trace of a real Debian boot: benches/traces/debian-boot.csv.
#
# 1. debootstrap --variant=minbase bookworm (+ systemd-sysv, udev, linux-image-amd64,
#    e2fsprogs, kmod) into WORK/rootfs, from the machine's configured Debian mirror.
# 2. An ext4 raw image of IMAGE_SIZE made from it (mkfs.ext4 -d), no partition table.
# 3. nbdkit serves it with the log filter in front of a cow filter (the guest's writes go
#    to the cow overlay, so the image stays as built and a re-recording starts from the
#    same bytes): nbdkit --filter=log --filter=cow file IMG logfile=LOG.
# 4. qemu (TCG) boots the image's own kernel and initrd (-kernel/-initrd, copied out of
#    the image's /boot) with root=/dev/vda on virtio-blk over NBD, until the serial
#    console shows the login prompt ("login:").
# 5. The log's reads issued before that moment become the trace (see benches/README.md):
#    offset,length,gap_us,after,qd. Writes, flushes and block-status calls are dropped.
#
# Needs root (debootstrap, chroot), debootstrap, qemu-system-x86_64, nbdkit, python3.
# Takes a few minutes (debootstrap) plus the boot (about a minute under TCG).
#
# Settings (environment): WORK (default /var/tmp/thinline-boot; the rootfs is reused if it
# exists), IMAGE_SIZE (default 2G), MIRROR (default: the first Debian URI in
# /etc/apt/sources.list*), OUT (default benches/traces/debian-boot.csv), BOOT_TIMEOUT
# (seconds, default 600), QEMU_ARGS (extra qemu arguments), KEEP=1 keeps the image.
set -euo pipefail

repo_root=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-/var/tmp/thinline-boot}
IMAGE_SIZE=${IMAGE_SIZE:-2G}
OUT=${OUT:-$repo_root/benches/traces/debian-boot.csv}
BOOT_TIMEOUT=${BOOT_TIMEOUT:-600}
SUITE=bookworm
PACKAGES=systemd-sysv,udev,linux-image-amd64,e2fsprogs,kmod

log() { printf '[record-boot-trace] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot)"
for t in debootstrap qemu-system-x86_64 nbdkit nbdinfo mkfs.ext4 python3; do
  command -v "$t" >/dev/null || die "$t not found"
done
if [ -z "${MIRROR:-}" ]; then
  MIRROR=$( (cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null || true) |
    grep -oE 'https?://[^ ]*/debian/?( |$)' | head -n1 | tr -d ' ' || true)
  [ -n "$MIRROR" ] || die "no Debian mirror in /etc/apt/sources.list*; set MIRROR"
fi

mkdir -p "$WORK"
rootfs=$WORK/rootfs
image=$WORK/debian-boot.raw
sock=$WORK/nbd.sock
nbdlog=$WORK/nbdkit-boot.log
console=$WORK/console.log
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  for m in proc sys dev/pts dev; do umount "$rootfs/$m" 2>/dev/null || true; done
}
trap cleanup EXIT

# --- 1. root file system ----------------------------------------------------------------------
if [ ! -x "$rootfs/sbin/init" ]; then
  log "debootstrap $SUITE (minbase + $PACKAGES) from $MIRROR into $rootfs"
  rm -rf "$rootfs"
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" \
    >"$WORK/debootstrap.log" 2>&1 || die "debootstrap failed; see $WORK/debootstrap.log"
else
  log "reusing $rootfs"
fi
echo thinline-boot >"$rootfs/etc/hostname"
printf '/dev/vda / ext4 errors=remount-ro 0 1\n' >"$rootfs/etc/fstab"
# No network in the guest: nothing should wait for it.
kver=$(basename "$(ls -d "$rootfs"/lib/modules/*/ | sort -V | tail -n1)")
[ -f "$rootfs/boot/vmlinuz-$kver" ] && [ -f "$rootfs/boot/initrd.img-$kver" ] ||
  die "no kernel/initrd for $kver in $rootfs/boot"
cp "$rootfs/boot/vmlinuz-$kver" "$WORK/vmlinuz"
cp "$rootfs/boot/initrd.img-$kver" "$WORK/initrd.img"
used=$(du -sb --exclude=proc --exclude=sys --exclude=dev "$rootfs" | cut -f1)

# --- 2. image -------------------------------------------------------------------------------
log "making the ext4 image $image ($IMAGE_SIZE, $((used / 1048576)) MiB of files)"
rm -f "$image"
mkfs.ext4 -q -F -L thinline-boot -d "$rootfs" "$image" "$IMAGE_SIZE" || die "mkfs.ext4 failed"
image_bytes=$(stat -c %s "$image")
image_sha=$(sha256sum "$image" | cut -d' ' -f1)

# --- 3. server with request logging -------------------------------------------------------
rm -f "$sock" "$nbdlog" "$console"
nbdkit -f -U "$sock" --filter=log --filter=cow file "$image" logfile="$nbdlog" \
  </dev/null >"$WORK/nbdkit.out" 2>&1 &
pids+=($!)
deadline=$((SECONDS + 30))
until nbdinfo --size "nbd+unix:///?socket=$sock" >/dev/null 2>&1; do
  [ $SECONDS -lt $deadline ] || die "nbdkit did not start: $(cat "$WORK/nbdkit.out")"
  sleep 0.2
done
# nbdinfo's probe connection is in the log too; the converter keeps the last connection.

# --- 4. boot --------------------------------------------------------------------------------
qemu_cmd=(qemu-system-x86_64 -accel tcg -cpu max -m 1024 -nographic -no-reboot -nic none
  -kernel "$WORK/vmlinuz" -initrd "$WORK/initrd.img"
  -append "root=/dev/vda ro console=ttyS0 panic=-1"
  -drive "file=nbd+unix:///?socket=$sock,format=raw,if=virtio" ${QEMU_ARGS:-})
log "booting: ${qemu_cmd[*]}"
boot_start=$(date +%s.%6N)
"${qemu_cmd[@]}" </dev/null >"$console" 2>&1 &
qemu_pid=$!
pids+=($qemu_pid)
deadline=$((SECONDS + BOOT_TIMEOUT))
until grep -q 'login:' "$console"; do
  kill -0 "$qemu_pid" 2>/dev/null || die "qemu exited before the login prompt; see $console"
  [ $SECONDS -lt $deadline ] || die "no login prompt after ${BOOT_TIMEOUT}s; see $console"
  sleep 0.05
done
ready=$(date +%s.%6N)
log "login prompt after $(python3 -c "print(f'{$ready - $boot_start:.1f}')") s"
kill "$qemu_pid"
wait "$qemu_pid" 2>/dev/null || true
sleep 0.5

# --- 5. trace ---------------------------------------------------------------------------------
mkdir -p "$(dirname "$OUT")"
qemu_ver=$(qemu-system-x86_64 --version | head -n1)
nbdkit_ver=$(nbdkit --version | head -n1)
python3 - "$nbdlog" "$OUT" "$boot_start" "$ready" <<PY
import datetime, re, sys
log_path, out_path, boot_start, ready = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
pat = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) connection=(\d+) (\.\.\.)?(\w+) id=(\d+)(.*)\$")
def ts(s):
    d = datetime.datetime.strptime(s, "%Y-%m-%d %H:%M:%S.%f")
    return d.timestamp()
issue, done, reads, other = {}, {}, [], {}
conns = {}
for line in open(log_path):
    m = pat.match(line)
    if not m:
        continue
    t, conn, ret, act, rid, rest = ts(m[1]), int(m[2]), m[3], m[4], int(m[5]), m[6]
    key = (conn, rid)
    if ret:
        done[key] = t
        if "return=-1" in rest:
            sys.exit(f"a request failed in the recording: {line.strip()}")
        continue
    conns[conn] = conns.get(conn, 0) + 1
    if act == "Read":
        off = int(re.search(r"offset=(0x[0-9a-f]+)", rest)[1], 16)
        cnt = int(re.search(r"count=(0x[0-9a-f]+)", rest)[1], 16)
        reads.append((t, key, off, cnt))
    else:
        other[act] = other.get(act, 0) + 1
# The guest's connection: the one with the most requests (nbdinfo's probe has none).
guest = max(conns, key=conns.get)
reads = [r for r in reads if r[1][0] == guest and r[0] <= ready]
reads.sort(key=lambda r: r[0])
rows, qd_hist = [], {}
start = reads[0][0]
for i, (t, key, off, cnt) in enumerate(reads):
    # The last read that completed before this one was issued: this one's predecessor.
    best, best_t = -1, start
    for j in range(i - 1, -1, -1):
        dj = done[reads[j][1]]
        if dj <= t and dj >= best_t:
            best, best_t = j, dj
        if t - reads[j][0] > 60:
            break
    qd = sum(1 for j in range(max(0, i - 256), i) if done[reads[j][1]] > t)
    qd_hist[qd] = qd_hist.get(qd, 0) + 1
    gap = max(0, round((t - best_t) * 1e6))
    rows.append((off, cnt, gap, best, qd))
total = sum(r[1] for r in rows)
# Unique bytes at 4 KiB granularity.
blocks = set()
for off, cnt, *_ in rows:
    blocks.update(range(off // 4096, (off + cnt + 4095) // 4096))
lat = sorted(done[r[1]] - r[0] for r in reads)
think = sum(r[2] for r in rows) / 1e6
span = done[reads[-1][1]] - start
sizes = sorted(r[1] for r in rows)
dep = sum(1 for r in rows if r[4] == 0)
with open(out_path, "w") as f:
    w = f.write
    w("# Block read trace of a Debian 12 (bookworm) boot to the serial login prompt.\n")
    w("# Recorded by benches/record-boot-trace.sh on $(date -u +%Y-%m-%d) with $qemu_ver (TCG, 1 vCPU,\n")
    w("#   -cpu max, -m 1024) and $nbdkit_ver (--filter=log --filter=cow file IMG).\n")
    w("# Guest: debootstrap --variant=minbase bookworm + $PACKAGES;\n")
    w("#   kernel $kver and its initramfs-tools initrd loaded with -kernel/-initrd (not read from the disk);\n")
    w("#   root=/dev/vda ro (ext4, no partition table) on virtio-blk over NBD; systemd to the ttyS0 getty.\n")
    w(f"# Image: {int('$image_bytes')} bytes ($IMAGE_SIZE raw ext4), {int('$used') // 1048576} MiB of files, sha256 $image_sha.\n")
    w(f"# Reads: {len(rows)} requests, {total} bytes ({total / 1048576:.1f} MiB), {len(blocks) * 4096 / 1048576:.1f} MiB unique (4 KiB blocks);\n")
    w(f"#   request size min/median/max {sizes[0]}/{sizes[len(sizes) // 2]}/{sizes[-1]} bytes; {dep} issued with nothing in flight.\n")
    w(f"# Not in the trace: {', '.join(f'{v} {k}' for k, v in sorted(other.items())) or 'nothing else'}"
      f" (all connections), and reads after the login prompt.\n")
    w(f"# Timing: login prompt {ready - boot_start:.1f} s after qemu started; first to last read {span:.1f} s;\n")
    w(f"#   think time (sum of gap_us) {think:.1f} s; recorded read latency (local file) median {lat[len(lat) // 2] * 1e6:.0f} us.\n")
    w(f"# Queue depth at issue (qd: count): {', '.join(f'{k}: {v}' for k, v in sorted(qd_hist.items()))}.\n")
    w("# Columns: offset, length (bytes); after = index (0-based) of the read whose completion this one\n")
    w("#   waited for (the last read completed before this one was issued; -1 = trace start); gap_us =\n")
    w("#   think time from that completion to this issue; qd = reads in flight at issue (informational).\n")
    w("#   Replay: issue in order, each once 'after' completed plus gap_us (examples/replay-trace.rs).\n")
    w("offset,length,gap_us,after,qd\n")
    for r in rows:
        w(f"{r[0]},{r[1]},{r[2]},{r[3]},{r[4]}\n")
print(f"{len(rows)} reads, {total / 1048576:.1f} MiB, think {think:.1f} s, span {span:.1f} s", file=sys.stderr)
PY
log "wrote $OUT"
if [ "${KEEP:-1}" != 1 ]; then rm -f "$image"; else log "image kept: $image"; fi
