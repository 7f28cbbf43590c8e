#!/usr/bin/env bash
# Compare Thinline with qemu-nbd writing into a qcow2 overlay over a raw template, over unix
# sockets, using fio's nbd engine (libnbd). Every run gets a fresh overlay (64 KiB clusters, made
# the same way for every server), so the writes land in unallocated clusters and copy the rest of
# each cluster from the template; a mixed read job reads a half-written overlay. After each write
# run, `qemu-img check` judges the overlay. Prints a Markdown report (header + tables) and keeps
# the raw fio JSON. See benches/README.md.
#
# Usage: benches/compare-writes.sh [--quick] [--repeat N] [--runtime S] [--size SIZE]
#                                   [--jobs LIST] [--servers LIST] [--results-dir DIR]
#                                   [--require-thinline]
#
# Environment (command-line options win):
#   THINLINE_BIN   thinline binary (default: target/release/thinline under the repo root;
#                  relative paths: current directory if present there, else repo root); run as
#                  "$THINLINE_BIN serve -w --socket SOCK OVERLAY"
#   THINLINE_CMD   replaces the whole thinline command line; {SOCK} and {IMAGE} are substituted,
#                  e.g. a stand-in to test this script:
#                  THINLINE_CMD='qemu-nbd -f qcow2 -t -e 8 -k {SOCK} {IMAGE}'
#   RUNTIME        seconds per fio run (default 10; --quick: 3): the random read job runs that
#                  long after its ramp; each write job stops after one pass over the disk or
#                  after RUNTIME, whichever comes first (no ramp, so no block is written twice)
#   RAMP_TIME      fio ramp_time seconds of the read job, not measured (default 2)
#   IMAGE_SIZE     virtual size of template and overlay, K/M/G suffixes are binary (default 1G;
#                  --quick: 256M)
#   REPEAT         rounds per job, servers interleaved; the tables show every round's IOPS and
#                  ratio, their min and median (default 1)
#   NUMJOBS        fio jobs (= NBD connections) per run (default 1)
#   SERVERS        comma list from: thinline,qemu-default,qemu-uring (default: all)
#   JOBS           comma list from: randwrite-4k-qd1,randwrite-4k-qd32,randwrite-64k-qd32,
#                  seqwrite-1m-qd8,randread-4k-qd32-mixed (default: all)
#   OVERLAY_TOOL   what makes the overlays: qemu-img (default) or thinline ("thinline image
#                  create"); either way 64 KiB clusters, backing format raw
#   RESULTS_DIR    default <repo>/target/bench-results/compare-writes-<timestamp>
#   IMAGE_DIR      where the template and the overlays go (default: <repo>/target/bench-tmp);
#                  must be a filesystem with O_DIRECT (not tmpfs) for qemu-nbd --cache=none
#   KEEP_IMAGES=1  do not delete the template and the last overlay at exit
#   READY_TIMEOUT  seconds to wait for a server to answer (default 30)
#   SERVER_CPUS, FIO_CPUS  optional taskset CPU lists to pin servers / fio (e.g. 1 and 0);
#                  unset = let the scheduler place them (QD1 latency is placement-sensitive)
set -euo pipefail

bench_name=compare-writes
# shellcheck source=lib/bench-common.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/bench-common.sh"

cli_jobs=
while [ $# -gt 0 ]; do
  case "$1" in
    --jobs) cli_jobs=${2:?--jobs needs a value}; shift 2 ;;
    *) parse_common_opt "$@"; shift "$opt_args" ;;
  esac
done

known_servers=thinline,qemu-default,qemu-uring
read_settings "$known_servers"
known_jobs=randwrite-4k-qd1,randwrite-4k-qd32,randwrite-64k-qd32,seqwrite-1m-qd8,randread-4k-qd32-mixed
JOBS=${cli_jobs:-${JOBS:-$known_jobs}}
OVERLAY_TOOL=${OVERLAY_TOOL:-qemu-img}
case "$OVERLAY_TOOL" in
  qemu-img|thinline) ;;
  *) die "OVERLAY_TOOL must be qemu-img or thinline (got '$OVERLAY_TOOL')" ;;
esac
check_tools fio nbdinfo qemu-nbd qemu-img qemu-io python3 numfmt

# --- servers --------------------------------------------------------------------------------
# Each entry: display name | command template ({SOCK}, {IMAGE}). All serve the overlay read-write,
# allow several connections (multi-conn) and stay up across connections: qemu-nbd exits after its
# last client without -t, and the readiness probe is itself a client.
declare -A label cmd
label[thinline]="thinline"
add_qemu_servers "-f qcow2"
set_thinline_cmd "serve -w --socket {SOCK} {IMAGE}"
select_servers "$known_servers" "${cmd[qemu-default]}"
if [ "$OVERLAY_TOOL" = thinline ] && [ ! -x "$THINLINE_BIN" ]; then
  die "OVERLAY_TOOL=thinline needs the thinline binary ($THINLINE_BIN)"
fi

# --- jobs -----------------------------------------------------------------------------------
# name | fio arguments. The write jobs are one pass (fio's random map: every block once) capped
# at RUNTIME, with no ramp: a fresh overlay has no clusters yet, and a ramp would allocate the
# first ones unmeasured. The read job is time-based like the other scripts' jobs.
declare -A job_args job_timing
job_args[randwrite-4k-qd1]="--rw=randwrite --bs=4k --iodepth=1"
job_args[randwrite-4k-qd32]="--rw=randwrite --bs=4k --iodepth=32"
job_args[randwrite-64k-qd32]="--rw=randwrite --bs=64k --iodepth=32"
job_args[seqwrite-1m-qd8]="--rw=write --bs=1M --iodepth=8"
job_args[randread-4k-qd32-mixed]="--rw=randread --bs=4k --iodepth=32"
for j in randwrite-4k-qd1 randwrite-4k-qd32 randwrite-64k-qd32 seqwrite-1m-qd8; do
  job_timing[$j]="--runtime=$RUNTIME --ramp_time=0"
done
select_jobs "$known_jobs"
is_write_job() { [[ ${job_args[$1]} == *write* ]]; }

# --- state + cleanup ------------------------------------------------------------------------
init_state
set_image_prefix
template=$image_prefix.template.raw
overlay=$image_prefix.overlay.qcow2
remove_images() { remove_prefixed_images; }
set_traps

half=$((image_bytes / 2))
prefill_chunk=$((64 * 1024 * 1024))
[ "$half" -ge "$prefill_chunk" ] || prefill_chunk=$half

# new_overlay [prefill]: replaces the overlay with an empty one over the template (64 KiB
# clusters, backing format raw); with "prefill", qemu-io then writes its first half (pattern
# 0x5a, 64 MiB per write), so a read over the whole disk hits overlay and template alike.
new_overlay() {
  rm -f "$overlay"
  if [ "$OVERLAY_TOOL" = thinline ]; then
    "$THINLINE_BIN" image create -f qcow2 --backing "$template" --backing-format raw \
      --cluster-size 64K "$overlay" >/dev/null
  else
    qemu-img create -q -f qcow2 -b "$template" -F raw -o cluster_size=65536 "$overlay"
  fi
  if [ "${1:-}" = prefill ]; then
    local args=() o
    for ((o = 0; o < half; o += prefill_chunk)); do
      args+=(-c "write -q -P 0x5a $o $prefill_chunk")
    done
    qemu-io -f qcow2 "${args[@]}" "$overlay" >/dev/null
  fi
}

# Same page-cache state for every run: flush what earlier runs left dirty, then read the template
# and the overlay (re-populates pages that qemu-nbd --cache=none dropped).
warm_cache() {
  sync -f "$IMAGE_DIR"
  cat "$template" "$overlay" >/dev/null
}

# check_overlay OUT: qemu-img check of the overlay (the server is stopped, so no lock is held),
# its JSON to OUT.check (not .json: the report reads every OUT*.json as fio's), its exit status to
# OUT.check.rc; a failing check is logged here and shown in the report.
check_overlay() {
  local out=$1 rc=0
  qemu-img check -f qcow2 --output=json "$overlay" >"$out.check" 2>"$out.check.err" || rc=$?
  if [ "$rc" -ne 0 ]; then
    log "WARNING: qemu-img check exit $rc for $(basename "$out") (see $out.check, $out.check.err)"
  fi
  echo "$rc" >"$out.check.rc"
}

# --- environment header ---------------------------------------------------------------------
collect_env
qemu_img_ver=$(qemu-img --version 2>&1 | head -n1)
if [ "$OVERLAY_TOOL" = thinline ]; then
  overlay_desc="\`$THINLINE_BIN image create -f qcow2 --backing TEMPLATE --backing-format raw --cluster-size 64K OVERLAY\`"
else
  overlay_desc="\`qemu-img create -f qcow2 -b TEMPLATE -F raw -o cluster_size=65536 OVERLAY\`"
fi

{
  echo "## qcow2 overlays, writes: Thinline vs qemu-nbd ($(date -u '+%Y-%m-%d %H:%M:%S UTC'))"
  echo
  echo "- Host: $(nproc) CPUs ($cpu_model), $mem_total RAM, kernel $(uname -r) ($(uname -m))"
  echo "- Tools: $fio_ver, $qemu_ver, $qemu_img_ver, libnbd $libnbd_ver"
  echo "- Thinline: $thinline_desc; version: $thinline_ver; repo rev: $git_rev"
  echo "- Template: raw, $(numfmt --to=iec-i --suffix=B "$image_bytes"), random data (no zero block), on $fs_type"
  echo "- Overlay: a fresh one before every run, $overlay_desc; for the mixed read job its first half is written first (qemu-io, 64 MiB writes of 0x5a); page cache synced and warmed (template + overlay) before every run"
  echo "- fio: ioengine=nbd over unix socket, whole virtual size, numjobs=$NUMJOBS; write jobs: one pass capped at ${RUNTIME}s, no ramp; read job: ${RUNTIME}s + ramp ${RAMP_TIME}s; no FLUSH/FUA from fio; $rounds_desc, servers interleaved per job"
  echo "- CPU pinning: servers ${SERVER_CPUS:-unpinned}, fio ${FIO_CPUS:-unpinned}; load average before setup: $load_start"
  echo "- Servers (each started fresh per run, on its fresh overlay):"
  printf '%s' "$server_lines" | sed 's/^/  /'
} >"$RESULTS_DIR/header.md"

# --- template -------------------------------------------------------------------------------
log "results: $RESULTS_DIR"
log "writing the $(numfmt --to=iec-i --suffix=B "$image_bytes") raw template $template (random data)"
head -c "$image_bytes" /dev/urandom >"$template"
sync "$template"

# --- runs -----------------------------------------------------------------------------------
# run_one JOB SERVER ROUND
run_one() {
  local job=$1 s=$2 out=$RESULTS_DIR/$1.$2.r$3
  run_log "$job round $3: ${label[$s]}"
  if is_write_job "$job"; then new_overlay; else new_overlay prefill; fi
  warm_cache
  start_run "$s" "$out.server.log" "$overlay" "$image_bytes" || return 0
  start_sampler "$out.peak"
  # --size: the whole virtual disk (the nbd engine's default too, stated so the JSON records it).
  run_fio "$job" "$out" "$job / $s" --size="$image_bytes"
  stop_sampler
  stop_server
  if is_write_job "$job"; then check_overlay "$out"; fi
}
count_runs 1
run_rounds run_one

# --- report ---------------------------------------------------------------------------------
# shellcheck disable=SC2119  # no extra arguments for the table code
write_job_table <<'PY'
results_dir, servers, jobs, labels = job_report_args()
data, rows, out = job_report(results_dir, servers, jobs, labels)
present = [p for p in ["qemu-default", "qemu-uring"] if p in servers]
if present and "thinline" in servers:
    out += ratio_table(["Job"], rows, labels, data, present) + [""]

def rounds(j, s):
    return sorted(n[len(f"{j}.{s}."):].split(".")[0] for n in os.listdir(results_dir)
                  if n.startswith(f"{j}.{s}.r") and n.endswith(".server.log"))

def check_summary(base):
    """The overlay's state after a write run: allocated clusters and qemu-img check's verdict."""
    try:
        rc = int(open(base + ".check.rc").read())
        c = json.load(open(base + ".check"))
    except (OSError, ValueError):
        return None, "no check"
    problems = [f"{c[k]} {k.replace('-', ' ')}" for k in ("corruptions", "leaks", "check-errors")
                if c.get(k)]
    if rc != 0 and not problems:
        problems = [f"exit {rc}"]
    return c.get("allocated-clusters"), ("**" + ", ".join(problems) + "**") if problems else "clean"

def writes_done(base):
    try:
        j = load(base + ".json")["jobs"][0]
    except (OSError, ValueError):
        return None
    return j["write"]["total_ios"]

# Details: per run (round), what the write did to the overlay and what the server cost.
warnings = []
det = ["| Job | Server | Round | Writes | Clusters allocated | qemu-img check | Peak RSS (MiB) | Peak threads |",
       "|---|---|---|---:|---:|---|---:|---:|"]
for j in jobs:
    for s in servers:
        for r in rounds(j, s):
            base = os.path.join(results_dir, f"{j}.{s}.{r}")
            try:
                hwm, thr = open(base + ".peak").read().split()
                rss, threads = f"{int(hwm) / 1024:,.0f}", thr
            except (OSError, ValueError):
                rss, threads = "n/a", "n/a"
            if os.path.exists(base + ".check.rc"):
                alloc, verdict = check_summary(base)
                writes = writes_done(base)
                if verdict != "clean":
                    warnings.append(f"**WARNING: qemu-img check of the overlay after {j} / {labels[s]} "
                                    f"({r}): {verdict.strip('*')}** (see {j}.{s}.{r}.check)")
            else:
                alloc, verdict, writes = None, "— (read job)", None
            det.append(f"| {j} | {labels[s]} | {r} | {fmt_num(writes)} | {fmt_num(alloc)} | {verdict} | "
                       f"{rss} | {threads} |")
out += ["Overlay after each write run (`qemu-img check`; clusters of 64 KiB, so a 4 KiB write "
        "allocates only when it is the first into its cluster) and the server's peak RSS (VmHWM) "
        "and thread count, sampled every 0.2 s:", ""] + det
if warnings:
    out += [""] + warnings
print("\n".join(out))
PY

finish_report
