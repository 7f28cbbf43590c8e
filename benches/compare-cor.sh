#!/usr/bin/env bash
# "Booting from a remote template": replays a recorded boot read trace
# (benches/traces/debian-boot.csv, see benches/record-boot-trace.sh) with
# examples/replay-trace.rs against the template behind a slow upstream, through Thinline's
# copy-on-read proxy and the alternatives, and prints a Markdown table. See benches/README.md.
#
# The upstream is `nbdkit --filter=log --filter=delay [--filter=rate] file IMG rdelay=Nms` on a
# unix socket, with delay-extents=Nms too (the delay is per request, requests run in parallel;
# the log filter counts what reaches the upstream). For every latency N and every round, each configuration runs once:
#
#   nocache     the replay reads the delayed upstream directly
#   fullcopy    nbdcopy the whole template from the upstream to a local file, then replay
#               against `thinline serve` of that file (reported: copy + replay)
#   cold        `thinline proxy --upstream UP --cache NEW`, replay
#   warm        the proxy restarted on the cache the cold run filled, replay
#   prefetch    `thinline proxy ... --prefetch` on a new cache, replay at once
#   nbdkit-cow  `nbdkit --filter=cow nbd socket=UP cow-on-read=true`
#   nbdkit-cache `nbdkit --filter=cache nbd socket=UP cache-on-read=true`
#   local       `thinline serve` of the image file itself, no upstream (the baseline)
#
# Usage: benches/compare-cor.sh [--repeat N] [--latencies LIST] [--configs LIST]
#                               [--results-dir DIR]
#
# Environment (command-line options win):
#   TRACE        the trace (default benches/traces/debian-boot.csv)
#   IMAGE        a copy of the traced image to serve (it must have the size the trace header
#                names); default: a scratch image of that size filled with random data (the
#                content does not matter for timing, and random data has no holes, so full
#                copies and prefetch move the whole virtual size, as from an HTTP/S3 template
#                that reports no extents)
#   LATENCIES    comma list of upstream first-byte latencies in ms (default 5,20,50)
#   RATE         upstream bandwidth limit for nbdkit's rate filter, e.g. 1G (bits/s, shared by
#                all connections); default empty: no rate filter
#   CONFIGS      comma list of configurations above (default: all, in that order)
#   REPEAT       rounds; the table shows per-configuration medians (default 1)
#   GAP_SCALE    multiplies the trace's think times (default 0.05: the recorded TCG boot's
#                86 s of think time become 4.3 s, about a minimal Debian's boot under KVM;
#                1: as recorded under TCG; 0: I/O only)
#   VERIFY       1 (default): the replay compares every byte read with the image (--verify)
#   PROXY_ARGS   extra `thinline proxy` options (default none)
#   THINLINE_BIN thinline binary (default target/release/thinline; CARGO_TARGET_DIR honoured)
#   REPLAY_BIN   replay tool (default target/release/examples/replay-trace; built when missing)
#   RESULTS_DIR  default <repo>/target/bench-results/compare-cor-<timestamp>
#   WORK_DIR     scratch folder for the image, copies, caches and nbdkit's overlays (default
#                <repo>/target/bench-tmp; a tmpfs such as /dev/shm/bench keeps a shared disk's noise out;
#                needs about 3× the image size)
#   READY_TIMEOUT seconds to wait for a server to answer (default 30)
set -euo pipefail

bench_name=compare-cor
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
die() { echo "$bench_name: $*" >&2; exit 1; }
log() { echo "$bench_name: $*" >&2; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

cli_repeat='' cli_latencies='' cli_configs='' cli_results=''
while [ $# -gt 0 ]; do
  case "$1" in
    --repeat) cli_repeat=${2:?--repeat needs a value}; shift 2 ;;
    --latencies) cli_latencies=${2:?--latencies needs a value}; shift 2 ;;
    --configs) cli_configs=${2:?--configs needs a value}; shift 2 ;;
    --results-dir) cli_results=${2:?--results-dir needs a value}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

all_configs=nocache,fullcopy,cold,warm,prefetch,nbdkit-cow,nbdkit-cache,local
target_dir=${CARGO_TARGET_DIR:-$repo_root/target}
TRACE=${TRACE:-$repo_root/benches/traces/debian-boot.csv}
LATENCIES=${cli_latencies:-${LATENCIES:-5,20,50}}
CONFIGS=${cli_configs:-${CONFIGS:-$all_configs}}
REPEAT=${cli_repeat:-${REPEAT:-1}}
RATE=${RATE:-}
GAP_SCALE=${GAP_SCALE:-0.05}
VERIFY=${VERIFY:-1}
PROXY_ARGS=${PROXY_ARGS:-}
THINLINE_BIN=${THINLINE_BIN:-$target_dir/release/thinline}
REPLAY_BIN=${REPLAY_BIN:-$target_dir/release/examples/replay-trace}
RESULTS_DIR=${cli_results:-${RESULTS_DIR:-$repo_root/target/bench-results/compare-cor-$(date +%Y%m%d-%H%M%S)}}
WORK_DIR=${WORK_DIR:-$repo_root/target/bench-tmp}
READY_TIMEOUT=${READY_TIMEOUT:-30}

[[ $REPEAT =~ ^[1-9][0-9]*$ ]] || die "REPEAT must be a positive integer"
IFS=, read -r -a latencies <<<"$LATENCIES"
for l in "${latencies[@]}"; do [[ $l =~ ^[0-9]+$ ]] || die "LATENCIES must be integers (ms), got '$l'"; done
IFS=, read -r -a configs <<<"$CONFIGS"
for c in "${configs[@]}"; do
  [[ ,$all_configs, == *,$c,* ]] || die "unknown configuration '$c' (known: $all_configs)"
done
for t in nbdkit nbdinfo nbdcopy python3; do command -v "$t" >/dev/null || die "$t not found"; done
[ -f "$TRACE" ] || die "no trace $TRACE (benches/record-boot-trace.sh records one)"
[ -x "$THINLINE_BIN" ] || die "no thinline binary at $THINLINE_BIN (cargo build --release --bin thinline)"
if [ ! -x "$REPLAY_BIN" ]; then
  log "building the replay tool (cargo build --release --example replay-trace)"
  cargo build --quiet --release --example replay-trace --manifest-path "$repo_root/Cargo.toml" ||
    die "building examples/replay-trace.rs failed"
  REPLAY_BIN=$target_dir/release/examples/replay-trace
fi

# The image size from the trace header ("# Image: N bytes").
image_bytes=$(sed -n 's/^# Image: \([0-9]*\) bytes.*/\1/p' "$TRACE" | head -n1)
[ -n "$image_bytes" ] || die "$TRACE names no image size ('# Image: N bytes')"
trace_reqs=$(grep -cv '^#\|^offset' "$TRACE")
trace_bytes=$(awk -F, '!/^#/ && !/^offset/ { s += $2 } END { printf "%.0f", s }' "$TRACE")

mkdir -p "$RESULTS_DIR" "$WORK_DIR"
RESULTS_DIR=$(cd "$RESULTS_DIR" && pwd)
work=$(mktemp -d "$WORK_DIR/compare-cor.XXXXXX")
sock_dir=$(mktemp -d /tmp/thinline-cor.XXXXXX)
pids=()

# stop PID: SIGTERM, then SIGKILL after 10 s; waits for it.
stop() {
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    log "pid $pid ignored SIGTERM for 10 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$? p
  trap - EXIT INT TERM HUP
  for p in "${pids[@]}"; do stop "$p"; done
  rm -rf "$sock_dir"
  if [ "${KEEP:-0}" = 1 ]; then log "kept $work"; else rm -rf "$work"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'exit 143' TERM HUP

# start NAME LOG CMD...: starts a server on $sock_dir/NAME.sock (the command names it itself),
# waits until it answers NBD with the image's size; sets last_pid.
start() {
  local name=$1 logfile=$2 s=$sock_dir/$1.sock deadline=$((SECONDS + READY_TIMEOUT)) size
  shift 2
  rm -f "$s"  # nbdkit leaves its socket behind and refuses to replace it
  echo "+ $*" >"$logfile"
  "$@" </dev/null >>"$logfile" 2>&1 &
  last_pid=$!
  pids+=("$last_pid")
  until size=$(nbdinfo --size "nbd+unix:///?socket=$s" 2>/dev/null); do
    kill -0 "$last_pid" 2>/dev/null || { tail -n 20 "$logfile" >&2; die "$name exited before answering (log $logfile)"; }
    [ $SECONDS -lt $deadline ] || die "$name did not answer within ${READY_TIMEOUT}s (log $logfile)"
    sleep 0.1
  done
  [ "$size" = "$image_bytes" ] || die "$name reports size $size, expected $image_bytes"
}
# halt PID: stops a server started with start.
halt() {
  local p keep=()
  stop "$1"
  for p in "${pids[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  pids=("${keep[@]}")
}

# --- image ----------------------------------------------------------------------------------
if [ -n "${IMAGE:-}" ]; then
  image=$(cd "$(dirname "$IMAGE")" && pwd)/$(basename "$IMAGE")
  [ "$(stat -c %s "$image")" = "$image_bytes" ] || die "$IMAGE is not $image_bytes bytes (the trace's image size)"
  image_desc="$image (given)"
else
  image=$work/template.raw
  log "writing a $image_bytes-byte random image $image"
  head -c "$image_bytes" /dev/urandom >"$image"
  image_desc="scratch file of $image_bytes bytes of random data (no holes)"
fi
cat "$image" >/dev/null

# --- runs -----------------------------------------------------------------------------------
up_sock=$sock_dir/up.sock
up_uri="nbd+unix:///?socket=$up_sock"
sut_sock=$sock_dir/sut.sock
sut_uri="nbd+unix:///?socket=$sut_sock"
verify_args=()
[ "$VERIFY" != 1 ] || verify_args=(--verify "$image")
rate_filter=() rate_arg=()
if [ -n "$RATE" ]; then rate_filter=(--filter=rate); rate_arg=(rate="$RATE"); fi

# upstream LAT OUT: starts the delayed upstream with its own request log OUT.up.log.
upstream() {
  start up "$2.up.out" nbdkit -f -r -U "$up_sock" --filter=log --filter=delay "${rate_filter[@]}" \
    file "$image" rdelay="$1ms" delay-extents="$1ms" "${rate_arg[@]}" logfile="$2.up.log"
  up_pid=$last_pid
}
# upstream_done OUT: stops the upstream and writes OUT.upstream: "reads bytes extents-calls".
upstream_done() {
  halt "$up_pid"
  python3 -c '
import re, sys
n = b = e = 0
for line in open(sys.argv[1]):
    m = re.search(r" connection=\d+ Read id=\d+ offset=0x[0-9a-f]+ count=(0x[0-9a-f]+)", line)
    if m:
        n += 1; b += int(m[1], 16)
    elif re.search(r" connection=\d+ Extents id=", line):
        e += 1
print(n, b, e)' "$1.up.log" >"$1.upstream"
}
# replay OUT: replays the trace against the system under test; JSON to OUT.json.
replay() {
  local rc=0
  "$REPLAY_BIN" --json --gap-scale "$GAP_SCALE" "${verify_args[@]}" --latency-log "$1.lat.csv" \
    "$TRACE" "$sut_uri" >"$1.json" 2>"$1.replay.err" || rc=$?
  if [ "$rc" != 0 ]; then
    log "replay failed (exit $rc): $(tail -n 3 "$1.replay.err")"
    failures=$((failures + 1))
  fi
}
proxy_status() {
  "$THINLINE_BIN" proxy status --json "$sut_sock.status" >"$1.status.json" 2>&1 || true
}

failures=0
total=$(( ${#latencies[@]} * REPEAT * ${#configs[@]} ))
n=0
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
for lat in "${latencies[@]}"; do
  for ((round = 1; round <= REPEAT; round++)); do
    cache=$work/cold.cache
    rm -f "$cache"
    for c in "${configs[@]}"; do
      n=$((n + 1))
      out=$RESULTS_DIR/$lat.$c.r$round
      log "[$n/$total] +$lat ms, round $round: $c"
      upstream "$lat" "$out"
      case "$c" in
        nocache)
          sut_uri=$up_uri; replay "$out"; sut_uri="nbd+unix:///?socket=$sut_sock" ;;
        fullcopy)
          rm -f "$work/copy.raw"
          t0=$(date +%s.%N)
          nbdcopy "$up_uri" "$work/copy.raw" >"$out.copy.log" 2>&1 || { log "nbdcopy failed"; failures=$((failures + 1)); }
          t1=$(date +%s.%N)
          python3 -c "print($t1 - $t0)" >"$out.copy_s"
          start sut "$out.server.log" "$THINLINE_BIN" serve --socket "$sut_sock" "$work/copy.raw"
          replay "$out"; halt "$last_pid"
          rm -f "$work/copy.raw" ;;
        cold | warm | prefetch)
          extra=()
          if [ "$c" = prefetch ]; then cache=$work/prefetch.cache; rm -f "$cache"; extra=(--prefetch); fi
          [ "$c" != warm ] || [ -f "$work/cold.cache" ] || log "warm without a cold run first: the cache starts empty"
          [ "$c" = prefetch ] || cache=$work/cold.cache
          # shellcheck disable=SC2086  # PROXY_ARGS is a list of options
          start sut "$out.server.log" "$THINLINE_BIN" proxy --upstream "$up_uri" --cache "$cache" \
            --socket "$sut_sock" --status-socket "$sut_sock.status" "${extra[@]}" $PROXY_ARGS
          replay "$out"; proxy_status "$out"; halt "$last_pid"
          [ "$c" != prefetch ] || rm -f "$cache" ;;
        nbdkit-cow)
          start sut "$out.server.log" env TMPDIR="$work" nbdkit -f -U "$sut_sock" --filter=cow nbd socket="$up_sock" cow-on-read=true
          replay "$out"; halt "$last_pid" ;;
        nbdkit-cache)
          start sut "$out.server.log" env TMPDIR="$work" nbdkit -f -U "$sut_sock" --filter=cache nbd socket="$up_sock" cache-on-read=true
          replay "$out"; halt "$last_pid" ;;
        local)
          start sut "$out.server.log" "$THINLINE_BIN" serve --socket "$sut_sock" "$image"
          replay "$out"; halt "$last_pid" ;;
      esac
      upstream_done "$out"
      python3 - "$out" <<'PY' >&2 || true
import json, sys
j = json.load(open(sys.argv[1] + ".json"))
u = open(sys.argv[1] + ".upstream").read().split()
print(f"    replay {j['wall_s']:.2f} s (I/O wait {j['io_wait_s']:.2f} s), p50 {j['latency_us']['p50']} us, "
      f"p99 {j['latency_us']['p99']} us, upstream {u[0]} reads {int(u[1]) / 1048576:.1f} MiB, ok={j['ok']}")
PY
    done
    rm -f "$work/cold.cache"
  done
done

# --- report ---------------------------------------------------------------------------------
thinline_ver=$("$THINLINE_BIN" --version 2>/dev/null | head -n1 || echo '?')
git_rev=$(git -C "$repo_root" rev-parse --short HEAD 2>/dev/null || echo '?')
git -C "$repo_root" diff --quiet HEAD 2>/dev/null || git_rev="$git_rev + uncommitted changes"
{
  echo "## Booting from a remote template: trace replay ($(date -u '+%Y-%m-%d %H:%M:%S UTC'))"
  echo
  echo "- Host: $(nproc) CPUs, kernel $(uname -r); load average before: $load_start, after: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- Trace: $(basename "$TRACE"): $trace_reqs reads, $trace_bytes bytes; think times × $GAP_SCALE; verify: $VERIFY"
  echo "- Image: $image_desc"
  echo "- Upstream: \`nbdkit -r --filter=log --filter=delay ${rate_filter[*]:+${rate_filter[*]} }file IMG rdelay=Nms delay-extents=Nms${rate_arg[*]:+ ${rate_arg[*]}}\` on a unix socket ($(nbdkit --version | head -n1))"
  echo "- Thinline: $thinline_ver, repo rev $git_rev; proxy options: ${PROXY_ARGS:-defaults}"
  echo "- Rounds: $REPEAT (medians)"
} >"$RESULTS_DIR/header.md"

python3 - "$RESULTS_DIR" "$LATENCIES" "$CONFIGS" "$REPEAT" "$trace_bytes" >"$RESULTS_DIR/table.md" <<'PY'
import json, os, statistics, sys
rdir, lats, cfgs, repeat, trace_bytes = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(","), int(sys.argv[4]), int(sys.argv[5])
labels = {
    "nocache": "(a) no cache, upstream directly",
    "fullcopy": "(b) full copy (nbdcopy), then local",
    "cold": "(c) thinline proxy, cold cache",
    "warm": "(d) thinline proxy, warm cache",
    "prefetch": "(e) thinline proxy, cold + --prefetch",
    "nbdkit-cow": "(f) nbdkit cow-on-read",
    "nbdkit-cache": "(g) nbdkit cache-on-read",
    "local": "(h) local file, thinline serve",
}
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
def load(lat, c):
    runs = []
    for r in range(1, repeat + 1):
        p = os.path.join(rdir, f"{lat}.{c}.r{r}")
        try:
            j = json.load(open(p + ".json"))
        except (OSError, ValueError):
            continue
        copy = 0.0
        if os.path.exists(p + ".copy_s"):
            copy = float(open(p + ".copy_s").read())
        up = [int(x) for x in open(p + ".upstream").read().split()] if os.path.exists(p + ".upstream") else [0, 0, 0]
        st = None
        if os.path.exists(p + ".status.json"):
            try:
                s = json.load(open(p + ".status.json"))
                st = sum(e.get("bytes_from_upstream", 0) for e in s.get("exports", {}).values())
            except ValueError:
                pass
        runs.append(dict(total=copy + j["wall_s"], replay=j["wall_s"], copy=copy, io=j["io_wait_s"],
                         p50=j["latency_us"]["p50"], p99=j["latency_us"]["p99"], ok=j["ok"],
                         upreq=up[0], upbytes=up[1], upext=up[2], status=st))
    if not runs:
        return None
    m = {k: med([r[k] for r in runs]) for k in ("total", "replay", "copy", "io", "p50", "p99", "upreq", "upbytes", "upext")}
    m["status"] = med([r["status"] for r in runs])
    m["ok"] = all(r["ok"] for r in runs)
    m["n"] = len(runs)
    return m
out = ["Seconds to replay the boot trace (median of rounds; fullcopy: copy + replay). "
       "\"vs cow\" = nbdkit cow-on-read's time ÷ this one (>1 = faster than cow); "
       "\"vs local\" = this time ÷ the local file's (1.00 = as fast as local). "
       "Upstream MiB / amplification: bytes the upstream served ÷ bytes the trace read.", ""]
out.append("| Latency | Configuration | Time (s) | I/O wait (s) | p50 / p99 request (ms) | vs cow | vs local | Upstream reads (+ block status) | Upstream MiB | Amplification | Bytes OK |")
out.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
summary = []
for lat in lats:
    data = {c: load(lat, c) for c in cfgs}
    cow = data.get("nbdkit-cow"); local = data.get("local")
    for c in cfgs:
        m = data[c]
        if m is None:
            out.append(f"| {lat} ms | {labels[c]} | failed | | | | | | | | |")
            continue
        t = m["total"]
        t_s = f"{t:.2f}" + (f" ({m['copy']:.2f} + {m['replay']:.2f})" if c == "fullcopy" else "")
        vs_cow = f"{cow['total'] / t:.2f}×" if cow and t else "n/a"
        vs_local = f"{t / local['total']:.2f}×" if local and local["total"] else "n/a"
        amp = f"{m['upbytes'] / trace_bytes:.2f}" if trace_bytes else "n/a"
        up_req = f"{m['upreq']:.0f}" + (f" (+{m['upext']:.0f})" if m["upext"] else "")
        up_mib = f"{m['upbytes'] / 1048576:.1f}"
        if m["status"] is not None:
            up_mib += f" (proxy: {m['status'] / 1048576:.1f})"
        out.append(f"| {lat} ms | {labels[c]} | {t_s} | {m['io']:.2f} | {m['p50'] / 1000:.2f} / {m['p99'] / 1000:.1f} | "
                   f"{vs_cow} | {vs_local} | {up_req} | {up_mib} | {amp} | {'yes' if m['ok'] else 'NO'} |")
    cold, warm = data.get("cold"), data.get("warm")
    parts = []
    if cold and cow:
        parts.append(f"cold proxy {cow['total'] / cold['total']:.2f}× faster than nbdkit cow-on-read (target ≥3× at 20 ms)")
    if warm and local:
        parts.append(f"warm proxy {warm['total'] / local['total']:.2f}× the local file's time (target ≤1.2×)")
    if parts:
        summary.append(f"- {lat} ms: " + "; ".join(parts))
out += ["", "Targets:"] + summary
print("\n".join(out))
PY
{ cat "$RESULTS_DIR/header.md"; echo; cat "$RESULTS_DIR/table.md"; } >"$RESULTS_DIR/report.md"
echo
cat "$RESULTS_DIR/report.md"
log "results: $RESULTS_DIR"
[ "$failures" = 0 ] || { log "$failures replay(s) failed"; exit 1; }
