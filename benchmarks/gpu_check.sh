#!/usr/bin/env bash
# The one prepared GPU check: ONE device call that ends by itself within its budget.
#
#   here, once:   bash benchmarks/fetch_gpu_wheels.sh            (diffusers wheel -> .whl/)
#   device call:  run(command="GIT_COMMIT=<sha> bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=560)
#
# Budget: BUDGET_S (default 540) seconds from the start of this script, wheel install included; the
# stages (benchmarks/gpu_check.py: smoke, m1 attention, m2 paired linear, m3 one real-size step,
# step eager vs fast) each run under min(their cap, what is left). $OUT receives exactly two files,
# report.md and results.json, rewritten after every stage. A failed install stops the run at once.
set -uo pipefail
T0=$(date +%s)
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/benchmarks/results/local-$(date +%Y%m%d-%H%M%S)}
BUDGET_S=${BUDGET_S:-540}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
unset TRITON_INTERPRET
LOG=$(mktemp -d)/install.log

fail_install() {  # the two files, saying what failed, then stop
  "$PY" - "$OUT" "$1" "$LOG" <<'PYEOF'
import json, sys, time, pathlib
out, what, log = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:]) if log.exists() else ""
(out / "results.json").write_text(json.dumps({"meta": {"verdict": "INSTALL FAILED", "what": what,
    "date": time.strftime("%Y-%m-%d %H:%M:%S")}, "rows": [], "log_tail": tail}, indent=1) + "\n")
(out / "report.md").write_text(f"# GPU check: INSTALL FAILED\n\n{what}\n\n```\n{tail}\n```\n")
PYEOF
  echo "gpu_check: $1 (see $OUT/report.md)"; exit 1
}

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$LOG" 2>&1 || fail_install "installing the carried wheels (.whl/) failed"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 \
  || fail_install "installing dopsd-fast (pip install -e .) failed"
echo "[$(( $(date +%s) - T0 )) s] installed"
exec "$PY" benchmarks/gpu_check.py --out "$OUT" --budget "$BUDGET_S" --t0 "$T0"
