#!/bin/sh
# lvm-sr.sh: guest side of the LVM SR checks through the commands operators run, sourced by
# cor-dmthin.sh so the same VM boot runs them (defines lvm_sr; guest-lib.sh must be sourced first).
#
# On two loop devices: `thinline sr create --type lvm`, then VDIs as dm-thin volumes: create,
# attach (a /dev/mapper device), a snapshot of the attached disk that holds every write made
# before it, a clone of the snapshot, read-only snapshots, an online resize, destroy refused while
# attached, a new disk that never reads a destroyed one's data, a preallocated VDI (a raw LV from
# the reserve: zeroed, resized online, wiped when destroyed, removed after an abort, SR_FULL beyond
# the reserve), kill -9 (abort) in the middle of
# create, snapshot and destroy with the next command finishing or undoing it (no thin id lost or
# leaked: `sr check` is clean), a thin id no VDI records found and repaired, a clone of a template
# whose external origin is the template's proxy (nbd-client, a cache on a thin volume; two clones
# sharing it, each with its own writes) started with
# its first attached VDI and stopped with its last, a host restart (proxy killed, devices and LVs
# gone) found by `sr check` and repaired by attaching again, the SR forgotten,
# probed on its devices and introduced again, and `sr destroy` leaving no VG, no signature and no
# device; then an SR made in a user's VG (--pool-size) and destroyed, the user's LV byte for byte.
#
# Configuration: THINLINE_BIN (the thinline binary).

lvm_sr() {
  _t=$THINLINE_BIN
  for f in a b; do truncate -s 128M "/tmp/lsr-$f" || return 1; done
  if ! { LSR_A=$(losetup -f --show /tmp/lsr-a) && LSR_B=$(losetup -f --show /tmp/lsr-b); }; then
    fail "lvm-sr: loop devices"
    return 1
  fi
  export THINLINE_SR_REGISTRY=/tmp/lsr-state/srs.json
  _nu='activation { udev_sync=0 udev_rules=0 } devices { use_devicesfile=0 }'

  # FIELD of the JSON object on stdin (a Python expression on d).
  js() { /usr/bin/python3 -c 'import json,sys; d=json.load(sys.stdin); v=eval(sys.argv[1]); print(str(v).lower() if isinstance(v, bool) else v)' "$1"; }
  # EXPECTED_STATUS COMMAND...: the command exits with that status.
  exits() { _want=$1; shift; "$@" >/tmp/lsr-out 2>&1; _got=$?; [ "$_got" = "$_want" ] || { cat /tmp/lsr-out; echo "exit $_got"; return 1; }; }
  # DEV OFFSET_MIB FILE: FILE's bytes at OFFSET MiB of DEV (O_DIRECT reads).
  holds() {
    dd if="$1" bs=1M skip="$2" count=$(( $(stat -c %s "$3") / 1048576 )) iflag=direct status=none >/tmp/lsr-read &&
      cmp /tmp/lsr-read "$3"
  }
  put() { dd if="$3" of="$1" bs=1M seek="$2" oflag=direct conv=notrunc status=none; }
  for p in 1 2 3; do head -c $((4 * 1048576)) /dev/urandom >/tmp/lsr-p$p; done
  head -c $((4 * 1048576)) /dev/zero >/tmp/lsr-zero

  tl_log "lvm-sr: thinline sr create --type lvm on $LSR_A,$LSR_B"
  $_t sr create --type lvm "$LSR_A" "$LSR_B" --vg tlsr --name-label prod --reserve 24M --hydrate on-pivot --json >/tmp/lsr-sr.json 2>/tmp/lsr-err ||
    { cat /tmp/lsr-err; fail "lvm-sr: sr create --type lvm"; return 1; }
  SR=$(js 'd["uuid"]' </tmp/lsr-sr.json)
  check "lvm-sr: sr create answers type lvm, the VG and a pool of free space" \
    test "$(js '(d["type"], d["vg"], d["total_space"] > 128 << 20, d["free_space"] == d["total_space"])' </tmp/lsr-sr.json)" = "('lvm', 'tlsr', True, True)"
  check "lvm-sr: sr stat shows the pool's health" \
    test "$($_t sr stat --sr tlsr --json | js '(d["pool"]["mode"], d["pool"]["data_percent"] < 1, d["pool"]["needs_check"], d["pool"]["when_full"])')" = "('read_write', True, False, 'error')"
  check "lvm-sr: sr stat shows that templates are hydrated only when vdi pivot asks" \
    test "$($_t sr stat --sr tlsr --json | js 'd["hydrate"]')" = on-pivot
  check "lvm-sr: --sr takes the VG name" test "$($_t sr stat --sr tlsr --json | js 'd["uuid"]')" = "$SR"
  check "lvm-sr: a device already in an SR is refused (SR_EXISTS, exit 17)" \
    exits 17 $_t sr create --type lvm "$LSR_A" --vg tlother --json

  DISK=$($_t vdi create --sr tlsr 64M --name-label disk --json | js 'd["uuid"]')
  DEV=$($_t vdi attach --sr tlsr "$DISK" --json | js 'd["device"]')
  check "lvm-sr: an attached disk is a /dev/mapper device of its size" \
    test "$(blockdev --getsize64 "$DEV")" = $((64 << 20))
  require "lvm-sr: write the disk" put "$DEV" 1 /tmp/lsr-p1
  SNAP=$($_t vdi snapshot --sr tlsr "$DISK" --name-label before --json | js 'd["uuid"]')
  require "lvm-sr: write the disk after its snapshot" put "$DEV" 1 /tmp/lsr-p2
  CLONE=$($_t vdi clone --sr tlsr "$SNAP" --name-label clone --json | js 'd["uuid"]')
  SDEV=$($_t vdi attach --sr tlsr "$SNAP" --json | js 'd["device"]')
  CDEV=$($_t vdi attach --sr tlsr "$CLONE" --json | js 'd["device"]')
  check "lvm-sr: the snapshot of the attached disk holds what was written before it" holds "$SDEV" 1 /tmp/lsr-p1
  check "lvm-sr: the disk holds what was written after" holds "$DEV" 1 /tmp/lsr-p2
  check "lvm-sr: a snapshot's device is read-only" test "$(blockdev --getro "$SDEV")" = 1
  require "lvm-sr: write the clone" put "$CDEV" 1 /tmp/lsr-p3
  check "lvm-sr: the clone holds its own write" holds "$CDEV" 1 /tmp/lsr-p3
  check "lvm-sr: the snapshot is unchanged by its clone's write" holds "$SDEV" 1 /tmp/lsr-p1
  check "lvm-sr: attaching an attached VDI answers the same device" \
    test "$($_t vdi attach --sr tlsr "$DISK" --json | js 'd["device"]')" = "$DEV"

  check "lvm-sr: vdi snapshot aborted while the attached disk's device was suspended" \
    exits 134 env THINLINE_SR_CRASH_AT=suspended $_t vdi snapshot --sr tlsr "$DISK" --json
  check "lvm-sr: the next change resumes the disk's device, which reads again" \
    sh -c "$_t sr check --sr tlsr --repair --json >/dev/null && timeout 20 dd if=$DEV bs=1M count=1 iflag=direct status=none of=/dev/null"
  check "lvm-sr: vdi resize of the attached disk" exits 0 $_t vdi resize --sr tlsr "$DISK" 96M --json
  check "lvm-sr: the attached device grew online" test "$(blockdev --getsize64 "$DEV")" = $((96 << 20))
  check "lvm-sr: the grown tail reads as zeroes" holds "$DEV" 64 /tmp/lsr-zero
  check "lvm-sr: the disk's data is kept by the resize" holds "$DEV" 1 /tmp/lsr-p2
  check "lvm-sr: vdi stat shows the disk's thin id, size and used blocks" \
    test "$($_t vdi stat --sr tlsr "$DISK" --json | js '(d["virtual_size"], d["thin_id"] > 0, d["physical_utilisation"] >= 4 << 20, d["attached"])')" = "($((96 << 20)), True, True, True)"
  check "lvm-sr: destroying an attached VDI is refused (VDI_IN_USE, exit 13)" \
    exits 13 $_t vdi destroy --sr tlsr "$DISK" --json
  exec 9<"$CDEV"
  check "lvm-sr: detaching a VDI whose device is open is refused (VDI_IN_USE)" \
    exits 13 $_t vdi detach --sr tlsr "$CLONE" --json
  exec 9<&-
  for v in "$DISK" "$SNAP" "$CLONE"; do
    check "lvm-sr: vdi detach $v" exits 0 $_t vdi detach --sr tlsr "$v" --json
  done
  check "lvm-sr: no device of a detached VDI is left (only the pool)" \
    test "$(dmsetup ls | grep -o "^thinline-$(echo "$SR" | tr -d -)-[a-z0-9]*")" = "thinline-$(echo "$SR" | tr -d -)-pool"

  # Destroyed data is never read by a new disk (dm-thin zeroes new blocks).
  check "lvm-sr: vdi destroy" exits 0 $_t vdi destroy --sr tlsr "$CLONE" --json
  NEW=$($_t vdi create --sr tlsr 64M --json | js 'd["uuid"]')
  NDEV=$($_t vdi attach --sr tlsr "$NEW" --json | js 'd["device"]')
  check "lvm-sr: a new disk reads zeroes where a destroyed one had data" \
    test "$(dd if="$NDEV" bs=1M iflag=direct status=none | tr -d '\0' | wc -c)" = 0
  $_t vdi detach --sr tlsr "$NEW" --json >/dev/null

  # A preallocated VDI: a raw LV from the reserve, zeroed, wiped when destroyed.
  RAW=$($_t vdi create --sr tlsr 8M --preallocate --name-label raw --json | js 'd["uuid"]')
  check "lvm-sr: vdi create --preallocate makes a raw LV of the SR" \
    test "$($_t vdi stat --sr tlsr "$RAW" --json | js '(d["lv"].startswith("thinline_raw_"), d["virtual_size"], d["physical_utilisation"])')" = "(True, $((8 << 20)), $((8 << 20)))"
  RDEV=$($_t vdi attach --sr tlsr "$RAW" --json | js 'd["device"]')
  check "lvm-sr: the preallocated VDI is a /dev/mapper device that reads zeroes" \
    test "$(dd if="$RDEV" bs=1M iflag=direct status=none | tr -d '\0' | wc -c)" = 0
  require "lvm-sr: write the preallocated VDI" put "$RDEV" 0 /tmp/lsr-p1
  check "lvm-sr: a preallocated VDI is not snapshotted (INVALID_ARGUMENT, exit 2)" \
    exits 2 $_t vdi snapshot --sr tlsr "$RAW" --json
  check "lvm-sr: vdi resize of the attached preallocated VDI" exits 0 $_t vdi resize --sr tlsr "$RAW" 12M --json
  check "lvm-sr: its device grew, the tail reads zeroes, the data is kept" \
    sh -c "test \"\$(blockdev --getsize64 $RDEV)\" = $((12 << 20)) && dd if=$RDEV bs=1M skip=8 iflag=direct status=none | cmp - /tmp/lsr-zero && dd if=$RDEV bs=1M count=4 iflag=direct status=none | cmp - /tmp/lsr-p1"
  check "lvm-sr: vdi detach of the preallocated VDI deactivates its LV" \
    sh -c "$_t vdi detach --sr tlsr $RAW --json >/dev/null && test ! -e $RDEV"
  check "lvm-sr: vdi destroy of the preallocated VDI" exits 0 $_t vdi destroy --sr tlsr "$RAW" --json
  # All the VG's free space, not zeroed by lvm: the destroyed LV's extents are among them.
  require "lvm-sr: an LV over all the VG's free space" quietly \
    lvcreate -y -Zn -Wn --config "$_nu" -l 100%FREE -n peek tlsr
  check "lvm-sr: a destroyed preallocated VDI's data was wiped" \
    test "$(dd if=/dev/tlsr/peek bs=1M iflag=direct status=none | tr -d '\0' | wc -c)" = 0
  require "lvm-sr: remove that LV" quietly lvremove -y --config "$_nu" tlsr/peek
  check "lvm-sr: vdi create --preallocate aborted after its LV was made" \
    exits 134 env THINLINE_SR_CRASH_AT=made $_t vdi create --sr tlsr 8M --preallocate --json
  check "lvm-sr: sr check --repair removes the LV the aborted create made" \
    test "$($_t sr check --sr tlsr --repair --json | js 'd["clean"]')" = true
  check "lvm-sr: no raw LV is left" \
    test -z "$(lvs --noheadings -o lv_name --config "$_nu" tlsr | grep thinline_raw_ || true)"
  check "lvm-sr: a preallocation larger than the reserve is SR_FULL (exit 15)" \
    exits 15 $_t vdi create --sr tlsr 64M --preallocate --json

  # kill -9 (abort) in the middle: the next command undoes or finishes it.
  for step in intent made committed; do
    check "lvm-sr: vdi create aborted at $step" exits 134 env THINLINE_SR_CRASH_AT=$step $_t vdi create --sr tlsr 8M --json
    check "lvm-sr: after a crash at $step of vdi create, sr check --repair leaves the SR clean" \
      test "$($_t sr check --sr tlsr --repair --json | js 'd["clean"]')" = true
  done
  check "lvm-sr: the create that crashed after its commit is there, the others are not" \
    test "$($_t vdi list --sr tlsr --json | js 'len(d["vdis"])')" = 4
  check "lvm-sr: vdi snapshot aborted after its thin id was made" \
    exits 134 env THINLINE_SR_CRASH_AT=made $_t vdi snapshot --sr tlsr "$DISK" --json
  check "lvm-sr: vdi destroy aborted after its commit" \
    exits 134 env THINLINE_SR_CRASH_AT=committed $_t vdi destroy --sr tlsr "$NEW" --json
  check "lvm-sr: sr stat shows the interrupted operation (needs_repair)" \
    test "$($_t sr stat --sr tlsr --json | js 'd["health"]')" = needs_repair
  $_t sr check --sr tlsr --json >/tmp/lsr-check; _rc=$?
  check "lvm-sr: sr check reports the interrupted operation (exit 3)" \
    test "$_rc $(js '[f["kind"] for f in d["findings"]]' </tmp/lsr-check)" = "3 ['interrupted_operation']"
  check "lvm-sr: the next change finishes the destroy and undoes the snapshot" \
    exits 0 $_t vdi set-name-label --sr tlsr "$DISK" --json renamed
  check "lvm-sr: no thin id is lost or leaked after the crashes (sr check clean)" \
    test "$($_t sr check --sr tlsr --json | js '(d["clean"], len(d["findings"]))')" = "(True, 0)"
  check "lvm-sr: the destroyed VDI is gone, the snapshot never made" \
    test "$($_t vdi list --sr tlsr --json | js 'sorted(v["name_label"] for v in d["vdis"])')" = "['before', 'disk', 'renamed']"

  # A thin id no VDI records (made by hand here) is found, and deleted by --repair.
  require "lvm-sr: a thin id made by hand" \
    dmsetup message "thinline-$(echo "$SR" | tr -d -)-pool" 0 "create_thin 999"
  check "lvm-sr: sr check finds the thin id no VDI records" \
    test "$($_t sr check --sr tlsr --json | js '[(f["kind"], "999" in f["message"], f["repairable"]) for f in d["findings"]]')" = "[('unknown_thin_id', True, True)]"
  check "lvm-sr: sr check --repair deletes it" \
    test "$($_t sr check --sr tlsr --repair --json | js '(d["clean"], len(d["repaired"]))')" = "(True, 1)"
  # A clone of a template: its external origin is the template's proxy, cached on a thin volume.
  # (64 MiB, of which the checks before the pivot read the first 8 only: the cache stays partial.)
  head -c $((64 * 1048576)) /dev/urandom >/tmp/lsr-template.raw
  _tsum=$(sha256sum </tmp/lsr-template.raw)
  head -c 1048576 /tmp/lsr-template.raw >/tmp/lsr-t1
  head -c $((8 * 1048576)) /tmp/lsr-template.raw >/tmp/lsr-t8
  TPL=$($_t vdi introduce --sr tlsr /tmp/lsr-template.raw --name-label tpl --json | js 'd["uuid"]')
  TC=$($_t vdi clone --sr tlsr "$TPL" --name-label tclone --json | js 'd["uuid"]')
  $_t vdi attach --sr tlsr "$TC" --json >/tmp/lsr-attach.json 2>&1
  TDEV=$(js 'd["device"]' </tmp/lsr-attach.json) ||
    { cat /tmp/lsr-attach.json; tail -n 20 /tmp/lsr-state/lvm/*/.thinline-sr/run/origin-*.log; }
  check "lvm-sr: a clone of a template reads the template through its origin (cmp)" \
    sh -c "dd if=$TDEV bs=1M count=8 iflag=direct status=none | cmp - /tmp/lsr-t8"
  check "lvm-sr: the template's proxy runs and the kernel's nbd client is connected to it" \
    sh -c "pgrep -f 'sr [o]rigin --sr' >/dev/null && ls /sys/block/nbd*/pid >/dev/null 2>&1"
  require "lvm-sr: write the template's clone" put "$TDEV" 1 /tmp/lsr-p2
  check "lvm-sr: the template's clone holds its write and the template's other bytes" \
    sh -c "dd if=$TDEV bs=1M count=1 iflag=direct status=none | cmp - /tmp/lsr-t1 && dd if=$TDEV bs=1M skip=1 count=4 iflag=direct status=none | cmp - /tmp/lsr-p2"
  TS=$($_t vdi snapshot --sr tlsr "$TC" --name-label tsnap --json | js 'd["uuid"]')
  TSDEV=$($_t vdi attach --sr tlsr "$TS" --json | js 'd["device"]')
  check "lvm-sr: a snapshot of the attached clone reads the template and the clone's write" \
    sh -c "dd if=$TSDEV bs=1M count=1 iflag=direct status=none | cmp - /tmp/lsr-t1 && dd if=$TSDEV bs=1M skip=1 count=4 iflag=direct status=none | cmp - /tmp/lsr-p2"
  TC2=$($_t vdi clone --sr tlsr "$TPL" --name-label tclone2 --json | js 'd["uuid"]')
  TC2DEV=$($_t vdi attach --sr tlsr "$TC2" --json | js 'd["device"]')
  require "lvm-sr: write a second clone of the template" put "$TC2DEV" 1 /tmp/lsr-p3
  check "lvm-sr: two clones of one template each read only their own writes, over the template" \
    sh -c "dd if=$TC2DEV bs=1M skip=1 count=4 iflag=direct status=none | cmp - /tmp/lsr-p3 && dd if=$TDEV bs=1M skip=1 count=4 iflag=direct status=none | cmp - /tmp/lsr-p2 && dd if=$TC2DEV bs=1M count=1 iflag=direct status=none | cmp - /tmp/lsr-t1"
  check "lvm-sr: the two clones share one proxy" test "$(pgrep -c -f 'sr [o]rigin --sr')" = 1
  check "lvm-sr: the second clone detached and destroyed" \
    sh -c "$_t vdi detach --sr tlsr $TC2 --json >/dev/null && $_t vdi destroy --sr tlsr $TC2 --json >/dev/null"
  check "lvm-sr: the template's cache volume holds what was read" \
    test "$($_t vdi stat --sr tlsr "$TPL" --json | js 'd["physical_utilisation"] >= 1 << 20')" = true
  check "lvm-sr: the template is unchanged" test "$(sha256sum </tmp/lsr-template.raw)" = "$_tsum"
  check "lvm-sr: detach of the snapshot" exits 0 $_t vdi detach --sr tlsr "$TS" --json
  check "lvm-sr: the proxy stays while a clone is attached" pgrep -f 'sr [o]rigin --sr'
  check "lvm-sr: detach of the last attached VDI of the template" exits 0 $_t vdi detach --sr tlsr "$TC" --json
  check "lvm-sr: the last detach stops the proxy and disconnects the nbd device" \
    sh -c "! pgrep -f 'sr [o]rigin --sr' >/dev/null && ! ls /sys/block/nbd*/pid >/dev/null 2>&1"
  check "lvm-sr: no device of the template or its clones is left (only the pool)" \
    test "$(dmsetup ls | grep -o "^thinline-$(echo "$SR" | tr -d -)-[a-z0-9]*")" = "thinline-$(echo "$SR" | tr -d -)-pool"
  TDEV=$($_t vdi attach --sr tlsr "$TC" --json | js 'd["device"]')
  check "lvm-sr: attached again, the clone reads its write and the template" \
    sh -c "dd if=$TDEV bs=1M count=1 iflag=direct status=none | cmp - /tmp/lsr-t1 && dd if=$TDEV bs=1M skip=1 count=4 iflag=direct status=none | cmp - /tmp/lsr-p2"
  # A host restart, as the kernel sees it: the proxy killed, every device of the SR gone, its LVs
  # inactive. sr check finds the attached VDIs without devices; --repair activates the pool
  # (thin_check first) and attaches them again, the template's proxy and nbd device too.
  DEV=$($_t vdi attach --sr tlsr "$DISK" --json | js 'd["device"]')
  _srs=$(echo "$SR" | tr -d -)
  pkill -9 -f 'sr [o]rigin --sr'
  for d in $(dmsetup ls | grep -o "^thinline-$_srs-[a-z0-9]*" | grep -v -- -pool); do
    dmsetup remove "$d" 2>/dev/null
  done
  for p in /sys/block/nbd*/pid; do [ -e "$p" ] && nbd-client -d "/dev/$(basename "$(dirname "$p")")" >/dev/null 2>&1; done
  for d in $(dmsetup ls | grep -o "^thinline-$_srs-[a-z0-9]*" | grep -v -- -pool); do
    dmsetup remove "$d" 2>/dev/null
  done
  dmsetup remove "thinline-$_srs-pool"
  lvchange -an --config "$_nu" tlsr >/dev/null 2>&1
  check "lvm-sr: after a restart, sr check finds the attached VDIs' devices gone" \
    test "$($_t sr check --sr tlsr --json | js 'sorted(f["kind"] for f in d["findings"])')" = "['device_missing', 'device_missing']"
  check "lvm-sr: sr check --repair attaches them again" \
    test "$($_t sr check --sr tlsr --repair --json | js '(d["clean"], len(d["repaired"]))')" = "(True, 2)"
  check "lvm-sr: after the restart the disk holds its data" holds "$DEV" 1 /tmp/lsr-p2
  check "lvm-sr: after the restart the template's clone reads its write and the template" \
    sh -c "dd if=$TDEV bs=1M count=1 iflag=direct status=none | cmp - /tmp/lsr-t1 && dd if=$TDEV bs=1M skip=1 count=4 iflag=direct status=none | cmp - /tmp/lsr-p2"
  lsr_pivot || return 1
  check "lvm-sr: vdi detach of the disk" exits 0 $_t vdi detach --sr tlsr "$DISK" --json
  check "lvm-sr: forgetting an attached clone's template is refused (VDI_IN_USE)" \
    exits 13 $_t vdi forget --sr tlsr "$TPL" --json
  $_t vdi detach --sr tlsr "$TC" --json >/dev/null
  check "lvm-sr: the template's snapshot destroyed, the template forgotten with --force" \
    sh -c "$_t vdi destroy --sr tlsr $TS --json >/dev/null && $_t vdi forget --sr tlsr $TPL --force --json >/dev/null"
  check "lvm-sr: a clone of a forgotten template is not attached (TEMPLATE_UNREACHABLE, exit 16)" \
    exits 16 $_t vdi attach --sr tlsr "$TC" --json
  check "lvm-sr: no proxy was left by the refused attach" sh -c "! pgrep -f 'sr [o]rigin --sr' >/dev/null"
  check "lvm-sr: the orphaned clone destroyed" exits 0 $_t vdi destroy --sr tlsr "$TC" --json
  check "lvm-sr: nothing of the template is left in the pool (sr check clean)" \
    test "$($_t sr check --sr tlsr --json | js 'd["clean"]')" = true

  lsr_full || return 1

  # Forgotten, found by a probe of its devices, adopted again with its VDIs.
  check "lvm-sr: sr forget" exits 0 $_t sr forget --sr tlsr --json
  check "lvm-sr: sr probe --type lvm finds the forgotten SR and its VDIs" \
    test "$($_t sr probe --type lvm "$LSR_A" "$LSR_B" --json | js '[(s["uuid"], s["vg"], s["vdi_count"], s["registered"]) for s in d["srs"]]')" = "[('$SR', 'tlsr', 3, False)]"
  check "lvm-sr: sr introduce --type lvm adopts it again" \
    test "$($_t sr introduce --type lvm tlsr --json | js '(d["uuid"], d["vdi_count"])')" = "('$SR', 3)"
  check "lvm-sr: a VG that holds no SR is not introduced (SR_NOT_FOUND, exit 10)" \
    exits 10 $_t sr introduce --type lvm nosuchvg --json
  check "lvm-sr: sr destroy of an SR with disks needs --force (SR_NOT_EMPTY, exit 14)" \
    exits 14 $_t sr destroy --sr tlsr --json
  check "lvm-sr: sr destroy --force" exits 0 $_t sr destroy --sr "$SR" --force --json
  check "lvm-sr: the VG is gone" test -z "$(vgs --noheadings -o vg_name --config "$_nu" 2>/dev/null | grep -w tlsr || true)"
  check "lvm-sr: no dm device of the SR is left" \
    test -z "$(dmsetup ls | grep "thinline-$(echo "$SR" | tr -d -)" || true)"
  check "lvm-sr: the devices hold no signature" \
    test -z "$(blkid -p "$LSR_A" "$LSR_B" 2>/dev/null || true)"
  check "lvm-sr: the SR is no longer listed" test "$($_t sr list --json | js 'len(d["srs"])')" = 0
  # The guest's /tmp is memory: what the next SRs need is room.
  losetup -d "$LSR_A" "$LSR_B" 2>/dev/null
  rm -f /tmp/lsr-a /tmp/lsr-b /tmp/lsr-template.raw /tmp/lsr-t8

  # An SR in a VG of the user's (--pool-size): beside the user's LV, which stays byte for byte.
  truncate -s 96M /tmp/lsr-u
  LSR_U=$(losetup -f --show /tmp/lsr-u)
  require "lvm-sr: a user's VG with an LV full of data" quietly sh -c "
    pvcreate -y --config '$_nu' $LSR_U && vgcreate --config '$_nu' uvg $LSR_U &&
    lvcreate -y --config '$_nu' -L 16m -n keep uvg"
  head -c $((16 * 1048576)) /dev/urandom >/tmp/lsr-keep
  dd if=/tmp/lsr-keep of=/dev/uvg/keep bs=1M oflag=direct status=none
  check "lvm-sr: a user's VG without an SR is not introduced without --pool-size (exit 10)" \
    exits 10 $_t sr introduce --type lvm uvg --json
  check "lvm-sr: sr introduce --type lvm --pool-size makes an SR in the user's VG" \
    test "$($_t sr introduce --type lvm uvg --pool-size 32M --when-full queue --autoextend-max 48M --name-label guest --json | js '(d["type"], d["vg"], d["total_space"])')" = "('lvm', 'uvg', $((32 << 20)))"
  UD=$($_t vdi create --sr uvg 16M --json | js 'd["uuid"]')
  UDEV=$($_t vdi attach --sr uvg "$UD" --json | js 'd["device"]')
  require "lvm-sr: write a disk of the SR in the user's VG" put "$UDEV" 1 /tmp/lsr-p1
  check "lvm-sr: it reads back" holds "$UDEV" 1 /tmp/lsr-p1
  $_t vdi detach --sr uvg "$UD" --json >/dev/null
  lsr_http || return 1
  lsr_autoextend || return 1
  check "lvm-sr: sr destroy of the SR in the user's VG" exits 0 $_t sr destroy --sr uvg --force --json
  check "lvm-sr: a pool larger than the user's VG's free space is SR_FULL (exit 15)" \
    exits 15 $_t sr introduce --type lvm uvg --pool-size 1G --json
  check "lvm-sr: the user's VG holds only its own LV again, untagged" \
    test "$(lvs --noheadings -o lv_name --config "$_nu" uvg | tr -d ' ') $(vgs --noheadings -o vg_tags --config "$_nu" uvg | tr -d ' ')" = "keep "
  check "lvm-sr: the user's LV holds its data (cmp)" cmp /dev/uvg/keep /tmp/lsr-keep
  vgremove -f --config "$_nu" uvg >/dev/null 2>&1
  pvremove -y --config "$_nu" "$LSR_U" >/dev/null 2>&1
  losetup -d "$LSR_U" 2>/dev/null
  rm -f /tmp/lsr-u /tmp/lsr-keep
  rm -rf /tmp/lsr-p? /tmp/lsr-zero /tmp/lsr-read /tmp/lsr-state /tmp/lsr-t1
}

# The pivot of the template's clone TC (attached; the template's cache partial, the SR hydrating
# only when asked) by `vdi pivot`, killed once after the clones moved and then finished, under a
# running fio --verify workload and a reader of the template's bytes; then the clone reads its
# writes and the template from the local cache with no proxy and no nbd device, and a new clone
# starts local.
lsr_pivot() {
  _srs=$(echo "$SR" | tr -d -)
  check "lvm-sr: vdi stat of a clone whose template is cached in part says origin partial" \
    test "$($_t vdi stat --sr tlsr "$TC" --json | js 'd["origin"]')" = partial
  dd if=/tmp/lsr-template.raw of=/tmp/lsr-t16 bs=1M skip=16 count=16 status=none
  rm -f /tmp/lsr-stop /tmp/lsr-fio-* /tmp/lsr-reads-*
  # The clone's snapshot, attached read-only: the pivot moves it too, and it stays read-only.
  TSDEV=$($_t vdi attach --sr tlsr "$TS" --json | js 'd["device"]')
  # Short fio runs that each write and verify 8 MiB of the clone (32..40 MiB), and reads of the
  # template's bytes at 16..32 MiB, one after another until told to stop: the pivot lands in or
  # between them, and every one of them must pass.
  (
    n=0
    while [ ! -e /tmp/lsr-stop ]; do
      n=$((n + 1))
      fio --name=pivot --filename="$TDEV" --rw=randwrite --bs=4k --offset=32M --size=8M \
        --direct=1 --ioengine=psync --verify=crc32c --verify_fatal=1 --randseed=$n \
        >/tmp/lsr-fio-$n.log 2>&1
      echo $? >/tmp/lsr-fio-$n.rc
    done
  ) &
  _fio=$!
  (
    n=0
    while [ ! -e /tmp/lsr-stop ]; do
      n=$((n + 1))
      dd if="$TDEV" bs=1M skip=16 count=16 iflag=direct status=none | cmp -s - /tmp/lsr-t16
      echo $? >/tmp/lsr-reads-$n.rc
    done
  ) &
  _reader=$!
  sleep 2
  # kill -9 (abort) of the pivot after the clones moved onto the local origin and before the
  # proxy stopped and the template was recorded local; then the next pivot finishes it.
  THINLINE_SR_CRASH_AT=pivoted $_t vdi pivot --sr tlsr "$TC" --json >/tmp/lsr-crash.json 2>&1
  _crc=$?
  _tcs=$(echo "$TC" | tr -d -)
  _moved=$(dmsetup table "thinline-$_srs-$_tcs" | awk '{print $6}')
  _lmm=$(dmsetup info -c --noheadings -o major,minor "thinline-$_srs-$(echo "$TPL" | tr -d -)" 2>/dev/null | tr -d ' ')
  _half=$($_t vdi stat --sr tlsr "$TC" --json | js 'd["origin"]')
  _halfcheck=$($_t sr check --sr tlsr --json | js '[f["kind"] for f in d["findings"]]')
  sleep 1
  $_t vdi pivot --sr tlsr "$TC" --json >/tmp/lsr-pivot.json 2>/tmp/lsr-pivot.err
  _rc=$?
  sleep 2
  touch /tmp/lsr-stop
  wait "$_fio" "$_reader"
  check "lvm-sr: a pivot killed (abort) after the clones moved leaves the clone on the local origin" \
    test "$_crc $_moved" = "134 $_lmm" || cat /tmp/lsr-crash.json
  check "lvm-sr: vdi stat said origin local for the half-pivoted clone" test "$_half" = local
  check "lvm-sr: sr check found the unfinished pivot" test "$_halfcheck" = "['pivot_unfinished']"
  check "lvm-sr: vdi pivot hydrates the template and answers origin local" \
    test "$_rc $(js 'd["origin"]' </tmp/lsr-pivot.json 2>/dev/null)" = "0 local" ||
    { cat /tmp/lsr-pivot.json /tmp/lsr-pivot.err; tail -n 30 /tmp/lsr-state/lvm/*/.thinline-sr/run/origin-*.log; }
  check "lvm-sr: every fio --verify run across the pivot passed (no error, no wrong byte)" \
    sh -c "ls /tmp/lsr-fio-*.rc >/dev/null && ! grep -vx 0 /tmp/lsr-fio-*.rc" ||
    { grep -l -vx 0 /tmp/lsr-fio-*.rc | head -1 | sed 's/rc$/log/' | xargs cat; }
  check "lvm-sr: every read of the template's bytes across the pivot was right" \
    sh -c "ls /tmp/lsr-reads-*.rc >/dev/null && ! grep -vx 0 /tmp/lsr-reads-*.rc"
  tl_log "lvm-sr: $(ls /tmp/lsr-fio-*.rc | wc -l) fio runs, $(ls /tmp/lsr-reads-*.rc | wc -l) template reads across the pivot"
  check "lvm-sr: after the pivot no proxy runs and no nbd device is connected" \
    sh -c "! pgrep -f 'sr [o]rigin --sr' >/dev/null && ! ls /sys/block/nbd*/pid >/dev/null 2>&1"
  check "lvm-sr: vdi stat of the pivoted clone says origin local" \
    test "$($_t vdi stat --sr tlsr "$TC" --json | js 'd["origin"]')" = local
  _tpls=$(echo "$TPL" | tr -d -)
  _local=$(dmsetup info -c --noheadings -o major,minor "thinline-$_srs-$_tpls" | tr -d ' ')
  check "lvm-sr: the clone's external origin is now the template's cache volume" \
    test "$(dmsetup table "thinline-$_srs-$(echo "$TC" | tr -d -)" | awk '{print $6}')" = "$_local"
  check "lvm-sr: the attached read-only snapshot moved onto the cache volume and is still read-only" \
    sh -c "test \"\$(dmsetup table thinline-$_srs-$(echo "$TS" | tr -d -) | awk '{print \$6}')\" = '$_local' &&
      test \"\$(blockdev --getro $TSDEV)\" = 1 && ! dd if=/tmp/lsr-p3 of=$TSDEV bs=1M count=1 oflag=direct status=none 2>/dev/null &&
      dd if=$TSDEV bs=1M count=1 iflag=direct status=none | cmp - /tmp/lsr-t1 &&
      dd if=$TSDEV bs=1M skip=1 count=4 iflag=direct status=none | cmp - /tmp/lsr-p2"
  check "lvm-sr: the snapshot detached" exits 0 $_t vdi detach --sr tlsr "$TS" --json
  check "lvm-sr: the template's cache volume is read-only once its proxy stopped" \
    test "$(blockdev --getro "/dev/mapper/thinline-$_srs-$_tpls")" = 1
  check "lvm-sr: the pivoted clone reads its writes and the template" \
    sh -c "dd if=$TDEV bs=1M count=1 iflag=direct status=none | cmp - /tmp/lsr-t1 &&
      dd if=$TDEV bs=1M skip=1 count=4 iflag=direct status=none | cmp - /tmp/lsr-p2 &&
      dd if=$TDEV bs=1M skip=5 count=27 iflag=direct status=none | cmp - /tmp/lsr-template.raw --ignore-initial=0:$((5 << 20)) -n $((27 << 20)) &&
      dd if=$TDEV bs=1M skip=40 iflag=direct status=none | cmp - /tmp/lsr-template.raw --ignore-initial=0:$((40 << 20))"
  # Grown past the cache's data (64 MiB: its metadata follows), the clone reads the template
  # through a linear device of the template's size: zeroes after it, never the metadata.
  check "lvm-sr: a pivoted clone resized online to 80 MiB" exits 0 $_t vdi resize --sr tlsr "$TC" 80M --json
  _lin=$(dmsetup info -c --noheadings -o major,minor "thinline-$_srs-$_tpls-local" 2>/dev/null | tr -d ' ')
  check "lvm-sr: the grown clone's origin is the linear local origin of the template's size" \
    sh -c "test -n '$_lin' && test \"\$(dmsetup table thinline-$_srs-$(echo "$TC" | tr -d -) | awk '{print \$6}')\" = '$_lin' &&
      test \"\$(blockdev --getsize64 /dev/mapper/thinline-$_srs-$_tpls-local)\" = $((64 << 20))"
  check "lvm-sr: the grown clone reads zeroes past the template and the template before" \
    sh -c "dd if=$TDEV bs=1M skip=64 count=16 iflag=direct status=none | cmp - /dev/zero -n $((16 << 20)) &&
      dd if=$TDEV bs=1M skip=40 count=24 iflag=direct status=none | cmp - /tmp/lsr-template.raw --ignore-initial=0:$((40 << 20))"
  check "lvm-sr: vdi pivot of a clone already local succeeds and moves nothing" \
    test "$($_t vdi pivot --sr tlsr "$TC" --json | js '(d["origin"], d["clones"])')" = "('local', [])"
  check "lvm-sr: vdi pivot of a disk built on no template succeeds doing nothing" \
    test "$($_t vdi pivot --sr tlsr "$DISK" --json | js '(d["origin"], d["template"])')" = "('local', None)"
  TC3=$($_t vdi clone --sr tlsr "$TPL" --name-label tclone3 --json | js 'd["uuid"]')
  TC3DEV=$($_t vdi attach --sr tlsr "$TC3" --json | js 'd["device"]')
  check "lvm-sr: a new clone of a local template starts local: no proxy, no nbd device" \
    sh -c "! pgrep -f 'sr [o]rigin --sr' >/dev/null && ! ls /sys/block/nbd*/pid >/dev/null 2>&1 &&
      test \"\$(dmsetup table thinline-$_srs-$(echo "$TC3" | tr -d -) | awk '{print \$6}')\" = $_local"
  check "lvm-sr: the new clone reads the whole template (cmp)" \
    sh -c "dd if=$TC3DEV bs=1M iflag=direct status=none | cmp - /tmp/lsr-template.raw"
  check "lvm-sr: the new clone detached and destroyed; the first still reads right" \
    sh -c "$_t vdi detach --sr tlsr $TC3 --json >/dev/null && $_t vdi destroy --sr tlsr $TC3 --json >/dev/null &&
      dd if=$TDEV bs=1M count=1 iflag=direct status=none | cmp - /tmp/lsr-t1"
  rm -f /tmp/lsr-stop /tmp/lsr-fio-* /tmp/lsr-reads-* /tmp/lsr-t16
}

# A clone of an ext4 template served by nginx (HTTP range requests), on the SR in the user's VG
# (templates hydrated in the background): files of the template read, files written, detached and
# attached again, intact; the clone pivots by itself once the cache is complete; nginx served
# each byte of the template at most once.
lsr_http() {
  ip link set lo up 2>/dev/null
  require "lvm-sr: load ext4" load_modules ext4
  rm -rf /tmp/lsr-www /tmp/lsr-mnt && mkdir -p /tmp/lsr-www/tree /tmp/lsr-www/logs /tmp/lsr-mnt
  echo "from the template" >/tmp/lsr-www/tree/hello.txt
  head -c $((3 * 1048576)) /dev/urandom >/tmp/lsr-www/tree/blob
  require "lvm-sr: an ext4 template image" quietly mkfs.ext4 -q -F -d /tmp/lsr-www/tree /tmp/lsr-www/fs.img 16M
  cat >/tmp/lsr-www/nginx.conf <<CONF
daemon on;
worker_processes 1;
user root;
pid /tmp/lsr-www/logs/nginx.pid;
error_log /tmp/lsr-www/logs/error.log;
events { worker_connections 64; }
http {
  log_format ranges '\$request_method \$status "\$http_range" \$body_bytes_sent';
  access_log /tmp/lsr-www/logs/access.log ranges;
  client_body_temp_path /tmp/lsr-www/logs;
  proxy_temp_path /tmp/lsr-www/logs;
  fastcgi_temp_path /tmp/lsr-www/logs;
  uwsgi_temp_path /tmp/lsr-www/logs;
  scgi_temp_path /tmp/lsr-www/logs;
  server { listen 127.0.0.1:18480; root /tmp/lsr-www; }
}
CONF
  require "lvm-sr: nginx serves the template" nginx -c /tmp/lsr-www/nginx.conf
  _url=http://127.0.0.1:18480/fs.img
  UT=$($_t vdi introduce --sr uvg "$_url" --name-label ext4-tpl --json | js 'd["uuid"]')
  UC=$($_t vdi clone --sr uvg "$UT" --name-label web --json | js 'd["uuid"]')
  # What the template's server sends from now on: the proxy's fetches.
  : >/tmp/lsr-www/logs/access.log
  UCDEV=$($_t vdi attach --sr uvg "$UC" --json | js 'd["device"]')
  check "lvm-sr: the HTTP template's clone mounts and holds the template's files" \
    sh -c "mount $UCDEV /tmp/lsr-mnt && grep -qx 'from the template' /tmp/lsr-mnt/hello.txt && cmp /tmp/lsr-mnt/blob /tmp/lsr-www/tree/blob"
  head -c $((2 * 1048576)) /dev/urandom >/tmp/lsr-new
  check "lvm-sr: files written on the clone's ext4" \
    sh -c "cp /tmp/lsr-new /tmp/lsr-mnt/new.bin && echo changed >/tmp/lsr-mnt/hello.txt && umount /tmp/lsr-mnt"
  check "lvm-sr: the clone detached and attached again" \
    sh -c "$_t vdi detach --sr uvg $UC --json >/dev/null && $_t vdi attach --sr uvg $UC --json >/dev/null"
  check "lvm-sr: after detach and attach the clone's files are intact (fsck clean)" \
    sh -c "fsck.ext4 -n $UCDEV >/dev/null && mount $UCDEV /tmp/lsr-mnt && cmp /tmp/lsr-mnt/new.bin /tmp/lsr-new &&
      grep -qx changed /tmp/lsr-mnt/hello.txt && cmp /tmp/lsr-mnt/blob /tmp/lsr-www/tree/blob"
  # Hydrated in the background, scrubbed, pivoted by the proxy's own `vdi pivot --if-ready`.
  _i=0
  while [ "$($_t vdi stat --sr uvg "$UC" --json | js 'd["origin"]')" != local ] && [ $_i -lt 240 ]; do
    sleep 0.5; _i=$((_i + 1))
  done
  check "lvm-sr: the mounted clone pivoted by itself once its template was cached whole" \
    test "$($_t vdi stat --sr uvg "$UC" --json | js 'd["origin"]')" = local ||
    tail -n 30 /tmp/lsr-state/lvm/*/.thinline-sr/run/origin-*.log
  check "lvm-sr: after the automatic pivot no proxy runs and no nbd device is connected" \
    sh -c "! pgrep -f 'sr [o]rigin --sr' >/dev/null && ! ls /sys/block/nbd*/pid >/dev/null 2>&1"
  check "lvm-sr: the mounted file system reads right after the pivot" \
    sh -c "echo 3 >/proc/sys/vm/drop_caches && cmp /tmp/lsr-mnt/new.bin /tmp/lsr-new && cmp /tmp/lsr-mnt/blob /tmp/lsr-www/tree/blob && umount /tmp/lsr-mnt && fsck.ext4 -n $UCDEV >/dev/null"
  # Every byte range nginx sent with a body (GET with a Range header; sizes from the log) but
  # the one-byte requests that check the object is still the one introduced (bytes=0-0): none
  # overlaps another, and together they are at most the template.
  check "lvm-sr: the template's server sent each byte of the template once" \
    /usr/bin/python3 - /tmp/lsr-www/logs/access.log $((16 << 20)) <<'PY'
import re, sys
spans = []
for line in open(sys.argv[1]):
    m = re.match(r'(\S+) (\d+) "bytes=(\d+)-(\d+)" (\d+)', line)
    if m and int(m.group(5)) > 0 and m.group(3, 4) != ("0", "0"):
        lo, hi = int(m.group(3)), int(m.group(4)) + 1
        assert int(m.group(5)) == hi - lo, line
        spans.append((lo, hi))
assert spans, "no range was fetched"
spans.sort()
end = 0
for lo, hi in spans:
    assert lo >= end, f"bytes {lo}..{end} sent twice"
    end = hi
assert sum(hi - lo for lo, hi in spans) <= int(sys.argv[2]), "more than the template"
print(len(spans), "ranges,", sum(hi - lo for lo, hi in spans), "bytes")
PY
  check "lvm-sr: the pivoted clone detached, destroyed and its template forgotten" \
    sh -c "$_t vdi detach --sr uvg $UC --json >/dev/null && $_t vdi destroy --sr uvg $UC --json >/dev/null &&
      $_t vdi forget --sr uvg $UT --json >/dev/null"
  check "lvm-sr: no device of the template is left (only the pool)" \
    sh -c "test \"\$(dmsetup ls | grep -c '^thinline-')\" = 1"
  kill "$(cat /tmp/lsr-www/logs/nginx.pid)" 2>/dev/null
  rm -rf /tmp/lsr-www /tmp/lsr-mnt /tmp/lsr-new
}

# A full pool that fails writes (`--when-full error`, the default), on an SR of its own (a small
# loop device: the guest's /tmp is memory): a disk written past the pool's end gets ENOSPC, the
# pool is out of data space, what was written before is intact, and `sr grow` (from the reserve)
# makes it take writes again, also after growths killed half-way.
lsr_full() {
  truncate -s 64M /tmp/lsr-f
  LSR_F=$(losetup -f --show /tmp/lsr-f) || { fail "lvm-sr: a loop device for the full pool"; return 1; }
  require "lvm-sr: an SR with a small pool and a 16 MiB reserve" quietly \
    $_t sr create --type lvm "$LSR_F" --vg tlfull --reserve 16M --json
  FD=$($_t vdi create --sr tlfull 128M --name-label fill --json | js 'd["uuid"]')
  FDEV=$($_t vdi attach --sr tlfull "$FD" --json | js 'd["device"]')
  require "lvm-sr: write the start of a disk larger than the pool" put "$FDEV" 0 /tmp/lsr-p1
  _before=$($_t sr stat --sr tlfull --json | js 'd["total_space"]')
  check "lvm-sr: writing past the pool's end fails with ENOSPC (when-full error)" \
    sh -c "! dd if=/dev/zero of=$FDEV bs=1M seek=4 oflag=direct status=none 2>/tmp/lsr-dd.err &&
      grep -q 'No space left on device' /tmp/lsr-dd.err" || cat /tmp/lsr-dd.err
  check "lvm-sr: sr stat says the pool is out of data space" \
    test "$($_t sr stat --sr tlfull --json | js 'd["pool"]["mode"]')" = out_of_data_space
  check "lvm-sr: sr check reports the full pool" \
    test "$($_t sr check --sr tlfull --json | js 'sorted(set(f["kind"] for f in d["findings"]))')" = "['pool_nearly_full', 'pool_not_writable']"
  check "lvm-sr: what was written before the pool filled is intact" holds "$FDEV" 0 /tmp/lsr-p1
  check "lvm-sr: sr grow --by 8M grows the pool by 8 MiB" \
    test "$($_t sr grow --sr tlfull --by 8M --json | js 'd["total_space"]')" = $((_before + (8 << 20)))
  check "lvm-sr: after the growth the pool is writable" \
    test "$($_t sr stat --sr tlfull --json | js 'd["pool"]["mode"]')" = read_write
  check "lvm-sr: the grown pool takes writes again" \
    sh -c "dd if=/tmp/lsr-p2 of=$FDEV bs=1M seek=100 oflag=direct conv=notrunc status=none &&
      dd if=$FDEV bs=1M skip=100 count=4 iflag=direct status=none | cmp - /tmp/lsr-p2"
  check "lvm-sr: sr grow beyond the VG's free space is SR_FULL (exit 15)" \
    exits 15 $_t sr grow --sr tlfull --by 1G --json
  # kill -9 (abort) of sr grow after its record, then after its lvextend (the VG's last 4 MiB).
  THINLINE_SR_CRASH_AT=grow-recorded $_t sr grow --sr tlfull --by 4M --json >/dev/null 2>&1
  _crc=$?
  check "lvm-sr: a growth killed after its record: the next command runs the pool at its recorded size" \
    test "$_crc $($_t sr stat --sr tlfull --json | js '(d["total_space"], d["pool"]["mode"])')" = "134 ($((_before + (12 << 20))), 'read_write')"
  THINLINE_SR_CRASH_AT=data-extended $_t sr grow --sr tlfull --by 4M --json >/dev/null 2>&1
  _crc=$?
  check "lvm-sr: a growth killed after its lvextend changes nothing recorded" \
    test "$_crc $($_t sr stat --sr tlfull --json | js 'd["total_space"]')" = "134 $((_before + (12 << 20)))"
  check "lvm-sr: the next sr grow takes up what the killed one extended (the VG has no more room)" \
    test "$($_t sr grow --sr tlfull --by 4M --json | js 'd["total_space"]')" = $((_before + (16 << 20)))
  check "lvm-sr: the grown disk still reads what was written" \
    sh -c "dd if=$FDEV bs=1M count=4 iflag=direct status=none | cmp - /tmp/lsr-p1 &&
      dd if=$FDEV bs=1M skip=100 count=4 iflag=direct status=none | cmp - /tmp/lsr-p2"
  # A device added to the VG: `sr introduce` names it in the SR's records, `sr grow` uses it.
  truncate -s 32M /tmp/lsr-f2
  LSR_F2=$(losetup -f --show /tmp/lsr-f2)
  require "lvm-sr: a device added to the full SR's VG (vgextend)" quietly \
    sh -c "pvcreate -y --config '$_nu' $LSR_F2 && vgextend --config '$_nu' tlfull $LSR_F2"
  _fsr=$($_t sr stat --sr tlfull --json | js 'd["uuid"]')
  check "lvm-sr: sr introduce of the extended VG adopts the SR again with both devices" \
    test "$($_t sr introduce --type lvm tlfull --json | js '(d["uuid"], len(d["devices"]))')" = "('$_fsr', 2)"
  check "lvm-sr: sr grow then grows the pool from the new device" \
    test "$($_t sr grow --sr tlfull --by 16M --json | js 'd["total_space"]')" = $((_before + (32 << 20)))
  check "lvm-sr: the disk attached across the introduce reads what was written" \
    sh -c "dd if=$FDEV bs=1M count=4 iflag=direct status=none | cmp - /tmp/lsr-p1"
  # As after a reboot: the pool built again from the records, at its grown size.
  $_t vdi detach --sr tlfull "$FD" --json >/dev/null
  dmsetup remove "thinline-$($_t sr stat --sr tlfull --json | js 'd["uuid"].replace("-", "")')-pool"
  check "lvm-sr: the grown pool activates again at its grown size, data intact" \
    sh -c "test \"\$($_t sr stat --sr tlfull --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"total_space\"])')\" = $((_before + (32 << 20))) &&
      FDEV=\$($_t vdi attach --sr tlfull $FD --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"device\"])') &&
      dd if=\$FDEV bs=1M count=4 iflag=direct status=none | cmp - /tmp/lsr-p1 &&
      dd if=\$FDEV bs=1M skip=100 count=4 iflag=direct status=none | cmp - /tmp/lsr-p2"
  check "lvm-sr: the full pool's SR destroyed" \
    sh -c "$_t vdi detach --sr tlfull $FD --json >/dev/null && $_t sr destroy --sr tlfull --force --json >/dev/null"
  check "lvm-sr: the destroyed SR's devices hold no signature, the added one too" \
    test -z "$(blkid -p "$LSR_F" "$LSR_F2" 2>/dev/null || true)"
  losetup -d "$LSR_F" "$LSR_F2" 2>/dev/null
  rm -f /tmp/lsr-f /tmp/lsr-f2 /tmp/lsr-dd.err
}

# A pool that queues writes when full (`--when-full queue`) with `sr monitor` running: a write
# larger than the pool completes while the monitor grows the pool from the user's VG, up to the
# SR's --autoextend-max, and reads back.
lsr_autoextend() {
  $_t sr monitor --sr uvg --interval 0.5 >/tmp/lsr-monitor.log 2>&1 &
  _mon=$!
  AD=$($_t vdi create --sr uvg 64M --name-label big --json | js 'd["uuid"]')
  ADEV=$($_t vdi attach --sr uvg "$AD" --json | js 'd["device"]')
  head -c $((32 * 1048576)) /dev/urandom >/tmp/lsr-big
  check "lvm-sr: 32 MiB written to a disk of a nearly full 32 MiB pool that queues: all of it lands" \
    put "$ADEV" 0 /tmp/lsr-big
  check "lvm-sr: the write reads back (cmp)" holds "$ADEV" 0 /tmp/lsr-big
  _i=0
  while [ "$($_t sr stat --sr uvg --json | js 'd["total_space"]')" != $((48 << 20)) ] && [ $_i -lt 60 ]; do
    sleep 0.5; _i=$((_i + 1))
  done
  check "lvm-sr: sr monitor grew the pool to its --autoextend-max (48 MiB) and no further" \
    test "$($_t sr stat --sr uvg --json | js 'd["total_space"]')" = $((48 << 20)) ||
    cat /tmp/lsr-monitor.log
  check "lvm-sr: the monitor says what it grew" grep -q "pool grown" /tmp/lsr-monitor.log
  kill "$_mon"
  check "lvm-sr: sr monitor stops on SIGTERM" wait "$_mon"
  check "lvm-sr: the big disk detached and destroyed" \
    sh -c "$_t vdi detach --sr uvg $AD --json >/dev/null && $_t vdi destroy --sr uvg $AD --json >/dev/null"
  rm -f /tmp/lsr-big /tmp/lsr-monitor.log
}
