"""Helpers the families share."""

from __future__ import annotations

import hashlib
from pathlib import Path


SAMPLE_BYTES = 1 << 20  # of a weight file's start and end, hashed: its header and its first and last tensors' data
SPAN_SAMPLES, SPAN_BYTES = 256, 1 << 16  # and 256 evenly spaced 64 KiB pieces in between: an edited layer is seen


def weights_fingerprint(p: Path) -> str:
    """``size:mtime:hash`` of a weight file, the hash of its first and last MiB and of 256 evenly spaced
    64 KiB pieces in between (about 18 MiB read, whatever the file's size): a copy (``cp -r``, rsync
    without -t: another mtime) is recognised as the same weights (:func:`same_weights`), and weights
    edited in place (a layer fine-tuned or merged: each piece of a 36-layer model's file is under a
    tenth of a layer apart) are not."""
    st = p.stat()
    size = st.st_size
    h = hashlib.sha256()
    with open(p, "rb") as f:
        if size <= 2 * SAMPLE_BYTES + SPAN_SAMPLES * SPAN_BYTES:
            h.update(f.read())
        else:
            h.update(f.read(SAMPLE_BYTES))
            inner = size - 2 * SAMPLE_BYTES - SPAN_BYTES
            for i in range(SPAN_SAMPLES):
                f.seek(SAMPLE_BYTES + inner * i // (SPAN_SAMPLES - 1))
                h.update(f.read(SPAN_BYTES))
            f.seek(size - SAMPLE_BYTES)
            h.update(f.read(SAMPLE_BYTES))
    return f"{size}:{int(st.st_mtime)}:{h.hexdigest()[:16]}"


def same_weights(a, b) -> bool | None:
    """Two :func:`weights_fingerprint` values: the same size and sampled content (the modification time
    aside); against an earlier version's ``size:mtime``, the same size and mtime. None where either is not
    such a value."""
    pa, pb = (str(x).split(":") if isinstance(x, str) else [] for x in (a, b))
    if not (2 <= len(pa) <= 3 and 2 <= len(pb) <= 3 and pa[0].isdigit() and pb[0].isdigit()):
        return None
    if len(pa) == 3 and len(pb) == 3:
        return pa[0] == pb[0] and pa[2] == pb[2]
    return pa[:2] == pb[:2]


def file_fingerprint(root: Path) -> dict:
    """Config contents plus names and fingerprints of weight files (:func:`weights_fingerprint`):
    identifies local weights without reading gigabytes."""
    out = {}
    if not root.exists():
        return {"missing": str(root)}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = str(p.relative_to(root))
            if p.suffix in (".json", ".txt", ".jinja"):
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            elif p.suffix in (".safetensors", ".bin", ".pt"):
                out[rel] = weights_fingerprint(p)
    return out


def differing_files(saved: dict, now: dict) -> list[str]:
    """The files two :func:`file_fingerprint` values do not share, by name: missing on either side, another
    content (a config), or other weights (:func:`same_weights`: a copy's new modification time is the same
    weights). ``[]``: the same files."""
    out = []
    for rel in sorted(set(saved) | set(now)):
        a, b = saved.get(rel), now.get(rel)
        if a == b:
            continue
        if a is None or b is None or not same_weights(a, b):
            out.append(rel)
    return out
