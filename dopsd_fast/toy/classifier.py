"""The toy world's metric classifier: a small CNN with one head per attribute (trained by the
pipeline's classifier stage; read by the metrics)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from dopsd_fast.toy import models as M
from dopsd_fast.toy import world as W


class Classifier(torch.nn.Module):
    """A small CNN with one head per attribute; ``features`` (64-d) is what the FID-like distance uses."""

    HEADS = {k: len(v) for k, v in W.ATTRIBUTES.items()}

    def __init__(self):
        super().__init__()
        c = [3, 32, 64, 96, 128]
        layers = []
        for a, b in zip(c[:-1], c[1:]):
            layers += [torch.nn.Conv2d(a, b, 3, padding=1), torch.nn.GroupNorm(8, b), torch.nn.SiLU(),
                       torch.nn.Conv2d(b, b, 3, padding=1, stride=2), torch.nn.SiLU()]
        self.body = torch.nn.Sequential(*layers)  # 64 -> 4
        self.proj = torch.nn.Linear(128 * 16, 64)
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(64, n) for k, n in self.HEADS.items()})

    def features(self, x):
        return F.silu(self.proj(self.body(x * 2 - 1).flatten(1)))

    def forward(self, x):
        f = self.features(x)
        return {k: h(f) for k, h in self.heads.items()}


def load_classifier(weights_dir: Path) -> Classifier:
    net = Classifier()
    M.load_into(net, Path(weights_dir) / "classifier.safetensors")
    return net.eval()


@torch.no_grad()
def attribute_accuracy(net, images, attrs) -> dict:
    """Per-attribute accuracy of the classifier's predictions against ``attrs`` (background colour
    only where the picture shows it)."""
    logits = net(images)
    out = {}
    for k in Classifier.HEADS:
        y = torch.tensor([W.labels(a)[k] for a in attrs])
        ok = y >= 0
        if ok.any():
            out[k] = round(float((logits[k].argmax(-1)[ok] == y[ok]).float().mean()), 4)
    return out
