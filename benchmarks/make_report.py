"""Collects a GPU check's outputs (JSON rows, test log, timeline) into one report.md.

    python benchmarks/make_report.py OUT_DIR
"""

import json
import sys
from pathlib import Path


def table(rows):
    keys = [k for k in dict.fromkeys(k for r in rows for k in r)
            if k not in ("device", "sm", "memory_gib", "driver", "torch", "cuda", "triton", "python", "date", "bench")]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(out: Path) -> None:
    parts = [f"# GPU check report ({out.name})", ""]
    env = out / "env.txt"
    if env.exists():
        parts += ["```", env.read_text().strip(), "```", ""]
    tests = out / "gpu_kernel_tests.txt"
    if tests.exists():
        tail = [line for line in tests.read_text().splitlines() if line.strip()][-3:]
        parts += ["## GPU kernel parity tests (DOPSD_GPU_TESTS=1)", "", "```", *tail, "```", ""]
    for f in sorted(out.rglob("*.json")):
        rows = json.loads(f.read_text())
        if isinstance(rows, dict) and "verdict" in rows:  # step_time.py
            r, env = rows, rows["env"]
            parts += [f"## step time, preset {r['preset']} ({env.get('device')}, driver {env.get('driver')}, torch "
                      f"{env.get('torch')}, CUDA {env.get('cuda')})", "",
                      table([r["eager"], r["fast"]] + r.get("ablation", [])), "",
                      f"speedup {r['speedup']:.3f}x, peak memory fast/eager {r['memory_ratio']:.3f}, floor "
                      f"{r['floor_tflop_per_step']:.1f} TFLOP/step, parity **{r['verdict']}**: loss rel err "
                      f"{r['parity']['loss']['rel_err_fast']:.3g}, grads global rel err "
                      f"{r['parity']['gradients']['global_rel_err_fast']:.3g} (eager "
                      f"{r['parity']['gradients']['global_rel_err_eager']:.3g}), min cos "
                      f"{r['parity']['gradients']['min_cos_fast']:.5f}", ""]
            continue
        if rows and isinstance(rows, list):
            r0 = rows[0]
            parts += [f"## {r0.get('bench', f.stem)} ({r0.get('device')}, driver {r0.get('driver')}, torch "
                      f"{r0.get('torch')}, CUDA {r0.get('cuda')}, triton {r0.get('triton')})", "", table(rows), ""]
    tl = out / "timeline.txt"
    if tl.exists():
        parts += ["## Timeline", "", "```", tl.read_text().strip(), "```", ""]
    (out / "report.md").write_text("\n".join(parts))
    print(f"report: {out / 'report.md'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
