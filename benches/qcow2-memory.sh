#!/usr/bin/env bash
# Peak memory and thread count of Thinline's server beside qemu-nbd's, serving a 1 TiB qcow2 whose
# every L2 table exists (qemu-img create -o preallocation=metadata: 128 MiB of L2 tables, far more
# than either server's metadata cache) to fio 4 KiB random reads at queue depth 32 over a unix
# socket (fio's nbd engine, libnbd). Every L2 table is equally likely, so the metadata cache misses
# all the time: this is the load that shows what a miss costs in memory and threads. A second
# pass of 4 KiB random writes at queue depth 32 serves the same image read-write (thinline serve
# -w, qemu-nbd without -r): the clusters are preallocated, so writes go in place and the cost of a
# metadata miss is the same as for reads.
#
# Each server is started fresh per pass; /proc/PID/status is sampled every 0.2 s from the moment it
# answers until it is stopped (VmRSS, VmHWM, Threads). Prints a Markdown report: IOPS, peak RSS
# (the kernel's VmHWM high-water mark, which catches peaks between samples) and peak threads, and
# keeps the fio JSON and the samples. The image file is sparse (about 160 MiB on disk) and lives in
# a temporary folder under IMAGE_DIR, removed at exit. See benches/README.md.
#
# Usage: benches/qcow2-memory.sh [--quick] [--runtime S] [--size SIZE] [--results-dir DIR]
#                                [--servers LIST] [--require-thinline]
#
# Environment (command-line options win):
#   THINLINE_BIN   thinline binary (default: target/release/thinline under the repo root;
#                  relative paths: current directory if present there, else repo root); run as
#                  "$THINLINE_BIN serve --socket SOCK IMAGE"
#   THINLINE_CMD   replaces the whole thinline command line; {SOCK} and {IMAGE} are substituted,
#                  e.g. THINLINE_CMD='qemu-nbd -r -f qcow2 -t -k {SOCK} {IMAGE}' (stand-in), or
#                  THINLINE_CMD='target/release/thinline serve --metadata-cache 8M --socket {SOCK} {IMAGE}'
#   RUNTIME        seconds per fio run, after ramp (default 20; --quick: 5)
#   RAMP_TIME      fio ramp_time seconds, not counted in IOPS but sampled (default 2)
#   IMAGE_SIZE     virtual size of the qcow2, K/M/G/T suffixes are binary (default 1T)
#   SERVERS        comma list from: thinline,qemu-nbd (default: both)
#   RESULTS_DIR    default <repo>/target/bench-results/qcow2-memory-<timestamp>
#   IMAGE_DIR      where the temporary image folder goes (default: <repo>/target/bench-tmp)
#   KEEP_IMAGE=1   do not delete the scratch image at exit
#   READY_TIMEOUT  seconds to wait for a server to answer (default 30)
#   SERVER_CPUS, FIO_CPUS  optional taskset CPU lists to pin servers / fio (e.g. 1 and 0)
set -euo pipefail

bench_name=qcow2-memory
# shellcheck source=lib/bench-common.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/bench-common.sh"

# --quick here only shortens the runs: the image must stay large for the cache to miss.
short=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) short=1; shift ;;
    --repeat) die "--repeat is not supported: each pass measures one server process" ;;
    *) parse_common_opt "$@"; shift "$opt_args" ;;
  esac
done

RUNTIME=${RUNTIME:-20}
[ "$short" = 0 ] || RUNTIME=5
IMAGE_SIZE=${IMAGE_SIZE:-1T}
known_servers=thinline,qemu-nbd
read_settings "$known_servers"
check_tools fio nbdinfo qemu-nbd qemu-img python3 numfmt

# --- servers --------------------------------------------------------------------------------
# -t keeps qemu-nbd up after the readiness probe disconnects; its L2 cache is qemu's default.
declare -A label cmd
label[thinline]="thinline"
label[qemu-nbd]="qemu-nbd"
cmd[qemu-nbd]="qemu-nbd -r -f qcow2 -t -k {SOCK} {IMAGE}"
set_thinline_cmd "serve --socket {SOCK} {IMAGE}"
select_servers "$known_servers" 'qemu-nbd -r -f qcow2 -t -k {SOCK} {IMAGE}'

# --- jobs -----------------------------------------------------------------------------------
job_names=(randread-4k-qd32 randwrite-4k-qd32)
declare -A job_args
job_args[randread-4k-qd32]="--rw=randread --bs=4k --iodepth=32"
job_args[randwrite-4k-qd32]="--rw=randwrite --bs=4k --iodepth=32"

# --- state + cleanup ------------------------------------------------------------------------
init_state
image_tmp=$(mktemp -d "$IMAGE_DIR/qcow2-memory.XXXXXX")
image=$image_tmp/big.qcow2
sampler_pid=
remove_images() {
  if [ -n "$sampler_pid" ]; then kill "$sampler_pid" 2>/dev/null || true; wait "$sampler_pid" 2>/dev/null || true; fi
  if [ "${KEEP_IMAGE:-0}" != 1 ]; then rm -rf "$image_tmp"; else log "kept image $image"; fi
}
set_traps

# sample PID OUT: one line "seconds VmRSS-kB VmHWM-kB threads cpu-ticks" every 0.2 s while PID
# lives (cpu-ticks: user + system time so far, in clock ticks).
sample() {
  local pid=$1 out=$2 start=$SECONDS rss hwm threads key value _ stat
  while [ -r "/proc/$pid/status" ]; do
    rss= hwm= threads=
    while read -r key value _; do
      case "$key" in
        VmRSS:) rss=$value ;;
        VmHWM:) hwm=$value ;;
        Threads:) threads=$value ;;
      esac
    done <"/proc/$pid/status" 2>/dev/null || break
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || break
    # After the command name: state is field 1, utime 12, stime 13.
    read -r -a stat <<<"${stat##*) }"
    [ -z "$rss" ] || echo "$((SECONDS - start)) $rss $hwm $threads $((stat[11] + stat[12]))" >>"$out"
    sleep 0.2
  done
}

start_sampler() { sample "$server_pid" "$1" & sampler_pid=$!; }
stop_sampler() {
  [ -n "$sampler_pid" ] || return 0
  kill "$sampler_pid" 2>/dev/null || true
  wait "$sampler_pid" 2>/dev/null || true
  sampler_pid=
}

# Puts the image's metadata (its only non-hole bytes) in the page cache, so that neither server
# is the first to read it from disk.
warm_metadata() {
  python3 - "$image" <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
end, pos = os.fstat(fd).st_size, 0
while pos < end:
    try:
        pos = os.lseek(fd, pos, os.SEEK_DATA)
    except OSError:
        break
    stop = os.lseek(fd, pos, os.SEEK_HOLE)
    while pos < stop:
        pos += len(os.pread(fd, min(stop - pos, 1 << 20), pos)) or stop - pos
PY
}

# --- environment header ---------------------------------------------------------------------
collect_env
{
  echo "## qcow2 server memory under random reads and writes ($(date -u '+%Y-%m-%d %H:%M:%S UTC'))"
  echo
  echo "- Host: $(nproc) CPUs ($cpu_model), $mem_total RAM, kernel $(uname -r) ($(uname -m))"
  echo "- Tools: $fio_ver, $qemu_ver, libnbd $libnbd_ver"
  echo "- Thinline: $thinline_desc; version: $thinline_ver; repo rev: $git_rev"
  echo "- Image: qcow2, $(numfmt --to=iec-i --suffix=B "$image_bytes") virtual, preallocation=metadata (every L2 table present), on $fs_type; metadata in the page cache before every run"
  echo "- fio: ioengine=nbd over unix socket, numjobs=$NUMJOBS, runtime=${RUNTIME}s + ramp ${RAMP_TIME}s; the write pass serves the image read-write"
  echo "- Memory: peak RSS is the server's VmHWM; threads sampled from /proc/PID/status every 0.2 s"
  echo "- Servers (each started fresh per run):"
  printf '%s' "$server_lines" | sed 's/^/  /'
} >"$RESULTS_DIR/header.md"

# --- image ----------------------------------------------------------------------------------
log "results: $RESULTS_DIR"
log "creating $(numfmt --to=iec-i --suffix=B "$image_bytes") qcow2 $image (preallocation=metadata)"
qemu-img create -q -f qcow2 -o preallocation=metadata "$image" "$image_bytes"
log "image uses $(du -h "$image" | cut -f1) on disk"

# --- runs -----------------------------------------------------------------------------------
# Write jobs serve the image read-write.
declare -A read_cmd
for s in "${servers[@]}"; do read_cmd[$s]=${cmd[$s]}; done
writable_cmd() {
  case "$1" in
    thinline) printf '%s' "${read_cmd[$1]/ serve / serve -w }" ;;
    *) printf '%s' "${read_cmd[$1]/ -r / }" ;;
  esac
}
for job in "${job_names[@]}"; do
  for s in "${servers[@]}"; do
    case "$job" in
      *write*) cmd[$s]=$(writable_cmd "$s") ;;
      *) cmd[$s]=${read_cmd[$s]} ;;
    esac
    base=$RESULTS_DIR/$job.$s
    warm_metadata
    if ! start_server "$s" "$base.server.log" "$image" "$image_bytes"; then
      failures=$((failures + 1)); stop_server; continue
    fi
    if [ "$job" != "${job_names[0]}" ] && nbdinfo --is read-only "nbd+unix:///?socket=$sock"; then
      log "$job: ${label[$s]} export is read-only, skipped"
      stop_server
      continue
    fi
    log "$job: ${label[$s]}"
    start_sampler "$base.samples"
    run_fio "$job" "$base" "$job / $s"
    stop_sampler
    stop_server
  done
done

# --- report ---------------------------------------------------------------------------------
write_job_table "$(getconf CLK_TCK)" "$((RUNTIME + RAMP_TIME))" <<'PY'
results_dir, servers, jobs, labels = job_report_args()
clk_tck, seconds = int(sys.argv[5]), int(sys.argv[6])

def peaks(prefix):
    """Peak RSS (MiB, from VmHWM and VmRSS), peak threads and CPU seconds used of one run's
    samples."""
    path = os.path.join(results_dir, prefix + ".samples")
    if not os.path.exists(path):
        return None
    rows = [list(map(int, l.split())) for l in open(path) if len(l.split()) == 5]
    if not rows:
        return None
    cpu = (rows[-1][4] - rows[0][4]) / clk_tck
    return max(max(r[1], r[2]) for r in rows) / 1024.0, max(r[3] for r in rows), cpu

# CPU per I/O divides the server's CPU time over the whole run (ramp included) by IOPS times
# runtime plus ramp: comparable between servers, and much less sensitive than IOPS to other
# work on the machine.
out = ["| Job | Server | IOPS | Mean lat (µs) | Server CPU per I/O (µs) | Peak RSS (MiB) | Peak threads |",
       "|---|---|---:|---:|---:|---:|---:|"]
for j in jobs:
    for s in servers:
        p = peaks(f"{j}.{s}")
        if p is None:
            continue
        m = metrics(results_dir, f"{j}.{s}.json")
        iops = fmt_num(m["iops"]) if m else "failed"
        lat = fmt_num(m["mean_us"], 1) if m else ""
        per_io = fmt_num(p[2] * 1e6 / (m["iops"] * seconds), 1) if m and m["iops"] else "n/a"
        out.append(f"| {j} | {labels[s]} | {iops} | {lat} | {per_io} | {p[0]:.1f} | {p[1]} |")
print("\n".join(out))
PY
finish_report
