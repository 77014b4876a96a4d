"""Few-step quality on the toy world: does a sampler draw sharp pictures of one object, or ghosts
(averages of the pictures a partial caption allows)?

Scored on the held-out prompts of the curved world (``curved.HELDOUT_PROMPTS``: combinations never
trained on) against
real pictures of the same prompts decoded through the toy VAE (the best a generator behind that VAE
can draw), in the metric classifier's 64-d feature space and in pixels:

| metric | what it sees | a sharp generator | ghosts / blur |
|---|---|---|---|
| ``precision`` | share of samples inside the real pictures' manifold (k-NN balls, Kynkaanniemi et al. 2019) | ~ the real floor | low |
| ``recall`` | share of real pictures inside the samples' manifold (diversity) | ~ the real floor | low when modes are dropped |
| ``frechet`` | FID's formula on the classifier's features | ~ the real floor | high |
| ``sharpness`` | mean squared pixel gradient, relative to the real pictures' | ~ 1 | < 1 (averaged edges and stripes) |
| ``prompt_accuracy`` | the classifier's reading of the attributes the prompt names | high | often still high: it does not see ghosts |

``ghost_control`` (the pixel mean of 4 real pictures of the same prompt, through the VAE) is the
control that the metrics must flag.
"""

from __future__ import annotations

import random

import torch

from dopsd_fast.toy import curved as C
from dopsd_fast.toy import world as W


def sharpness(images: torch.Tensor) -> torch.Tensor:
    """(N,) mean squared horizontal and vertical pixel differences."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).pow(2).flatten(1).mean(1)
    dy = (images[..., 1:, :] - images[..., :-1, :]).pow(2).flatten(1).mean(1)
    return dx + dy


def _kth_radius(feats: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(feats, feats)
    return d.kthvalue(k + 1, dim=1).values  # the 0-th neighbour is the point itself


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of feature sets ``(N, D)``."""
    real, fake = real.double(), fake.double()
    d = torch.cdist(fake, real)
    precision = (d <= _kth_radius(real, k)[None, :]).any(1).double().mean()
    recall = (d.T <= _kth_radius(fake, k)[None, :]).any(1).double().mean()
    return float(precision), float(recall)


def frechet(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (FID's formula, float64)."""
    f1, f2 = f1.double(), f2.double()
    m1, m2 = f1.mean(0), f2.mean(0)
    c1, c2 = torch.cov(f1.T), torch.cov(f2.T)
    w, v = torch.linalg.eigh(c1)
    s1 = (v * w.clamp_min(0).sqrt()) @ v.T
    mid = torch.linalg.eigvalsh(s1 @ c2 @ s1).clamp_min(0).sqrt().sum()
    return float((m1 - m2).pow(2).sum() + c1.trace() + c2.trace() - 2 * mid)


def redraw(entry: dict, rng: random.Random) -> dict:
    """Another picture of a held-out prompt: the attributes it leaves out drawn anew (uniformly over
    the held-out combinations that agree with what it names), fresh jitter."""
    a = entry["attrs"]
    pool = [c for c in C.HELDOUT_COMBOS if all(c[k] == a[k] for k in entry["named"])]
    return dict(rng.choice(pool), jitter=C.draw_jitter(rng))


def real_pictures(entries: list[dict], draws: int, seed: int) -> torch.Tensor:
    """``(draws * N, 3, 64, 64)``: ``draws`` real pictures per prompt (draw-major)."""
    rng = random.Random(seed)
    return torch.stack([W.to_tensor(W.render(redraw(e, rng))) for _ in range(draws) for e in entries])


def prompt_accuracy(net, images: torch.Tensor, entries: list[dict], by_attribute: bool = False):
    """Share of (picture, named attribute) pairs the classifier reads as the prompt says; with
    ``by_attribute`` also that share per attribute (``(overall, {attribute: share})``)."""
    with torch.no_grad():
        logits = net(images)
    hits = {}
    for i, e in enumerate(entries):
        lab = W.labels(e["attrs"])
        for k in e["named"]:
            if lab[k] >= 0:
                hits.setdefault(k, []).append(int(logits[k][i].argmax()) == lab[k])
    flat = [h for v in hits.values() for h in v]
    overall = sum(flat) / max(1, len(flat))
    if not by_attribute:
        return overall
    return overall, {k: round(sum(v) / len(v), 4) for k, v in hits.items()}


class Reference:
    """Real pictures of the held-out prompts through the VAE: ``draws`` per prompt form the
    reference manifold; one more draw per prompt is the real-vs-real floor; the pixel mean of 4 more
    is the ghost control."""

    def __init__(self, net, vae_roundtrip, entries: list[dict], draws: int = 2, seed: int = 97):
        self.net, self.entries = net, entries
        n = len(entries)
        with torch.no_grad():
            pics = vae_roundtrip(real_pictures(entries, draws + 5, seed))
        self.images = pics[: draws * n]
        self.floor_images = pics[draws * n:(draws + 1) * n]
        self.ghost_images = pics[(draws + 1) * n:].reshape(4, n, *pics.shape[1:]).mean(0)
        self.features = self._features(self.images)
        self.sharpness = float(sharpness(self.images).mean())

    def _features(self, images):
        with torch.no_grad():
            return torch.cat([self.net.features(images[i:i + 256]) for i in range(0, len(images), 256)])

    def score(self, images: torch.Tensor) -> dict:
        """Quality of ``(N, 3, 64, 64)`` samples, sample i drawn for prompt i."""
        f = self._features(images)
        p, r = precision_recall(self.features, f)
        acc, by = prompt_accuracy(self.net, images, self.entries, by_attribute=True)
        return {"precision": round(p, 4), "recall": round(r, 4), "frechet": round(frechet(self.features, f), 2),
                "sharpness": round(float(sharpness(images).mean()) / self.sharpness, 4),
                "prompt_accuracy": round(acc, 4), "prompt_accuracy_by_attribute": by}

    def controls(self) -> dict:
        """The metrics on real pictures (the floor) and on the ghost control (must be flagged)."""
        return {"real": self.score(self.floor_images), "ghosts": self.score(self.ghost_images)}
