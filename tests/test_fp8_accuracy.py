"""benchmarks/fp8_accuracy.py at a narrow width (the released head dim, few tokens): the script's
real-width part runs, every precision takes its path (FP8 on the block linears only), and the
figures it reports keep their order (bf16 closer to fp32 than FP8)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_real_width_part_at_a_narrow_width(monkeypatch):
    import importlib

    # Triton decides at a kernel's definition whether it is interpreted: define every kernel under the
    # suite's own setting first, so the switch below changes only which path runs, not what later
    # tests find defined
    for f in sorted((ROOT / "kernels").glob("*.py")):
        if not f.name.startswith("_"):
            importlib.import_module(f"dopsd_fast.kernels.{f.stem}")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the fused element-wise ops by their PyTorch references
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import fp8_accuracy
    finally:
        sys.path.pop(0)
    r = fp8_accuracy.real_width(blocks=1, image_tokens=16, cap_tokens=8, rank=4, seed=0, dim=384)
    assert r["config"]["dim"] == 384 and r["config"]["ffn"] == 1024  # both multiples of 16: all FP8-eligible
    for name in ("fp8-rowwise", "fp8-tensorwise"):
        row = r[name]
        assert row["fp8_linears"] == 7  # q, k, v, out, w1, w2, w3 of the one block; nothing else
        assert row["velocity_sqnr_vs_bf16_db"] >= 20.0, row
        assert r["bf16"]["velocity_sqnr_vs_fp32_db"] > row["velocity_sqnr_vs_fp32_db"]
        assert row["lora_grad_vs_fp32"]["n_tensors"] == 14 and row["lora_grad_vs_fp32"]["n_zero_reference"] == 0
