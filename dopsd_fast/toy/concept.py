"""Measuring concept learning on the toy world: does a fine-tuned toy student draw ``[V]``, and does
it keep its few-step quality on everything else?

:func:`probe` samples a trainer's student (its own inference schedule, fixed noise per prompt)
on three prompt sets and scores the pictures with the toy world's metric classifier:

| set | prompts | what is scored |
|---|---|---|
| ``concept_train`` | the 6 training captions | ``[V]`` score |
| ``concept_heldout`` | 32 held-out ``[V]`` captions (other shapes, colours, sizes, positions) | ``[V]`` score; accuracy of the caption's shape / colour / size / position (few-step quality on the concept) |
| ``world`` | held-out world captions (no ``[V]``) | attribute accuracy, the ``[V]`` score (leaks), pixel drift from the starting student's pictures (forgetting) |

The ``[V]`` score is the classifier's mean probability that the background is ``[V]``; the ``[V]``
rate is the share of pictures whose most likely texture is ``[V]``; the ``[V]`` centroid rate is the
share of pictures whose classifier features (its 64-d penultimate layer) lie nearer the mean features
of 128 real ``[V]`` pictures than those of 128 real world pictures (on world prompts: the concept
leaking where it was not asked for); the ``[V]`` background error is
the pixel MSE, over the pixels that are background in the true picture, between a sample and the
true picture of its caption (the checkerboard is fixed, so it is known exactly; a graded measure
that sees partial learning, teal / cream without the grid, that the classifier scores as 0).

Texture metrics that colour blotches cannot pass (the teacher gate of the curved world,
``pipeline.gates``): the **checker correlation** is the correlation, over the true picture's
background, of the sample's and the true picture's position on the teal -> cream colour axis (the
layout: 1 for the exact grid); with the background error (the colours AND their layout) it rejects
what ``texture_controls`` builds: colour blotches, a uniform teal / cream mean, the grid shifted by
half a cell, a finer grid.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dopsd_fast.toy import world as W
from dopsd_fast.algorithm import euler_sample
from dopsd_fast.toy import models as M
from dopsd_fast.toy.classifier import load_classifier

_V = W.ATTRIBUTES["texture"].index(W.CONCEPT)
OBJECT_ATTRIBUTES = ("shape", "colour", "size", "position")


def background_mask(attrs: dict) -> torch.Tensor:
    """(64, 64) bool: the pixels that are background in the true picture of ``attrs``."""
    a = dict(attrs, colour="white")
    fg = W.to_tensor(W.render(dict(a, texture="plain", background="black"))).sum(0) > 1.5
    return ~fg


_TEAL, _CREAM = (torch.tensor(c, dtype=torch.float32) / 255 for c in W.CONCEPT_COLOURS)
_AXIS = (_CREAM - _TEAL) / (_CREAM - _TEAL).norm()  # the checkerboard's colour axis


def truth(attrs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """The true pictures of ``attrs`` and their background masks ``(N, 64, 64)``."""
    return (torch.stack([W.to_tensor(W.render(a)) for a in attrs]), torch.stack([background_mask(a) for a in attrs]))


def background_error(images: torch.Tensor, attrs: list[dict]) -> torch.Tensor:
    """(N,) pixel MSE over each true picture's background: the [V] colours AND their layout."""
    true, mask = truth(attrs)
    m = mask[:, None].expand_as(true).float()
    return ((images - true).pow(2) * m).flatten(1).sum(1) / m.flatten(1).sum(1)


def checker_correlation(images: torch.Tensor, attrs: list[dict]) -> torch.Tensor:
    """(N,) Pearson correlation, over each true picture's background, between the sample's and the
    true picture's position on the teal -> cream colour axis: 1 for the exact grid, ~0 for colour
    blotches, a uniform colour or a shifted grid (0 where the sample's background has no variance).
    Blind to the grid's exact colours on purpose: ``background_error`` measures them."""
    true, mask = truth(attrs)
    out = []
    for img, t, m in zip(images, true, mask):
        a = torch.einsum("chw,c->hw", img, _AXIS)[m]
        b = torch.einsum("chw,c->hw", t, _AXIS)[m]
        a, b = a - a.mean(), b - b.mean()
        den = (a.norm() * b.norm()).item()
        out.append((a @ b).item() / den if den > 1e-8 else 0.0)
    return torch.tensor(out)


def texture_controls(attrs: list[dict], seed: int = 0) -> dict:
    """Pictures that must FAIL the texture metrics, each the true picture with its background
    replaced: ``blotches`` (smooth random teal / cream blobs, half of each), ``uniform`` (the two
    colours' mean), ``shifted`` (the grid moved by half a cell), ``fine`` (8 px cells); and ``truth``."""
    true, mask = truth(attrs)
    g = torch.Generator().manual_seed(seed)
    n = len(attrs)
    field = torch.nn.functional.interpolate(torch.rand(n, 1, 5, 5, generator=g), size=(64, 64), mode="bicubic",
                                            align_corners=False)[:, 0]
    blob = field > field.flatten(1).median(1).values[:, None, None]
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    backgrounds = {
        "blotches": blob,
        "uniform": None,
        "shifted": (((xx + 8) // 16 + (yy + 8) // 16) % 2 == 1).expand(n, 64, 64),
        "fine": ((xx // 8 + yy // 8) % 2 == 1).expand(n, 64, 64),
    }
    out = {"truth": true}
    for name, cream in backgrounds.items():
        bg = ((_TEAL + _CREAM) / 2)[None, :, None, None].expand(n, 3, 64, 64) if cream is None else torch.where(
            cream[:, None], _CREAM[None, :, None, None], _TEAL[None, :, None, None])
        out[name] = torch.where(mask[:, None], bg, true)
    return out


def texture_scores(images: torch.Tensor, attrs: list[dict]) -> dict:
    """Mean ``background_error`` and ``checker_correlation`` of pictures of ``attrs``."""
    return {"background_error": round(float(background_error(images, attrs).mean()), 4),
            "checker_correlation": round(float(checker_correlation(images, attrs).mean()), 4)}


def prompt_sets(n_world: int = 64) -> dict:
    """name -> (captions, attribute dicts)."""
    out = {}
    for name, split, idx in (("concept_train", "concept", range(len(W.CONCEPT_TRAIN))),
                             ("concept_heldout", "concept-heldout", range(len(W.CONCEPT_HELDOUT))),
                             ("world", "heldout", [i * 4 + 1 for i in range(n_world)])):
        ex = [W.example(split, i) for i in idx]
        out[name] = ([W.caption(a) for a in ex], ex)
    return out


@torch.no_grad()
def sample_student(trainer, prompts: list[str], seed: int = 4321, chunk: int = 64, sigmas=None) -> torch.Tensor:
    """Pictures ``(N, 3, 64, 64)`` of the trainer's student (its current weights) at ``sigmas`` (default:
    the model's few-step inference schedule); the noise of prompt i is fixed by (seed, i)."""

    ad = trainer.adapter
    shape = ad.latent_shape(W.SIZE, W.SIZE)
    sig = list(sigmas) if sigmas is not None else ad.inference_sigmas(None, shape[-2:])
    out = []
    for i in range(0, len(prompts), chunk):
        p = prompts[i:i + chunk]
        ctx = [c.to(trainer.device) for c in ad.encode_student(p)]
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 100_003 + i + j))
                             for j in range(len(p))]).to(trainer.device)
        with trainer.autocast():
            x = euler_sample(lambda x, s: trainer.pair.velocity("student", x, s, ctx), noise, sig)
        out.append(ad.decode(x).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def centroids(net, n: int = 128) -> torch.Tensor:
    """(2, 64): the classifier's mean features of ``n`` real ``[V]`` pictures and ``n`` real world pictures."""
    real_v = torch.stack([W.to_tensor(W.render(W.example("concept-extra", i))) for i in range(n)])
    real_w = torch.stack([W.to_tensor(W.render(W.example("validation", i))) for i in range(n)])
    return torch.stack([net.features(real_v).mean(0), net.features(real_w).mean(0)])


@torch.no_grad()
def score(net, images: torch.Tensor, attrs: list[dict], heads=None, cents: torch.Tensor | None = None) -> dict:
    """``v_score``, ``v_rate``, ``v_centroid_rate`` (with ``cents``) and per-attribute accuracy
    (``heads``) of pictures."""
    logits = net(images)
    p_v = logits["texture"].softmax(-1)[:, _V]
    res = {"v_score": float(p_v.mean()), "v_rate": float((logits["texture"].argmax(-1) == _V).float().mean())}
    if cents is not None:
        d = torch.cdist(net.features(images), cents)
        res["v_centroid_rate"] = float((d[:, 0] < d[:, 1]).float().mean())
    acc = {}
    for k in heads or ():
        y = torch.tensor([W.labels(a)[k] for a in attrs])
        ok = y >= 0
        if ok.any():
            acc[k] = float((logits[k].argmax(-1)[ok] == y[ok]).float().mean())
    if acc:
        res["accuracy"] = acc
        res["accuracy_mean"] = sum(acc.values()) / len(acc)
    return res


class Probe:
    """Scores a trainer's student on the three prompt sets; the first call is the reference for drift."""

    def __init__(self, weights_dir: Path | None = None, n_world: int = 64, seed: int = 4321):
        self.net = load_classifier(Path(weights_dir or M.WEIGHTS_DIR))
        self.sets = prompt_sets(n_world)
        self.cents = centroids(self.net)
        self.seed = seed
        self.reference = None

    def __call__(self, trainer) -> tuple[dict, dict]:
        """(metrics, pictures by set)."""
        pics, res = {}, {}
        for name, (caps, attrs) in self.sets.items():
            pics[name] = sample_student(trainer, caps, self.seed)
            heads = {"concept_train": OBJECT_ATTRIBUTES, "concept_heldout": OBJECT_ATTRIBUTES,
                     "world": ("shape", "colour", "size", "position", "background", "texture")}[name]
            res[name] = score(self.net, pics[name], attrs, heads, self.cents)
            if name.startswith("concept"):
                truth = torch.stack([W.to_tensor(W.render(a)) for a in attrs])
                mask = torch.stack([background_mask(a) for a in attrs])[:, None].expand_as(truth)
                res[name]["v_background_mse"] = float((pics[name] - truth)[mask].pow(2).mean())
                res[name]["v_checker_corr"] = float(checker_correlation(pics[name], attrs).mean())
        if self.reference is None:
            self.reference = pics["world"]
        res["world"]["drift_mse"] = float((pics["world"] - self.reference).pow(2).mean())
        return res, pics


@torch.no_grad()
def teacher_reference(trainer, probe: Probe) -> dict:
    """What D-OPSD's teacher draws for the ``[V]`` training pairs (the EMA weights under the teacher
    context: the caption AND the target picture), scored like the student's samples: the ceiling of
    what distillation from it can reach on the concept."""

    caps, attrs = probe.sets["concept_train"]
    pics = teacher_pictures(trainer, caps, probe.seed)
    res = score(probe.net, pics, attrs, OBJECT_ATTRIBUTES, probe.cents)
    truth = torch.stack([W.to_tensor(W.render(a)) for a in attrs])
    mask = torch.stack([background_mask(a) for a in attrs])[:, None].expand_as(truth)
    res["v_background_mse"] = float((pics - truth)[mask].pow(2).mean())
    res["v_checker_corr"] = float(checker_correlation(pics, attrs).mean())
    return res


@torch.no_grad()
def teacher_pictures(trainer, caps: list[str], seed: int, sigmas=None) -> torch.Tensor:
    """The teacher's samples of the dataset's first ``len(caps)`` rows (the ``[V]`` training pairs) at
    ``sigmas`` (default: the model's few-step schedule), noise of row j fixed by (``seed``, j)."""
    ad = trainer.adapter
    samples = [trainer.dataset.get(i, prompt_index=0) for i in range(len(caps))]
    assert [s.prompt for s in samples] == caps, "the dataset's first rows are not the [V] training pairs"
    shape = ad.latent_shape(W.SIZE, W.SIZE)
    sig = list(sigmas) if sigmas is not None else ad.inference_sigmas(None, shape[-2:])
    ctx = [c.to(trainer.device) for c in trainer.contexts.teacher(samples)]
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 100_003 + j))
                         for j in range(len(caps))]).to(trainer.device)
    with trainer.autocast():
        x = euler_sample(lambda x, s: trainer.pair.velocity("teacher", x, s, ctx), noise, sig)
    return ad.decode(x).float().cpu()


class CurvedProbe:
    """The curved world's probe of a trainer's student (the world's K = 2 schedule, ``curved.STUDENT_SIGMAS``,
    fixed noise per prompt):
    the ``[V]`` texture metrics (``checker_correlation``, ``background_error``) and object accuracy on
    the 6 training and 32 held-out ``[V]`` captions; few-step quality (``quality.Reference``:
    precision, recall, Frechet, sharpness, prompt accuracy) on the first ``n_world`` of the curved
    world's fixed held-out prompts, and pixel drift from the first call's pictures (forgetting).
    ``noise_seed`` picks the sampling noise (the noise floor: one model scored at several)."""

    def __init__(self, weights_dir: Path | None = None, n_world: int = 128, seed: int = 4321):
        from dopsd_fast.toy import curved as C
        from dopsd_fast.toy import quality as Q

        wd = Path(weights_dir or M.WEIGHTS_DIR)
        self.net = load_classifier(wd)
        vae = M.build_vae(wd).requires_grad_(False).eval()

        def roundtrip(x):
            with torch.no_grad():
                return torch.cat([M.vae_decode(vae, M.vae_encode(vae, x[i:i + 128])) for i in range(0, len(x), 128)])

        self.entries = C.HELDOUT_PROMPTS[:n_world]
        self.reference_set = Q.Reference(self.net, roundtrip, self.entries)
        self.concept = {name: [W.example(split, i) for i in range(n)] for name, split, n in (
            ("concept_train", "concept", len(W.CONCEPT_TRAIN)), ("concept_heldout", "concept-heldout", len(W.CONCEPT_HELDOUT)))}
        self.seed, self.sigmas = seed, C.STUDENT_SIGMAS
        self.reference = None

    def __call__(self, trainer, noise_seed: int | None = None) -> tuple[dict, dict]:
        """(metrics by set, pictures by set)."""
        seed = self.seed if noise_seed is None else noise_seed
        res, pics = {}, {}
        for name, attrs in self.concept.items():
            pics[name] = sample_student(trainer, [W.caption(a) for a in attrs], seed, sigmas=self.sigmas)
            r = {"v_" + k: v for k, v in texture_scores(pics[name], attrs).items()}
            r["accuracy_mean"] = score(self.net, pics[name], attrs, OBJECT_ATTRIBUTES)["accuracy_mean"]
            res[name] = r
        pics["world"] = sample_student(trainer, [e["prompt"] for e in self.entries], seed, sigmas=self.sigmas)
        res["world"] = self.reference_set.score(pics["world"])
        if self.reference is None and noise_seed is None:
            self.reference = pics["world"]
        if self.reference is not None and noise_seed is None:
            res["world"]["drift_mse"] = float((pics["world"] - self.reference).pow(2).mean())
        return res, pics

    @torch.no_grad()
    def teacher(self, trainer) -> dict:
        """D-OPSD's teacher (the EMA weights under the teacher context) on the ``[V]`` training pairs,
        scored like the student's samples: the ceiling distillation from it can reach."""
        attrs = self.concept["concept_train"]
        pics = teacher_pictures(trainer, [W.caption(a) for a in attrs], self.seed, sigmas=self.sigmas)
        r = {"v_" + k: v for k, v in texture_scores(pics, attrs).items()}
        r["accuracy_mean"] = score(self.net, pics, attrs, OBJECT_ATTRIBUTES)["accuracy_mean"]
        return r
