#!/usr/bin/env bash
# A real userspace NFSv3 server for tests: nfs-ganesha (VFS FSAL) exporting one directory
# read-only on 127.0.0.1, NFSv3 over TCP only, no Kerberos, no NLM/RQUOTA, no kernel mount.
#
#   tests/scripts/nfs-server.sh start DIR STATEFILE   # export DIR; waits until it answers
#   tests/scripts/nfs-server.sh stop STATEFILE        # stop it, remove its temp files
#
# STATEFILE receives `key=value` lines: nfs_port, mount_port (TCP ports on 127.0.0.1),
# export (the exported path, = DIR made absolute), pid, state (temp dir with the config,
# log, pid file and recovery dir). Clients must be given both ports (nfs://127.0.0.1:NFS_PORT
# /DIR/file?mountport=MOUNT_PORT): ganesha registers with rpcbind, but with several test
# servers at once the last one started owns the registration.
#
# Needs root (the VFS FSAL opens files by handle) and the packages nfs-ganesha,
# nfs-ganesha-vfs and rpcbind (tests/scripts/install-deps.sh). Ganesha 4.3 refuses to start
# NFSv3 when it cannot register with rpcbind, so this starts the system rpcbind (`rpcbind -w`,
# port 111) when none answers and leaves it running, like a system service. Starts are
# serialised with flock because each ganesha replaces the previous registration at startup.
#
# Settings (environment):
#   NFS_SERVER_TIMEOUT  seconds to wait for the server (default 30)
#   NFS_SERVER_OWNER    a pid (the test process): when it exits without calling `stop`
#                       (killed, cancelled), a watcher stops the server and removes its files
set -euo pipefail

log() { printf 'nfs-server: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

self=$(readlink -f "$0")
timeout_s=${NFS_SERVER_TIMEOUT:-30}
lock=${TMPDIR:-/tmp}/thinline-nfs-server.lock

# True if something accepts TCP connections on 127.0.0.1:$1.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A port below the kernel's ephemeral range: every other server the tests start binds port
# 0, which the kernel only assigns from that range, and NFS starts are serialised (below),
# so a port found free here is not taken by another test before ganesha binds it. (ganesha
# cannot listen on an inherited socket or report a port it chose itself.)
free_port() {
  local p low
  low=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
  [ "$low" -gt 11000 ] || die "the ephemeral port range starts at $low; no room below it"
  for _ in $(seq 100); do
    p=$((10000 + RANDOM % (low - 10000)))
    port_busy "$p" || { echo "$p"; return 0; }
  done
  die "no free TCP port found"
}

# Runs "$@" in place of this (sub)shell with every descriptor above 2 closed, so a daemon
# started here holds neither the start lock (fd 9) nor a caller's pipe (a test waiting for
# this script's output to end would otherwise wait for the daemon's exit).
exec_closing_fds() {
  local fd
  for fd in /proc/self/fd/*; do
    fd=${fd##*/}
    [ "$fd" -gt 2 ] && eval "exec $fd>&-"
  done
  exec "$@"
}

ensure_rpcbind() {
  rpcinfo -p 127.0.0.1 >/dev/null 2>&1 && return 0
  log "starting rpcbind (ganesha needs it to register NFSv3)"
  (exec_closing_fds rpcbind -w) </dev/null >/dev/null 2>&1 ||
    (exec_closing_fds rpcbind) </dev/null >/dev/null 2>&1 || die "cannot start rpcbind"
  for _ in $(seq 50); do
    rpcinfo -p 127.0.0.1 >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "rpcbind does not answer on 127.0.0.1:111"
}

write_config() { # state export nfs_port mount_port
  cat >"$1/ganesha.conf" <<CONF
NFS_CORE_PARAM {
    Protocols = 3;
    Bind_Addr = 127.0.0.1;
    NFS_Port = $3;
    MNT_Port = $4;
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
}
NFS_KRB5 { Active_krb5 = false; }
NFSV4 {
    Graceless = true;
    RecoveryBackend = fs;
    RecoveryRoot = "$1/recovery";
}
EXPORT {
    Export_Id = 1;
    Path = "$2";
    Pseudo = "$2";
    Protocols = 3;
    Transports = TCP;
    Access_Type = RO;
    Squash = No_Root_Squash;
    SecType = sys;
    # Attributes returned with READ replies come from the file, not a 60 s cache, so a
    # client sees a rewritten file at once.
    Attr_Expiration_Time = 0;
    FSAL { Name = VFS; }
    CLIENT { Clients = 127.0.0.1; Access_Type = RO; }
}
LOG { Default_Log_Level = EVENT; }
CONF
}

start() {
  local dir=$1 statefile=$2
  [ -d "$dir" ] || die "not a directory: $dir"
  command -v ganesha.nfsd >/dev/null || die "ganesha.nfsd is missing: run tests/scripts/install-deps.sh"
  command -v rpcinfo >/dev/null || die "rpcinfo is missing (package rpcbind)"
  command -v flock >/dev/null || die "flock is missing (package util-linux)"
  [ "$(id -u)" = 0 ] || die "ganesha's VFS export needs root"
  dir=$(cd "$dir" && pwd -P)

  exec 9>"$lock"
  flock -w 120 9 || die "another start holds $lock for over 120 s (lsof $lock names it)"
  ensure_rpcbind

  local state nfs_port mount_port pid attempt
  state=$(mktemp -d "${TMPDIR:-/tmp}/thinline-ganesha.XXXXXX")
  mkdir -p "$state/recovery"
  for attempt in 1 2 3; do
    nfs_port=$(free_port)
    mount_port=$(free_port)
    [ "$nfs_port" != "$mount_port" ] || continue
    write_config "$state" "$dir" "$nfs_port" "$mount_port"
    : >"$state/ganesha.log"
    (exec_closing_fds setsid ganesha.nfsd -F -f "$state/ganesha.conf" -p "$state/ganesha.pid" \
      -L "$state/ganesha.log") </dev/null >>"$state/ganesha.out" 2>&1 &
    pid=$!
    local deadline=$((SECONDS + timeout_s))
    while alive "$pid" && [ $SECONDS -lt $deadline ]; do
      # Not `rpcinfo -n PORT`: Debian's rpcinfo ignores -n and asks rpcbind, which may
      # still point at another instance.
      if grep -q 'NFS SERVER INITIALIZED' "$state/ganesha.log" &&
         port_busy "$nfs_port" && port_busy "$mount_port"; then
        cat >"$statefile" <<STATE
nfs_port=$nfs_port
mount_port=$mount_port
export=$dir
pid=$pid
state=$state
STATE
        log "ganesha $pid exports $dir on 127.0.0.1 (nfs $nfs_port, mount $mount_port)"
        if [ -n "${NFS_SERVER_OWNER:-}" ]; then
          # In its own session: whoever kills the owner's process group spares it.
          (exec_closing_fds setsid "$self" watch "$NFS_SERVER_OWNER" "$pid" "$state") \
            </dev/null >/dev/null 2>&1 &
        fi
        return 0
      fi
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    log "attempt $attempt: ganesha did not come up; its log:"
    tail -n 20 "$state/ganesha.log" >&2 || true
  done
  rm -rf "$state"
  die "cannot start ganesha"
}

# True while process $1 runs (a zombie left for an init that does not reap counts as gone).
alive() {
  local st
  st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ]
}

# Stops ganesha $2 (and removes $3) once process $1 has gone; returns when $2 has gone.
watch_owner() {
  local owner=$1 pid=$2 state=$3
  while alive "$owner" && alive "$pid"; do sleep 1; done
  if alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    sleep 5
    kill -9 "$pid" 2>/dev/null || true
    rm -rf "$state"
  fi
}

stop() {
  local statefile=$1 pid state
  [ -f "$statefile" ] || { log "no state file $statefile"; return 0; }
  pid=$(sed -n 's/^pid=//p' "$statefile")
  state=$(sed -n 's/^state=//p' "$statefile")
  if [ -n "$pid" ] && alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  case $state in */thinline-ganesha.*) rm -rf "$state" ;; esac
  rm -f "$statefile"
}

case ${1:-} in
  start) [ $# = 3 ] || die "usage: $0 start DIR STATEFILE"; start "$2" "$3" ;;
  stop) [ $# = 2 ] || die "usage: $0 stop STATEFILE"; stop "$2" ;;
  watch) [ $# = 4 ] || die "usage: $0 watch OWNER PID STATE"; watch_owner "$2" "$3" "$4" ;;
  *) die "usage: $0 start DIR STATEFILE | stop STATEFILE" ;;
esac
