#!/usr/bin/env bash
# Pack what a lent GPU machine without network needs to run both workers (see docs/remote-and-gpu.md,
# "A lent GPU machine"): that machine has python3 3.12 with torch (CUDA), transformers, numpy, msgpack,
# click and rich, but no pyzmq and no paddle. paddlepaddle's CPU wheel (195 MB) is trimmed (no headers,
# no OpenVINO CPU plugin: ~614 MB unpacked) and compressed with zstd (~115 MB), then split into parts
# under 60 MiB, since one call carries at most 64 MiB. Writes .gpu/ (git-ignored); needs network here.
#
#   scripts/device_pack.sh            # then: scripts/device_bench.sh's header says how to run it
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$here/.gpu"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d "$work" paddlepaddle==3.3.1 pyzmq==27.3.0 opt_einsum==3.3.0
cp "$work"/pyzmq-*.whl "$work"/opt_einsum-*.whl "$out/"
mkdir "$work/pp"
(cd "$work/pp" && unzip -q "$work"/paddlepaddle-*.whl && rm -rf paddle/include paddle/libs/libopenvino_intel_cpu_plugin.so)
tar -C "$work/pp" -cf - . | zstd -q -T0 -19 --long=30 -o "$work/paddle.tar.zst"
rm -f "$out"/paddle.zst.*
split -b 58M -d -a 1 "$work/paddle.tar.zst" "$out/paddle.zst."
sha256sum < "$work/paddle.tar.zst" | cut -d' ' -f1 > "$out/paddle.sha256"
# the device image has no zstd binary: take this machine's, with the libraries it links
mkdir -p "$out/zb"
cp "$(command -v zstd)" "$out/zb/"
for lib in $(ldd "$(command -v zstd)" | awk '/libzstd|liblzma|liblz4|libz\./{print $3}'); do cp "$lib" "$out/zb/"; done
ls -la "$out"
