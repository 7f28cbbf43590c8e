#!/usr/bin/env bash
# Compare Thinline with qemu-nbd serving the same qcow2, VHD and VMDK images (and a raw reference),
# read-only over unix sockets, using fio's nbd engine (libnbd). All images are made with qemu-img
# convert from one raw base image filled with compressible text. Prints a Markdown report (header
# + table) and keeps the raw fio JSON. See benches/README.md.
#
# Usage: benches/compare-formats.sh [--quick] [--repeat N] [--runtime S] [--size SIZE]
#                                    [--formats LIST] [--servers LIST] [--jobs LIST]
#                                    [--results-dir DIR] [--require-thinline]
#
# Environment (command-line options win):
#   THINLINE_BIN   thinline binary (default: target/release/thinline under the repo root;
#                  relative paths: current directory if present there, else repo root); run as
#                  "$THINLINE_BIN serve -r --socket SOCK IMAGE" (format detected)
#   THINLINE_CMD   replaces the whole thinline command line; {SOCK}, {IMAGE} and {FMT} (qemu's
#                  format name) are substituted, e.g. a stand-in to test this script:
#                  THINLINE_CMD='qemu-nbd -r -f {FMT} -t -e 8 -k {SOCK} {IMAGE}'
#   RUNTIME        seconds per fio run, after ramp (default 10; --quick: 3)
#   RAMP_TIME      fio ramp_time seconds, not measured (default 2)
#   IMAGE_SIZE     virtual size of every image, K/M/G suffixes are binary (default 1G; --quick: 256M)
#   REPEAT         rounds per format and job; the table shows the per-metric median (default 1)
#   NUMJOBS        fio jobs (= NBD connections) per run (default 1)
#   FORMATS        comma list from: raw,qcow2,qcow2-zlib,qcow2-zstd,vhd,vmdk,vmdk-stream
#                  (default: raw,qcow2,qcow2-zlib,vhd,vmdk,vmdk-stream)
#   SERVERS        comma list from: thinline,qemu-default,qemu-uring (default: all)
#   JOBS           comma list from: randread-4k-qd1,randread-4k-qd32,seqread-1m-qd8 (default: all)
#   RESULTS_DIR    default <repo>/target/bench-results/compare-formats-<timestamp>
#   IMAGE_DIR      where the scratch images go (default: <repo>/target/bench-tmp); must be a
#                  filesystem with O_DIRECT (not tmpfs) for qemu-nbd --cache=none
#   KEEP_IMAGES=1  do not delete the scratch images at exit
#   READY_TIMEOUT  seconds to wait for a server to answer (default 30)
#   SERVER_CPUS, FIO_CPUS  optional taskset CPU lists to pin servers / fio (e.g. 1 and 0);
#                  unset = let the scheduler place them (QD1 latency is placement-sensitive)
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "$script_dir/.." && pwd)

die() { echo "compare-formats: $*" >&2; exit 1; }
log() { echo "compare-formats: $*" >&2; }

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

quick=0
require_thinline=0
cli_repeat= cli_runtime= cli_size= cli_results= cli_servers= cli_formats= cli_jobs=
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --repeat) cli_repeat=${2:?--repeat needs a value}; shift ;;
    --runtime) cli_runtime=${2:?--runtime needs a value}; shift ;;
    --size) cli_size=${2:?--size needs a value}; shift ;;
    --results-dir) cli_results=${2:?--results-dir needs a value}; shift ;;
    --servers) cli_servers=${2:?--servers needs a value}; shift ;;
    --formats) cli_formats=${2:?--formats needs a value}; shift ;;
    --jobs) cli_jobs=${2:?--jobs needs a value}; shift ;;
    --require-thinline) require_thinline=1 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done

RUNTIME=${RUNTIME:-10}
IMAGE_SIZE=${IMAGE_SIZE:-1G}
if [ "$quick" = 1 ]; then RUNTIME=3; IMAGE_SIZE=256M; fi
RUNTIME=${cli_runtime:-$RUNTIME}
IMAGE_SIZE=${cli_size:-$IMAGE_SIZE}
RAMP_TIME=${RAMP_TIME:-2}
REPEAT=${cli_repeat:-${REPEAT:-1}}
NUMJOBS=${NUMJOBS:-1}
SERVERS=${cli_servers:-${SERVERS:-thinline,qemu-default,qemu-uring}}
FORMATS=${cli_formats:-${FORMATS:-raw,qcow2,qcow2-zlib,vhd,vmdk,vmdk-stream}}
JOBS=${cli_jobs:-${JOBS:-randread-4k-qd1,randread-4k-qd32,seqread-1m-qd8}}
READY_TIMEOUT=${READY_TIMEOUT:-30}
SERVER_CPUS=${SERVER_CPUS:-}
FIO_CPUS=${FIO_CPUS:-}
server_prefix= fio_prefix=()
if [ -n "$SERVER_CPUS$FIO_CPUS" ]; then command -v taskset >/dev/null || die "SERVER_CPUS/FIO_CPUS need taskset (util-linux)"; fi
[ -z "$SERVER_CPUS" ] || server_prefix="taskset -c $(printf '%q' "$SERVER_CPUS") "
[ -z "$FIO_CPUS" ] || fio_prefix=(taskset -c "$FIO_CPUS")
THINLINE_BIN=${THINLINE_BIN:-target/release/thinline}
# Relative paths: taken from the current directory if the file is there, else from the repo root;
# a bare name is looked up on PATH.
case "$THINLINE_BIN" in
  /*) ;;
  */*) [ -e "$THINLINE_BIN" ] && THINLINE_BIN=$(pwd)/$THINLINE_BIN || THINLINE_BIN=$repo_root/$THINLINE_BIN ;;
  *) THINLINE_BIN=$(command -v "$THINLINE_BIN" || echo "$THINLINE_BIN") ;;
esac
timestamp=$(date +%Y%m%d-%H%M%S)
RESULTS_DIR=${cli_results:-${RESULTS_DIR:-$repo_root/target/bench-results/compare-formats-$timestamp}}
IMAGE_DIR=${IMAGE_DIR:-$repo_root/target/bench-tmp}

for v in RUNTIME RAMP_TIME REPEAT NUMJOBS READY_TIMEOUT; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a non-negative integer (got '${!v}')"
done
[ "$REPEAT" -ge 1 ] && [ "$NUMJOBS" -ge 1 ] && [ "$RUNTIME" -ge 1 ] || die "RUNTIME, REPEAT, NUMJOBS must be >= 1"

# IMAGE_SIZE: 1G, 256M, 1GiB, 512MiB, 1073741824 (suffixes are powers of 1024).
size_str=${IMAGE_SIZE%B}; size_str=${size_str%i}
image_bytes=$(numfmt --from=iec "$size_str" 2>/dev/null) || die "bad IMAGE_SIZE '$IMAGE_SIZE'"
[ "$image_bytes" -ge $((64 * 1024 * 1024)) ] || die "IMAGE_SIZE must be at least 64M"
[ $((image_bytes % 1048576)) -eq 0 ] || die "IMAGE_SIZE must be a multiple of 1 MiB"

for tool in fio nbdinfo qemu-nbd qemu-img python3 numfmt; do
  command -v "$tool" >/dev/null || die "'$tool' not found (tests/scripts/install-deps.sh installs the tools)"
done
fio --enghelp=nbd 2>/dev/null | grep -q '^uri' || die "this fio has no nbd engine (need fio >= 3.16 built with libnbd)"

# --- formats --------------------------------------------------------------------------------
# Each entry: table label | qemu's format name (qemu-nbd -f, qemu-img -f) | qemu-img convert
# options that make it from the raw base ("" = the base itself).
declare -A fmt_label fmt_qemu fmt_convert
fmt_label[raw]="raw"
fmt_label[qcow2]="qcow2"
fmt_label[qcow2-zlib]="qcow2 zlib"
fmt_label[qcow2-zstd]="qcow2 zstd"
fmt_label[vhd]="vhd dynamic"
fmt_label[vmdk]="vmdk sparse"
fmt_label[vmdk-stream]="vmdk stream"
fmt_qemu[raw]=raw fmt_qemu[qcow2]=qcow2 fmt_qemu[qcow2-zlib]=qcow2 fmt_qemu[qcow2-zstd]=qcow2
fmt_qemu[vhd]=vpc fmt_qemu[vmdk]=vmdk fmt_qemu[vmdk-stream]=vmdk
fmt_convert[raw]=""
fmt_convert[qcow2]="-O qcow2"
fmt_convert[qcow2-zlib]="-O qcow2 -c -o compression_type=zlib"
fmt_convert[qcow2-zstd]="-O qcow2 -c -o compression_type=zstd"
# force_size: keep the exact size (qemu otherwise rounds a VHD up to a CHS geometry).
fmt_convert[vhd]="-O vpc -o subformat=dynamic,force_size=on"
fmt_convert[vmdk]="-O vmdk -o subformat=monolithicSparse"
fmt_convert[vmdk-stream]="-O vmdk -o subformat=streamOptimized"
known_formats="raw,qcow2,qcow2-zlib,qcow2-zstd,vhd,vmdk,vmdk-stream"

IFS=, read -r -a formats <<<"$FORMATS"
[ ${#formats[@]} -gt 0 ] || die "FORMATS is empty"
for f in "${formats[@]}"; do
  [ -n "${fmt_label[$f]+x}" ] || die "unknown format '$f' in FORMATS (known: $known_formats)"
done

# --- servers --------------------------------------------------------------------------------
# Each entry: display name | command template ({SOCK}, {IMAGE}, {FMT}). All are read-only, allow
# several connections (multi-conn) and stay up across connections: qemu-nbd exits after its last
# client without -t, and the readiness probe is itself a client.
declare -A label cmd
label[thinline]="thinline"
label[qemu-default]="qemu-nbd default"
label[qemu-uring]="qemu-nbd io_uring"
cmd[qemu-default]="qemu-nbd -r -f {FMT} -t -e 8 -k {SOCK} {IMAGE}"
cmd[qemu-uring]="qemu-nbd -r -f {FMT} -t -e 8 --cache=none --aio=io_uring -k {SOCK} {IMAGE}"
if [ -n "${THINLINE_CMD:-}" ]; then
  cmd[thinline]=$THINLINE_CMD
  thinline_desc="THINLINE_CMD stand-in: $THINLINE_CMD"
else
  # -r: raw would otherwise be served read-write; qcow2, VHD and VMDK are always read-only.
  cmd[thinline]="$(printf '%q' "$THINLINE_BIN") serve -r --socket {SOCK} {IMAGE}"
  thinline_desc="$THINLINE_BIN"
fi

IFS=, read -r -a servers <<<"$SERVERS"
for s in "${servers[@]}"; do
  [ -n "${cmd[$s]+x}" ] || die "unknown server '$s' in SERVERS (known: thinline,qemu-default,qemu-uring)"
done

have_thinline=1
if [[ " ${servers[*]} " == *" thinline "* ]] && [ -z "${THINLINE_CMD:-}" ] && [ ! -x "$THINLINE_BIN" ]; then
  have_thinline=0
  msg="thinline binary not found or not executable: $THINLINE_BIN
  build it (cargo build --release), point THINLINE_BIN at it, or set THINLINE_CMD
  (e.g. THINLINE_CMD='qemu-nbd -r -f {FMT} -t -e 8 -k {SOCK} {IMAGE}' to test this script)."
  if [ "$require_thinline" = 1 ]; then die "$msg"; fi
  log "WARNING: $msg
  Continuing with the other servers only; thinline columns and ratios will be n/a."
  kept=()
  for s in "${servers[@]}"; do [ "$s" = thinline ] || kept+=("$s"); done
  servers=("${kept[@]}")
  thinline_desc="(not run: $THINLINE_BIN missing)"
fi
[ ${#servers[@]} -gt 0 ] || die "no servers left to benchmark"

# --- jobs (all read-only) -------------------------------------------------------------------
declare -A job_args
job_args[randread-4k-qd1]="--rw=randread --bs=4k --iodepth=1"
job_args[randread-4k-qd32]="--rw=randread --bs=4k --iodepth=32"
job_args[seqread-1m-qd8]="--rw=read --bs=1M --iodepth=8"
IFS=, read -r -a job_names <<<"$JOBS"
[ ${#job_names[@]} -gt 0 ] || die "JOBS is empty"
for j in "${job_names[@]}"; do
  [ -n "${job_args[$j]+x}" ] || die "unknown job '$j' in JOBS (known: randread-4k-qd1,randread-4k-qd32,seqread-1m-qd8)"
done

# --- state + cleanup ------------------------------------------------------------------------
mkdir -p "$RESULTS_DIR" "$IMAGE_DIR"
RESULTS_DIR=$(cd "$RESULTS_DIR" && pwd)
IMAGE_DIR=$(cd "$IMAGE_DIR" && pwd)
# Short path for the sockets (sun_path is limited to 107 bytes).
sock_dir=$(mktemp -d /tmp/thinline-bench.XXXXXX)
image_prefix=$IMAGE_DIR/compare-formats-$$
base=$image_prefix.base.raw
declare -A image_of vsize_of
server_pid=
fio_pid=
sock=

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
  stop_server
  rm -rf "$sock_dir"
  if [ "${KEEP_IMAGES:-0}" != 1 ]; then
    rm -f "$image_prefix".*
  else
    log "kept images $image_prefix.*"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'exit 143' TERM HUP

# start_server KEY FORMAT LOGFILE: starts it fresh on a new socket and waits until it answers NBD
# with the image's virtual size.
start_server() {
  local key=$1 f=$2 logfile=$3 c
  sock=$sock_dir/$key.sock
  rm -f "$sock"
  c=${cmd[$key]}
  c=${c//\{SOCK\}/$(printf '%q' "$sock")}
  c=${c//\{IMAGE\}/$(printf '%q' "${image_of[$f]}")}
  c=${c//\{FMT\}/${fmt_qemu[$f]}}
  c=$server_prefix$c
  echo "+ $c" >"$logfile"
  # exec in the background subshell (taskset execs too), so $! is the server process itself.
  (eval "exec $c") </dev/null >>"$logfile" 2>&1 &
  server_pid=$!
  local uri="nbd+unix:///?socket=$sock" deadline=$((SECONDS + READY_TIMEOUT)) size
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
      [ "$size" = "${vsize_of[$f]}" ] || { log "server '$key' reports size $size for $f, expected ${vsize_of[$f]}"; return 1; }
      return 0
    fi
    [ $SECONDS -lt $deadline ] || { log "server '$key' did not answer within ${READY_TIMEOUT}s; log: $logfile"; return 1; }
    sleep 0.1
  done
}

# Same page-cache state for every run: read the whole image file (also re-populates pages that
# an earlier qemu-nbd --cache=none run may have dropped).
warm_cache() {
  cat "$1" >/dev/null
}

# --- environment header ---------------------------------------------------------------------
cpu_model=$(lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p' | head -n1)
[ -n "$cpu_model" ] || cpu_model=$(sed -n 's/^model name[[:space:]]*:[[:space:]]*//p' /proc/cpuinfo | head -n1)
fio_ver=$(fio --version 2>&1 | head -n1)
qemu_ver=$(qemu-nbd --version 2>&1 | head -n1)
qemu_img_ver=$(qemu-img --version 2>&1 | head -n1)
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

if awk -v n="$(nproc)" '{ exit !($1 > 0.5 * n) }' /proc/loadavg; then
  log "WARNING: load average is $load_start on $(nproc) CPUs: other work is running, results will be noisy"
fi

# --- images ---------------------------------------------------------------------------------
log "results: $RESULTS_DIR"
log "writing the $(numfmt --to=iec-i --suffix=B "$image_bytes") raw base image $base (compressible text)"
# Words of 2-9 letters from a 256-word vocabulary, each followed by a space: zlib packs a 64 KiB
# cluster about 3x, like real text (random bytes would make qemu store compressed clusters
# uncompressed). A 16 MiB pool of such text is copied out in 64 KiB pieces from random places, so
# the image holds no long repeats and no zero clusters.
python3 - "$base" "$image_bytes" <<'PY'
import random, sys
path, size = sys.argv[1], int(sys.argv[2])
rng = random.Random(20240601)
letters = "abcdefghijklmnopqrstuvwxyz"
vocab = [("".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) + " ").encode()
         for _ in range(256)]
pool = b"".join(rng.choices(vocab, k=3_000_000))[: 16 << 20]
piece = 65536
with open(path, "wb") as f:
    for _ in range(size // piece):
        o = rng.randrange(0, len(pool) - piece)
        f.write(pool[o:o + piece])
PY

image_lines=
for f in "${formats[@]}"; do
  if [ -z "${fmt_convert[$f]}" ]; then
    image_of[$f]=$base
  else
    image_of[$f]=$image_prefix.$f
    log "making $f: qemu-img convert -f raw ${fmt_convert[$f]}"
    t0=$(date +%s.%N)
    # shellcheck disable=SC2086  # the convert options are intentionally split
    qemu-img convert -q -f raw ${fmt_convert[$f]} "$base" "${image_of[$f]}" || die "qemu-img convert for $f failed"
    t1=$(date +%s.%N)
    log "made $f in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s"
  fi
  vsize_of[$f]=$(qemu-img info --output=json -f "${fmt_qemu[$f]}" "${image_of[$f]}" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["virtual-size"])')
  [ "${vsize_of[$f]}" = "$image_bytes" ] || log "WARNING: $f has virtual size ${vsize_of[$f]}, not $image_bytes"
  file_bytes=$(stat -c %s "${image_of[$f]}")
  conv=${fmt_convert[$f]:-(the base image)}
  image_lines+="- ${fmt_label[$f]}: \`qemu-img convert ${conv}\`, file $(numfmt --to=iec-i --suffix=B "$file_bytes")"$'\n'
done
sync -f "$base"

rounds_desc="1 round"
[ "$REPEAT" -eq 1 ] || rounds_desc="$REPEAT rounds (each metric: median over rounds)"
server_lines=
for s in "${servers[@]}"; do
  server_lines+="- ${label[$s]}: \`${cmd[$s]}\`"$'\n'
done

{
  echo "## Image formats: Thinline vs qemu-nbd ($(date -u '+%Y-%m-%d %H:%M:%S UTC'))"
  echo
  echo "- Host: $(nproc) CPUs ($cpu_model), $mem_total RAM, kernel $(uname -r) ($(uname -m))"
  echo "- Tools: $fio_ver, $qemu_ver, $qemu_img_ver, libnbd $libnbd_ver"
  echo "- Thinline: $thinline_desc; version: $thinline_ver; repo rev: $git_rev"
  echo "- Images: $(numfmt --to=iec-i --suffix=B "$image_bytes") virtual, made from one raw base filled with compressible text (about 3× with zlib), on $fs_type, page cache warmed before every run:"
  printf '%s' "$image_lines" | sed 's/^/  /'
  echo "- fio: ioengine=nbd over unix socket, whole virtual size, numjobs=$NUMJOBS, runtime=${RUNTIME}s + ramp ${RAMP_TIME}s, $rounds_desc, servers interleaved per format and job"
  echo "- CPU pinning: servers ${SERVER_CPUS:-unpinned}, fio ${FIO_CPUS:-unpinned}; load average before image setup: $load_start"
  echo "- Servers (each started fresh per run; {FMT} is qemu's format name):"
  printf '%s' "$server_lines" | sed 's/^/  /'
} >"$RESULTS_DIR/header.md"

# --- runs -----------------------------------------------------------------------------------
n_servers=${#servers[@]}
total_runs=$(( ${#formats[@]} * ${#job_names[@]} * REPEAT * n_servers ))
run_no=0
failures=0
for f in "${formats[@]}"; do
  for job in "${job_names[@]}"; do
    for ((round = 1; round <= REPEAT; round++)); do
      # Rotate the starting server each round so no server is always first after a change.
      for ((i = 0; i < n_servers; i++)); do
        s=${servers[$(( (i + round - 1) % n_servers ))]}
        run_no=$((run_no + 1))
        out=$RESULTS_DIR/$f.$job.$s.r$round
        log "[$run_no/$total_runs] $f $job round $round: ${label[$s]}"
        warm_cache "${image_of[$f]}"
        if ! start_server "$s" "$f" "$out.server.log"; then
          failures=$((failures + 1)); stop_server; continue
        fi
        # fio runs in the background and we wait for its PID, so a signal runs the trap at once
        # (bash defers traps until a foreground child exits). --size: the whole virtual disk
        # (the nbd engine's default too, stated so the JSON records it).
        # shellcheck disable=SC2086  # job_args are intentionally split
        "${fio_prefix[@]}" fio --name="$job" --ioengine=nbd --uri="nbd+unix:///?socket=$sock" \
            ${job_args[$job]} --size="${vsize_of[$f]}" --numjobs="$NUMJOBS" --group_reporting \
            --time_based --runtime="$RUNTIME" --ramp_time="$RAMP_TIME" \
            --lat_percentiles=1 --output-format=json --output="$out.json" \
            </dev/null >"$out.fio.log" 2>&1 &
        fio_pid=$!
        fio_rc=0
        wait "$fio_pid" || fio_rc=$?
        fio_pid=
        if [ "$fio_rc" -ne 0 ]; then
          log "fio failed (exit $fio_rc) for $f $job / $s (see $out.fio.log)"
          tail -n 5 "$out.fio.log" >&2 || true
          rm -f "$out.json"
          failures=$((failures + 1))
        fi
        stop_server
      done
    done
  done
done

# --- report ---------------------------------------------------------------------------------
server_keys=$(IFS=,; echo "${servers[*]}")
format_keys=$(IFS=,; echo "${formats[*]}")
labels_tsv=$(for s in thinline qemu-default qemu-uring; do printf '%s\t%s\n' "$s" "${label[$s]}"; done
             for f in "${formats[@]}"; do printf '%s\t%s\n' "$f" "${fmt_label[$f]}"; done)
python3 - "$RESULTS_DIR" "$server_keys" "$format_keys" "${job_names[*]}" "$labels_tsv" >"$RESULTS_DIR/table.md" <<'PY'
import json, os, statistics, sys

results_dir, server_keys, format_keys, job_names, labels_tsv = sys.argv[1:6]
servers = [s for s in server_keys.split(",") if s]
formats = [f for f in format_keys.split(",") if f]
jobs = job_names.split()
labels = dict(line.split("\t", 1) for line in labels_tsv.splitlines() if line)
peers = ["qemu-default", "qemu-uring"]

def load(path):
    with open(path) as f:
        text = f.read()
    # Some fio builds print engine messages ("fio: connected to NBD server") before the JSON.
    return json.loads(text[text.index("{"):])

def metrics(fmt, job, server):
    prefix = f"{fmt}.{job}.{server}.r"
    rows = []
    for name in sorted(os.listdir(results_dir)):
        if not (name.startswith(prefix) and name.endswith(".json")):
            continue
        j = load(os.path.join(results_dir, name))["jobs"][0]
        if j.get("error"):
            continue
        d = j["read"]
        lat = d["lat_ns"]
        rows.append({
            "iops": d["iops"],
            "mibs": d["bw_bytes"] / 1048576.0,
            "mean_us": lat["mean"] / 1000.0,
            "p99_us": lat.get("percentile", {}).get("99.000000", float("nan")) / 1000.0,
        })
    if not rows:
        return None
    # Median of each metric independently over the rounds.
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}

def fmt_num(x, digits=0):
    if x is None or x != x:
        return "n/a"
    return f"{x:,.{digits}f}"

def ratio(a, b):
    if not a or not b:
        return "n/a"
    return f"{a['iops'] / b['iops']:.2f}×"

data = {(f, j, s): metrics(f, j, s) for f in formats for j in jobs for s in servers}
out = []
out.append("| Format | Job | Server | IOPS | MiB/s | Mean lat (µs) | p99 lat (µs) | thinline ÷ this (IOPS) |")
out.append("|---|---|---|---:|---:|---:|---:|---:|")
for f in formats:
    for j in jobs:
        tl = data.get((f, j, "thinline"))
        for s in servers:
            m = data[(f, j, s)]
            r = "—" if s == "thinline" else ratio(tl, m)
            if m is None:
                out.append(f"| {labels[f]} | {j} | {labels[s]} | failed | | | | {r} |")
                continue
            out.append(f"| {labels[f]} | {j} | {labels[s]} | {fmt_num(m['iops'])} | "
                       f"{fmt_num(m['mibs'], 1)} | {fmt_num(m['mean_us'], 1)} | "
                       f"{fmt_num(m['p99_us'], 1)} | {r} |")
out.append("")
present = [p for p in peers if p in servers]
if present:
    out.append("IOPS ratio thinline ÷ peer (>1.00× = thinline faster):")
    out.append("")
    out.append("| Format | " + " | ".join(f"{j} ÷ {labels[p]}" for j in jobs for p in present) + " |")
    out.append("|---|" + "---:|" * (len(jobs) * len(present)))
    for f in formats:
        cells = [ratio(data.get((f, j, "thinline")), data[(f, j, p)]) for j in jobs for p in present]
        out.append(f"| {labels[f]} | " + " | ".join(cells) + " |")
print("\n".join(out))
PY

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
