#!/usr/bin/env bash
# Compare Thinline with qemu-nbd serving the same qcow2, VHD and VMDK images (and a raw reference),
# read-only over unix sockets, using fio's nbd engine (libnbd). All images are made with qemu-img
# convert from one raw base image filled with compressible text. Prints a Markdown report (header
# + tables, every round's IOPS and ratio next to the medians) and keeps the raw fio JSON. See
# benches/README.md.
#
# Usage: benches/compare-formats.sh [--quick] [--repeat N] [--runtime S] [--size SIZE]
#                                    [--formats LIST] [--servers LIST] [--jobs LIST]
#                                    [--placements LIST] [--results-dir DIR] [--require-thinline]
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
#   REPEAT         rounds per format and job, interleaved: each round runs every placement and
#                  server in turn; the tables show every round's IOPS and ratio, their min and
#                  median (default 1)
#   NUMJOBS        fio jobs (= NBD connections) per run (default 1)
#   FORMATS        comma list from: raw,qcow2,qcow2-zlib,qcow2-zstd,vhd,vmdk,vmdk-stream
#                  (default: raw,qcow2,qcow2-zlib,vhd,vmdk,vmdk-stream)
#   SERVERS        comma list from: thinline,qemu-default,qemu-uring (default: all)
#   JOBS           comma list from: randread-4k-qd1,randread-4k-qd32,seqread-4k-qd1,seqread-1m-qd8
#                  (default: all but seqread-4k-qd1, a guest reading a file 4 KiB at a time:
#                  the case where one decoded compressed unit serves several reads)
#   PLACEMENTS     comma list of CPU placements (taskset), every one in every round (default:
#                  unpinned; custom when SERVER_CPUS or FIO_CPUS is set); as in compare-servers.sh:
#                    unpinned  no taskset
#                    split     fio on the last CPU this process may use, the server on the others
#                    shared    the server and fio both on the first CPU (0)
#                    custom    the server on SERVER_CPUS, fio on FIO_CPUS (empty: unpinned)
#   RESULTS_DIR    default <repo>/target/bench-results/compare-formats-<timestamp>
#   IMAGE_DIR      where the scratch images go (default: <repo>/target/bench-tmp); must be a
#                  filesystem with O_DIRECT (not tmpfs) for qemu-nbd --cache=none
#   KEEP_IMAGES=1  do not delete the scratch images at exit
#   READY_TIMEOUT  seconds to wait for a server to answer (default 30)
#   SERVER_CPUS, FIO_CPUS  taskset CPU lists of the placement custom (e.g. 1 and 0); setting
#                  either makes custom the only placement unless PLACEMENTS names others
set -euo pipefail

bench_name=compare-formats
# shellcheck source=lib/bench-common.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/bench-common.sh"

cli_formats='' cli_jobs=''
while [ $# -gt 0 ]; do
  case "$1" in
    --formats) cli_formats=${2:?--formats needs a value}; shift 2 ;;
    --jobs) cli_jobs=${2:?--jobs needs a value}; shift 2 ;;
    --placements) cli_placements=${2:?--placements needs a value}; shift 2 ;;
    *) parse_common_opt "$@"; shift "$opt_args" ;;
  esac
done

known_servers=thinline,qemu-default,qemu-uring
read_settings "$known_servers"
select_placements unpinned
FORMATS=${cli_formats:-${FORMATS:-raw,qcow2,qcow2-zlib,vhd,vmdk,vmdk-stream}}
JOBS=${cli_jobs:-${JOBS:-randread-4k-qd1,randread-4k-qd32,seqread-1m-qd8}}
check_tools fio nbdinfo qemu-nbd qemu-img python3 numfmt

# --- formats --------------------------------------------------------------------------------
# add_format KEY LABEL QEMU_FMT CONVERT: format KEY, shown as LABEL in the table, is qemu's format
# QEMU_FMT (qemu-nbd -f, qemu-img -f) and made from the raw base by `qemu-img convert CONVERT`
# ("" = the base itself); known_formats lists the keys.
declare -A fmt_label fmt_qemu fmt_convert
known_formats=
add_format() {
  fmt_label[$1]=$2 fmt_qemu[$1]=$3 fmt_convert[$1]=$4
  known_formats+=${known_formats:+,}$1
}
add_format raw "raw" raw ""
add_format qcow2 "qcow2" qcow2 "-O qcow2"
add_format qcow2-zlib "qcow2 zlib" qcow2 "-O qcow2 -c -o compression_type=zlib"
add_format qcow2-zstd "qcow2 zstd" qcow2 "-O qcow2 -c -o compression_type=zstd"
# force_size: keep the exact size (qemu otherwise rounds a VHD up to a CHS geometry).
add_format vhd "vhd dynamic" vpc "-O vpc -o subformat=dynamic,force_size=on"
add_format vmdk "vmdk sparse" vmdk "-O vmdk -o subformat=monolithicSparse"
add_format vmdk-stream "vmdk stream" vmdk "-O vmdk -o subformat=streamOptimized"

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
add_qemu_servers "-r -f {FMT}"
# -r: raw would otherwise be served read-write; qcow2, VHD and VMDK are always read-only.
set_thinline_cmd "serve -r --socket {SOCK} {IMAGE}"
select_servers "$known_servers" "${cmd[qemu-default]}"

# --- jobs (all read-only) -------------------------------------------------------------------
declare -A job_args
job_args[randread-4k-qd1]="--rw=randread --bs=4k --iodepth=1"
job_args[randread-4k-qd32]="--rw=randread --bs=4k --iodepth=32"
job_args[seqread-4k-qd1]="--rw=read --bs=4k --iodepth=1"
job_args[seqread-1m-qd8]="--rw=read --bs=1M --iodepth=8"
select_jobs randread-4k-qd1,randread-4k-qd32,seqread-4k-qd1,seqread-1m-qd8

# --- state + cleanup ------------------------------------------------------------------------
init_state
set_image_prefix
base=$image_prefix.base.raw
declare -A image_of vsize_of
remove_images() { remove_prefixed_images; }
set_traps

# Same page-cache state for every run: read the whole image file (also re-populates pages that
# an earlier qemu-nbd --cache=none run may have dropped).
warm_cache() {
  cat "$1" >/dev/null
}

# --- environment header ---------------------------------------------------------------------
collect_env
qemu_img_ver=$(qemu-img --version 2>&1 | head -n1)

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

{
  echo "## Image formats: Thinline vs qemu-nbd ($(date -u '+%Y-%m-%d %H:%M:%S UTC'))"
  echo
  echo "- Host: $(nproc) CPUs ($cpu_model), $mem_total RAM, kernel $(uname -r) ($(uname -m))"
  echo "- Tools: $fio_ver, $qemu_ver, $qemu_img_ver, libnbd $libnbd_ver"
  echo "- Thinline: $thinline_desc; version: $thinline_ver; repo rev: $git_rev"
  echo "- Images: $(numfmt --to=iec-i --suffix=B "$image_bytes") virtual, made from one raw base filled with compressible text (about 3× with zlib), on $fs_type, page cache warmed before every run:"
  printf '%s' "$image_lines" | sed 's/^/  /'
  echo "- fio: ioengine=nbd over unix socket, whole virtual size, numjobs=$NUMJOBS, runtime=${RUNTIME}s + ramp ${RAMP_TIME}s, $rounds_desc; per format and job, each round runs every placement and, in each, every server in turn"
  echo "- CPU placements (taskset; this process may use CPUs $allowed_cpu_list); load average before image setup: $load_start"
  printf '%s' "$placement_lines" | sed 's/^/  /'
  echo "- Servers (each started fresh per run; {FMT} is qemu's format name):"
  printf '%s' "$server_lines" | sed 's/^/  /'
} >"$RESULTS_DIR/header.md"

# --- runs -----------------------------------------------------------------------------------
# run_one JOB SERVER ROUND: one run on the format $f, in the placement $placement.
run_one() {
  local job=$1 s=$2 out=$RESULTS_DIR/$f.$1.$placement.$2.r$3
  run_log "$f $job round $3, $placement: ${label[$s]}"
  warm_cache "${image_of[$f]}"
  start_run "$s" "$out.server.log" "${image_of[$f]}" "${vsize_of[$f]}" "$f" "${fmt_qemu[$f]}" || return 0
  # --size: the whole virtual disk (the nbd engine's default too, stated so the JSON records it).
  run_fio "$job" "$out" "$f $job / $s" --size="${vsize_of[$f]}"
  stop_server
}
count_runs ${#formats[@]}
log_estimate
for f in "${formats[@]}"; do
  run_rounds run_one
done

# --- report ---------------------------------------------------------------------------------
server_keys=$(IFS=,; echo "${servers[*]}")
format_keys=$(IFS=,; echo "${formats[*]}")
labels_tsv=$(server_labels_tsv
             for f in "${formats[@]}"; do printf '%s\t%s\n' "$f" "${fmt_label[$f]}"; done)
write_table "$RESULTS_DIR" "$server_keys" "$format_keys" "${job_names[*]}" "$labels_tsv" <<'PY'
results_dir, server_keys, format_keys, job_names, labels_tsv = sys.argv[1:6]
servers = keys(server_keys)
formats = keys(format_keys)
jobs = job_names.split()
labels = tsv_dict(labels_tsv)
peers = ["qemu-default", "qemu-uring"]

rows = placement_rows([([labels[f], j], (f, j)) for f in formats for j in jobs])
data = row_data(results_dir, rows, servers)
lead = lead_names(["Format", "Job"])
out = main_table(lead, rows, servers, labels, data)
present = [p for p in peers if p in servers]
if present:
    out += ratio_table(lead, rows, labels, data, present)
print("\n".join(out))
PY

finish_report
