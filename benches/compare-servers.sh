#!/usr/bin/env bash
# Compare Thinline's NBD server with qemu-nbd, nbdkit and nbdkit null (the protocol floor) on the
# same raw image, over unix sockets, using fio's nbd engine (libnbd), in several CPU placements
# (unpinned and pinned). Prints a Markdown report (header + tables, every round's IOPS and ratio
# next to the medians) and keeps the raw fio JSON. See benches/README.md.
#
# Usage: benches/compare-servers.sh [--quick] [--repeat N] [--runtime S] [--size SIZE]
#                                    [--results-dir DIR] [--servers LIST] [--placements LIST]
#                                    [--require-thinline]
#
# Run time: jobs x placements x servers x REPEAT runs of RUNTIME + RAMP_TIME + about 1 s. The
# defaults (7 jobs, 3 placements, 5 servers, REPEAT=1: 105 runs of 13 s) take about 23 min;
# --quick (6 s a run) about 11 min; REPEAT=5 five times that. The script logs its estimate first.
#
# Environment (command-line options win):
#   THINLINE_BIN   thinline binary (default: target/release/thinline under the repo root;
#                  relative paths: current directory if present there, else repo root); run as
#                  "$THINLINE_BIN serve --socket SOCK IMAGE"
#   THINLINE_CMD   replaces the whole thinline command line; {SOCK} and {IMAGE} are substituted,
#                  e.g. THINLINE_CMD='qemu-nbd -f raw -t -e 8 -k {SOCK} {IMAGE}' (stand-in)
#   RUNTIME        seconds per fio run, after ramp (default 10; --quick: 3)
#   RAMP_TIME      fio ramp_time seconds, not measured (default 2)
#   IMAGE_SIZE     image size, K/M/G suffixes are binary (default 1G; --quick: 256M)
#   REPEAT         rounds, interleaved: each round runs every placement and server in turn; the
#                  tables show every round's IOPS and ratio, their min and median (default 1)
#   NUMJOBS        fio jobs (= NBD connections) per run (default 1)
#   SERVERS        comma list from: thinline,qemu-uring,qemu-default,nbdkit,nbdkit-null
#                  (default: all; nbdkit-null reads nothing and discards writes: the floor)
#   PLACEMENTS     comma list of CPU placements (taskset), every one in every round (default:
#                  unpinned,split,shared; custom alone when SERVER_CPUS or FIO_CPUS is set):
#                    unpinned  no taskset: the scheduler places the server and fio
#                    split     fio on the last CPU this process may use, the server on all the
#                              others (2 CPUs: server on 0, fio on 1)
#                    shared    the server and fio both on the first CPU (0)
#                    custom    the server on SERVER_CPUS, fio on FIO_CPUS (empty: unpinned)
#   JOBS           comma list of jobs (default: all): randread-4k-qd1, randread-4k-qd32,
#                  randwrite-4k-qd32, seqread-1m-qd8, and the same inside TLS: tls-randread-4k-qd1,
#                  tls-randread-4k-qd32, tls-seqread-1m-qd8 (every server with the same x509
#                  certificate, made by openssl for the run; fio's libnbd with nbds+unix://)
#   RESULTS_DIR    default <repo>/target/bench-results/compare-servers-<timestamp>
#   IMAGE_DIR      where the scratch image goes (default: <repo>/target/bench-tmp); must be a
#                  filesystem with O_DIRECT (not tmpfs) for qemu-nbd --cache=none
#   KEEP_IMAGE=1   do not delete the scratch image at exit
#   READY_TIMEOUT  seconds to wait for a server to answer (default 30)
#   SERVER_CPUS, FIO_CPUS  taskset CPU lists of the placement custom (e.g. 1 and 0); setting
#                  either makes custom the only placement unless PLACEMENTS names others
set -euo pipefail

bench_name=compare-servers
# shellcheck source=lib/bench-common.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/bench-common.sh"

while [ $# -gt 0 ]; do
  case "$1" in
    --placements) cli_placements=${2:?--placements needs a value}; shift 2 ;;
    *) parse_common_opt "$@"; shift "$opt_args" ;;
  esac
done

known_servers=thinline,qemu-uring,qemu-default,nbdkit,nbdkit-null
read_settings "$known_servers"
select_placements unpinned,split,shared
check_tools fio nbdinfo qemu-nbd nbdkit python3 numfmt openssl

# --- servers --------------------------------------------------------------------------------
# Each entry: display name | command template ({SOCK}, {IMAGE}). All allow several connections
# (multi-conn) and stay up across connections: qemu-nbd exits after its last client without -t,
# and the readiness probe is itself a client.
declare -A label cmd
label[thinline]="thinline"
add_qemu_servers "-f raw"
label[nbdkit]="nbdkit file"
# -f: stay in the foreground so $! is the server; --exit-with-parent: no orphan if we die hard.
cmd[nbdkit]="nbdkit -f --exit-with-parent -U {SOCK} file {IMAGE}"
# The protocol floor: answers every read with zeros without reading anything, discards writes.
label[nbdkit-null]="nbdkit null"
cmd[nbdkit-null]="nbdkit -f --exit-with-parent -U {SOCK} null size=$image_bytes"
set_thinline_cmd "serve --socket {SOCK} {IMAGE}"
select_servers "$known_servers" "${cmd[qemu-default]}"

# The same servers inside TLS (the tls-* jobs): one x509 certificate for all, in tls_dir
# (ca-cert.pem, server-cert.pem, server-key.pem: the layout qemu-nbd's tls-creds-x509 and
# nbdkit's --tls-certificates read). Each requires TLS.
tls_dir=$RESULTS_DIR/tls
declare -A cmd_tls
tls_dir_q=$(printf '%q' "$tls_dir")
cmd_tls[thinline]=${cmd[thinline]//\{IMAGE\}/--tls require --tls-cert $tls_dir_q/server-cert.pem --tls-key $tls_dir_q/server-key.pem \{IMAGE\}}
for s in qemu-default qemu-uring; do
  cmd_tls[$s]=${cmd[$s]//-k \{SOCK\}/--object tls-creds-x509,id=tls0,dir=$tls_dir_q,endpoint=server,verify-peer=off --tls-creds tls0 -k \{SOCK\}}
done
for s in nbdkit nbdkit-null; do
  cmd_tls[$s]=${cmd[$s]//--exit-with-parent/--exit-with-parent --tls=require --tls-certificates=$tls_dir_q}
done

# --- jobs -----------------------------------------------------------------------------------
# name | fio arguments
all_jobs=randread-4k-qd1,randread-4k-qd32,randwrite-4k-qd32,seqread-1m-qd8,tls-randread-4k-qd1,tls-randread-4k-qd32,tls-seqread-1m-qd8
declare -A job_args
job_args[randread-4k-qd1]="--rw=randread --bs=4k --iodepth=1"
job_args[randread-4k-qd32]="--rw=randread --bs=4k --iodepth=32"
job_args[randwrite-4k-qd32]="--rw=randwrite --bs=4k --iodepth=32"
job_args[seqread-1m-qd8]="--rw=read --bs=1M --iodepth=8"
for j in randread-4k-qd1 randread-4k-qd32 seqread-1m-qd8; do job_args[tls-$j]=${job_args[$j]}; done
JOBS=${JOBS:-$all_jobs}
select_jobs "$all_jobs"

# --- state + cleanup ------------------------------------------------------------------------
init_state
image=$IMAGE_DIR/compare-servers-$$.raw
remove_images() {
  if [ "${KEEP_IMAGE:-0}" != 1 ]; then rm -f "$image"; else log "kept image $image"; fi
}
set_traps

# Same page-cache state for every run: flush dirty pages from earlier write runs, then read the
# whole image (also re-populates pages that O_DIRECT writes from qemu-nbd --cache=none dropped).
warm_cache() {
  sync "$image"
  cat "$image" >/dev/null
}

# --- environment header ---------------------------------------------------------------------
collect_env
nbdkit_ver=$(nbdkit --version 2>&1 | head -n1)  # "nbdkit 1.32.5"

{
  echo "## NBD server comparison ($(date -u '+%Y-%m-%d %H:%M:%S UTC'))"
  echo
  echo "- Host: $(nproc) CPUs ($cpu_model), $mem_total RAM, kernel $(uname -r) ($(uname -m))"
  echo "- Tools: $fio_ver, $qemu_ver, $nbdkit_ver, libnbd $libnbd_ver"
  echo "- Thinline: $thinline_desc; version: $thinline_ver; repo rev: $git_rev"
  echo "- Image: raw, $(numfmt --to=iec-i --suffix=B "$image_bytes"), fully written (random data), on $fs_type, page cache warmed before every run"
  echo "- fio: ioengine=nbd over unix socket, numjobs=$NUMJOBS, runtime=${RUNTIME}s + ramp ${RAMP_TIME}s, $rounds_desc; per job, each round runs every placement and, in each, every server in turn"
  echo "- CPU placements (taskset; this process may use CPUs $allowed_cpu_list); load average before image setup: $load_start"
  printf '%s' "$placement_lines" | sed 's/^/  /'
  echo "- Servers (each started fresh per run):"
  printf '%s' "$server_lines" | sed 's/^/  /'
  if [[ ",$JOBS," == *,tls-* ]]; then
    echo "- tls-* rows: every server with --tls require (thinline), tls-creds-x509 (qemu-nbd) or --tls=require (nbdkit, nbdkit null), one P-256 certificate; fio's libnbd over nbds+unix:// (TLS 1.3 as negotiated)"
  fi
} >"$RESULTS_DIR/header.md"

# --- image ----------------------------------------------------------------------------------
log "results: $RESULTS_DIR"
log "writing $(numfmt --to=iec-i --suffix=B "$image_bytes") image $image (random data, fully allocated)"
head -c "$image_bytes" /dev/urandom >"$image"
sync "$image"
cat "$image" >/dev/null
if [[ ",$JOBS," == *,tls-* ]]; then
  mkdir -p "$tls_dir"
  (cd "$tls_dir" &&
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca-key.pem \
      -out ca-cert.pem -days 2 -subj '/CN=bench CA' &&
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout server-key.pem \
      -out server.csr -subj '/CN=localhost' &&
    printf 'subjectAltName=DNS:localhost\n' >server.ext &&
    openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
      -out server-cert.pem -days 2 -extfile server.ext &&
    chmod 600 server-key.pem) >"$tls_dir/openssl.log" 2>&1 || die "openssl failed: $tls_dir/openssl.log"
fi

# --- runs -----------------------------------------------------------------------------------
# run_one JOB SERVER ROUND: one run in the placement $placement.
run_one() {
  local job=$1 s=$2 base=$RESULTS_DIR/$1.$placement.$2.r$3 plain_cmd=${cmd[$2]}
  run_log "$job round $3, $placement: ${label[$s]}"
  warm_cache
  server_tls=0
  if [[ $job == tls-* ]]; then
    cmd[$s]=${cmd_tls[$s]}
    server_tls=1
  fi
  if start_run "$s" "$base.server.log" "$image" "$image_bytes"; then
    run_fio "$job" "$base" "$job / $s"
    stop_server
  fi
  cmd[$s]=$plain_cmd
}
count_runs 1
log_estimate
run_rounds run_one

# --- report ---------------------------------------------------------------------------------
# shellcheck disable=SC2119  # no extra arguments for the table code
write_job_table <<'PY'
results_dir, servers, jobs, labels = job_report_args()
data, rows, out = job_report(results_dir, servers, jobs, labels)
present = [p for p in ["qemu-uring", "qemu-default", "nbdkit", "nbdkit-null"] if p in servers]
if present:
    out += ratio_table(lead_names(["Job"]), rows, labels, data, present)
print("\n".join(out))
PY

finish_report
