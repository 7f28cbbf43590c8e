#!/bin/bash
# lvm-pivot-guest.sh: the guest side of benches/lvm-pivot.sh (run inside the test VM by
# tests/kernel/run-vm.sh; see there). Writes /mnt/lvm-pivot.json (every fio result) and
# /mnt/lvm-pivot.md (the table), and prints "lvm-pivot: DONE".
set -u
# shellcheck source=tests/kernel/guest-lib.sh
. "$THINLINE_GUEST_LIB"
[ -f /mnt/lvm-pivot.env ] && . /mnt/lvm-pivot.env
_t=$THINLINE_BIN
RUNTIME=${RUNTIME:-8}
ROUNDS=${ROUNDS:-2}
SIZE_MIB=${SIZE_MIB:-128}
export THINLINE_SR_REGISTRY=/tmp/b/srs.json
js() { /usr/bin/python3 -c 'import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1]))' "$1"; }

load_modules nbd max_part=0 loop dm-thin-pool >/dev/null || { echo "lvm-pivot: modules"; exit 1; }
mkdir -p /tmp/b
truncate -s $((SIZE_MIB * 7 + 256))M /tmp/b/pv
PV=$(losetup -f --show /tmp/b/pv)
$_t sr create --type lvm "$PV" --vg tlbench --hydrate on-pivot --json >/dev/null || exit 1
head -c $((SIZE_MIB << 20)) /dev/urandom >/tmp/b/template.raw

# JOB DEV: one fio job on DEV, its JSON on stdout.
fio_job() {
  case $1 in
    rand4k-qd1) set -- "$2" --rw=randread --bs=4k --ioengine=psync --iodepth=1 ;;
    rand4k-qd32) set -- "$2" --rw=randread --bs=4k --ioengine=libaio --iodepth=32 ;;
    seq1m) set -- "$2" --rw=read --bs=1M --ioengine=libaio --iodepth=8 ;;
  esac
  _dev=$1; shift
  fio --name=b --filename="$_dev" --direct=1 --time_based --runtime="$RUNTIME" \
    --randrepeat=0 --output-format=json "$@" 2>/dev/null
}
JOBS="rand4k-qd1 rand4k-qd32 seq1m"
: >/tmp/b/results.jsonl
# CONFIG ROUND JOB DEV [PAIRED]: runs the job and records it (PAIRED: the configuration a
# plain-thin run was paired with, run right before it).
record() {
  fio_job "$3" "$4" | /usr/bin/python3 -c '
import json, sys
d = json.load(sys.stdin)["jobs"][0]["read"]
print(json.dumps({"config": sys.argv[1], "round": int(sys.argv[2]), "job": sys.argv[3],
                  "paired": sys.argv[4], "iops": d["iops"], "mib_s": d["bw"] / 1024}))' \
    "$1" "$2" "$3" "${5:-}" >>/tmp/b/results.jsonl
  tl_log "lvm-pivot: round $2 $1 $3: $(tail -n1 /tmp/b/results.jsonl)"
}
# A template introduced anew (a new cache), a clone of it attached; sets TPL, CL, CDEV.
new_clone() {
  TPL=$($_t vdi introduce --sr tlbench /tmp/b/template.raw --json | js 'd["uuid"]')
  CL=$($_t vdi clone --sr tlbench "$TPL" --json | js 'd["uuid"]')
  CDEV=$($_t vdi attach --sr tlbench "$CL" --json | js 'd["device"]')
}
drop_clone() {
  $_t vdi detach --sr tlbench "$CL" --json >/dev/null
  $_t vdi destroy --sr tlbench "$CL" --json >/dev/null
  $_t vdi forget --sr tlbench "$TPL" --json >/dev/null
}

PL=$($_t vdi create --sr tlbench "${SIZE_MIB}M" --json | js 'd["uuid"]')
PDEV=$($_t vdi attach --sr tlbench "$PL" --json | js 'd["device"]')
dd if=/tmp/b/template.raw of="$PDEV" bs=1M oflag=direct status=none
# The control: a dm-thin snapshot of another thin volume holding the same bytes, whose blocks
# are all shared (dm-thin sends a bio to a shared block through its worker thread, as it does a
# read of a block a clone never wrote). The plain volume above is never snapshotted.
PL2=$($_t vdi create --sr tlbench "${SIZE_MIB}M" --json | js 'd["uuid"]')
P2DEV=$($_t vdi attach --sr tlbench "$PL2" --json | js 'd["device"]')
dd if=/tmp/b/template.raw of="$P2DEV" bs=1M oflag=direct status=none
SN=$($_t vdi snapshot --sr tlbench "$PL2" --json | js 'd["uuid"]')
SDEV=$($_t vdi attach --sr tlbench "$SN" --json | js 'd["device"]')

for round in $(seq 1 "$ROUNDS"); do
  for job in $JOBS; do
    # Cold: a template nothing of which is cached yet.
    new_clone
    record proxy-cold "$round" "$job" "$CDEV"
    drop_clone
  done
  new_clone
  # Warm: every block cached (read once through the clone), still served by the proxy.
  dd if="$CDEV" of=/dev/null bs=1M iflag=direct status=none
  # Each run is followed by the same job on the plain thin volume: its ratio is to that one
  # (the emulated machine's speed drifts; neighbours drift together).
  for job in $JOBS; do
    record proxy-warm "$round" "$job" "$CDEV"
    record plain-thin "$round" "$job" "$PDEV" proxy-warm
  done
  $_t vdi pivot --sr tlbench "$CL" --json >/dev/null || { echo "lvm-pivot: pivot failed"; exit 1; }
  for job in $JOBS; do
    record pivoted "$round" "$job" "$CDEV"
    record plain-thin "$round" "$job" "$PDEV" pivoted
  done
  for job in $JOBS; do
    record thin-snapshot "$round" "$job" "$SDEV"
    record plain-thin "$round" "$job" "$PDEV" thin-snapshot
  done
  drop_clone
done
cp /tmp/b/results.jsonl /mnt/lvm-pivot.jsonl
/usr/bin/python3 - /tmp/b/results.jsonl >/mnt/lvm-pivot.md <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
jobs = ["rand4k-qd1", "rand4k-qd32", "seq1m"]
def value(r):
    return r["mib_s"] if r["job"] == "seq1m" else r["iops"]
def runs(c, j, paired=None):
    return [r for r in rows if r["config"] == c and r["job"] == j
            and (paired is None or r["paired"] == paired)]
def ratios(c, j):
    """Each run over the plain-thin run paired with it (cold: the round's plain-thin median)."""
    out = []
    for r in runs(c, j):
        plain = [value(p) for p in runs("plain-thin", j) if p["round"] == r["round"]
                 and (c == "proxy-cold" or p["paired"] == c)]
        out.append(value(r) / statistics.median(plain))
    return out
print("| Origin | 4 KiB random read QD1 (IOPS) | 4 KiB random read QD32 (IOPS) | 1 MiB sequential read (MiB/s) |")
print("|---|---|---|---|")
for c in ["proxy-cold", "proxy-warm", "pivoted", "thin-snapshot", "plain-thin"]:
    cells = []
    for j in jobs:
        v = [value(r) for r in runs(c, j)]
        if c == "plain-thin":
            cells.append(f"{statistics.median(v):.0f} (1.00x)")
            continue
        rs = ratios(c, j)
        cells.append(f"{statistics.median(v):.0f} ({statistics.median(rs):.2f}x; "
                     + " ".join(f"{x:.2f}" for x in rs) + ")")
    print(f"| {c} | " + " | ".join(cells) + " |")
PY
cat /mnt/lvm-pivot.md
echo "lvm-pivot: DONE"
