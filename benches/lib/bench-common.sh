# shellcheck shell=bash
# Variables go both ways between this file and the sourcing script, which shellcheck cannot see
# when it checks this file alone:
# shellcheck disable=SC2034,SC2154
# Shared parts of the NBD benchmark scripts benches/compare-servers.sh, benches/compare-formats.sh,
# benches/compare-remote.sh, benches/compare-writes.sh and benches/qcow2-memory.sh: option and
# environment handling, starting and stopping servers, sampling their peak memory and threads,
# cleanup, the CPU placements and rounds of the runs, the fio run, the environment header and the
# report. Each script keeps its own servers, jobs, images and tables (qcow2-memory.sh keeps its own
# finer sampler, with CPU time).
#
# Source it right after `set -euo pipefail`, with bench_name set (the prefix of messages and of the
# default results folder). The sourcing script must define before use:
#   label, cmd     associative arrays: server key -> table label / command template ({SOCK},
#                  {IMAGE}, optionally {FMT})
#   job_args       associative array: job name -> fio arguments
#   remove_images  function run by cleanup at exit (the scratch images are the script's own)
# Not a script of its own: no `set` here, the sourcing script's options apply.

# The script that sourced this file: its header comment is the usage text.
bench_script=${BASH_SOURCE[1]}
# Two levels up from benches/lib.
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

die() { echo "$bench_name: $*" >&2; exit 1; }
log() { echo "$bench_name: $*" >&2; }

usage() { sed -n '2,/^set -euo/p' "$bench_script" | sed '$d; s/^# \{0,1\}//'; }

# --- options and settings -------------------------------------------------------------------
quick=0
require_thinline=0
cli_repeat='' cli_runtime='' cli_size='' cli_results='' cli_servers='' cli_placements=''

# parse_common_opt ARGS...: handles the option in $1 (an option both scripts have) and sets
# opt_args to how many arguments it took; anything unknown ends the script with the usage text.
# Script-specific options are matched by the caller before it gets here.
parse_common_opt() {
  opt_args=1
  case "$1" in
    --quick) quick=1 ;;
    --repeat) cli_repeat=${2:?--repeat needs a value}; opt_args=2 ;;
    --runtime) cli_runtime=${2:?--runtime needs a value}; opt_args=2 ;;
    --size) cli_size=${2:?--size needs a value}; opt_args=2 ;;
    --results-dir) cli_results=${2:?--results-dir needs a value}; opt_args=2 ;;
    --servers) cli_servers=${2:?--servers needs a value}; opt_args=2 ;;
    --require-thinline) require_thinline=1 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
}

# read_settings DEFAULT_SERVERS: the settings both scripts share, from options, then environment,
# then defaults; checks them and sets image_bytes and the one placement of a script that does not
# call select_placements (custom with SERVER_CPUS/FIO_CPUS, else unpinned; see use_placement).
read_settings() {
  RUNTIME=${RUNTIME:-10}
  IMAGE_SIZE=${IMAGE_SIZE:-1G}
  if [ "$quick" = 1 ]; then RUNTIME=3; IMAGE_SIZE=256M; fi
  RUNTIME=${cli_runtime:-$RUNTIME}
  IMAGE_SIZE=${cli_size:-$IMAGE_SIZE}
  RAMP_TIME=${RAMP_TIME:-2}
  REPEAT=${cli_repeat:-${REPEAT:-1}}
  NUMJOBS=${NUMJOBS:-1}
  SERVERS=${cli_servers:-${SERVERS:-$1}}
  READY_TIMEOUT=${READY_TIMEOUT:-30}
  SERVER_CPUS=${SERVER_CPUS:-}
  FIO_CPUS=${FIO_CPUS:-}
  # One placement unless the script calls select_placements: custom with SERVER_CPUS/FIO_CPUS,
  # else unpinned.
  place_server[unpinned]='' place_fio[unpinned]=''
  place_server[custom]=$SERVER_CPUS place_fio[custom]=$FIO_CPUS
  placements=(unpinned) placement_keys=
  if [ -n "$SERVER_CPUS$FIO_CPUS" ]; then
    command -v taskset >/dev/null || die "SERVER_CPUS/FIO_CPUS need taskset (util-linux)"
    placements=(custom)
  fi
  use_placement "${placements[0]}"
  THINLINE_BIN=${THINLINE_BIN:-target/release/thinline}
  # Relative paths: taken from the current directory if the file is there, else from the repo
  # root; a bare name is looked up on PATH.
  case "$THINLINE_BIN" in
    /*) ;;
    */*) [ -e "$THINLINE_BIN" ] && THINLINE_BIN=$(pwd)/$THINLINE_BIN || THINLINE_BIN=$repo_root/$THINLINE_BIN ;;
    *) THINLINE_BIN=$(command -v "$THINLINE_BIN" || echo "$THINLINE_BIN") ;;
  esac
  local timestamp
  timestamp=$(date +%Y%m%d-%H%M%S)
  RESULTS_DIR=${cli_results:-${RESULTS_DIR:-$repo_root/target/bench-results/$bench_name-$timestamp}}
  IMAGE_DIR=${IMAGE_DIR:-$repo_root/target/bench-tmp}

  local v
  for v in RUNTIME RAMP_TIME REPEAT NUMJOBS READY_TIMEOUT; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a non-negative integer (got '${!v}')"
  done
  if [ "$REPEAT" -lt 1 ] || [ "$NUMJOBS" -lt 1 ] || [ "$RUNTIME" -lt 1 ]; then
    die "RUNTIME, REPEAT, NUMJOBS must be >= 1"
  fi

  # IMAGE_SIZE: 1G, 256M, 1GiB, 512MiB, 1073741824 (suffixes are powers of 1024).
  local size_str=${IMAGE_SIZE%B}; size_str=${size_str%i}
  image_bytes=$(numfmt --from=iec "$size_str" 2>/dev/null) || die "bad IMAGE_SIZE '$IMAGE_SIZE'"
  [ "$image_bytes" -ge $((64 * 1024 * 1024)) ] || die "IMAGE_SIZE must be at least 64M"
  [ $((image_bytes % 1048576)) -eq 0 ] || die "IMAGE_SIZE must be a multiple of 1 MiB"
}

# check_tools TOOL...: every TOOL is on PATH, and fio can speak NBD.
check_tools() {
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null || die "'$tool' not found (tests/scripts/install-deps.sh installs the tools)"
  done
  fio --enghelp=nbd 2>/dev/null | grep -q '^uri' || die "this fio has no nbd engine (need fio >= 3.16 built with libnbd)"
}

# --- placements -----------------------------------------------------------------------------
# A placement says where the servers and fio run: a taskset CPU list for each (empty: no taskset).
# run_rounds runs every job, round and server in every placement of the placements array, and
# use_placement sets it up. A script that calls select_placements names its runs and table rows
# after the placement; other scripts have the one placement read_settings chose.
declare -A place_server place_fio
placement_names=unpinned,split,shared,custom

# use_placement NAME: placement is NAME; server_prefix (put in front of the server command) and
# fio_prefix (an array, in front of fio) pin them as it says.
use_placement() {
  placement=$1
  server_prefix='' fio_prefix=()
  [ -z "${place_server[$1]}" ] || server_prefix="taskset -c $(printf '%q' "${place_server[$1]}") "
  [ -z "${place_fio[$1]}" ] || fio_prefix=(taskset -c "${place_fio[$1]}")
}

# allowed_cpus: the CPUs this process may run on (its affinity, e.g. a cgroup's cpuset), one a
# line, in order.
allowed_cpus() {
  local list part i parts
  list=$(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' /proc/self/status)
  [ -n "$list" ] || list=0-$(($(nproc) - 1))
  IFS=, read -r -a parts <<<"$list"
  for part in "${parts[@]}"; do
    for ((i = ${part%-*}; i <= ${part#*-}; i++)); do echo "$i"; done
  done
}

# cpu_ranges CPU...: the ascending CPU numbers as a taskset list with ranges ("0-2,5").
cpu_ranges() {
  local out='' start=$1 prev=$1 c
  shift
  for c in "$@" $(( prev - 2 )); do
    if [ "$c" -eq $((prev + 1)) ]; then prev=$c; continue; fi
    out+=${out:+,}$start
    [ "$prev" -eq "$start" ] || out+=-$prev
    start=$c prev=$c
  done
  echo "$out"
}

# select_placements DEFAULT: the placements array from --placements (cli_placements), else
# PLACEMENTS, else custom when SERVER_CPUS or FIO_CPUS is set, else DEFAULT (a comma list; a
# placement this machine cannot have, split on one CPU, is left out of it with a warning).
# Placements, on the CPUs this process may use (the first F and the last L of them):
#   unpinned  no taskset: the scheduler places the server and fio
#   split     fio on L, the server on all the others (on 2 CPUs: server on 0, fio on 1)
#   shared    the server and fio both on F (one CPU: no wake-up crosses CPUs)
#   custom    the server on SERVER_CPUS, fio on FIO_CPUS (either empty: not pinned)
# Sets placement_keys (the comma list, for the report), placement_lines (for the header) and
# allowed_cpu_list (the CPUs this process may use, as a taskset list).
select_placements() {
  local cpus n p explicit=1 seen=, names
  mapfile -t cpus < <(allowed_cpus)
  n=${#cpus[@]}
  allowed_cpu_list=$(cpu_ranges "${cpus[@]}")
  place_server[shared]=${cpus[0]} place_fio[shared]=${cpus[0]}
  if [ "$n" -ge 2 ]; then
    place_server[split]=$(cpu_ranges "${cpus[@]:0:n-1}") place_fio[split]=${cpus[n-1]}
  fi
  PLACEMENTS=${cli_placements:-${PLACEMENTS:-}}
  if [ -z "$PLACEMENTS" ]; then
    explicit=0
    PLACEMENTS=$1
    [ -z "$SERVER_CPUS$FIO_CPUS" ] || PLACEMENTS=custom
  fi
  placements=()
  IFS=, read -r -a names <<<"$PLACEMENTS"
  for p in "${names[@]}"; do
    [[ ,$placement_names, == *,"$p",* ]] ||
      die "unknown placement '$p' in PLACEMENTS (known: $placement_names)"
    [[ $seen != *,"$p",* ]] || die "placement '$p' is named twice in PLACEMENTS"
    seen+=$p,
    if [ "$p" = split ] && [ "$n" -lt 2 ]; then
      [ "$explicit" = 0 ] ||
        die "placement split needs two CPUs; this process may use only CPU ${cpus[0]}"
      log "WARNING: one CPU only: placement split left out"
      continue
    fi
    if [ "$p" = custom ] && [ -z "$SERVER_CPUS$FIO_CPUS" ]; then
      die "placement custom needs SERVER_CPUS and/or FIO_CPUS"
    fi
    placements+=("$p")
  done
  [ ${#placements[@]} -gt 0 ] || die "PLACEMENTS is empty"
  if [[ " ${placements[*]} " != " unpinned " ]]; then
    command -v taskset >/dev/null || die "pinned placements need taskset (util-linux)"
  fi
  placement_keys=$(IFS=,; echo "${placements[*]}")
  placement_lines=
  for p in "${placements[@]}"; do
    placement_lines+="- $p: $(placement_desc "$p")"$'\n'
  done
}

# placement_desc NAME: where placement NAME puts the server and fio, in words.
placement_desc() {
  local s=${place_server[$1]} f=${place_fio[$1]}
  if [ -z "$s$f" ]; then
    echo "no taskset"
  else
    echo "server ${s:+on CPU }${s:-unpinned}, fio ${f:+on CPU }${f:-unpinned}"
  fi
}

# --- servers --------------------------------------------------------------------------------
# set_thinline_cmd SERVE_ARGS: cmd[thinline] is "$THINLINE_BIN SERVE_ARGS", or THINLINE_CMD when
# set; thinline_desc says which for the header.
set_thinline_cmd() {
  if [ -n "${THINLINE_CMD:-}" ]; then
    cmd[thinline]=$THINLINE_CMD
    thinline_desc="THINLINE_CMD stand-in: $THINLINE_CMD"
  else
    cmd[thinline]="$(printf '%q' "$THINLINE_BIN") $1"
    thinline_desc="$THINLINE_BIN"
  fi
}

# select_servers KNOWN STAND_IN: splits SERVERS into the servers array, each one of KNOWN (a comma
# list, for the message). A missing thinline binary drops thinline (have_thinline=0) with a warning
# that suggests STAND_IN as THINLINE_CMD, or ends the script under --require-thinline.
select_servers() {
  local known=$1 stand_in=$2 s msg
  IFS=, read -r -a servers <<<"$SERVERS"
  for s in "${servers[@]}"; do
    [ -n "${cmd[$s]+x}" ] || die "unknown server '$s' in SERVERS (known: $known)"
  done

  have_thinline=1
  if [[ " ${servers[*]} " == *" thinline "* ]] && [ -z "${THINLINE_CMD:-}" ] && [ ! -x "$THINLINE_BIN" ]; then
    have_thinline=0
    msg="thinline binary not found or not executable: $THINLINE_BIN
  build it (cargo build --release), point THINLINE_BIN at it, or set THINLINE_CMD
  (e.g. THINLINE_CMD='$stand_in' to test this script)."
    if [ "$require_thinline" = 1 ]; then die "$msg"; fi
    log "WARNING: $msg
  Continuing with the other servers only; thinline columns and ratios will be n/a."
    local kept=()
    for s in "${servers[@]}"; do [ "$s" = thinline ] || kept+=("$s"); done
    servers=("${kept[@]}")
    thinline_desc="(not run: $THINLINE_BIN missing)"
  fi
  [ ${#servers[@]} -gt 0 ] || die "no servers left to benchmark"
}

# add_qemu_servers QEMU_ARGS: the servers qemu-default and qemu-uring (label and cmd), both
# "qemu-nbd QEMU_ARGS -t -e 8 -k {SOCK} {IMAGE}", qemu-uring with --cache=none --aio=io_uring.
# -t: qemu-nbd stays up across connections (it exits after its last client otherwise, and the
# readiness probe is itself a client); -e 8: several connections (multi-conn).
add_qemu_servers() {
  label[qemu-default]="qemu-nbd default"
  label[qemu-uring]="qemu-nbd io_uring"
  cmd[qemu-default]="qemu-nbd $1 -t -e 8 -k {SOCK} {IMAGE}"
  cmd[qemu-uring]="qemu-nbd $1 -t -e 8 --cache=none --aio=io_uring -k {SOCK} {IMAGE}"
}

# --- runs ---------------------------------------------------------------------------------
# count_runs GROUPS: run_no starts at 0 of total_runs, GROUPS times every job, round, placement
# and server.
count_runs() {
  run_no=0
  total_runs=$(( $1 * ${#job_names[@]} * REPEAT * ${#placements[@]} * ${#servers[@]} ))
}

# run_rounds RUN_ONE: calls RUN_ONE JOB SERVER ROUND for every job, round (1 to REPEAT), placement
# (use_placement sets it up first) and server, counting each run in run_no. Each round runs every
# placement in turn, so a drift of the machine over time touches every placement alike. The
# starting server rotates with the round and the placement so that no server is always the first
# one after a change (of job, placement, or of the caller's format or row group).
run_rounds() {
  local job round p i n=${#servers[@]}
  for job in "${job_names[@]}"; do
    for ((round = 1; round <= REPEAT; round++)); do
      for ((p = 0; p < ${#placements[@]}; p++)); do
        use_placement "${placements[p]}"
        for ((i = 0; i < n; i++)); do
          run_no=$((run_no + 1))
          "$1" "$job" "${servers[$(( (i + round - 1 + p) % n ))]}" "$round"
        done
      done
    done
  done
}

# log_estimate: logs how many runs there are and about how long they take (RUNTIME + RAMP_TIME
# and about a second to start the server and warm the page cache, per run).
log_estimate() {
  local each=$((RUNTIME + RAMP_TIME + 1))
  log "$total_runs runs of about $each s: about $(( (total_runs * each + 59) / 60 )) min"
}

# run_log TEXT: logs TEXT after the run's number, "[run_no/total_runs]".
run_log() { log "[$run_no/$total_runs] $*"; }

# start_run ARGS...: start_server ARGS; if the server does not come up, the run counts as failed,
# the server is stopped and the status is 1.
start_run() {
  start_server "$@" && return 0
  failures=$((failures + 1))
  stop_server
  return 1
}

# --- jobs -----------------------------------------------------------------------------------
# select_jobs KNOWN: splits JOBS into the job_names array, each one a key of job_args (KNOWN, a
# comma list, for the message).
select_jobs() {
  local j
  IFS=, read -r -a job_names <<<"$JOBS"
  [ ${#job_names[@]} -gt 0 ] || die "JOBS is empty"
  for j in "${job_names[@]}"; do
    [ -n "${job_args[$j]+x}" ] || die "unknown job '$j' in JOBS (known: $1)"
  done
}

# --- state + cleanup ------------------------------------------------------------------------
# init_state: creates the results and image folders (RESULTS_DIR made absolute) and the socket
# folder.
init_state() {
  mkdir -p "$RESULTS_DIR" "$IMAGE_DIR"
  RESULTS_DIR=$(cd "$RESULTS_DIR" && pwd)
  # Short path for the sockets (sun_path is limited to 107 bytes).
  sock_dir=$(mktemp -d /tmp/thinline-bench.XXXXXX)
  server_pid=
  fio_pid=
  sampler_pid=
  sock=
  failures=0
}

# set_image_prefix: makes IMAGE_DIR absolute and sets image_prefix, IMAGE_DIR/bench_name-PID, for
# a script whose scratch images are all named image_prefix.SOMETHING.
set_image_prefix() {
  IMAGE_DIR=$(cd "$IMAGE_DIR" && pwd)
  image_prefix=$IMAGE_DIR/$bench_name-$$
}

# remove_prefixed_images: removes the images image_prefix.*, unless KEEP_IMAGES=1.
remove_prefixed_images() {
  if [ "${KEEP_IMAGES:-0}" != 1 ]; then
    rm -f "$image_prefix".*
  else
    log "kept images $image_prefix.*"
  fi
}

# --- peak memory and threads of a server ----------------------------------------------------
# proc_peak PID: "VmHWM_KiB THREADS" from /proc/PID/status (nothing once the process is gone).
proc_peak() {
  local k v _ hwm='' thr=''
  while read -r k v _; do
    case $k in
      VmHWM:) hwm=$v ;;
      Threads:) thr=$v ;;
    esac
  done 2>/dev/null <"/proc/$1/status" || return 0
  [ -z "$hwm" ] || [ -z "$thr" ] || echo "$hwm $thr"
}

# start_sampler OUT: samples the running server ($server_pid) every 0.2 s until stop_sampler and
# keeps in OUT "PEAK_RSS_KIB PEAK_THREADS" (VmHWM is the kernel's own peak; the thread count is
# the highest one seen).
start_sampler() {
  local pid=$server_pid out=$1
  [ -n "$pid" ] || return 0
  (
    trap 'exit 0' TERM
    hwm=0 thr=0
    while s=$(proc_peak "$pid") && [ -n "$s" ]; do
      read -r h t <<<"$s"
      [ "$h" -le "$hwm" ] || hwm=$h
      [ "$t" -le "$thr" ] || thr=$t
      echo "$hwm $thr" >"$out.tmp" && mv -f "$out.tmp" "$out"
      sleep 0.2
    done
  ) &
  sampler_pid=$!
  sampler_out=$out
}

# stop_sampler: stops the sampler and folds one last sample of the (still running) server into
# its file. Call it before stop_server.
stop_sampler() {
  local pid=$sampler_pid s h t hwm thr
  [ -n "$pid" ] || return 0
  sampler_pid=
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -f "$sampler_out.tmp"
  [ -n "$server_pid" ] && s=$(proc_peak "$server_pid") && [ -n "$s" ] || return 0
  read -r h t <<<"$s"
  read -r hwm thr 2>/dev/null <"$sampler_out" || { hwm=0 thr=0; }
  [ "$h" -le "$hwm" ] || hwm=$h
  [ "$t" -le "$thr" ] || thr=$t
  echo "$hwm $thr" >"$sampler_out"
}

stop_server() {
  local pid=$server_pid
  [ -n "$pid" ] || return 0
  server_pid=
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      log "server pid $pid ignored SIGTERM for 5 s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  wait "$pid" 2>/dev/null || true
  [ -z "$sock" ] || rm -f "$sock"
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  if [ -n "$fio_pid" ]; then
    kill -TERM "$fio_pid" 2>/dev/null || true
    wait "$fio_pid" 2>/dev/null || true
  fi
  stop_sampler
  stop_server
  rm -rf "$sock_dir"
  remove_images
  exit "$rc"
}

# set_traps: from here on, any exit stops fio and the server and removes the scratch files (call it
# once remove_images knows the image paths).
set_traps() {
  trap cleanup EXIT
  trap 'log "interrupted"; exit 130' INT
  trap 'exit 143' TERM HUP
}

# server_uri: the NBD URI of the server on $sock: nbd+unix://, or nbds+unix:// (TLS) with
# server_tls=1. libnbd checks no certificate on a unix socket, and fio's nbd engine may not
# name a certificate directory in its URI (libnbd forbids local files there by default).
server_uri() {
  if [ "${server_tls:-0}" = 1 ]; then
    echo "nbds+unix:///?socket=$sock"
  else
    echo "nbd+unix:///?socket=$sock"
  fi
}

# start_server KEY LOGFILE IMAGE SIZE [WHAT FMT]: starts server KEY fresh on a new socket, serving
# IMAGE, and waits until it answers NBD with SIZE bytes. With FMT, {FMT} in the command becomes FMT
# and WHAT names the image in the size mismatch message.
start_server() {
  local key=$1 logfile=$2 img=$3 want=$4 what=${5:-} c
  sock=$sock_dir/$key.sock
  rm -f "$sock"
  c=${cmd[$key]}
  c=${c//\{SOCK\}/$(printf '%q' "$sock")}
  c=${c//\{IMAGE\}/$(printf '%q' "$img")}
  [ $# -lt 6 ] || c=${c//\{FMT\}/$6}
  c=$server_prefix$c
  echo "+ $c" >"$logfile"
  # exec in the background subshell (taskset execs too), so $! is the server process itself.
  (eval "exec $c") </dev/null >>"$logfile" 2>&1 &
  server_pid=$!
  local uri deadline=$((SECONDS + READY_TIMEOUT)) size
  uri=$(server_uri)
  while :; do
    if ! kill -0 "$server_pid" 2>/dev/null; then
      wait "$server_pid" 2>/dev/null || true
      server_pid=
      log "server '$key' exited before answering; its log ($logfile):"
      tail -n 20 "$logfile" >&2
      return 1
    fi
    # The socket file appears before the server listens: only a real NBD answer counts.
    if size=$(nbdinfo --size "$uri" 2>/dev/null); then
      [ "$size" = "$want" ] || { log "server '$key' reports size $size${what:+ for $what}, expected $want"; return 1; }
      return 0
    fi
    [ $SECONDS -lt $deadline ] || { log "server '$key' did not answer within ${READY_TIMEOUT}s; log: $logfile"; return 1; }
    sleep 0.1
  done
}

# run_fio JOB OUT WHAT [FIO_ARGS...]: runs fio job JOB against the server on $sock: JSON to
# OUT.json, its output to OUT.fio.log; FIO_ARGS follow the job's own arguments. A failed run is
# logged (WHAT names it), counted in failures and leaves no JSON behind. A job runs for RUNTIME
# seconds after RAMP_TIME (time_based), unless the sourcing script declared an associative array
# job_timing with an entry for JOB: then those fio arguments replace the timing.
run_fio() {
  local job=$1 out=$2 what=$3 fio_rc=0
  shift 3
  local timing="--time_based --runtime=$RUNTIME --ramp_time=$RAMP_TIME"
  if declare -p job_timing >/dev/null 2>&1 && [ -n "${job_timing[$job]+x}" ]; then
    timing=${job_timing[$job]}
  fi
  # shellcheck disable=SC2206  # job_args and timing are intentionally split
  local fio_cmd=("${fio_prefix[@]}" fio --name="$job" --ioengine=nbd --uri="$(server_uri)"
    ${job_args[$job]} "$@" --numjobs="$NUMJOBS" --group_reporting $timing
    --lat_percentiles=1 --output-format=json --output="$out.json")
  echo "+ ${fio_cmd[*]}" >"$out.fio.log"
  # fio runs in the background and we wait for its PID, so a signal runs the trap at once
  # (bash defers traps until a foreground child exits).
  "${fio_cmd[@]}" </dev/null >>"$out.fio.log" 2>&1 &
  fio_pid=$!
  wait "$fio_pid" || fio_rc=$?
  fio_pid=
  if [ "$fio_rc" -ne 0 ]; then
    log "fio failed (exit $fio_rc) for $what (see $out.fio.log)"
    tail -n 5 "$out.fio.log" >&2 || true
    rm -f "$out.json"
    failures=$((failures + 1))
  fi
}

# --- environment header ---------------------------------------------------------------------
# collect_env: what the header says about the host, the common tools, Thinline and the run
# (rounds_desc, server_lines); warns when the machine is already busy.
collect_env() {
  cpu_model=$(lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p' | head -n1)
  [ -n "$cpu_model" ] || cpu_model=$(sed -n 's/^model name[[:space:]]*:[[:space:]]*//p' /proc/cpuinfo | head -n1)
  fio_ver=$(fio --version 2>&1 | head -n1)
  qemu_ver=$(qemu-nbd --version 2>&1 | head -n1 || true)
  libnbd_ver=$(nbdinfo --version 2>&1 | sed -n 's/^libnbd //p' | head -n1)
  fs_type=$(findmnt -n -o FSTYPE -T "$IMAGE_DIR" 2>/dev/null || stat -f -c %T "$IMAGE_DIR" 2>/dev/null || echo '?')
  load_start=$(cut -d' ' -f1-3 /proc/loadavg)
  mem_total=$(awk '/^MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)

  thinline_ver=n/a
  if [ "$have_thinline" = 1 ] && [ -z "${THINLINE_CMD:-}" ]; then
    thinline_ver=$("$THINLINE_BIN" --version 2>/dev/null | head -n1 || true)
    [ -n "$thinline_ver" ] || thinline_ver="(--version gave nothing)"
  fi
  if git_rev=$(git -C "$repo_root" rev-parse --short HEAD 2>/dev/null); then
    git -C "$repo_root" diff --quiet HEAD 2>/dev/null || git_rev="$git_rev + uncommitted changes"
  else
    git_rev="no commit yet"
  fi

  rounds_desc="1 round"
  [ "$REPEAT" -eq 1 ] || rounds_desc="$REPEAT rounds (each metric: median over rounds)"
  server_lines=
  local s
  for s in "${servers[@]}"; do
    server_lines+="- ${label[$s]}: \`${cmd[$s]}\`"$'\n'
  done

  if awk -v n="$(nproc)" '{ exit !($1 > 0.5 * n) }' /proc/loadavg; then
    log "WARNING: load average is $load_start on $(nproc) CPUs: other work is running, results will be noisy"
  fi
}

# --- report ---------------------------------------------------------------------------------
# Python helpers for the report table, put in front of each script's own table code.
report_helpers_py() {
  cat <<'PY'
import json, os, statistics, sys

def keys(text):
    """The keys of a comma list."""
    return [k for k in text.split(",") if k]

def tsv_dict(text):
    """A dict of "key<TAB>value" lines."""
    return dict(line.split("\t", 1) for line in text.splitlines() if line)

def job_report_args():
    """What write_job_table passes first: the results folder, the servers run, the jobs and the
    servers' labels."""
    results_dir, server_keys, job_names, labels_tsv = sys.argv[1:5]
    return results_dir, keys(server_keys), job_names.split(), tsv_dict(labels_tsv)

# The rounds of every run (REPEAT) and the placements of a script that names its runs after them
# (none: the script has one placement and leaves it out of its file names and tables).
REPEAT = int(os.environ.get("BENCH_REPEAT", "1"))
PLACEMENTS = keys(os.environ.get("BENCH_PLACEMENTS", ""))

def load(path):
    with open(path) as f:
        text = f.read()
    # Some fio builds print engine messages ("fio: connected to NBD server") before the JSON.
    return json.loads(text[text.index("{"):])

def run_metrics(path):
    """IOPS, MiB/s, mean and p99 latency of one fio JSON file, or None when the run failed (no
    file, or an error in it)."""
    try:
        j = load(path)["jobs"][0]
    except (OSError, ValueError):
        return None
    if j.get("error"):
        return None
    d = j["write"] if "write" in j["job options"].get("rw", "") else j["read"]
    lat = d["lat_ns"]
    return {
        "iops": d["iops"],
        "mibs": d["bw_bytes"] / 1048576.0,
        "mean_us": lat["mean"] / 1000.0,
        "p99_us": lat.get("percentile", {}).get("99.000000", float("nan")) / 1000.0,
    }

def summary(rounds):
    """The median of each metric independently over the rounds (a list of run_metrics, None for
    a failed round), with the list itself as "rounds"; None when every round failed."""
    done = [r for r in rounds if r]
    if not done:
        return None
    m = {k: statistics.median(r[k] for r in done) for k in done[0]}
    m["rounds"] = rounds
    return m

def metrics(results_dir, prefix):
    """summary() of the fio JSON files named prefix*.json, whatever their number."""
    names = sorted(n for n in os.listdir(results_dir)
                   if n.startswith(prefix) and n.endswith(".json"))
    return summary([run_metrics(os.path.join(results_dir, n)) for n in names])

def round_metrics(results_dir, prefix):
    """summary() of rounds 1 to REPEAT, in the files prefix<round>.json (a missing one: a failed
    round), so that round r stays round r next to another server's."""
    return summary([run_metrics(os.path.join(results_dir, f"{prefix}{r}.json"))
                    for r in range(1, REPEAT + 1)])

def fmt_num(x, digits=0):
    if x is None or x != x:
        return "n/a"
    return f"{x:,.{digits}f}"

def fmt_short(x):
    """IOPS in three or four digits: 41.2k, 1.23M, 950."""
    if x >= 999_950:
        return f"{x / 1e6:.2f}M"
    return f"{x / 1e3:.1f}k" if x >= 1000 else f"{x:.0f}"

def fmt_ratio(x):
    return "n/a" if x is None else f"{x:.2f}×"

def round_ratios(a, b):
    """thinline's IOPS a ÷ a peer's b round by round: round r of a ÷ round r of b (None where
    either failed)."""
    if not a or not b:
        return [None] * REPEAT
    return [x["iops"] / y["iops"] if x and y and y["iops"] else None
            for x, y in zip(a["rounds"], b["rounds"])]

def median_ratio(a, b):
    """The median over the rounds of round_ratios(a, b), or None."""
    done = [r for r in round_ratios(a, b) if r is not None]
    return statistics.median(done) if done else None

def lead_names(names):
    """The lead column names, with "Placement" last when the script runs placements."""
    return names + ["Placement"] if PLACEMENTS else names

def placement_rows(rows):
    """Every row (lead cells, key) once per placement, the placement added to both (the rows as
    they are when the script runs no placements)."""
    if not PLACEMENTS:
        return rows
    return [(cells + [p], key + (p,)) for cells, key in rows for p in PLACEMENTS]

def row_data(results_dir, rows, servers):
    """round_metrics of every row (lead cells, key) and server, by key + (server,), from the files
    KEY.SERVER.r<round>.json (the key's parts joined by dots)."""
    return {key + (s,): round_metrics(results_dir, ".".join(key + (s,)) + ".r")
            for _, key in rows for s in servers}

def table_head(lead):
    """The two header lines of the main table; lead: the column names before "Server"."""
    per_round = ["IOPS (median)", "IOPS per round"] if REPEAT > 1 else ["IOPS"]
    return ["| " + " | ".join(lead + ["Server"] + per_round + ["MiB/s", "Mean lat (µs)",
            "p99 lat (µs)", "thinline ÷ this (IOPS)"]) + " |",
            "|---|" + "---|" * len(lead) + "---:|" * (len(per_round) + 4)]

def table_row(lead, server, label, m, tl):
    """One row of the main table: the lead cells, server (label), its metrics m and the median
    ratio of thinline's metrics tl to them."""
    r = "—" if server == "thinline" else fmt_ratio(median_ratio(tl, m))
    if m is None:
        cells = ["failed"] + ([""] if REPEAT > 1 else []) + ["", "", ""]
    else:
        cells = [fmt_num(m["iops"])]
        if REPEAT > 1:
            cells.append(" / ".join(fmt_short(x["iops"]) if x else "failed" for x in m["rounds"]))
        cells += [fmt_num(m["mibs"], 1), fmt_num(m["mean_us"], 1), fmt_num(m["p99_us"], 1)]
    return "| " + " | ".join(lead + [label] + cells + [r]) + " |"

def main_table(lead, rows, servers, labels, data):
    """table_head(lead) and, for each row (lead cells, key), a table_row per server with
    data[key + (server,)]; a blank line after it."""
    out = table_head(lead)
    for cells, key in rows:
        tl = data.get(key + ("thinline",))
        for s in servers:
            out.append(table_row(cells, s, labels[s], data[key + (s,)], tl))
    return out + [""]

RATIO_INTRO = ["IOPS ratio thinline ÷ peer (>1.00× = thinline faster):", ""]

def job_report(results_dir, servers, jobs, labels):
    """The rows (lead cells, key) of each job (and placement), the metrics of every row and server
    (from the files JOB[.PLACEMENT].SERVER.r<round>.json) and the main table of them."""
    rows = placement_rows([([j], (j,)) for j in jobs])
    data = row_data(results_dir, rows, servers)
    return data, rows, main_table(lead_names(["Job"]), rows, servers, labels, data)

def ratio_table(lead, rows, labels, data, peers):
    """RATIO_INTRO and thinline's IOPS ratio to each server in peers, a row per row (lead cells,
    key) and peer: the ratio of every round (round r of thinline ÷ round r of the peer) and, with
    several rounds, the lowest and the median of them."""
    summary_cols = ["min", "median"] if REPEAT > 1 else []
    cols = [f"round {r}" for r in range(1, REPEAT + 1)] + summary_cols
    out = RATIO_INTRO + ["| " + " | ".join(lead + ["thinline ÷"] + cols) + " |",
                         "|---|" + "---|" * len(lead) + "---:|" * len(cols)]
    for cells, key in rows:
        tl = data.get(key + ("thinline",))
        for p in peers:
            rs = round_ratios(tl, data[key + (p,)])
            done = [r for r in rs if r is not None]
            stats = [min(done), statistics.median(done)] if done else [None, None]
            vals = rs + (stats if summary_cols else [])
            out.append("| " + " | ".join(cells + [labels[p]] + [fmt_ratio(v) for v in vals]) + " |")
    return out
PY
}

# write_table ARGS... <<'PY' ...: runs the script's table code (stdin) after the helpers, with ARGS
# in sys.argv[1:], REPEAT and placement_keys in the environment (REPEAT and PLACEMENTS there), into
# RESULTS_DIR/table.md.
write_table() {
  { report_helpers_py; cat; } |
    BENCH_REPEAT=$REPEAT BENCH_PLACEMENTS=$placement_keys python3 - "$@" >"$RESULTS_DIR/table.md"
}

# server_labels_tsv: "key<TAB>label" lines of every server in known_servers, for the report.
server_labels_tsv() {
  local IFS=, s
  for s in $known_servers; do printf '%s\t%s\n' "$s" "${label[$s]}"; done
}

# write_job_table [ARGS...] <<'PY' ...: write_table with the results folder, the servers run (a
# comma list), the jobs and server_labels_tsv first (job_report_args() reads them), then ARGS.
write_job_table() {
  local server_keys
  server_keys=$(IFS=,; echo "${servers[*]}")
  write_table "$RESULTS_DIR" "$server_keys" "${job_names[*]}" "$(server_labels_tsv)" "$@"
}

# finish_report: puts header.md and table.md together as report.md, prints it, and exits 1 if any
# run failed.
finish_report() {
  echo "- Load average after the runs: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$RESULTS_DIR/header.md"
  { cat "$RESULTS_DIR/header.md"; echo; cat "$RESULTS_DIR/table.md"; } >"$RESULTS_DIR/report.md"
  echo
  cat "$RESULTS_DIR/report.md"
  echo
  log "raw fio JSON, server/fio logs and report.md are in $RESULTS_DIR"
  if [ "$failures" -gt 0 ]; then
    log "$failures run(s) failed"
    exit 1
  fi
}
