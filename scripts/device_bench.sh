#!/usr/bin/env bash
# On a lent GPU machine with no network (the `device` tool of this workplace), after
# scripts/device_pack.sh here. Two calls, back to back (the machine stays warm ~30 s between them):
#
#   1. carry [".gpu/paddle.zst.0", ".gpu/zb"], run:
#        mkdir -p /tmp/stage && cp -r .gpu/paddle.zst.0 .gpu/zb /tmp/stage/
#   2. carry [".gpu/paddle.zst.1", ".gpu/paddle.sha256", ".gpu/pyzmq-27.3.0-cp312-abi3-manylinux_2_26_x86_64.manylinux_2_28_x86_64.whl",
#             ".gpu/opt_einsum-3.3.0-py3-none-any.whl"], run:  bash scripts/device_bench.sh [checks|bench|all]
#
# checks: scripts/gpu_check.sh on the CNN example (torch on cuda:0, paddle on the CPU build:
#         the image has no paddle GPU build and 64 MiB per call cannot carry one) and its buggy port
#         (negative control: exit 1, bn1 named). bench: bench/layers_overhead.py --factory in the
#         schedules of a 16-core host, with threaded comparison/copy off (1/1) and on (auto).
# Results land in $OUT (what the device tool brings back).
set -uo pipefail
export PYTHONUNBUFFERED=1
what="${1:-all}"
case "$what" in checks|bench|all) ;; *) echo "usage: scripts/device_bench.sh [checks|bench|all] (got '$what')" >&2; exit 2 ;; esac
t0=$(date +%s)
D="${OUT:-/tmp/device-out}"; mkdir -p "$D"
R=/tmp/lockstep-device-runs   # this script's own run directories, fresh each time
rm -rf "$R"
if [ ! -x /tmp/bin/paddle-python ]; then
  cat /tmp/stage/paddle.zst.0 .gpu/paddle.zst.1 > /tmp/stage/p.zst || exit 5
  [ "$(sha256sum < /tmp/stage/p.zst | cut -d' ' -f1)" = "$(cut -d' ' -f1 .gpu/paddle.sha256)" ] || { echo "paddle parts: checksum mismatch"; exit 5; }
  mkdir -p /tmp/psite /tmp/site /tmp/bin
  if command -v zstd >/dev/null; then unz() { zstd -q -d --long=30 -c "$1"; }
  else unz() { LD_LIBRARY_PATH=/tmp/stage/zb /tmp/stage/zb/zstd -q -d --long=30 -c "$1"; }; fi
  unz /tmp/stage/p.zst | tar xf - -C /tmp/psite || exit 5
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/pyzmq-*.whl || exit 5
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/psite .gpu/opt_einsum-*.whl || exit 5
  printf '#!/bin/sh\nPYTHONPATH=/tmp/psite${PYTHONPATH:+:$PYTHONPATH} exec python3 "$@"\n' > /tmp/bin/paddle-python
  chmod +x /tmp/bin/paddle-python
fi
mkdir -p "$R"
export PYTHONPATH=/tmp/site:$PWD
echo "set-up: $(( $(date +%s) - t0 )) s"
rc=0
if [ "$what" = checks ] || [ "$what" = all ]; then
  export COORDINATOR="python3 -c 'import sys; from coordinator.cli import main; sys.exit(main())'"
  export TORCH_PYTHON=python3 PADDLE_PYTHON=/tmp/bin/paddle-python
  CNN="--torch-model examples.cnn.torch_model:build"
  echo "### gpu_check: CNN, torch cuda:0 vs paddle cpu (expect 0)"
  OUT="$R/cnn" TORCH_DEVICE=cuda:0 PADDLE_DEVICE=cpu STEPS=weights,forward,layers,loss,metric,backward \
    RUN_ARGS="$CNN --paddle-model examples.cnn.paddle_model:build" \
    timeout 400 bash scripts/gpu_check.sh > "$D/check_cnn.log" 2>&1 || rc=1
  tail -n 25 "$D/check_cnn.log"
  echo "### gpu_check: buggy CNN port, torch cuda:0 (negative control, expect 1)"
  OUT="$R/buggy" TORCH_DEVICE=cuda:0 PADDLE_DEVICE=cpu STEPS=weights,forward,layers EXPECT=1 \
    RUN_ARGS="$CNN --paddle-model examples.cnn_buggy.paddle_model:build" \
    timeout 300 bash scripts/gpu_check.sh > "$D/check_buggy.log" 2>&1 || rc=1
  grep -E "first divergent|^status:|gpu_check" "$D/check_buggy.log"
  unset COORDINATOR TORCH_PYTHON PADDLE_PYTHON
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  export LOCKSTEP_WORKER_ARGV_TORCH="[\"$(command -v python3)\", \"-m\", \"torch_worker\"]"
  export LOCKSTEP_WORKER_ARGV_PADDLE='["/tmp/bin/paddle-python", "-m", "paddle_worker"]'
  lo() {
    local name=$1; shift; echo "### layers_overhead --factory $*"
    timeout 90 python3 bench/layers_overhead.py --factory --reps 3 --out "$R/$name" "$@" > "$D/lo_$name.txt" 2>&1 || rc=1
    python3 - "$D/lo_$name.txt" <<'PY'
import json, sys
t = open(sys.argv[1]).read(); i = t.find("{\n")
if i < 0:
    print(t[-3000:]); sys.exit()
s = json.loads(t[i:]); L = s["live"]
for side in ("torch", "paddle"):
    x = s[side]
    print(f"  {side}: fwd plain {x['fwd_plain_s']} capture {x['fwd_capture_s']} ({x['fwd_overhead_pct']}%), "
          f"bwd plain {x['bwd_plain_s']} capture {x['bwd_capture_s']} ({x['bwd_overhead_pct']}%)")
for ph in ("fwd", "bwd"):
    print(f"  live {ph} {L[ph + '_wall_s']} s vs both plain {L[ph + '_both_plain_s']} s: {L[ph + '_vs_both_plain_pct']}% "
          f"(paired {L[ph + '_vs_both_plain_pct_paired']})")
c = s["config"]
print(f"  diff threads {c['diff_threads']}, copy threads {c['copy_threads']}, direct copy {c.get('direct_copy')} "
      f"(copies {L.get('direct_copies_fwd')}), failed rows {L['failed_rows']}")
PY
  }
  # most telling first: whatever the call's limit cuts off is the least needed
  lo gpu_direct --schedule parallel --threads 8 --torch-device cuda:0
  LOCKSTEP_DIRECT_COPY=0 lo gpu_host --schedule parallel --threads 8 --torch-device cuda:0
  lo par8_auto --schedule parallel --threads 8
  LOCKSTEP_DIRECT_COPY=0 lo par8_host --schedule parallel --threads 8
  lo par8_base --schedule parallel --threads 8 --diff-threads 1 --copy-threads 1
  lo alt16_auto --schedule alternate --threads 16
  lo alt16_base --schedule alternate --threads 16 --diff-threads 1 --copy-threads 1
fi
echo "total $(( $(date +%s) - t0 )) s, exit $rc"
exit $rc
