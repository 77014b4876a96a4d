"""Aspect-ratio buckets (width, height)."""

from __future__ import annotations

import math

# The authors' 11 buckets around one megapixel.
ONE_MEGAPIXEL_BUCKETS: tuple[tuple[int, int], ...] = (
    (1024, 1024), (1152, 896), (896, 1152), (1152, 864), (864, 1152), (1248, 832),
    (832, 1248), (1280, 720), (720, 1280), (1344, 576), (576, 1344),
)


def make_buckets(spec, scale: float = 1.0, multiple: int = 16) -> list[tuple[int, int]]:
    """Resolve ``"1mp"`` or a list of [w, h]; scale each side and round it to ``multiple``.

    Scaled-down buckets (tiny presets) can coincide after rounding: duplicates are dropped, order
    kept.
    """
    base = ONE_MEGAPIXEL_BUCKETS if spec == "1mp" else [tuple(int(v) for v in b) for b in spec]
    out: list[tuple[int, int]] = []
    for w, h in base:
        sw = max(multiple, int(round(w * scale / multiple)) * multiple)
        sh = max(multiple, int(round(h * scale / multiple)) * multiple)
        if (sw, sh) not in out:
            out.append((sw, sh))
    if not out:
        raise ValueError("no buckets")
    return out


def assign_bucket(width: int, height: int, buckets) -> tuple[int, int] | None:
    """The bucket with the nearest aspect ratio among those that fit inside the image (no
    upscaling). Returns None when the image is smaller than every bucket."""
    fitting = [b for b in buckets if b[0] <= width and b[1] <= height]
    if not fitting:
        return None
    log_ar = math.log(width / height)
    return min(fitting, key=lambda b: (abs(math.log(b[0] / b[1]) - log_ar), -b[0] * b[1]))


def nearest_aspect(width: int, height: int, buckets) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's, whether or not it fits inside it (what an
    image too small for every bucket is told about)."""
    return min(buckets, key=lambda b: abs(math.log((b[0] / b[1]) / (width / height))))
