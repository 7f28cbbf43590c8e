#!/usr/bin/env bash
# Writes small qemu-img-made images into fuzz/seeds/{qcow2,vhd,vmdk}/ as starting points
# for the image fuzz targets. Images are tiny (1 MiB virtual, small clusters) so that
# mutations hit metadata, not data. Run from anywhere: fuzz/seeds/make-image-seeds.sh
set -euo pipefail
seeds=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
mkdir -p "$seeds/qcow2" "$seeds/vhd" "$seeds/vmdk"
qemu-img create -q -f raw base.raw 1M
qemu-io -f raw -c 'write -P 0xaa 0 4k' -c 'write -P 0xbb 600k 5000' base.raw >/dev/null
w() { qemu-io -f "$1" -c 'write -P 0x11 512 1536' -c 'write -z 64k 4k' "$2" >/dev/null; }
for opts in compat=0.10,cluster_size=512 compat=1.1,cluster_size=512,refcount_bits=1 \
            cluster_size=16k,extended_l2=on lazy_refcounts=on,cluster_size=1k; do
  n=$(echo "$opts" | tr ',=' '__'); qemu-img create -q -f qcow2 -o "$opts" "q-$n.qcow2" 1M; w qcow2 "q-$n.qcow2"
  cp "q-$n.qcow2" "$seeds/qcow2/"
done
qemu-img convert -c -O qcow2 -o cluster_size=1k base.raw "$seeds/qcow2/compressed.qcow2"
qemu-img convert -c -O qcow2 -o cluster_size=1k,compression_type=zstd base.raw "$seeds/qcow2/zstd.qcow2"
qemu-img create -q -f qcow2 -o cluster_size=512 -b base.raw -F raw overlay.qcow2 1M && w qcow2 overlay.qcow2 && cp overlay.qcow2 "$seeds/qcow2/"
qemu-img convert -O vpc -o subformat=dynamic base.raw "$seeds/vhd/dynamic.vhd"
qemu-img convert -O vpc -o subformat=dynamic,force_size=on base.raw "$seeds/vhd/force-size.vhd"
qemu-img create -q -f vpc -o subformat=fixed,force_size=on fixed.vhd 64k && cp fixed.vhd "$seeds/vhd/fixed.vhd"
qemu-img convert -O vmdk -o subformat=monolithicSparse base.raw "$seeds/vmdk/sparse.vmdk"
qemu-img convert -O vmdk -o subformat=streamOptimized base.raw "$seeds/vmdk/stream.vmdk"
qemu-img create -q -f vmdk -o zeroed_grain=on zg.vmdk 1M && w vmdk zg.vmdk && cp zg.vmdk "$seeds/vmdk/"
if /usr/bin/python3 -c 'import VMDKstream' 2>/dev/null; then
  /usr/bin/python3 -c "import VMDKstream; VMDKstream.convert_to_stream('base.raw', '$seeds/vmdk/vmware-stream.vmdk')"
fi
ls -l "$seeds"/{qcow2,vhd,vmdk}
