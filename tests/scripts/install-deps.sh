#!/usr/bin/env bash
# Installs everything Thinline's test suite needs on a fresh Debian bookworm machine (run as root).
# Idempotent: a second run only checks. Used by `make test` / .ci/run and by developers.
set -euo pipefail

need_root() { [ "$(id -u)" = 0 ] || { echo "install-deps: run as root (apt-get)" >&2; exit 1; }; }

# qemu 10 (whose NBD client speaks extended headers) comes from bookworm-backports; Debian 12's
# own qemu-system-x86 would downgrade qemu-utils to 7.2.
backports=/etc/apt/sources.list.d/thinline-backports.sources
if [ ! -f "$backports" ] && ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
  need_root
  cat >"$backports" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

# nginx-light and openssl: the HTTP(S) server of the http(s):// tests and its test CA; nfs-ganesha, nfs-ganesha-vfs, rpcbind:
# the userspace NFSv3 server of the nfs:// tests (tests/scripts/nfs-server.sh); curl and
# python3-venv: the S3 server (moto, from PyPI, in a venv) and uploads to it. dmsetup: dm-thin
# in the kernel VM test of the copy-on-read proxy (tests/kernel/cor-dmthin.sh); lvm2 and
# thin-provisioning-tools: the LVM SR's tests in the same VM (tests/kernel/lvm-blocks.sh). systemd:
# systemd-analyze, which checks the shipped units (packaging/systemd/). gnutls-bin: psktool, which
# makes the TLS-PSK key files of tests/tls.rs. libssl-dev, pkg-config: building the openssl crate
# (TLS-PSK).
packages=(libnbd-bin python3-libnbd nbdkit fio nbd-client busybox-static kmod cpio e2fsprogs
          util-linux mount xxd libvhdi-utils libvmdk-utils libqcow-utils fuse3 python3-vmdkstream
          nginx-light openssl nfs-ganesha nfs-ganesha-vfs rpcbind curl python3-venv dmsetup
          systemd lvm2 thin-provisioning-tools python3-prometheus-client man-db
          gnutls-bin libssl-dev pkg-config)
backports_packages=(qemu-system-x86 qemu-utils)

missing=()
for p in "${packages[@]}" "${backports_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
# qemu-utils must be 10.x (backports), not bookworm's 7.2.
if ! qemu-img --version 2>/dev/null | grep -q 'version 1[0-9]\.'; then missing+=(qemu-utils); fi

if [ ${#missing[@]} -gt 0 ]; then
  need_root
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${packages[@]}"
  apt-get install -y -q --no-install-recommends -t bookworm-backports "${backports_packages[@]}"
fi

# moto's S3 server for the s3:// tests (test-support/src/servers.rs), from PyPI into a venv of
# Debian's python: a real HTTP implementation of the S3 API with ranges and versioning.
moto_venv=${THINLINE_MOTO_VENV:-/var/cache/thinline/moto}
if [ ! -x "$moto_venv/bin/moto_server" ]; then
  need_root
  rm -rf "$moto_venv"
  /usr/bin/python3 -m venv "$moto_venv"
  "$moto_venv/bin/pip" install -q --disable-pip-version-check 'moto[server]>=5.1,<6'
fi

# The guest kernel for the kernel tests (tests/kernel/): a Debian kernel package, unpacked.
kdir=${THINLINE_KERNEL_DIR:-/var/cache/thinline/kernel}
if [ ! -f "$kdir/ready" ]; then
  need_root
  mkdir -p "$kdir"
  tmp=$(mktemp -d)
  (
    cd "$tmp"
    apt-get update -q >/dev/null 2>&1 || true
    # linux-image-amd64 is a metapackage: download the image it depends on.
    image=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
    [ -n "$image" ] || { echo "install-deps: cannot find the linux-image package" >&2; exit 1; }
    apt-get download "$image"
    rm -rf "$kdir/root"; mkdir -p "$kdir/root"
    dpkg -x ./*.deb "$kdir/root"
  )
  rm -rf "$tmp"
  ver=$(ls "$kdir/root/lib/modules" | head -1)
  depmod -b "$kdir/root" "$ver"
  echo "$ver" >"$kdir/ready"
fi

echo "install-deps: ok (qemu $(qemu-img --version | head -1 | awk '{print $3}'), kernel $(cat "$kdir/ready"), moto $("$moto_venv/bin/pip" show moto 2>/dev/null | awk '/^Version/{print $2}'))"
