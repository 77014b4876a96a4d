#!/usr/bin/env bash
# One-command GPU check: from a checkout on a GPU machine (no network needed), measure the fast path
# against the eager reference within a time budget, and write report.md + results.json.
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--budget SECONDS] [--wheels DIR] [--stages a,b,c]
#
#   --out DIR        where the files go: report.md, results.json, logs.txt (default: $OUT, else
#                    benchmarks/results/local-<time>)
#   --budget S       seconds for the whole call, wheel install included (default: $BUDGET_S, else 540)
#   --wheels DIR     a folder of extra wheels the machine lacks (e.g. diffusers, fetched with
#                    benchmarks/fetch_gpu_wheels.sh); installed with --no-index into a private temporary
#                    folder put on PYTHONPATH (default: .whl/ when it holds wheels)
#   --stages LIST    stages of benchmarks/gpu_check.py (default: its own list, in its --help)
#   --dry-run        on the CPU: every stage at toy shapes (kernels through Triton's interpreter), the
#                    per-stage budget table first; checks the code before GPU time is spent, measures nothing
#
# dopsd-fast itself is not installed: the checkout imports as-is. A failed wheel install stops the
# run at once, with the two files saying so.
set -uo pipefail
T0=$(date +%s)
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/benchmarks/results/local-$(date +%Y%m%d-%H%M%S)}
BUDGET_S=${BUDGET_S:-540}
WHEELS=.whl
STAGES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --budget) BUDGET_S=$2; shift 2 ;;
    --wheels) WHEELS=$2; shift 2 ;;
    --stages) STAGES=(--stages "$2"); shift 2 ;;
    --dry-run) export GPU_CHECK_DRYRUN=1; shift ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
unset TRITON_INTERPRET
PRIVATE=$(mktemp -d -t gpu-check-XXXXXXXX)  # mode 0700: nobody else can plant a package in it
LOG=$PRIVATE/install.log

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

if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  PIP_NO_INDEX=1 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$PRIVATE/site" \
    "$WHEELS"/*.whl >"$LOG" 2>&1 || fail_install "installing the carried wheels ($WHEELS/) failed"
  export PYTHONPATH=$PRIVATE/site${PYTHONPATH:+:$PYTHONPATH} GPU_CHECK_CARRIED=$PRIVATE/site
fi
# the checkout imports as-is (dopsd_fast.kernels reaches the top-level kernels/ folder)
"$PY" -c "import dopsd_fast, dopsd_fast.kernels.attention" >>"$LOG" 2>&1 \
  || fail_install "importing dopsd_fast from the checkout failed"
# what every measuring stage imports: a missing one stops here in seconds, not after minutes of failed stages
"$PY" -c "import diffusers, transformers, peft, dopsd_fast.families.zimage.adapter" >>"$LOG" 2>&1 \
  || fail_install "importing diffusers / transformers / peft failed (carry the missing wheels: \
benchmarks/fetch_gpu_wheels.sh)"
echo "[$(( $(date +%s) - T0 )) s] ready"
exec "$PY" benchmarks/gpu_check.py --out "$OUT" --budget "$BUDGET_S" --t0 "$T0" "${STAGES[@]}"
