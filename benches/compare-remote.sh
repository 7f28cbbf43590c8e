#!/usr/bin/env bash
# Compare Thinline serving a remote raw template over HTTP (`thinline serve http://...`) with
# nbdkit's curl plugin, alone and with nbdkit's readahead filter, all reading the same image from
# the same nginx through the same latency proxy (examples/latency-proxy.rs), which adds a fixed
# delay before every response head. Optionally (S3=1) also as an S3 object on moto_server. Each
# server is driven with fio's nbd engine (libnbd) over a unix socket. Prints a Markdown report
# (header + tables, ratios thinline ÷ nbdkit) and keeps the raw fio JSON. See benches/README.md.
#
# Usage: benches/compare-remote.sh [--quick] [--repeat N] [--runtime S] [--size SIZE]
#                                   [--latencies LIST] [--jobs LIST] [--servers LIST] [--s3]
#                                   [--results-dir DIR] [--require-thinline]
#
# Environment (command-line options win):
#   THINLINE_BIN   thinline binary (default: target/release/thinline under the repo root;
#                  relative paths: current directory if present there, else repo root); run as
#                  "$THINLINE_BIN serve -r $THINLINE_ARGS --socket SOCK URL"
#   THINLINE_ARGS  extra serve options, e.g. "--fetch-unit 256K --readahead 64M" (default none)
#   THINLINE_CMD   replaces the whole thinline command line; {SOCK} and {IMAGE} (the URL) are
#                  substituted, e.g. a stand-in to test this script:
#                  THINLINE_CMD='nbdkit -f -r --exit-with-parent -U {SOCK} curl url={IMAGE}'
#   LATENCIES      comma list of first-byte latencies in ms added by the proxy (default 0,20)
#   DIRECT         1 (default): also run every server against nginx without the proxy, to show
#                  what the proxy costs; 0: skip that group
#   S3             1: add an S3 row group, thinline "s3://BUCKET/KEY --s3-endpoint URL" and
#                  nbdkit curl on the object's path-style URL, against moto_server through the
#                  proxy; skipped with a message when moto_server is not on PATH or thinline does
#                  not accept s3:// yet (probe: thinline image info). Default 0 (--s3: 1)
#   JOBS           comma list from: seqread-1m-qd8,randread-4k-qd32,randread-4k-qd1
#                  (default: seqread-1m-qd8,randread-4k-qd32)
#   SERVERS        comma list from: thinline,nbdkit-curl,nbdkit-readahead,nbdkit-ra-nocache
#                  (default: thinline,nbdkit-curl,nbdkit-readahead)
#   RUNTIME        seconds per random-read run (default 10; --quick: 3)
#   RAMP_TIME      fio ramp_time of the random-read runs (default 0: the cold start counts)
#   SEQ_MAX_TIME   the sequential job reads the whole image once; it stops after this many
#                  seconds if that takes longer (default 120)
#   IMAGE_SIZE     size of the random-data template, K/M/G suffixes are binary (default 1G;
#                  --quick: 256M)
#   REPEAT         rounds per row group and job; the tables show per-metric medians (default 1)
#   NUMJOBS        fio jobs (= NBD connections) per run (default 1)
#   RESULTS_DIR    default <repo>/target/bench-results/compare-remote-<timestamp>
#   IMAGE_DIR      where the scratch folder (image, nginx files) goes (default:
#                  <repo>/target/bench-tmp)
#   KEEP_IMAGES=1  do not delete the scratch folder at exit
#   LATENCY_PROXY  the proxy binary (default target/release/examples/latency-proxy; built with
#                  cargo when missing)
#   READY_TIMEOUT  seconds to wait for a server to answer (default 30)
#   SERVER_CPUS, FIO_CPUS  optional taskset CPU lists to pin servers / fio
set -euo pipefail

bench_name=compare-remote
# shellcheck source=lib/bench-common.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/bench-common.sh"

cli_latencies='' cli_jobs='' cli_s3=''
while [ $# -gt 0 ]; do
  case "$1" in
    --latencies) cli_latencies=${2:?--latencies needs a value}; shift 2 ;;
    --jobs) cli_jobs=${2:?--jobs needs a value}; shift 2 ;;
    --s3) cli_s3=1; shift ;;
    *) parse_common_opt "$@"; shift "$opt_args" ;;
  esac
done

known_servers=thinline,nbdkit-curl,nbdkit-readahead,nbdkit-ra-nocache
# Cold caches are the point here: by default nothing of the random-read runs goes unmeasured.
RAMP_TIME=${RAMP_TIME:-0}
read_settings thinline,nbdkit-curl,nbdkit-readahead
LATENCIES=${cli_latencies:-${LATENCIES:-0,20}}
JOBS=${cli_jobs:-${JOBS:-seqread-1m-qd8,randread-4k-qd32}}
DIRECT=${DIRECT:-1}
S3=${cli_s3:-${S3:-0}}
SEQ_MAX_TIME=${SEQ_MAX_TIME:-120}
THINLINE_ARGS=${THINLINE_ARGS:-}
LATENCY_PROXY=${LATENCY_PROXY:-$repo_root/target/release/examples/latency-proxy}
[[ $SEQ_MAX_TIME =~ ^[1-9][0-9]*$ ]] || die "SEQ_MAX_TIME must be a positive integer"
IFS=, read -r -a latencies <<<"$LATENCIES"
[ ${#latencies[@]} -gt 0 ] || die "LATENCIES is empty"
for l in "${latencies[@]}"; do
  [[ $l =~ ^[0-9]+$ ]] || die "LATENCIES must be integers (milliseconds), got '$l'"
done
check_tools fio nbdinfo nbdkit nginx curl python3 numfmt

# --- servers --------------------------------------------------------------------------------
# {IMAGE} is the URL the server reads: nginx directly, the proxy in front of nginx, or (S3 row
# group) the proxy in front of moto. All are read-only; nbdkit's curl plugin is
# serialize_requests in 1.32 (one request at a time, no connections= option before 1.34).
declare -A label cmd
label[thinline]="thinline"
label[nbdkit-curl]="nbdkit curl"
label[nbdkit-readahead]="nbdkit curl+readahead"
label[nbdkit-ra-nocache]="nbdkit curl+readahead, no cache"
nbdkit_base="nbdkit -f -r --exit-with-parent -U {SOCK}"
cmd[nbdkit-curl]="$nbdkit_base curl url={IMAGE}"
# The readahead filter prefetches with .cache requests, which the curl plugin does not
# implement: without the cache filter below it, it warns and does nothing (nbdkit-ra-nocache
# shows that).
cmd[nbdkit-readahead]="$nbdkit_base --filter=readahead --filter=cache curl url={IMAGE}"
cmd[nbdkit-ra-nocache]="$nbdkit_base --filter=readahead curl url={IMAGE}"
thinline_serve="serve -r ${THINLINE_ARGS:+$THINLINE_ARGS }--socket {SOCK} {IMAGE}"
set_thinline_cmd "$thinline_serve"
select_servers "$known_servers" 'nbdkit -f -r --exit-with-parent -U {SOCK} curl url={IMAGE}'

# --- jobs (read-only) -----------------------------------------------------------------------
# job_metric: what the main table shows for the job (fio's IOPS or MiB/s).
declare -A job_args job_timing job_metric
job_args[seqread-1m-qd8]="--rw=read --bs=1M --iodepth=8"
# One pass over the whole image (fio stops at the end of --size), not time_based: a second pass
# would measure Thinline's memory, not the remote fetches.
job_timing[seqread-1m-qd8]="--runtime=$SEQ_MAX_TIME --ramp_time=0"
job_metric[seqread-1m-qd8]=mibs
job_args[randread-4k-qd32]="--rw=randread --bs=4k --iodepth=32"
job_metric[randread-4k-qd32]=iops
job_args[randread-4k-qd1]="--rw=randread --bs=4k --iodepth=1"
job_metric[randread-4k-qd1]=iops
select_jobs seqread-1m-qd8,randread-4k-qd32,randread-4k-qd1

# --- state + cleanup ------------------------------------------------------------------------
init_state
IMAGE_DIR=$(cd "$IMAGE_DIR" && pwd)
work_dir=$(mktemp -d "$IMAGE_DIR/compare-remote.XXXXXX")
# nginx's workers run as another user unless `user root;` applies: make the files readable.
chmod 755 "$work_dir"
image=$work_dir/www/template.raw
access_log=$RESULTS_DIR/nginx-access.log
helper_pids=()

stop_helpers() {
  local pid
  for pid in "${helper_pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${helper_pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  helper_pids=()
}
# Run by cleanup at exit: the helpers (nginx, proxies, moto) go first, then the scratch folder.
remove_images() {
  stop_helpers
  if [ "${KEEP_IMAGES:-0}" != 1 ]; then
    rm -rf "$work_dir"
  else
    log "kept $work_dir"
  fi
}
set_traps

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_http URL WHAT [SECONDS]: until URL answers HTTP at all (any status).
wait_http() {
  local deadline=$((SECONDS + ${3:-30}))
  until curl -s -o /dev/null "$1"; do
    [ $SECONDS -lt $deadline ] || die "$2 did not answer on $1"
    sleep 0.2
  done
}

# start_proxy UPSTREAM_PORT LATENCY_MS: starts a latency proxy; sets proxy_port.
start_proxy() {
  local out=$work_dir/proxy-$1-$2.log deadline=$((SECONDS + 10))
  "$LATENCY_PROXY" --upstream "$1" --listen 0 --latency-ms "$2" </dev/null >"$out" 2>&1 &
  helper_pids+=($!)
  until proxy_port=$(sed -n 's/^listening on 127\.0\.0\.1:\([0-9]*\)$/\1/p' "$out") && [ -n "$proxy_port" ]; do
    [ $SECONDS -lt $deadline ] || die "latency proxy did not start: $(cat "$out")"
    sleep 0.1
  done
}

# Same page-cache state for every run: nginx serves the image from memory.
warm_cache() {
  cat "$image" >/dev/null
}

# --- environment header ---------------------------------------------------------------------
collect_env
nbdkit_ver=$(nbdkit --version 2>&1 | head -n1)
nginx_ver=$(nginx -v 2>&1 | sed 's/^nginx version: //')

# --- latency proxy --------------------------------------------------------------------------
if [ ! -x "$LATENCY_PROXY" ]; then
  command -v cargo >/dev/null || die "latency proxy $LATENCY_PROXY missing and no cargo to build it"
  log "building the latency proxy (cargo build --release --example latency-proxy)"
  cargo build --quiet --release --example latency-proxy --manifest-path "$repo_root/Cargo.toml" ||
    die "building examples/latency-proxy.rs failed"
  LATENCY_PROXY=$repo_root/target/release/examples/latency-proxy
fi

# --- image and nginx ------------------------------------------------------------------------
log "results: $RESULTS_DIR"
log "writing the $(numfmt --to=iec-i --suffix=B "$image_bytes") random template $image"
mkdir -p "$work_dir/www" "$work_dir/nginx"
chmod 755 "$work_dir/www"
head -c "$image_bytes" /dev/urandom >"$image"
chmod 644 "$image"

nginx_port=$(free_port)
nginx_user=
[ "$(id -u)" != 0 ] || nginx_user="user root;"
: >"$access_log"
cat >"$work_dir/nginx/nginx.conf" <<EOF
$nginx_user
daemon off;
worker_processes 2;
pid $work_dir/nginx/nginx.pid;
error_log $work_dir/nginx/error.log warn;
events { worker_connections 1024; }
http {
  # One line per request: the range asked for and the body bytes sent, for the per-run counts.
  log_format bench '\$msec \$connection \$request_method \$status \$body_bytes_sent "\$http_range" \$request_time';
  access_log $access_log bench;
  client_body_temp_path $work_dir/nginx/body;
  proxy_temp_path $work_dir/nginx/proxy;
  fastcgi_temp_path $work_dir/nginx/fastcgi;
  uwsgi_temp_path $work_dir/nginx/uwsgi;
  scgi_temp_path $work_dir/nginx/scgi;
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  keepalive_timeout 300s;
  keepalive_requests 1000000;
  default_type application/octet-stream;
  server {
    listen 127.0.0.1:$nginx_port;
    root $work_dir/www;
  }
}
EOF
nginx -p "$work_dir/nginx" -c "$work_dir/nginx/nginx.conf" -e "$work_dir/nginx/error.log" \
  </dev/null >"$work_dir/nginx/stdout.log" 2>&1 &
helper_pids+=($!)
wait_http "http://127.0.0.1:$nginx_port/" nginx
code=$(curl -s -o /dev/null -w '%{http_code}' -r 0-0 "http://127.0.0.1:$nginx_port/template.raw")
[ "$code" = 206 ] || die "nginx answers $code for a range of the image (expected 206); see $work_dir/nginx/error.log"

# --- row groups -----------------------------------------------------------------------------
# A group: a source and a latency. group_url[g,server] is the URL that server reads.
declare -A group_label group_url group_src group_lat
groups=()
add_group() { # KEY SOURCE LATENCY LABEL
  groups+=("$1"); group_src[$1]=$2; group_lat[$1]=$3; group_label[$1]=$4
}
if [ "$DIRECT" = 1 ]; then
  add_group http-direct http direct "HTTP nginx, no proxy"
  for s in "${servers[@]}"; do group_url[http-direct,$s]=http://127.0.0.1:$nginx_port/template.raw; done
fi
for l in "${latencies[@]}"; do
  start_proxy "$nginx_port" "$l"
  add_group "http-$l" http "$l" "HTTP nginx, +$l ms"
  for s in "${servers[@]}"; do group_url[http-$l,$s]=http://127.0.0.1:$proxy_port/template.raw; done
done

# --- S3 (optional) --------------------------------------------------------------------------
s3_note="not run (S3=1 adds it)"
s3_bucket=thinline-bench
s3_key=template.raw
s3_setup() {
  command -v moto_server >/dev/null || { s3_note="skipped: moto_server not on PATH"; return 1; }
  if [ "$have_thinline" != 1 ] || [ -n "${THINLINE_CMD:-}" ]; then
    s3_note="skipped: needs the thinline binary (not THINLINE_CMD)"; return 1
  fi
  # moto does not check signatures; thinline signs with whatever credentials it finds.
  export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-testing}
  export AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-testing}
  export AWS_REGION=${AWS_REGION:-us-east-1}
  local moto_port
  moto_port=$(free_port)
  moto_server -H 127.0.0.1 -p "$moto_port" </dev/null >"$work_dir/moto.log" 2>&1 &
  helper_pids+=($!)
  wait_http "http://127.0.0.1:$moto_port/" moto_server 90
  log "uploading the template to moto (s3://$s3_bucket/$s3_key)"
  curl -sf -o /dev/null -X PUT "http://127.0.0.1:$moto_port/$s3_bucket" || die "moto: cannot create bucket $s3_bucket"
  # public-read: nbdkit's curl plugin reads the object's path-style URL without signing.
  curl -sf -o /dev/null -H 'x-amz-acl: public-read' -T "$image" "http://127.0.0.1:$moto_port/$s3_bucket/$s3_key" ||
    die "moto: upload failed"
  local l first=1 probe
  for l in "${latencies[@]}"; do
    start_proxy "$moto_port" "$l"
    if [ "$first" = 1 ]; then
      first=0
      if ! probe=$(timeout 60 "$THINLINE_BIN" image info --s3-endpoint "http://127.0.0.1:$proxy_port" \
          "s3://$s3_bucket/$s3_key" 2>&1); then
        s3_note="skipped: thinline does not read s3:// here ($(printf '%s' "$probe" | grep -v '^$' | tail -n1))"
        return 1
      fi
    fi
    add_group "s3-$l" s3 "$l" "S3 moto, +$l ms"
    local s
    for s in "${servers[@]}"; do
      if [ "$s" = thinline ]; then
        group_url[s3-$l,$s]=s3://$s3_bucket/$s3_key
      else
        group_url[s3-$l,$s]=http://127.0.0.1:$proxy_port/$s3_bucket/$s3_key
      fi
    done
    group_s3_endpoint[s3-$l]=http://127.0.0.1:$proxy_port
  done
  s3_note="moto_server ($(command -v moto_server)), bucket $s3_bucket, thinline with --s3-endpoint (the proxy in front of moto); nbdkit reads the public object's path-style URL"
}
declare -A group_s3_endpoint
if [ "$S3" = 1 ]; then
  if ! s3_setup; then
    log "S3 row group $s3_note"
  fi
fi

# --- header ---------------------------------------------------------------------------------
group_lines=
for g in "${groups[@]}"; do
  group_lines+="- ${group_label[$g]}: \`${group_url[$g,${servers[0]}]}\`"$'\n'
done
{
  echo "## Remote templates: Thinline vs nbdkit curl ($(date -u '+%Y-%m-%d %H:%M:%S UTC'))"
  echo
  echo "- Host: $(nproc) CPUs ($cpu_model), $mem_total RAM, kernel $(uname -r) ($(uname -m))"
  echo "- Tools: $fio_ver, $nbdkit_ver, $nginx_ver, libnbd $libnbd_ver"
  echo "- Thinline: $thinline_desc; version: $thinline_ver; repo rev: $git_rev"
  echo "- Template: $(numfmt --to=iec-i --suffix=B "$image_bytes") of random data, raw, served by nginx (sendfile, keep-alive) from the page cache on 127.0.0.1"
  echo "- Latency: examples/latency-proxy.rs (the tests' fault proxy) waits the given time before forwarding each request, so every response head arrives that much later; one thread per connection"
  echo "- fio: ioengine=nbd over unix socket, numjobs=$NUMJOBS; seqread: one pass over the whole image (cap ${SEQ_MAX_TIME}s); randread: ${RUNTIME}s, ramp ${RAMP_TIME}s; every server started fresh (cold) per run; $rounds_desc, servers interleaved per row group and job"
  echo "- CPU pinning: servers ${SERVER_CPUS:-unpinned}, fio ${FIO_CPUS:-unpinned}; load average before setup: $load_start"
  echo "- Row groups (URL as the first server reads it):"
  printf '%s' "$group_lines" | sed 's/^/  /'
  echo "- S3 row group: $s3_note"
  echo "- Servers (thinline in S3 groups: \`serve -r --s3-endpoint URL ... s3://$s3_bucket/$s3_key\`):"
  printf '%s' "$server_lines" | sed 's/^/  /'
} >"$RESULTS_DIR/header.md"

# --- runs -----------------------------------------------------------------------------------
# upstream_counts OUT OFFSET: the access-log lines since byte OFFSET (this run's requests to
# nginx) summed up into OUT.upstream: "requests bytes connections" (%.0f: mawk's %d stops at 2^31).
upstream_counts() {
  tail -c +"$(($2 + 1))" "$access_log" |
    awk '{ n++; b += $5; c[$2] = 1 } END { printf "%d %.0f %d\n", n, b, length(c) }' >"$1.upstream"
}

# run_one JOB SERVER ROUND: one run in the row group $g.
run_one() {
  local job=$1 s=$2 out=$RESULTS_DIR/$g.$1.$2.r$3 log_offset
  run_log "${group_label[$g]}, $job, round $3: ${label[$s]}"
  warm_cache
  log_offset=$(stat -c %s "$access_log")
  start_run "$s" "$out.server.log" "${group_url[$g,$s]}" "$image_bytes" || return 0
  run_fio "$job" "$out" "$g $job / $s" --size="$image_bytes"
  stop_server
  [ "${group_src[$g]}" != http ] || upstream_counts "$out" "$log_offset"
}
count_runs ${#groups[@]}
for g in "${groups[@]}"; do
  if [ "${group_src[$g]}" = s3 ]; then
    set_thinline_cmd "serve -r --s3-endpoint ${group_s3_endpoint[$g]} ${THINLINE_ARGS:+$THINLINE_ARGS }--socket {SOCK} {IMAGE}"
  else
    set_thinline_cmd "$thinline_serve"
  fi
  run_rounds run_one
done

# --- report ---------------------------------------------------------------------------------
server_keys=$(IFS=,; echo "${servers[*]}")
group_tsv=$(for g in "${groups[@]}"; do printf '%s\t%s\t%s\n' "$g" "${group_lat[$g]}" "${group_label[$g]}"; done)
labels_tsv=$(server_labels_tsv)
jobs_tsv=$(for j in "${job_names[@]}"; do printf '%s\t%s\n' "$j" "${job_metric[$j]}"; done)
write_table "$RESULTS_DIR" "$server_keys" "$group_tsv" "$jobs_tsv" "$labels_tsv" "$s3_note" <<'PY'
results_dir, server_keys, group_tsv, jobs_tsv, labels_tsv, s3_note = sys.argv[1:7]
servers = keys(server_keys)
groups = [line.split("\t") for line in group_tsv.splitlines() if line]
jobs = [line.split("\t") for line in jobs_tsv.splitlines() if line]
labels = tsv_dict(labels_tsv)
peers = [s for s in servers if s != "thinline"]

def upstream(prefix):
    """Median requests, bytes and connections to nginx over the rounds, or None."""
    rows = []
    for name in sorted(os.listdir(results_dir)):
        if name.startswith(prefix) and name.endswith(".upstream"):
            with open(os.path.join(results_dir, name)) as f:
                rows.append([int(x) for x in f.read().split()])
    if not rows:
        return None
    return [statistics.median(col) for col in zip(*rows)]

data = {(g[0], j, s): metrics(results_dir, f"{g[0]}.{j}.{s}.r")
        for g in groups for j, _ in jobs for s in servers}

def value(m, metric):
    if m is None:
        return "failed"
    return f"{fmt_num(m['mibs'], 1)} MiB/s" if metric == "mibs" else f"{fmt_num(m['iops'])} IOPS"

def vratio(a, b, metric):
    if not a or not b or not b[metric]:
        return "n/a"
    return f"{a[metric] / b[metric]:.2f}×"

out = ["Sequential reads: MiB/s of one pass over the image; random reads: IOPS. "
       "Ratios thinline ÷ nbdkit (>1.00× = thinline faster).", ""]
head = ["Row group", "Job"]
if "thinline" in servers:
    head.append("thinline")
for p in peers:
    head.append(labels[p])
    if "thinline" in servers:
        head.append(f"thinline ÷ {labels[p]}")
out.append("| " + " | ".join(head) + " |")
out.append("|---|---|" + "---:|" * (len(head) - 2))
for g, _, glabel in groups:
    for j, metric in jobs:
        tl = data.get((g, j, "thinline"))
        cells = [glabel, j]
        if "thinline" in servers:
            cells.append(value(tl, metric))
        for p in peers:
            cells.append(value(data[(g, j, p)], metric))
            if "thinline" in servers:
                cells.append(vratio(tl, data[(g, j, p)], metric))
        out.append("| " + " | ".join(cells) + " |")

# Proxy overhead: the same server and job, proxy at 0 ms vs nginx directly.
lat = {g: l for g, l, _ in groups}
if "http-direct" in lat and "http-0" in lat:
    parts = []
    for s in servers:
        for j, metric in jobs:
            d, p = data.get(("http-direct", j, s)), data.get(("http-0", j, s))
            parts.append(f"{labels[s]} {j} {vratio(p, d, metric)}")
    out += ["", "Proxy overhead (proxy at 0 ms ÷ nginx directly, 1.00× = none): " + "; ".join(parts) + "."]
out += ["", f"S3 row group: {s3_note}.", ""]

out += ["Details (medians over rounds; HTTP requests and bytes from nginx's access log, readiness "
        "probe included; n/a for S3):", ""]
out.append("| Row group | Job | Server | IOPS | MiB/s | Mean lat (µs) | p99 lat (µs) | "
           "HTTP requests | MiB fetched | KiB/request | connections |")
out.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for g, _, glabel in groups:
    for j, _ in jobs:
        for s in servers:
            m = data[(g, j, s)]
            u = upstream(f"{g}.{j}.{s}.r")
            ucells = ["n/a"] * 4
            if u:
                n, b, c = u
                ucells = [fmt_num(n), fmt_num(b / 1048576, 1),
                          fmt_num(b / n / 1024, 1) if n else "n/a", fmt_num(c)]
            if m is None:
                mcells = ["failed", "", "", ""]
            else:
                mcells = [fmt_num(m["iops"]), fmt_num(m["mibs"], 1), fmt_num(m["mean_us"], 1),
                          fmt_num(m["p99_us"], 1)]
            out.append(f"| {glabel} | {j} | {labels[s]} | " + " | ".join(mcells + ucells) + " |")
print("\n".join(out))
PY

finish_report
