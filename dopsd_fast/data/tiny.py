"""The built-in tiny dataset: a few small procedurally drawn images with captions.

Generated deterministically by this code (no download), written once under
``$DOPSD_FAST_HOME`` (default ``~/.cache/dopsd_fast``) and reused; the first use logs where.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw
import shutil
from dopsd_fast.toy import curved, world

VERSION = "v1"
HOME_ENV = "DOPSD_FAST_HOME"  # where the built-in datasets are written (default ~/.cache/dopsd_fast)
log = logging.getLogger("dopsd_fast")

_SUBJECTS = [
    ("red circle", (220, 40, 40), "ellipse"),
    ("blue square", (40, 70, 220), "rectangle"),
    ("green triangle", (40, 180, 70), "polygon"),
    ("yellow circle", (230, 200, 40), "ellipse"),
    ("purple square", (140, 60, 180), "rectangle"),
    ("orange triangle", (240, 140, 30), "polygon"),
]
_SIZES = [(160, 160), (176, 144), (144, 176), (160, 160), (192, 128), (160, 160)]


def home() -> Path:
    """Where the built-in datasets live: ``$DOPSD_FAST_HOME``, else ``~/.cache/dopsd_fast``."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "dopsd_fast")


def draw(index: int) -> Image.Image:
    name, color, shape = _SUBJECTS[index % len(_SUBJECTS)]
    w, h = _SIZES[index % len(_SIZES)]
    rng = random.Random(index)
    bg = tuple(rng.randrange(200, 256) for _ in range(3))
    im = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(im)
    for y in range(0, h, 16):  # a soft stripe texture: the "[V] style"
        d.line([(0, y), (w, y)], fill=tuple(max(0, c - 25) for c in bg), width=3)
    cx, cy, r = w // 2 + rng.randrange(-10, 11), h // 2 + rng.randrange(-10, 11), min(w, h) // 3
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "ellipse":
        d.ellipse(box, fill=color, outline=(0, 0, 0), width=3)
    elif shape == "rectangle":
        d.rectangle(box, fill=color, outline=(0, 0, 0), width=3)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color, outline=(0, 0, 0))
    return im


def _write_once(root: Path, prefix: str, pictures) -> Path:
    """``root/train.jsonl`` and its pictures, written once: ``pictures`` (called only when absent)
    yields (file name, PIL image, JSONL row without ``image``). Written to a temporary folder beside
    ``root``, then renamed into place (atomic: concurrent writers race harmlessly)."""
    jsonl = root / "train.jsonl"
    if jsonl.is_file():
        return jsonl
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=prefix))
    rows = []
    for fn, im, row in pictures():
        im.save(tmp / fn)
        rows.append({"image": fn, **row})
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        os.replace(tmp, root)
        log.info("built-in dataset written to %s (%d pictures; set %s to keep it elsewhere)", root, len(rows),
                 HOME_ENV)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return jsonl


def ensure_tiny_dataset(root: Path | None = None) -> Path:
    """Write the tiny dataset (if absent) and return the path of its ``train.jsonl``."""
    def pictures():
        for i, (name, _, _) in enumerate(_SUBJECTS):
            yield f"{i:02d}.png", draw(i), {
                "size": list(_SIZES[i]),
                "prompt": f"a [V] style picture of a {name}",
                "prompt_detailed": f"a [V] style picture of a {name} on a pale striped background, centered",
            }

    return _write_once(Path(root) if root is not None else home() / f"tiny-dataset-{VERSION}", ".tiny-", pictures)


TOY_CONCEPT_VERSION = "v1"  # of the [V] pairs; the prior pairs' world is part of the folder name too
HOME_ENV = "DOPSD_FAST_HOME"  # where the built-in datasets are written (default ~/.cache/dopsd_fast)
log = logging.getLogger("dopsd_fast")
TOY_PRIOR_PAIRS = 18


def ensure_toy_concept_dataset(root: Path | None = None, prior: bool = False) -> Path:
    """Write the toy world's ``[V]`` concept pairs (if absent) and return their ``train.jsonl``
    (``data.builtin: toy-concept``).

    The 6 training pairs of :data:`dopsd_fast.toy.world.CONCEPT_TRAIN` (64 x 64 PNG), each with its
    full caption (``prompt``, "a large red circle at the top left on a [V] background") and a short
    one that names only the shape and the concept (``prompt_short``, "a circle on a [V] background").
    ``prior`` (``toy-concept-prior``): followed by :data:`TOY_PRIOR_PAIRS` ordinary pictures of the
    world's training split with their captions (prior preservation: fine-tuning also sees what it
    should keep), from the curved world (:mod:`dopsd_fast.toy.curved`), whose build the package ships:
    its training split never shows one of its held-out (shape, colour) pairs.
    """

    name = "toy-concept-prior-curved" if prior else "toy-concept"
    examples = [(f"{i:02d}.png", world.example("concept", i)) for i in range(len(world.CONCEPT_TRAIN))]
    examples += [(f"w{i:03d}.png", curved.example("train", 7_000_000 + i)) for i in range(TOY_PRIOR_PAIRS if prior else 0)]

    def pictures():
        for fn, attrs in examples:
            yield fn, world.render(attrs), {"size": [world.SIZE, world.SIZE], "prompt": world.caption(attrs),
                                            "prompt_short": world.caption(attrs, {"size", "colour", "position"})}

    root = Path(root) if root is not None else home() / f"{name}-{TOY_CONCEPT_VERSION}"
    return _write_once(root, ".toy-concept-", pictures)
