# shellcheck shell=bash disable=SC2154  # name, here and repo: set by the entry point that sources this
# host-lib.sh: what the host-side entry points (test-*.sh) share: prerequisite checks, the
# work directory, the guest's environment file, and running the guest script in the VM with
# one PASS/FAIL verdict. Source it after setting `name` (the guest script is "$here/$name.sh").
#
# Exit codes of the entry points: 0 pass; 1 fail; 77 skip (only with THINLINE_ALLOW_SKIP=1 and
# missing prerequisites; without it, missing prerequisites are a failure telling you to run
# tests/scripts/install-deps.sh).

# missing_prereq MESSAGE: skip (THINLINE_ALLOW_SKIP=1) or fail, naming the install script.
missing_prereq() {
  if [ "${THINLINE_ALLOW_SKIP:-0}" = 1 ]; then
    echo "SKIP: $name: $*"
    exit 77
  fi
  echo "FAIL: $name: $* -- run tests/scripts/install-deps.sh (as root) to install the kernel-test" \
       "prerequisites (or set THINLINE_ALLOW_SKIP=1 to skip)" >&2
  exit 1
}

# need_guest_kernel: the guest kernel of install-deps.sh; sets kver.
need_guest_kernel() {
  local kdir=${THINLINE_KERNEL_DIR:-/var/cache/thinline/kernel}
  [ -f "$kdir/ready" ] || missing_prereq "no guest kernel in $kdir"
  kver=$(cat "$kdir/ready")
  [ -f "$kdir/root/boot/vmlinuz-$kver" ] || missing_prereq "kernel image $kdir/root/boot/vmlinuz-$kver missing"
}

# need_tools TOOL...: every TOOL on PATH.
need_tools() {
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || missing_prereq "$tool not found"
  done
}

# need_thinline_bin: THINLINE_BIN (default <repo>/target/release/thinline) is executable.
need_thinline_bin() {
  THINLINE_BIN=${THINLINE_BIN:-$repo/target/release/thinline}
  if [ ! -x "$THINLINE_BIN" ]; then
    echo "FAIL: $name: thinline binary $THINLINE_BIN not found or not executable" \
         "(build it with 'cargo build --release', or set THINLINE_BIN)" >&2
    exit 1
  fi
}

# make_workdir: a new work directory in $TMPDIR; sets workdir. When THINLINE_BIN is set, makes it
# absolute and visible to the guest, which sees the host's files at the same paths except where
# it mounts its own file systems (a binary there is copied into the work dir, seen as /mnt).
make_workdir() {
  workdir=$(mktemp -d "${TMPDIR:-/tmp}/thinline-$name.XXXXXX") || { echo "FAIL: $name: mktemp" >&2; exit 1; }
  [ -n "${THINLINE_BIN:-}" ] || return 0
  THINLINE_BIN=$(cd "$(dirname "$THINLINE_BIN")" && pwd -P)/$(basename "$THINLINE_BIN")
  case "$THINLINE_BIN" in
    /tmp/*|/run/*|/mnt/*|/proc/*|/sys/*|/dev/*)
      cp "$THINLINE_BIN" "$workdir/thinline"
      THINLINE_BIN=/mnt/thinline ;;
  esac
}

# shq STRING: STRING single-quoted for a shell.
shq() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }

# write_guest_env VAR...: $workdir/$name.env assigns every VAR that is set and not empty, for
# the guest script to source.
write_guest_env() {
  local v
  {
    echo "# written by test-$name.sh"
    for v in "$@"; do
      [ -n "${!v:-}" ] && echo "$v=$(shq "${!v}")"
    done
  } >"$workdir/$name.env"
}

# run_guest DESCRIPTION [CONSOLE_LINES]: boots the VM (run-vm.sh) on $here/$name.sh, then exits:
# 0 with the guest's PASS/FAIL lines when it printed "$name: ALL PASSED", else 1 with the end of
# the console (CONSOLE_LINES, default 150) and of qemu's log, keeping the work directory.
run_guest() {
  local rc start elapsed lines=${2:-150}
  echo "$name: kernel $kver, $1, work dir $workdir"
  start=$(date +%s)
  "$here/run-vm.sh" "$here/$name.sh" "$workdir"
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
    echo "---- console.log (last $lines lines) ----"
    tail -n "$lines" "$workdir/console.log" | tr -d '\r'
    if [ -s "$workdir/qemu.log" ]; then
      echo "---- qemu.log ----"
      tail -n 40 "$workdir/qemu.log"
    fi
    echo "----"
  } >&2
  exit 1
}
