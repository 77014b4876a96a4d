"""Helpers the families share."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_fingerprint(root: Path) -> dict:
    """Config contents plus names, sizes and mtimes of weight files: identifies local weights
    without reading gigabytes."""
    out = {}
    if not root.exists():
        return {"missing": str(root)}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = str(p.relative_to(root))
            if p.suffix in (".json", ".txt", ".jinja"):
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            elif p.suffix in (".safetensors", ".bin", ".pt"):
                st = p.stat()
                out[rel] = f"{st.st_size}:{int(st.st_mtime)}"
    return out
