#!/usr/bin/env bash
# GPU check: each worker pinned to its own GPU (or both on GPU 0 with --allow-shared-gpu when
# there is only one), TF32 off and deterministic kernels on; prints the devices, the HELLOs,
# the determinism section and the diffs. Runs from a fresh copy of the repository with only
# python3 (and network access for the first environment build).
#
#   scripts/gpu_check.sh                      # build GPU envs if needed, run the check
#   TORCH_PYTHON=/x/bin/python PADDLE_PYTHON=/y/bin/python scripts/gpu_check.sh
#                                             # use interpreters that already have torch (CUDA) /
#                                             # paddlepaddle-gpu + paddlenlp instead of building envs
#   COORDINATOR="python3 -c 'import sys; from coordinator.cli import main; sys.exit(main())'" \
#     TORCH_PYTHON=... PADDLE_PYTHON=... scripts/gpu_check.sh
#                                             # an offline machine: no .venv, no environment builds
# Knobs: STEPS (default weights,forward,backward), ENV_TIMEOUT (s, default 900),
#        RUN_TIMEOUT (s, default 420), OUT (run dir, default runs/gpu-check-<time>),
#        TORCH_DEVICE / PADDLE_DEVICE (default: cuda:0 and gpu:1, or gpu:0 when there is one GPU;
#        two workers on one GPU index get --allow-shared-gpu),
#        RUN_ARGS (more `coordinator run` arguments, e.g. factory model specs),
#        EXPECT (the run's expected exit status, default 0: a negative control passes 1).
# Exit status: 0 aligned; otherwise the failing phase's status (the coordinator's exit codes).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
for v in TORCH_PYTHON PADDLE_PYTHON; do   # a relative path is the caller's, before the cd below
  case "${!v:-}" in */*) printf -v "$v" '%s' "$(realpath -ms "${!v}")" ;; esac
done
cd "$here"
ENV_TIMEOUT="${ENV_TIMEOUT:-900}"
RUN_TIMEOUT="${RUN_TIMEOUT:-420}"
OUT="${OUT:-runs/gpu-check-$(date +%Y%m%d-%H%M%S)}"
say() { printf '\n=== %s ===\n' "$*"; }
die() { echo "gpu_check: FAILED: $1" >&2; exit "${2:-1}"; }

say "machine"
uname -a; python3 --version || die "python3 is required"
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: not a GPU machine?" 3
timeout 60 nvidia-smi -L || die "nvidia-smi -L failed" 3
timeout 60 nvidia-smi --query-gpu=index,uuid,name,memory.total,driver_version --format=csv || true
ngpu=$(timeout 60 nvidia-smi -L | grep -c '^GPU ')
[ "$ngpu" -ge 1 ] || die "no GPU listed by nvidia-smi" 3

say "coordinator environment"
if [ -n "${COORDINATOR:-}" ]; then
  echo "using COORDINATOR=$COORDINATOR"
elif [ -x .venv/bin/coordinator ] && .venv/bin/python -c 'import coordinator.cli' 2>/dev/null; then
  echo "using existing .venv"
elif [ -x ./lockstep ]; then
  timeout "$ENV_TIMEOUT" ./lockstep --help >/dev/null || die "./lockstep could not set up .venv" 3
else
  { python3 -m venv .venv && timeout "$ENV_TIMEOUT" .venv/bin/pip install -q -e .; } || die "pip install -e . failed" 3
fi
if [ -n "${COORDINATOR:-}" ]; then
  eval "co=($COORDINATOR)"; py=python3
else
  co=(.venv/bin/coordinator); py=.venv/bin/python
fi

say "worker environments (GPU)"
if [ -n "${TORCH_PYTHON:-}" ] || [ -n "${PADDLE_PYTHON:-}" ]; then
  [ -n "${TORCH_PYTHON:-}" ] && [ -n "${PADDLE_PYTHON:-}" ] || die "set both TORCH_PYTHON and PADDLE_PYTHON" 2
  # absolute paths: the workers start in the run directory
  TORCH_PYTHON=$(realpath -s "$(command -v "$TORCH_PYTHON")") && PADDLE_PYTHON=$(realpath -s "$(command -v "$PADDLE_PYTHON")") \
    || die "TORCH_PYTHON/PADDLE_PYTHON: not found" 2
  export LOCKSTEP_WORKER_ARGV_TORCH="[\"$TORCH_PYTHON\", \"-m\", \"torch_worker\"]"
  export LOCKSTEP_WORKER_ARGV_PADDLE="[\"$PADDLE_PYTHON\", \"-m\", \"paddle_worker\"]"
  export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"   # protocol + the worker packages
  echo "torch:  $TORCH_PYTHON"; echo "paddle: $PADDLE_PYTHON"
else
  timeout "$ENV_TIMEOUT" "${co[@]}" envs create --env-set gpu || die "building the GPU environments failed (see the
  *.create.log next to them under ~/.cache/lockstep/envs, or set TORCH_PYTHON/PADDLE_PYTHON)" 3
  timeout 300 "${co[@]}" envs check --env-set gpu || die "the GPU environments do not import their framework" 3
fi

# each side: its own GPU by default (both on GPU 0 when there is one), or what TORCH_DEVICE /
# PADDLE_DEVICE say; two workers on one GPU index get --allow-shared-gpu
tdev="${TORCH_DEVICE:-cuda:0}"
if [ "$ngpu" -ge 2 ]; then pdev="${PADDLE_DEVICE:-gpu:1}"; else pdev="${PADDLE_DEVICE:-gpu:0}"; fi
devices=(--torch-device "$tdev" --paddle-device "$pdev")
gpu_index() { case "$1" in cuda|gpu) echo 0 ;; cuda:*|gpu:*) echo "${1#*:}" ;; *) echo "" ;; esac; }
ti=$(gpu_index "$tdev"); pi=$(gpu_index "$pdev")
if [ -n "$ti" ] && [ "$ti" = "$pi" ]; then
  devices+=(--allow-shared-gpu)
  echo "both workers on GPU $ti (--allow-shared-gpu)"
fi
where="on $tdev and $pdev"

eval "extra=(${RUN_ARGS:-})"
control=()
for a in "${extra[@]}"; do [ "$a" = --allow-shared-gpu ] || control+=("$a"); done
say "negative control: one GPU for both without --allow-shared-gpu is refused"
"${co[@]}" run --steps weights --torch-device cuda:0 --paddle-device gpu:0 --out "$OUT-refused" --no-create "${control[@]}"
code=$?
[ "$code" -eq 2 ] || die "expected exit 2 for a shared GPU, got $code" 1
echo "refused as expected (exit 2)"

STEPS="${STEPS:-weights,forward,backward}"

say "run: steps $STEPS, ${devices[*]}"
timeout -k 20 "$RUN_TIMEOUT" "${co[@]}" run --steps "$STEPS" "${devices[@]}" --env-set gpu --out "$OUT" \
  --hello-timeout 300 --timeout 300 --no-create "${extra[@]}"
code=$?
[ "$code" -eq 124 ] && echo "gpu_check: the run passed RUN_TIMEOUT=${RUN_TIMEOUT}s" >&2

say "HELLOs, determinism, schedule and diffs (from $OUT/summary.json)"
if [ -f "$OUT/summary.json" ]; then
  "$py" - "$OUT/summary.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
for name, h in (s.get("workers") or {}).items():
    keep = ("framework", "framework_version", "device", "device_name", "device_index", "visible_devices",
            "device_uuid", "device_memory", "nvidia_smi", "cuda_available", "threads", "host", "executable")
    print(f"{name}: " + json.dumps({k: h.get(k) for k in keep if k in h}, indent=1))
print("determinism: " + json.dumps(s.get("determinism"), indent=1))
print("schedule: " + json.dumps(s.get("schedule")))
for st in s.get("steps", []):
    print(f"step {st['name']}: {st['status']} worst={st.get('worst')} tol={st.get('tolerance')} {st.get('message', '')[:200]}")
    for d in st.get("diffs", [])[:40]:
        print(f"    {d.get('name')}: max_abs={d.get('max_abs')} mean_abs={d.get('mean_abs')} passed={d.get('passed')}")
print(f"status: {s.get('status')} exit_code: {s.get('exit_code')} error: {(s.get('error') or '')[:600]}")
if s.get("determinism") and not s["determinism"].get("ok"):
    print("WARNING: determinism problems: " + "; ".join(s["determinism"].get("problems", [])))
EOF
else
  echo "no summary.json was written"
fi
for log in "$OUT"/*_worker.log; do
  [ -f "$log" ] && { echo "--- tail of $log ---"; tail -n 40 "$log"; }
done
expect="${EXPECT:-0}"
[ "$code" -eq "$expect" ] || die "the run exited $code (expected $expect)" "$([ "$code" -eq 0 ] && echo 1 || echo "$code")"
if [ "$expect" -eq 0 ]; then echo "gpu_check: OK (aligned $where)"; else echo "gpu_check: OK (exit $code as expected, $where)"; fi
