#!/usr/bin/env bash
# The Debian package, built and smoke-tested as root on this machine, then removed again:
# dpkg -i, thinline --version, man -w for a command's page, the completions and units in
# place, the thinline-serve@ unit's command started by systemd-socket-activate and read by
# nbdinfo, dpkg -r leaving no binary behind. Run by tests/scripts/test-all.sh.
#
# Usage: tests/scripts/package-smoke.sh   (as root; THINLINE_BIN as build-deb.sh takes it)
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$(id -u)" != 0 ]; then
  [ "${CI:-}" = true ] && { echo "package-smoke: must run as root in CI" >&2; exit 1; }
  echo "SKIP: package-smoke: not root (dpkg -i needs it)"
  exit 0
fi
if dpkg -s thinline >/dev/null 2>&1; then
  echo "package-smoke: a thinline package is installed already; not touching it" >&2
  exit 1
fi
fail() { echo "package-smoke: FAIL: $*" >&2; exit 1; }
deb=$(packaging/debian/build-deb.sh)
echo "package-smoke: built $deb ($(du -h "$deb" | cut -f1))"
work=$(mktemp -d)
cleanup() {
  [ -n "${activator:-}" ] && kill "$activator" 2>/dev/null
  dpkg -r thinline >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
dpkg -i "$deb" >/dev/null || fail "dpkg -i"
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
[ "$(/usr/bin/thinline --version)" = "thinline $version" ] || fail "thinline --version: $(/usr/bin/thinline --version)"
man -w thinline-serve | grep -q '/usr/share/man/man1/thinline-serve.1.gz' || fail "man -w thinline-serve"
man -w thinline-vdi-clone >/dev/null || fail "man -w thinline-vdi-clone"
[ -s /usr/share/bash-completion/completions/thinline ] || fail "bash completion"
[ -s /lib/systemd/system/thinline-serve@.service ] || fail "the serve unit"
if readelf -S /usr/bin/thinline | grep -qE '\.debug_(info|line)'; then fail "the binary has debug info"; fi
# The unit's command, its arguments from what its EnvironmentFile would hold.
truncate -s 4M "$work/disk.raw"
command=$(sed -n 's/^ExecStart=//p' /lib/systemd/system/thinline-serve@.service)
command=${command/\$THINLINE_SERVE_ARGS/--read-only $work/disk.raw}
# shellcheck disable=SC2086 # the unit's command line, split as systemd splits it
systemd-socket-activate -l "$work/t.sock" -- $command >"$work/out" 2>"$work/log" &
activator=$!
for _ in $(seq 100); do grep -q "Listening on" "$work/log" && break; sleep 0.1; done
size=$(nbdinfo --size "nbd+unix:///?socket=$work/t.sock") || fail "nbdinfo through the unit's command: $(cat "$work/log")"
[ "$size" = $((4 << 20)) ] || fail "size $size"
kill "$activator"; wait "$activator" 2>/dev/null || true; activator=
grep -q '"level":"INFO"' "$work/log" || fail "the unit's JSON logs: $(cat "$work/log")"
dpkg -r thinline >/dev/null || fail "dpkg -r"
[ ! -e /usr/bin/thinline ] || fail "/usr/bin/thinline left after dpkg -r"
echo "package-smoke: installed, served through the unit's command, removed"
