#!/usr/bin/env bash
# The one prepared GPU check. On a lent GPU machine (device tool), from the repository root:
#
#   here, once:   bash benchmarks/fetch_gpu_wheels.sh
#   device call:  run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=560)
#
# Stages (STAGES="tests kernels step", default all): GPU kernel parity tests (compiled kernels,
# DOPSD_GPU_TESTS=1), the kernel benchmarks at real shapes, and benchmarks/step_time.py when it
# exists. Writes logs, JSON/CSV rows and report.md under $OUT (the device tool's output folder;
# benchmarks/results/local-<time> elsewhere). Copy the folder to benchmarks/results/<date>-<gpu>/
# and commit it. Each stage has its own time limit so one slow stage cannot eat the rest. With 15
# minutes of device time per task, split it: STAGES="tests kernels" QUICK=1 in one call (~6 min),
# STAGES=step in another (~8 min).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/benchmarks/results/local-$(date +%Y%m%d-%H%M%S)}
STAGES=${STAGES:-tests kernels step}
QUICK=${QUICK:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$OUT/timeline.txt"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
  || { stamp "installing dopsd-fast failed"; tail -20 "$OUT/install.log"; exit 1; }
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
"$PY" - >"$OUT/env.txt" 2>&1 <<'PYEOF'
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA")
for name in ("diffusers", "transformers", "peft"):
    try:
        print(name, __import__(name).__version__)
    except Exception as e:  # noqa: BLE001
        print(name, "missing:", e)
PYEOF
cat "$OUT/env.txt"
stamp "setup done"

status=0
if [[ " $STAGES " == *" tests "* ]]; then
  DOPSD_GPU_TESTS=1 timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/kernels -rs 2>&1 | tee "$OUT/gpu_kernel_tests.txt"
  rc=${PIPESTATUS[0]}; [[ $rc -ne 0 ]] && status=1
  stamp "gpu kernel tests rc=$rc"
fi
if [[ " $STAGES " == *" kernels "* ]]; then
  for b in benchmarks/kernels/bench_*.py; do
    timeout 150 "$PY" "$b" ${QUICK:+--quick} --out "$OUT/kernels" 2>&1 | tee -a "$OUT/kernel_bench.txt"
    rc=${PIPESTATUS[0]}; [[ $rc -ne 0 ]] && status=1
    stamp "$(basename "$b") rc=$rc"
  done
fi
if [[ " $STAGES " == *" step "* && -f benchmarks/step_time.py ]]; then
  # STEP_PRESETS (default: a smaller real-architecture Z-Image, then the real 6.15 B size with the
  # authors' eager setting, gradient checkpointing, as the reference); klein-4b / klein-9b on request
  for preset in ${STEP_PRESETS:-zimage-mid zimage-6b}; do
    extra="--ablation"
    limit=150
    case "$preset" in zimage-6b|klein-9b) extra="--eager-checkpointing"; limit=330 ;; klein-4b) limit=240 ;; esac
    timeout $limit "$PY" benchmarks/step_time.py --preset "$preset" --steps 3 --warmup 1 --parity-steps 1 $extra \
      ${STEP_ARGS:-} --out "$OUT/step" 2>&1 | tee "$OUT/step_time_$preset.txt"
    rc=${PIPESTATUS[0]}; [[ $rc -ne 0 ]] && status=1
    stamp "step_time $preset rc=$rc"
  done
fi
"$PY" benchmarks/make_report.py "$OUT" || status=1
stamp "done status=$status"
exit $status
