#!/bin/sh
# lvm-blocks.sh: guest side of the LVM SR building-block checks, sourced by cor-dmthin.sh so the
# same VM boot runs them (defines lvm_blocks; guest-lib.sh must be sourced first).
#
# Two loop devices for the SR and a third holding a user's VG with an LV full of a pattern. The
# Rust test `in_guest_the_lvm_srs_building_blocks_work_with_lvm2_dm_thin_and_thin_check` of this
# test binary ($KERNEL_TEST_BIN) then runs here: the SR refused on the user's device, then made on
# the two others (real lvm2 limited to them by the agent's device filter, tagged LVs sized by the
# agent, a dm-thin pool built with dmsetup), the MGT volume's records, thin devices, messages and
# the pool's status, thin_check, the pool re-created from its metadata, and a destroy that stops at
# an LV the SR did not make. Afterwards the user's VG and LV must be exactly as they were.
#
# Configuration: KERNEL_TEST_BIN (from the host side, test-cor-dmthin.sh).

lvm_blocks() {
  if [ -z "${KERNEL_TEST_BIN:-}" ] || [ ! -x "$KERNEL_TEST_BIN" ]; then
    fail "lvm: KERNEL_TEST_BIN (the kernel test binary) is not set or not executable"
    return 1
  fi
  # lvm without udev: it makes the device nodes itself.
  _nu='activation { udev_sync=0 udev_rules=0 } devices { use_devicesfile=0 }'
  for f in a b user; do truncate -s 96M "/tmp/lvm-$f" || return 1; done
  if ! { LVM_A=$(losetup -f --show /tmp/lvm-a) && LVM_B=$(losetup -f --show /tmp/lvm-b) &&
          LVM_U=$(losetup -f --show /tmp/lvm-user); }; then
    fail "lvm: loop devices"
    return 1
  fi
  export LVM_SUPPRESS_FD_WARNINGS=1
  require "lvm: a user's VG and LV on another disk" quietly sh -c "
    pvcreate -y --config '$_nu' $LVM_U && vgcreate --config '$_nu' uservg $LVM_U &&
    lvcreate -y --config '$_nu' -L 16m -n userlv uservg"
  head -c $((16 * 1048576)) /dev/urandom >/tmp/lvm-user-data
  dd if=/tmp/lvm-user-data of=/dev/uservg/userlv bs=1M oflag=direct status=none ||
    fail "lvm: write the user's LV"
  _before=$(vgs --config "$_nu" --noheadings -o vg_name,lv_count,vg_free uservg 2>&1)

  tl_log "lvm: the SR's building blocks on $LVM_A,$LVM_B (the Rust test, in this guest)"
  THINLINE_LVM_DEVICES="$LVM_A,$LVM_B" THINLINE_LVM_FOREIGN="$LVM_U" "$KERNEL_TEST_BIN" --ignored --exact --nocapture \
    --test-threads=1 in_guest_the_lvm_srs_building_blocks_work_with_lvm2_dm_thin_and_thin_check \
    >/mnt/lvm-blocks.log 2>&1
  _rc=$?
  if [ "$_rc" = 0 ] && grep -q "1 passed" /mnt/lvm-blocks.log; then
    pass "lvm: the SR refused on a device holding a PV; made on two others (lvm2 limited to them, tagged LVs, the pool); MGT records, thin devices, messages, pool status, thin_check, data back after re-creating the pool; a destroy stopped by a foreign LV"
  else
    fail "lvm: the building-block test (exit $_rc)"
    tail -n 40 /mnt/lvm-blocks.log
  fi

  check "lvm: the user's VG is as it was" \
    test "$(vgs --config "$_nu" --noheadings -o vg_name,lv_count,vg_free uservg 2>&1)" = "$_before"
  check "lvm: the user's LV holds its data (cmp)" cmp /dev/uservg/userlv /tmp/lvm-user-data
  vgremove -f --config "$_nu" uservg >/dev/null 2>&1
  pvremove -y --config "$_nu" "$LVM_U" >/dev/null 2>&1
  losetup -d "$LVM_A" "$LVM_B" "$LVM_U" 2>/dev/null
  rm -f /tmp/lvm-a /tmp/lvm-b /tmp/lvm-user /tmp/lvm-user-data
}
