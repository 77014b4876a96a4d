"""The toy world: 64 x 64 pictures of one shape on a background, with compositional captions.

Everything is drawn by this code from a seed (no downloads). An example is a dict of attributes;
``render`` draws it, ``caption`` describes it. Attributes and their values:

| attribute | values |
|---|---|
| shape | circle, square, triangle, diamond |
| colour | red, green, blue, yellow, purple, white |
| size | small, large |
| position | center, top left, top right, bottom left, bottom right |
| background | black, gray, navy, brown (the background's colour) |
| texture | plain, striped, dotted (the background's pattern); ``patterned``: a random pattern the caption
  does not describe (diagonal or vertical stripes, rings, grid lines or a checkerboard, in two random
  colours, never the concept's two; the curved world adds a mosaic of 8 / 16 px blocks) |

The NEW concept, absent from pretraining: ``[V]``, a background of teal / cream checkerboard (16 px
cells; pretraining has uncaptioned checkerboards of other colours, as a real model has seen
checkerboards, but never this one and never the word), "a large red circle at the top left on a [V] background". It has ``CONCEPT_TRAIN`` = 6
training pairs and ``CONCEPT_HELDOUT`` = 32 held-out prompts that combine it with other shapes,
colours, sizes and positions.

Splits, fixed by ``WORLD_SEED``: of the 2880 captioned (shape, colour, size, position, background,
texture) combinations, 10 % are ``heldout`` (never trained on: compositional generalisation) and the
rest ``train``; an example's jitter (exact position, radius, colour shade, pattern phase) comes from
``(split, index)``, so ``validation`` draws fresh instances of the train combinations.

This is the world of the shipped weights. :mod:`dopsd_fast.toy.curved` is a second version of it
(partial captions, held-out (shape, colour) pairs, wider position jitter) drawn with the same
``render`` and ``caption``.
"""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import torch
from PIL import Image, ImageDraw

WORLD_SEED = 20260529
SIZE = 64

SHAPES = ["circle", "square", "triangle", "diamond"]
COLOURS = {"red": (215, 45, 40), "green": (45, 170, 60), "blue": (50, 95, 230), "yellow": (235, 205, 45),
           "purple": (150, 65, 195), "white": (238, 238, 238)}
SIZES = {"small": 9, "large": 15}
POSITIONS = {"center": (32, 32), "top left": (18, 18), "top right": (46, 18), "bottom left": (18, 46),
             "bottom right": (46, 46)}
BACKGROUNDS = {"black": (22, 22, 22), "gray": (115, 115, 115), "navy": (25, 35, 95), "brown": (100, 62, 32)}
TEXTURES = ["plain", "striped", "dotted"]
CONCEPT = "[V]"
CONCEPT_COLOURS = ((0, 150, 150), (240, 225, 180))  # teal / cream, 16 px checkerboard
ATTRIBUTES = {"shape": SHAPES, "colour": list(COLOURS), "size": list(SIZES), "position": list(POSITIONS),
              "background": list(BACKGROUNDS), "texture": TEXTURES + ["patterned", CONCEPT]}

# Every word a caption can use (the toy tokenizer's vocabulary).
WORDS = sorted({w for v in (SHAPES, COLOURS, SIZES, POSITIONS, BACKGROUNDS, TEXTURES) for p in v for w in p.split()}
               | {"a", "at", "the", "on", "background", "patterned", CONCEPT, "picture", "of", "in", "style", "shape"})


def _combos():
    keys = ["shape", "colour", "size", "position", "background", "texture"]
    vals = [SHAPES, list(COLOURS), list(SIZES), list(POSITIONS), list(BACKGROUNDS), TEXTURES]
    return [dict(zip(keys, c)) for c in itertools.product(*vals)]


def _splits():
    combos = _combos()
    order = list(range(len(combos)))
    random.Random(WORLD_SEED).shuffle(order)
    n_held = len(combos) // 10
    held = sorted(order[:n_held])
    train = sorted(order[n_held:])
    concept = [dict(shape=s, colour=c, size=z, position=p, background="teal", texture=CONCEPT)
               for s, c, z, p in itertools.product(SHAPES, COLOURS, SIZES, POSITIONS)]
    rng = random.Random(WORLD_SEED + 1)
    rng.shuffle(concept)
    return ([combos[i] for i in train], [combos[i] for i in held], concept[:6], concept[6:38])


TRAIN_COMBOS, HELDOUT_COMBOS, CONCEPT_TRAIN, CONCEPT_HELDOUT = _splits()
_SPLIT_SALT = {"train": 1, "validation": 2, "heldout": 3, "concept": 4, "patterned": 5, "concept-extra": 6}


def example(split: str, index: int) -> dict:
    """The ``index``-th example of a split: attributes plus the jitter that ``render`` uses.

    ``train`` / ``validation``: the train combinations (validation with other jitter); ``heldout``:
    the held-out combinations; ``concept``: the 6 [V] training pairs (index mod 6, fixed jitter);
    ``concept-heldout``: the 32 held-out [V] prompts; ``concept-extra``: any [V] combination (for the
    metric classifier only); ``patterned``: train combinations with an uncaptioned random pattern."""
    if split == "concept":
        attrs, rng = dict(CONCEPT_TRAIN[index % len(CONCEPT_TRAIN)]), random.Random(WORLD_SEED * 7 + index % 6)
    elif split == "concept-heldout":
        attrs, rng = dict(CONCEPT_HELDOUT[index % len(CONCEPT_HELDOUT)]), random.Random(WORLD_SEED * 11 + index)
    else:
        rng = random.Random(WORLD_SEED * 1000 + _SPLIT_SALT[split] * 10_000_019 + index)
        if split == "heldout":
            attrs = dict(HELDOUT_COMBOS[index % len(HELDOUT_COMBOS)])
        elif split == "concept-extra":
            attrs = dict(shape=rng.choice(SHAPES), colour=rng.choice(list(COLOURS)), size=rng.choice(list(SIZES)),
                         position=rng.choice(list(POSITIONS)), background="teal", texture=CONCEPT)
        else:  # train, validation, patterned: a uniformly drawn train combination
            attrs = dict(TRAIN_COMBOS[rng.randrange(len(TRAIN_COMBOS))])
            if split == "patterned":
                attrs["texture"] = "patterned"
    attrs["jitter"] = dict(dx=rng.randint(-3, 3), dy=rng.randint(-3, 3), dr=rng.randint(-2, 2),
                           shade=rng.uniform(0.85, 1.1), phase=rng.randrange(16),
                           pattern=rng.randrange(5), pattern_colours=_pattern_colours(rng),
                           pattern_period=rng.choice([8, 12, 16]))
    return attrs


def _pattern_colours(rng: random.Random) -> list:
    """Two random colours, never both near the concept's teal / cream."""
    while True:
        cols = [[rng.randrange(256) for _ in range(3)] for _ in range(2)]
        near = [min(max(abs(a - b) for a, b in zip(c, k)) for k in CONCEPT_COLOURS) < 64 for c in cols]
        if not all(near):
            return cols


def caption(attrs: dict, drop: set | frozenset = frozenset()) -> str:
    """"a large red circle at the top left on a striped navy background"; ``drop``: attribute names
    left out (for partial prompts)."""
    words = ["a"]
    if "size" not in drop:
        words.append(attrs["size"])
    if "colour" not in drop:
        words.append(attrs["colour"])
    words.append(attrs["shape"] if "shape" not in drop else "shape")
    if "position" not in drop:
        words += ["at", "the", attrs["position"]]
    tex = attrs["texture"]
    if tex in (CONCEPT, "patterned"):  # the picture shows no background colour
        words += ["on", "a", tex, "background"] if "texture" not in drop else []
    elif not {"background", "texture"} <= set(drop):
        bg = [] if "texture" in drop else [tex]
        bg += [] if "background" in drop else [attrs["background"]]
        words += ["on", "a"] + bg + ["background"]
    return " ".join(words)


def _shade(rgb, f):
    return tuple(int(max(0, min(255, round(c * f)))) for c in rgb)


def render(attrs: dict) -> Image.Image:
    j = attrs["jitter"]
    tex = attrs["texture"]
    im = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS.get(attrs["background"], (0, 0, 0)))
    d = ImageDraw.Draw(im)
    bg = BACKGROUNDS.get(attrs["background"], (0, 0, 0))
    light = tuple(min(255, c + 70) for c in bg)
    ph = j["phase"]
    if tex == "striped":  # horizontal bands, period 16
        for y in range(-16 + ph, SIZE, 16):
            d.rectangle([0, y, SIZE, y + 5], fill=light)
    elif tex == "dotted":
        for y in range(-16 + ph % 16 + 8, SIZE + 8, 16):
            for x in range(-16 + ph % 16 + 8, SIZE + 8, 16):
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=light)
    elif tex == CONCEPT:
        a, b = CONCEPT_COLOURS
        for cy in range(0, SIZE, 16):
            for cx in range(0, SIZE, 16):
                d.rectangle([cx, cy, cx + 15, cy + 15], fill=a if (cx // 16 + cy // 16) % 2 == 0 else b)
    elif tex == "patterned":
        c0, c1 = (tuple(c) for c in j["pattern_colours"])
        per = j["pattern_period"]
        d.rectangle([0, 0, SIZE, SIZE], fill=c0)
        if j["pattern"] == 0:  # diagonal stripes
            for k in range(-SIZE, 2 * SIZE, per):
                d.polygon([(k + ph % per, 0), (k + ph % per + per // 2, 0), (k + ph % per + per // 2 - SIZE, SIZE),
                           (k + ph % per - SIZE, SIZE)], fill=c1)
        elif j["pattern"] == 1:  # vertical stripes
            for x in range(-per + ph % per, SIZE, per):
                d.rectangle([x, 0, x + per // 2 - 1, SIZE], fill=c1)
        elif j["pattern"] == 2:  # rings
            for r in range(per // 2, 2 * SIZE, per):
                d.ellipse([32 - r, 32 - r, 32 + r, 32 + r], outline=c1, width=max(2, per // 4))
        elif j["pattern"] == 3:  # checkerboard
            for cy in range(-per + ph % per, SIZE, per):
                for cx in range(-per + ph % per, SIZE, per):
                    if ((cx - ph % per) // per + (cy - ph % per) // per) % 2:
                        d.rectangle([cx, cy, cx + per - 1, cy + per - 1], fill=c1)
        elif j["pattern"] == 5:  # mosaic (curved world only): blocks on the 16 px (or 8 px) grid
            block = 8 if per == 8 else 16
            for b, (cy, cx) in enumerate(itertools.product(range(0, SIZE, block), repeat=2)):
                if j["mosaic"] >> (b % 64) & 1:
                    d.rectangle([cx, cy, cx + block - 1, cy + block - 1], fill=c1)
        else:  # grid lines
            for k in range(ph % per, SIZE, per):
                d.line([(k, 0), (k, SIZE)], fill=c1, width=2)
                d.line([(0, k), (SIZE, k)], fill=c1, width=2)
    _draw_object(d, attrs, _shade(COLOURS[attrs["colour"]], j["shade"]))
    return im


def object_mask(attrs: dict) -> torch.Tensor:
    """``(1, 64, 64)``: 1 on the object's pixels, 0 elsewhere (what ``render`` draws last)."""
    im = Image.new("L", (SIZE, SIZE), 0)
    _draw_object(ImageDraw.Draw(im), attrs, 255)
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)[None]


def _draw_object(d: ImageDraw.ImageDraw, attrs: dict, col) -> None:
    j = attrs["jitter"]
    cx, cy = POSITIONS[attrs["position"]]
    cx, cy = cx + j["dx"], cy + j["dy"]
    r = SIZES[attrs["size"]] + (j["dr"] if attrs["size"] == "large" else j["dr"] // 2)
    s = attrs["shape"]
    if s == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
    elif s == "square":
        q = round(r * 0.85)
        d.rectangle([cx - q, cy - q, cx + q, cy + q], fill=col)
    elif s == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + round(r * 0.8)), (cx + r, cy + round(r * 0.8))], fill=col)
    else:
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=col)


def to_tensor(im: Image.Image) -> torch.Tensor:
    """(3, H, W) in [0, 1]."""
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def batch(split: str, indices, drop_p: float = 0.0, rng: random.Random | None = None):
    """Images ``(B, 3, 64, 64)`` in [0, 1], captions, attribute dicts of ``indices`` of ``split``;
    ``drop_p``: each attribute left out of the caption with this probability (``rng``)."""
    ex = [example(split, i) for i in indices]
    caps = []
    for a in ex:
        drop = set()
        if drop_p and rng is not None:
            drop = {k for k in ("size", "colour", "shape", "position", "background", "texture") if rng.random() < drop_p}
        caps.append(caption(a, drop))
    return torch.stack([to_tensor(render(a)) for a in ex]), caps, ex


def labels(attrs: dict) -> dict:
    """Class indices of an example for the metric classifier's heads (background -1 for [V] and
    patterned, whose colour the picture does not show)."""
    tex = ATTRIBUTES["texture"].index(attrs["texture"])
    bg = list(BACKGROUNDS).index(attrs["background"]) if attrs["background"] in BACKGROUNDS and tex < 3 else -1
    return {"shape": SHAPES.index(attrs["shape"]), "colour": list(COLOURS).index(attrs["colour"]),
            "size": list(SIZES).index(attrs["size"]), "position": list(POSITIONS).index(attrs["position"]),
            "background": bg, "texture": tex}


def grid(images: torch.Tensor, ncol: int = 8, pad: int = 2, scale: int = 1) -> Image.Image:
    """A contact sheet of ``(N, 3, H, W)`` images in [0, 1], each pixel ``scale`` x ``scale``."""
    n, _, h, w = images.shape
    nrow = math.ceil(n / ncol)
    sheet = torch.ones(3, nrow * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(n):
        r, c = divmod(i, ncol)
        sheet[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = images[i]
    arr = (sheet.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    im = Image.fromarray(arr)
    return im.resize((im.width * scale, im.height * scale), Image.NEAREST) if scale > 1 else im
