"""The curved toy world (version 2 of :mod:`dopsd_fast.toy.world`): a world whose flow from noise to
picture is curved, so that a few-step sampler of a model trained on it ghosts.

The pictures are drawn by ``world.render`` and described by ``world.caption``; what changes:

- **Partial captions.** A training caption names the shape and leaves each other attribute out with
  probability ``P_DROP`` = 0.5 (``draw_drop``): "a circle on a striped background" stands for 48
  pictures, so the conditional distribution is multimodal (the many-step ODE picks one mode, one
  Euler step from noise lands on their mean). The empty caption is classifier-free guidance's
  unconditional branch.
- **Wider position jitter** (+-``POSITION_JITTER`` px instead of +-3).
- **Held-out (shape, colour) pairs.** ``HELDOUT_PAIRS``: one pair per shape, four colours, drawn by
  the seed (e.g. no purple triangle): no ``train`` picture shows one, in any size, position or
  background (``heldout``: 480 of the 2880 captioned combinations, the rest ``train``); ``any``
  draws from all of them (for networks that measure, not generate).
- ``patterned`` adds a mosaic of 8 / 16 px blocks to the uncaptioned patterns (layouts of blocks in
  two colours, the kind of background the in-context route must copy exactly).
- ``HELDOUT_PROMPTS``: 256 partial captions of held-out combinations (shape and colour always named,
  so each prompt is a combination never trained on; the other attributes dropped at p = 0.5), with
  the picture each was drawn from; the same list is fixed in ``benchmarks/science/heldout_prompts.txt``.

The ``[V]`` concept and its splits are the world's (``world.CONCEPT_TRAIN``, ``world.CONCEPT_HELDOUT``).
"""

from __future__ import annotations

import random

import torch

from dopsd_fast.toy import world as W

VERSION = "curved"
STUDENT_SIGMAS = (1.0, 0.5, 0.0)
"""The curved world's student: K = 2 steps, two of the Z-Image K = 4 schedule's levels (1, 0.9, 0.75,
0.5, 0). The K = 4 schedule spends three steps between 1 and 0.5, where this world's choices (colour,
position, background) are made, so the base's own 4-step samples are the 40-step ones slightly blurred
(sharpness 0.77 against 0.88): nothing for a distilled student to win. At K = 2 the base's first step
lands on the mean of the modes and its samples ghost (0.51)."""
P_DROP = 0.5  # each attribute but the shape left out of a training caption with this probability
POSITION_JITTER = 5
OPTIONAL = ("size", "colour", "position", "background", "texture")  # what a partial caption may leave out


def _heldout_pairs() -> list[tuple[str, str]]:
    """One (shape, colour) pair per shape, four different colours, drawn by the seed."""
    colours = list(W.COLOURS)
    random.Random(W.WORLD_SEED).shuffle(colours)
    return list(zip(W.SHAPES, colours))


HELDOUT_PAIRS = _heldout_pairs()
ALL_COMBOS = W._combos()
TRAIN_COMBOS = [c for c in ALL_COMBOS if (c["shape"], c["colour"]) not in HELDOUT_PAIRS]
HELDOUT_COMBOS = [c for c in ALL_COMBOS if (c["shape"], c["colour"]) in HELDOUT_PAIRS]
random.Random(W.WORLD_SEED + 2).shuffle(HELDOUT_COMBOS)  # any prefix is a uniform draw of them
_SPLIT_SALT = {"train": 11, "validation": 12, "heldout": 13, "patterned": 15, "any": 17}
SPLITS = tuple(_SPLIT_SALT) + ("concept", "concept-heldout", "concept-extra")


def draw_jitter(rng: random.Random) -> dict:
    """What varies between pictures of one combination: exact position, radius, shade, pattern phase
    (and, for ``patterned``, the pattern)."""
    return dict(dx=rng.randint(-POSITION_JITTER, POSITION_JITTER), dy=rng.randint(-POSITION_JITTER, POSITION_JITTER),
                dr=rng.randint(-2, 2), shade=rng.uniform(0.85, 1.1), phase=rng.randrange(16),
                pattern=rng.randrange(6), pattern_colours=W._pattern_colours(rng),
                pattern_period=rng.choice([8, 12, 16]), mosaic=rng.getrandbits(64))


def example(split: str, index: int) -> dict:
    """The ``index``-th example of a split: ``train`` / ``validation`` (other jitter): the train
    combinations; ``heldout``: the held-out ones (index mod 480); ``any``: all of them;
    ``patterned``: train combinations with an uncaptioned random pattern; the ``[V]`` splits are the
    world's (``world.example``)."""
    if split.startswith("concept"):
        return W.example(split, index)
    rng = random.Random(W.WORLD_SEED * 1000 + _SPLIT_SALT[split] * 10_000_019 + index)
    if split == "heldout":
        attrs = dict(HELDOUT_COMBOS[index % len(HELDOUT_COMBOS)])
    elif split == "any":
        attrs = dict(ALL_COMBOS[rng.randrange(len(ALL_COMBOS))])
    else:
        attrs = dict(TRAIN_COMBOS[rng.randrange(len(TRAIN_COMBOS))])
        if split == "patterned":
            attrs["texture"] = "patterned"
    attrs["jitter"] = draw_jitter(rng)
    return attrs


def draw_drop(rng: random.Random, p: float = P_DROP, keep=()) -> set:
    """The attributes a partial caption leaves out: each of ``OPTIONAL`` but ``keep`` with probability ``p``."""
    return {k for k in OPTIONAL if rng.random() < p and k not in keep}


def named(drop) -> tuple:
    """The attributes a caption with ``drop`` left out still names (what it asks for)."""
    return tuple(k for k in ("shape",) + OPTIONAL if k not in drop)


def batch(split: str, indices, drop_p: float = 0.0, rng: random.Random | None = None):
    """Images ``(B, 3, 64, 64)`` in [0, 1], captions (partial at ``drop_p`` with ``rng``), attribute
    dicts of ``indices`` of ``split``."""
    ex = [example(split, i) for i in indices]
    caps = [W.caption(a, draw_drop(rng, drop_p) if drop_p and rng is not None else set()) for a in ex]
    return torch.stack([W.to_tensor(W.render(a)) for a in ex]), caps, ex


def partial_prompts(split: str = "heldout", n: int = 256) -> list[dict]:
    """``n`` partial captions of ``split``'s combinations (shape and colour always named, the other
    attributes dropped at p = 0.5, fixed by the index), each with what it names and its picture's
    attributes: ``HELDOUT_PROMPTS`` are the held-out ones; ``validation`` gives trained combinations."""
    out = []
    for i in range(n):
        a = example(split, i)
        drop = draw_drop(random.Random(W.WORLD_SEED * 13 + i), 0.5, keep=("colour",))
        out.append({"prompt": W.caption(a, drop), "named": named(drop), "attrs": a})
    return out


HELDOUT_PROMPTS = partial_prompts()
