#!/bin/sh
# cor-dmthin.sh: guest side of the copy-on-read proxy + dm-thin race test (run inside the VM by
# run-vm.sh; see test-cor-dmthin.sh for the host side).
#
# The original design wrote fetched template data into the thin clone, which loses guest writes:
# the guest reads block b (a fetch starts), writes part of b (dm-thin provisions and acknowledges),
# the fetch finishes and template bytes land on top of the guest's. `thinline proxy` caches the
# *origin* instead. This test builds the real stack and races exactly that:
#
#   nbdkit --filter=delay file TEMPLATE (slow upstream) -> thinline proxy (cache /tmp/cor.cache)
#     -> nbd-client /dev/nbd0 (read-only) -> dm-thin thin volume with /dev/nbd0 as external origin
#
# Round 1 (deterministic): the upstream is frozen (SIGSTOP on nbdkit) while the first operation on
# each of 24 uncached 64 KiB blocks is shown to be waiting in the proxy; then the racing operations
# are issued, the full-block writes must complete while the reads of the same blocks still wait,
# and only then is the upstream released. Per block (i % 4):
#   A   64 KiB O_DIRECT read of b, then a 4 KiB write inside b                  (read sees template)
#   B   4 KiB write inside b, then a read of b                         (read sees template + write)
#   D   read of b, then a full 64 KiB write of b (acknowledged while the read still waits)
#   A2  read of b, then two 4 KiB writes and a 512-byte write inside b, concurrently
# and for every block a 512-byte write into another uncached block (some in template holes).
# Round 2: 8 more blocks raced on the upstream's delay alone (read/write in either order).
#
# Afterwards the thin volume must equal the template with exactly the guest's writes applied (also
# after removing the thin device and its pool and re-creating both from the pool's metadata),
# dm-thin must have provisioned only the written blocks, /dev/nbd0 and the proxy's cache file must
# equal the template, and the proxy must have fetched every template byte exactly once.
#
# Configuration (environment, or /mnt/cor-dmthin.env in the work directory, which is sourced):
#   THINLINE_BIN  the thinline binary (default target/release/thinline of this repository)
#   RDELAY        nbdkit delay filter rdelay (default 300ms)
#   NBD_TIMEOUT   nbd-client -timeout (default 120 s: round 1 holds requests for 20-40 s under
#                 TCG); a wedged proxy fails instead of hanging
#   PROXY_ARGS    extra arguments for `thinline proxy` (e.g. -v for debug logs in /mnt/proxy.log)
#   SIMULATE_CLOBBER=1  negative control: after the races, do what the original design's late
#                 fetch did (write the template's bytes of race 0's block into the clone); the
#                 thin volume checks must then FAIL
#   KERNEL_TEST_BIN  the kernel test binary, whose LVM building-block test runs at the end
#                 (lvm-blocks.sh)
set -u

[ -f /mnt/cor-dmthin.env ] && . /mnt/cor-dmthin.env
. "${THINLINE_GUEST_LIB:-${THINLINE_KERNEL_TESTS:-/work/main/tests/kernel}/guest-lib.sh}"

THINLINE_BIN=${THINLINE_BIN:-${THINLINE_KERNEL_TESTS:-/work/main/tests/kernel}/../../target/release/thinline}
RDELAY=${RDELAY:-300ms}
NBD_TIMEOUT=${NBD_TIMEOUT:-120}
PROXY_ARGS=${PROXY_ARGS:-}
SIMULATE_CLOBBER=${SIMULATE_CLOBBER:-0}

MiB=1048576
BLK=65536                      # dm-thin block = proxy chunk = 64 KiB
SIZE=$((64 * MiB))             # the template; the proxy fetches 1 MiB units ("units" below)
FROZEN=24                      # blocks 0..23: round 1 (upstream frozen); 24..31: round 2
NBLOCKS=32
TEMPLATE=/tmp/template.img
EXPECTED=/tmp/expected.img
UPSOCK=/tmp/up.sock
PSOCK=/tmp/proxy.sock
PURI="nbd+unix:///?socket=$PSOCK"
CACHE=/tmp/cor.cache
DEV=/dev/nbd0
POOL=corpool
THIN=corthin
TDEV=/dev/mapper/$THIN
W=/tmp/w                       # write patterns, read results, operation lists
NBDKIT_LOG=/mnt/nbdkit.log
PROXY_LOG=/mnt/proxy.log

NKPID=
PPID_=
META=
DATA=

running() { # PID: alive and not a zombie
  [ -r "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]
}

cleanup() {
  set +e
  [ -n "$NKPID" ] && kill -CONT "$NKPID" 2>/dev/null
  # background dd's still running (after a failure) hold the thin device open: let them finish
  for f in "$W"/ops.*; do
    [ -f "$f" ] || continue
    while read -r p _; do running "$p" && kill -TERM "$p" 2>/dev/null; done <"$f"
  done
  for d in "$THIN" "$POOL"; do
    dmsetup info "$d" >/dev/null 2>&1 && { dm_remove "$d" || { sleep 2; dm_remove "$d"; }; }
  done
  if [ "$(cat /sys/block/nbd0/size 2>/dev/null || echo 0)" != 0 ]; then
    nbd-client -d "$DEV" >/dev/null 2>&1; nbd_wait_disconnected "$DEV" 10
  fi
  [ -n "$PPID_" ] && running "$PPID_" && stop_process "$PPID_" 10 >/dev/null
  [ -n "$NKPID" ] && running "$NKPID" && stop_process "$NKPID" 10 >/dev/null
  [ -n "$META" ] && losetup -d "$META" 2>/dev/null
  [ -n "$DATA" ] && losetup -d "$DATA" 2>/dev/null
  if [ "$TL_FAIL" -gt 0 ]; then
    for l in "$PROXY_LOG" "$NBDKIT_LOG"; do
      [ -s "$l" ] && { echo "---- $l (tail) ----"; tail -n 40 "$l"; echo "----"; }
    done
    echo "---- dmsetup status ----"; dmsetup status 2>&1; echo "----"
  fi
}
trap cleanup EXIT

# ---- helpers ---------------------------------------------------------------------------------
pstatus() { "$THINLINE_BIN" proxy status "$PSOCK.status" --json 2>/dev/null; }
field() { sed -n "s/.*\"$1\":\([0-9a-z.]*\).*/\1/p"; }       # FIELD, from status JSON on stdin
requests() { # hits + misses the proxy has seen
  _j=$(pstatus); echo $(( $(echo "$_j" | field hits) + $(echo "$_j" | field misses) ))
}
wait_requests() { # N TIMEOUT_S: until the proxy has seen at least N requests
  _dl=$(( $(cut -d. -f1 /proc/uptime) + $2 ))
  while [ "$(requests)" -lt "$1" ]; do
    [ "$(cut -d. -f1 /proc/uptime)" -ge "$_dl" ] && return 1
    sleep 0.2
  done
}
uri_of() { echo "nbd+unix:///?socket=$1"; }

# Layout (the proxy fetches 1 MiB units; unit 0 is left alone, as something reading the device's
# start on attach, like a partition scan, would fetch it). Round 1 race i: block b in unit 2i+1, its "other" write in unit 2i+2
# (units 1..48). Round 2: block b and the other write in unit 26+i (units 50..57).
prim_off() { # I: byte offset of block b of race I
  if [ "$1" -lt "$FROZEN" ]; then _u=$((2 * $1 + 1)); else _u=$((26 + $1)); fi
  echo $((_u * MiB + ($1 % 12) * BLK))
}
other_off() { # I: byte offset of the 512-byte write of race I into another block
  if [ "$1" -lt "$FROZEN" ]; then _b=$(((2 * $1 + 2) * MiB + (($1 * 5) % 16) * BLK))
  else _b=$(((26 + $1) * MiB + (12 + $1 % 4) * BLK)); fi
  echo $((_b + ($1 % 7) * 4096 + ($1 % 8) * 512))
}
not_cached() { # FROM TO (bytes): no chunk of [FROM, TO) is present in the proxy's cache
  nbdinfo --map=qemu:allocation-depth "$PURI" >"$W/map" || return 1
  awk -v s="$1" -v e="$2" '$1 < e && $1 + $2 > s && $3 == 1 { print "cached:", $0; bad = 1 }
                           END { exit bad }' "$W/map"
}

# Every write's data is a slice of one random pattern file; $W/writes lists "OFF LEN PATOFF NAME".
plan_write() { # NAME OFF LEN
  echo "$2 $3 $PATOFF $1" >>"$W/writes"; PATOFF=$((PATOFF + $3))
}
wr() { # NAME: that planned write, to the thin device, O_DIRECT + fsync
  while read -r _o _l _po _n; do [ "$_n" = "$1" ] && break; done <"$W/writes"
  [ "$_n" = "$1" ] || { echo "wr: no planned write $1" >&2; return 1; }
  dd if="$W/patterns" of="$TDEV" bs="$_l" count=1 skip="$_po" seek="$_o" iflag=skip_bytes \
    oflag=direct,seek_bytes conv=fsync status=none
}
rd() { # I: 64 KiB O_DIRECT read of block b of race I into $W/rd.I; completion time in $W/rd.I.t
  dd if="$TDEV" of="$W/rd.$1" bs=$BLK count=1 skip="$(prim_off "$1")" iflag=direct,skip_bytes \
    status=none || return
  read -r _up _ </proc/uptime; echo "$_up" >"$W/rd.$1.t"
}

bgop() { # LIST NAME CMD...: run CMD in the background, remember "PID NAME" in $W/ops.LIST
  _l=$1; _n=$2; shift 2
  "$@" &
  echo "$! $_n" >>"$W/ops.$_l"
}

wait_list() { # LIST: wait for every op in it; prints the failures
  _bad=0
  while read -r _p _n; do
    wait "$_p" || { echo "operation $_n (pid $_p) failed: exit $?"; _bad=$((_bad + 1)); }
  done <"$W/ops.$1"
  return "$_bad"
}

cmp_dev() { # DEV FILE: whole device (O_DIRECT) against FILE
  dd if="$1" bs=1M iflag=direct status=none | cmp - "$2"
}

remove_dm() { dm_remove "$THIN" && dm_remove "$POOL"; }
nbd_disconnect() { nbd-client -d "$DEV" && nbd_wait_disconnected "$DEV" 30; }

mapped_sectors() { dmsetup status "$THIN" | awk '{print $4}'; }

tl_log "cor-dmthin: kernel $(uname -r), $($THINLINE_BIN --version 2>&1), upstream rdelay=$RDELAY"

# ---- modules ---------------------------------------------------------------------------------
# max_part=0: no partition scan when nbd-client connects. With one, the kernel reads the start of
# /dev/nbd0 through the proxy, whose readahead then fetches unit 1 too (seen here).
require "load modules nbd (max_part=0) loop dm-thin-pool" load_modules nbd max_part=0 loop dm-thin-pool
[ -b "$DEV" ] || die "$DEV exists"

# ---- template (random data with holes) ---------------------------------------------------------
mkdir -p "$W"
tl_log "making the 64 MiB template"
head -c "$SIZE" /dev/urandom >"$TEMPLATE" || die "write template"
# holes: whole "other" units (writes into holes), the tail of race units 13 and 53 (the other
# write of race 27 lands in it), and the end of the template
for u in 8 22 36; do fallocate -p -o $((u * MiB)) -l "$MiB" "$TEMPLATE" || die "punch hole"; done
for u in 13 53; do fallocate -p -o $((u * MiB + 768 * 1024)) -l $((256 * 1024)) "$TEMPLATE" || die "punch hole"; done
fallocate -p -o $((SIZE - 128 * 1024)) -l $((128 * 1024)) "$TEMPLATE" || die "punch hole"
check "template is 64 MiB with holes" test "$(stat -c %s "$TEMPLATE")" = "$SIZE" -a \
  "$(stat -c %b "$TEMPLATE")" -lt $((SIZE / 512))

# ---- upstream, proxy, nbd-client -------------------------------------------------------------
tl_log "starting nbdkit (delay filter rdelay=$RDELAY) and thinline proxy"
nbdkit -f --filter=delay file "$TEMPLATE" rdelay="$RDELAY" -U "$UPSOCK" >"$NBDKIT_LOG" 2>&1 &
NKPID=$!
require "nbdkit (slow upstream) answers" wait_for_socket_server "$UPSOCK" 60 "$NKPID"

# --fetch-around 0: the races sit in neighbouring units, which must stay uncached until each race
# starts (the race is between a fetch in flight and guest writes; speculation is not under test).
# shellcheck disable=SC2086 # PROXY_ARGS: words
"$THINLINE_BIN" proxy --upstream "$(uri_of "$UPSOCK")" --cache "$CACHE" --socket "$PSOCK" --json \
  --fetch-around 0 $PROXY_ARGS \
  >/mnt/proxy.json 2>"$PROXY_LOG" &
PPID_=$!
require "thinline proxy answers" wait_for_socket_server "$PSOCK" 60 "$PPID_"
check "proxy printed its JSON line" grep -q '"status_socket"' /mnt/proxy.json
check "proxy cache starts empty" test "$(pstatus | field chunks_present)" = 0

require "nbd-client -readonly to the proxy" quietly \
  nbd-client -unix "$PSOCK" "$DEV" -b 4096 -readonly -timeout "$NBD_TIMEOUT"
check "/dev/nbd0 is 64 MiB" test "$(bytes_of "$DEV")" = "$SIZE"
check "/dev/nbd0 is read-only" test "$(blockdev --getro "$DEV")" = 1

# ---- dm-thin pool on loop devices, thin volume with /dev/nbd0 as external origin ---------------
{ truncate -s 16M /tmp/pool-meta && truncate -s 256M /tmp/pool-data; } || die "pool files"
META=$(losetup -f --show /tmp/pool-meta) || die "losetup meta"
DATA=$(losetup -f --show /tmp/pool-data) || die "losetup data"
POOL_TABLE="0 $((256 * MiB / 512)) thin-pool $META $DATA $((BLK / 512)) 0"
THIN_TABLE="0 $((SIZE / 512)) thin /dev/mapper/$POOL 0 $DEV"
require "create pool (64 KiB blocks)" dm_create "$POOL" "$POOL_TABLE"
require "create_thin 0" dmsetup message "/dev/mapper/$POOL" 0 "create_thin 0"
require "thin volume with /dev/nbd0 as external origin" dm_create "$THIN" "$THIN_TABLE"
check "thin volume is 64 MiB" test "$(bytes_of "$TDEV")" = "$SIZE"
tl_log "thin volume: logical block size $(blockdev --getss "$TDEV"), nbd0 $(blockdev --getss "$DEV")"

# ---- the writes (patterns decided up front) ----------------------------------------------------
: >"$W/writes"; : >"$W/blocks"
PATOFF=0
i=0
while [ "$i" -lt "$NBLOCKS" ]; do
  p=$(prim_off "$i")
  echo "$i $p" >>"$W/blocks"
  if [ "$i" -lt "$FROZEN" ]; then mode=$((i % 4)); else mode=$((i % 2)); fi
  case "$mode" in
    2) plan_write "full.$i" "$p" "$BLK" ;;
    *) plan_write "w1.$i" $((p + 4096 * (1 + i % 7))) 4096 ;;
  esac
  if [ "$i" -lt "$FROZEN" ] && [ "$mode" = 3 ]; then
    plan_write "w2.$i" $((p + 4096 * (9 + i % 5))) 4096
    plan_write "w3.$i" $((p + 15 * 4096 + 512 * (1 + i % 7))) 512
  fi
  plan_write "other.$i" "$(other_off "$i")" 512
  i=$((i + 1))
done
head -c "$PATOFF" /dev/urandom >"$W/patterns" || die "write patterns"
tl_log "$(wc -l <"$W/writes") writes planned into $(awk -v b=$BLK '{print int($1 / b)}' "$W/writes" | sort -u | wc -l) blocks"

# ---- nothing the races touch is cached yet -------------------------------------------------
dl=$(( $(cut -d. -f1 /proc/uptime) + 30 ))
until [ "$(pstatus | field in_flight)" = 0 ] || [ "$(cut -d. -f1 /proc/uptime)" -ge "$dl" ]; do sleep 0.2; done
sleep 0.5   # fetched units are marked present within 20 ms
tl_log "before the races: $(pstatus | field upstream_reads) upstream reads"
check "units 1..62 not cached before the races" not_cached "$MiB" $((62 * MiB))

# ---- round 1: upstream frozen -------------------------------------------------------------------
tl_log "round 1: $FROZEN blocks, upstream frozen (SIGSTOP nbdkit)"
kill -STOP "$NKPID" || die "SIGSTOP nbdkit"
R0=$(requests)
: >"$W/ops.first"; : >"$W/ops.second"; : >"$W/ops.full"; : >"$W/ops.reads1"
i=0
while [ "$i" -lt "$FROZEN" ]; do
  p=$(prim_off "$i")
  case $((i % 4)) in
    1) bgop first "w1.$i" wr "w1.$i";;
    *) bgop first "read.$i" rd "$i"; tail -n1 "$W/ops.first" >>"$W/ops.reads1" ;;
  esac
  i=$((i + 1))
done
if wait_requests $((R0 + FROZEN)) 60; then
  pass "all $FROZEN first operations are waiting in the proxy ($(pstatus | field in_flight) upstream reads in flight)"
else
  fail "all $FROZEN first operations reach the proxy" "$(($(requests) - R0)) did; $(pstatus)"
fi

# the racing operations
R1=$(requests)
i=0
while [ "$i" -lt "$FROZEN" ]; do
  p=$(prim_off "$i")
  case $((i % 4)) in
    0) bgop second "w1.$i" wr "w1.$i";;
    1) bgop second "read.$i" rd "$i" ;;
    2) bgop full "full.$i" wr "full.$i";;
    3) bgop second "w1.$i" wr "w1.$i"
       bgop second "w2.$i" wr "w2.$i"
       bgop second "w3.$i" wr "w3.$i";;
  esac
  bgop second "other.$i" wr "other.$i"
  i=$((i + 1))
done
# dm-thin copies the origin block for each partial write of an unprovisioned block (A, A2: one
# per block; the others wait in dm-thin behind it) and for each "other" write; B's reads wait in
# dm-thin behind the provisioning write; D's full-block writes need no copy.
n_copy=$((FROZEN * 2 / 4 + FROZEN))
if wait_requests $((R1 + n_copy)) 60; then
  pass "the $n_copy origin copies of the racing writes are waiting in the proxy too"
else
  fail "origin copies of the racing writes reach the proxy" "$(($(requests) - R1)) of $n_copy; $(pstatus)"
fi
# full-block writes: acknowledged (O_DIRECT + fsync) while the reads of the same blocks still wait
dl=$(( $(cut -d. -f1 /proc/uptime) + 60 ))
while :; do
  busy=0
  while read -r p _; do running "$p" && busy=$((busy + 1)); done <"$W/ops.full"
  [ "$busy" = 0 ] && break
  [ "$(cut -d. -f1 /proc/uptime)" -ge "$dl" ] && break
  sleep 0.2
done
check "$(wc -l <"$W/ops.full") full-block writes acknowledged while the upstream is frozen" \
  test "$busy" = 0
check "full-block writes succeeded" quietly wait_list full
stuck=0; early=""
while read -r p n; do
  if running "$p"; then stuck=$((stuck + 1)); else early="$early $n(done at $(cat "$W/rd.${n#read.}.t" 2>/dev/null)s)"; fi
done <"$W/ops.reads1"
[ -n "$early" ] && tl_log "answered while the upstream was frozen:$early; proxy: $(pstatus)"
check "all $(wc -l <"$W/ops.reads1") reads issued before the writes are still waiting upstream ($stuck)" \
  test "$stuck" = "$(wc -l <"$W/ops.reads1")"
check "upstream reads still in flight just before the release" test "$(pstatus | field in_flight)" -gt 0

tl_log "releasing the upstream (SIGCONT nbdkit)"
kill -CONT "$NKPID"
check "round 1 first operations succeeded" wait_list first
check "round 1 racing operations succeeded" wait_list second

# ---- round 2: the upstream's delay alone ------------------------------------------------------
tl_log "round 2: $((NBLOCKS - FROZEN)) blocks raced on rdelay=$RDELAY only"
check "round 2 units (50..57) still not cached" not_cached $((50 * MiB)) $((58 * MiB))
: >"$W/ops.r2"
i=$FROZEN
while [ "$i" -lt "$NBLOCKS" ]; do
  p=$(prim_off "$i")
  if [ $((i % 2)) = 0 ]; then
    bgop r2 "read.$i" rd "$i"
    bgop r2 "w1.$i" wr "w1.$i"
  else
    bgop r2 "w1.$i" wr "w1.$i"
    bgop r2 "read.$i" rd "$i"
  fi
  bgop r2 "other.$i" wr "other.$i"
  i=$((i + 1))
done
tl_log "round 2 issued; proxy: $(pstatus | field in_flight) upstream reads in flight"
check "round 2 operations succeeded" wait_list r2

if [ "$SIMULATE_CLOBBER" = 1 ]; then
  tl_log "SIMULATE_CLOBBER: writing the template's block of race 0 into the clone (must be detected)"
  dd if="$TEMPLATE" of="$TDEV" bs=$BLK count=1 skip="$(prim_off 0)" seek="$(prim_off 0)" \
    iflag=skip_bytes oflag=direct,seek_bytes conv=fsync status=none
fi

# ---- expected image, and what each racing read saw ------------------------------------------
# (one python process: a loop of 76 dd's costs ~10 s under TCG)
tl_log "building the expected image"
/usr/bin/python3 - "$TEMPLATE" "$EXPECTED" "$W" >"$W/classes" <<'PY' || die "build the expected image"
import shutil, sys
tmpl, exp, w = sys.argv[1:4]
shutil.copyfile(tmpl, exp)
pat = open(w + "/patterns", "rb").read()
with open(exp, "r+b") as f:
    for line in open(w + "/writes"):
        off, ln, po, _ = line.split()
        f.seek(int(off))
        f.write(pat[int(po):int(po) + int(ln)])
old, new = open(tmpl, "rb"), open(exp, "rb")
for line in open(w + "/blocks"):
    i, off = (int(x) for x in line.split())
    got = open("%s/rd.%d" % (w, i), "rb").read()
    old.seek(off); new.seek(off)
    o, n = old.read(65536), new.read(65536)
    print(i, off, "old" if got == o else "new" if got == n else "other")
PY

# reads: round 1 A/A2/D saw the template, B saw its write; round 2 either, never a mix
old_ok=0; new_ok=0; bad=""
while read -r i p got; do
  if [ "$i" -lt "$FROZEN" ]; then
    if [ $((i % 4)) = 1 ]; then want=new; else want=old; fi
  else
    want="$got"; [ "$got" = other ] && want=old-or-new
  fi
  if [ "$got" = "$want" ]; then
    if [ "$got" = old ]; then old_ok=$((old_ok + 1)); else new_ok=$((new_ok + 1)); fi
  else
    bad="$bad block $i@$p: $got (want $want);"
  fi
done <"$W/classes"
check "all $NBLOCKS racing reads classified" test "$(wc -l <"$W/classes")" = "$NBLOCKS"
if [ -z "$bad" ]; then
  pass "racing reads saw whole blocks, in order ($old_ok template, $new_ok with the guest's write)"
else
  fail "racing reads" "$bad"
fi

# ---- the thin volume: every guest write, template everywhere else ----------------------------
nblk=$(awk -v b=$BLK '{print int($1 / b)}' "$W/writes" | sort -u | wc -l)
tl_log "comparing the thin volume"
check "thin volume == template + guest writes (cmp)" cmp_dev "$TDEV" "$EXPECTED"
check "dm-thin provisioned exactly the $nblk written blocks" \
  test "$(mapped_sectors)" = $((nblk * BLK / 512))

# ---- the origin as the kernel sees it -----------------------------------------------------------
tl_log "comparing /dev/nbd0"
check "/dev/nbd0 == template (cmp)" cmp_dev "$DEV" "$TEMPLATE"

# ---- dm-thin metadata: re-create the thin device, then the pool -------------------------------
# (removing the pool too: the mappings must come back from the metadata device)
tl_log "re-creating the thin device and its pool"
require "remove thin device and pool" remove_dm
require "re-activate pool from its metadata" dm_create "$POOL" "$POOL_TABLE"
require "re-create thin device 0 on it" dm_create "$THIN" "$THIN_TABLE"
check "re-created thin volume == template + guest writes (cmp)" cmp_dev "$TDEV" "$EXPECTED"
check "still exactly $nblk blocks provisioned" test "$(mapped_sectors)" = $((nblk * BLK / 512))

# ---- shut down in order: dm, nbd-client, proxy, nbdkit ----------------------------------------
dl=$(( $(cut -d. -f1 /proc/uptime) + 30 ))
until [ "$(pstatus | field complete)" = true ] || [ "$(cut -d. -f1 /proc/uptime)" -ge "$dl" ]; do
  sleep 0.5
done
check "proxy cache complete" test "$(pstatus | field complete)" = true
tl_log "proxy: $(pstatus)"
data_bytes=$(( $(stat -c %b "$TEMPLATE") * 512 ))   # tmpfs: allocated = the template's data
check "the proxy fetched each template byte once ($data_bytes bytes of data, holes skipped)" \
  test "$(pstatus | field bytes_from_upstream)" = "$data_bytes"
require "remove thin device and pool (final)" remove_dm
require "nbd-client -d" quietly nbd_disconnect
stop_process "$PPID_" 30; rc=$?; PPID_=
check "proxy exits 0 on SIGTERM" test "$rc" = 0
stop_process "$NKPID" 30; rc=$?; NKPID=
check "nbdkit exits 0 on SIGTERM" test "$rc" = 0
tl_log "comparing the cache file"
check "proxy cache file holds exactly the template, no guest data (cmp)" cmp -n "$SIZE" "$CACHE" "$TEMPLATE"

# ---- the LVM SR's building blocks, in the same boot --------------------------------------------
. "$(dirname "$THINLINE_GUEST_LIB")/lvm-blocks.sh"
lvm_blocks
# ---- the LVM SR through the commands, in the same boot -----------------------------------------
. "$(dirname "$THINLINE_GUEST_LIB")/lvm-sr.sh"
lvm_sr

tl_summary || exit 1
echo "cor-dmthin: ALL PASSED"
