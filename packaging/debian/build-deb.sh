#!/usr/bin/env bash
# Builds the Debian package of Thinline from the workspace: the release binary without debug
# info, a man page for every command and subcommand and the shell completions (both generated
# from the CLI definitions), the systemd units of packaging/systemd/, the README and docs/.
#
# Usage: packaging/debian/build-deb.sh
# Environment: THINLINE_BIN (default target/release/thinline, built with --locked), OUT (the
#   directory the .deb goes to, default target/debian). Prints the package's path.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
repo=$(cd "$here/../.." && pwd -P)
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
bin=${THINLINE_BIN:-$repo/target/release/thinline}
if [ -z "${THINLINE_BIN:-}" ]; then
  (cd "$repo" && cargo build --release --locked -q)
fi
out=${OUT:-$repo/target/debian}
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml")
arch=$(dpkg --print-architecture)
stage=$(mktemp -d "${TMPDIR:-/tmp}/thinline-deb.XXXXXX")
trap 'rm -rf "$stage"' EXIT

install -d "$stage/DEBIAN" "$stage/usr/bin" "$stage/usr/share/man/man1" "$stage/lib/systemd/system" \
  "$stage/usr/share/bash-completion/completions" "$stage/usr/share/zsh/vendor-completions" \
  "$stage/usr/share/fish/vendor_completions.d" "$stage/usr/share/doc/thinline/docs"
strip --strip-debug -o "$stage/usr/bin/thinline" "$bin"
chmod 0755 "$stage/usr/bin/thinline"
"$bin" man --out "$stage/usr/share/man/man1" >/dev/null
gzip -9n "$stage"/usr/share/man/man1/*.1
"$bin" completions bash >"$stage/usr/share/bash-completion/completions/thinline"
"$bin" completions zsh >"$stage/usr/share/zsh/vendor-completions/_thinline"
"$bin" completions fish >"$stage/usr/share/fish/vendor_completions.d/thinline.fish"
install -m 0644 "$repo"/packaging/systemd/*.service "$repo"/packaging/systemd/*.socket "$stage/lib/systemd/system/"
install -m 0644 "$repo/README.md" "$repo/SECURITY.md" "$stage/usr/share/doc/thinline/"
install -m 0644 "$repo"/docs/*.md "$stage/usr/share/doc/thinline/docs/"
install -m 0644 "$here/copyright" "$stage/usr/share/doc/thinline/copyright"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" "$here/control.in" >"$stage/DEBIAN/control"
mkdir -p "$out"
deb="$out/thinline_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "$deb"
