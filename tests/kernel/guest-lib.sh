# guest-lib.sh: helpers for guest scripts run by tests/kernel/run-vm.sh (POSIX sh: dash or bash).
#
#   . "$THINLINE_GUEST_LIB"          # run-vm.sh exports this path (the host file, seen read-only)
#
# Reporting:
#   tl_log MSG...            "[  12.3s] MSG" on the console
#   pass NAME                prints "PASS: NAME", counts it
#   fail NAME [DETAIL]       prints "FAIL: NAME (DETAIL)", counts it, returns 1 (does not exit)
#   die NAME [DETAIL]        fail + exit 1 (the EXIT trap, if any, still runs)
#   check NAME CMD [ARGS...] runs CMD; pass or fail NAME by its exit status (returns it)
#   require NAME CMD...      like check, but die on failure
#   quietly CMD [ARGS...]    runs CMD with its output captured; shows the output only on failure
#   tl_summary               prints the counts; returns 1 if anything failed
#
# Kernel modules:
#   load_modules MOD [opt=val ...] [MOD2 ...]
#       insmods each module and its dependencies, in order, as resolved by
#       `modprobe -d $THINLINE_KERNEL_ROOT -S $THINLINE_KERNEL_VER --show-depends` (the kernel's
#       directory is visible in the guest at its host path). Built-in modules and modules already
#       loaded are skipped; .ko.xz/.ko.zst/.ko.gz are decompressed to /tmp first. Arguments with '='
#       are module options for the module named just before them (e.g. `load_modules nbd nbds_max=4`).
#       A dependency that fails to load (e.g. crc32c-intel on a CPU without SSE4.2) is a warning;
#       a named module that fails is an error (returns 1).
#
# Servers:
#   wait_for_socket_server URI|SOCKET_PATH [TIMEOUT_S=60] [PID]
#       loops until `nbdinfo --size URI` answers (a socket path becomes nbd+unix:///?socket=PATH);
#       returns 1 on timeout or, if PID is given, as soon as that process has died.
#   stop_process PID [TIMEOUT_S=30]
#       sends SIGTERM, waits, returns the process's exit status (PID must be a child of this
#       shell); after the timeout sends SIGKILL and returns 124.
#
# Block devices:
#   bytes_of DEV                        size in bytes (blockdev --getsize64)
#   is_zero FILE_OR_DEV OFFSET LENGTH   true if that byte range reads as zeroes
#   sha_range DEV OFFSET LENGTH         sha256 of a byte range read with O_DIRECT (multiples of 4096;
#                                       not for tmpfs files: 6.1's tmpfs has no O_DIRECT)
#   nbd_wait_disconnected DEV [TIMEOUT] waits until /sys/block/<dev>/size is 0
#
# Device-mapper and lvm without udev (there is no udev in the guest):
#   dm_create NAME TABLE    dmsetup create --noudevsync + dmsetup mknodes (so /dev/mapper/NAME exists)
#   dm_remove NAME          dmsetup remove --noudevsync + dmsetup mknodes
#   After any other dmsetup command that creates or renames devices, run `dmsetup mknodes`.
#   For lvm2 commands pass  --config "$LVM_NOUDEV"  (or write it to /etc/lvm/lvm.conf: the guest's
#   root is an overlay, so /etc is writable and changes vanish with the VM).

LVM_NOUDEV='activation { udev_sync = 0 udev_rules = 0 } devices { obtain_device_list_from_udev = 0 }'

TL_PASS=0
TL_FAIL=0

tl_log() {
  printf '[%6ss] %s\n' "$(cut -d' ' -f1 /proc/uptime)" "$*"
}

pass() { TL_PASS=$((TL_PASS + 1)); echo "PASS: $1"; }

fail() {
  TL_FAIL=$((TL_FAIL + 1))
  if [ $# -ge 2 ]; then echo "FAIL: $1 ($2)"; else echo "FAIL: $1"; fi
  return 1
}

die() { fail "$@" || true; exit 1; }

check() {
  _tl_name=$1; shift
  if "$@"; then pass "$_tl_name"; return 0; else _tl_rc=$?; fail "$_tl_name" "exit $_tl_rc"; return "$_tl_rc"; fi
}

require() {
  _tl_name=$1; shift
  if "$@"; then pass "$_tl_name"; else _tl_rc=$?; die "$_tl_name" "exit $_tl_rc"; fi
}

quietly() {
  _tl_q=$(mktemp /tmp/quietly.XXXXXX)
  if "$@" >"$_tl_q" 2>&1; then rm -f "$_tl_q"; return 0; fi
  _tl_qrc=$?
  echo "---- $* (exit $_tl_qrc):"; cat "$_tl_q"; echo "----"
  rm -f "$_tl_q"
  return $_tl_qrc
}

tl_summary() {
  echo "SUMMARY: $TL_PASS passed, $TL_FAIL failed"
  [ "$TL_FAIL" -eq 0 ]
}

# --------------------------------------------------------------------------------------------
# Modules

_tl_insmod() { # PATH [OPTIONS...]  -> 0 loaded or already there
  _tl_p=$1; shift
  _tl_n=${_tl_p##*/}; _tl_n=${_tl_n%%.ko*}
  case "$_tl_n" in *-*) _tl_sys=$(echo "$_tl_n" | tr - _) ;; *) _tl_sys=$_tl_n ;; esac
  [ -d "/sys/module/$_tl_sys/sections" ] || [ -e "/sys/module/$_tl_sys/initstate" ] && return 0
  case "$_tl_p" in
    *.ko) ;;
    *.ko.xz|*.ko.zst|*.ko.gz)
      mkdir -p /tmp/thinline-modules
      _tl_out=/tmp/thinline-modules/$_tl_n.ko
      case "$_tl_p" in
        *.xz) xz -dc "$_tl_p" >"$_tl_out" ;;
        *.zst) zstd -qdc "$_tl_p" >"$_tl_out" ;;
        *.gz) gzip -dc "$_tl_p" >"$_tl_out" ;;
      esac || return 1
      _tl_p=$_tl_out ;;
  esac
  _tl_err=$(insmod "$_tl_p" "$@" 2>&1) && return 0
  case "$_tl_err" in *"File exists"*) return 0 ;; esac
  echo "load_modules: insmod $_tl_p $*: $_tl_err" >&2
  return 1
}

_tl_load_one() { # MODULE [OPTIONS...]
  _tl_mod=$1; shift
  _tl_deps=$(modprobe -d "$THINLINE_KERNEL_ROOT" -S "$THINLINE_KERNEL_VER" --show-depends "$_tl_mod" 2>&1) || {
    echo "load_modules: cannot resolve $_tl_mod: $_tl_deps" >&2; return 1; }
  # show-depends lists the dependencies first and the module itself last ("builtin NAME" if built in)
  _tl_total=$(printf '%s\n' "$_tl_deps" | grep -c '^insmod ')
  case "$(printf '%s\n' "$_tl_deps" | grep -E '^(insmod|builtin) ' | tail -n1)" in
    builtin*) _tl_total=$((_tl_total + 1)) ;;  # all insmod lines are dependencies
  esac
  _tl_i=0
  _tl_status=0
  # Read from a here-document so the loop runs in this shell (not a pipeline subshell).
  while read -r _tl_kind _tl_path _tl_opts; do
    [ "$_tl_kind" = insmod ] || continue
    _tl_i=$((_tl_i + 1))
    if [ "$_tl_i" -eq "$_tl_total" ]; then
      # the module asked for: its options from modprobe.d plus the caller's
      # shellcheck disable=SC2086
      _tl_insmod "$_tl_path" $_tl_opts "$@" || _tl_status=1
    else
      # shellcheck disable=SC2086
      _tl_insmod "$_tl_path" $_tl_opts \
        || echo "load_modules: warning: dependency $_tl_path of $_tl_mod did not load" >&2
    fi
  done <<EOF
$_tl_deps
EOF
  return $_tl_status
}

load_modules() {
  : "${THINLINE_KERNEL_ROOT:?not set (run under run-vm.sh)}" "${THINLINE_KERNEL_VER:?}"
  _tl_rc=0
  while [ $# -gt 0 ]; do
    _tl_m=$1; shift
    _tl_o=""
    while [ $# -gt 0 ]; do
      case "$1" in *=*) _tl_o="$_tl_o $1"; shift ;; *) break ;; esac
    done
    # shellcheck disable=SC2086
    _tl_load_one "$_tl_m" $_tl_o || { echo "load_modules: FAILED to load $_tl_m" >&2; _tl_rc=1; }
  done
  return $_tl_rc
}

# --------------------------------------------------------------------------------------------
# Servers

wait_for_socket_server() { # URI|SOCKET [TIMEOUT_S] [PID]
  _tl_uri=$1
  case "$_tl_uri" in /*) _tl_uri="nbd+unix:///?socket=$_tl_uri" ;; esac
  _tl_deadline=$(( $(cut -d. -f1 /proc/uptime) + ${2:-60} ))
  while :; do
    nbdinfo --size "$_tl_uri" >/dev/null 2>&1 && return 0
    if [ -n "${3:-}" ] && ! kill -0 "$3" 2>/dev/null; then
      echo "wait_for_socket_server: server process $3 died" >&2; return 1
    fi
    if [ "$(cut -d. -f1 /proc/uptime)" -ge "$_tl_deadline" ]; then
      echo "wait_for_socket_server: $_tl_uri did not answer within ${2:-60}s" >&2
      nbdinfo --size "$_tl_uri" >&2 || true
      return 1
    fi
    sleep 0.2
  done
}

stop_process() { # PID [TIMEOUT_S]
  kill -TERM "$1" 2>/dev/null || true
  _tl_deadline=$(( $(cut -d. -f1 /proc/uptime) + ${2:-30} ))
  while kill -0 "$1" 2>/dev/null; do
    # a zombie child still answers kill -0: check its state
    _tl_state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null || echo Z)
    [ "$_tl_state" = Z ] && break
    if [ "$(cut -d. -f1 /proc/uptime)" -ge "$_tl_deadline" ]; then
      echo "stop_process: $1 did not exit within ${2:-30}s of SIGTERM; sending SIGKILL" >&2
      kill -KILL "$1" 2>/dev/null || true
      wait "$1" 2>/dev/null
      return 124
    fi
    sleep 0.2
  done
  wait "$1"
}

# --------------------------------------------------------------------------------------------
# Block devices

bytes_of() { blockdev --getsize64 "$1"; }

is_zero() { # FILE OFFSET LENGTH
  cmp -s -n "$3" -i "$2:0" "$1" /dev/zero
}

sha_range() { # DEV OFFSET LENGTH (multiples of 4096; read with O_DIRECT, i.e. not from the page cache)
  dd if="$1" bs=1M skip="$2" count="$3" iflag=direct,skip_bytes,count_bytes status=none \
    | sha256sum | cut -d' ' -f1
}

nbd_wait_disconnected() { # DEV [TIMEOUT_S]
  _tl_b=$(basename "$1")
  _tl_deadline=$(( $(cut -d. -f1 /proc/uptime) + ${2:-30} ))
  while [ "$(cat "/sys/block/$_tl_b/size" 2>/dev/null || echo 0)" != 0 ]; do
    [ "$(cut -d. -f1 /proc/uptime)" -ge "$_tl_deadline" ] && return 1
    sleep 0.2
  done
}

# --------------------------------------------------------------------------------------------
# Device-mapper without udev

dm_create() { # NAME TABLE
  dmsetup create --noudevsync "$1" --table "$2" && dmsetup mknodes "$1"
}

dm_remove() { # NAME
  dmsetup remove --noudevsync "$1"; _tl_rc=$?
  dmsetup mknodes >/dev/null 2>&1 || true
  return $_tl_rc
}
