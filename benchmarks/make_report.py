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
