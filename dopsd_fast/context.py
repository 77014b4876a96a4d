"""What a transformer is conditioned on, per sample and branch: :class:`Context`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Context:
    """Conditioning of ONE sample for one branch: token features ``(L, D)`` plus model-specific
    extras (e.g. reference latents for an editing-branch teacher)."""

    features: torch.Tensor
    extra: dict = field(default_factory=dict)

    def to(self, device=None, dtype=None) -> "Context":
        extra = {k: (v.to(device=device) if torch.is_tensor(v) else v) for k, v in self.extra.items()}
        return Context(self.features.to(device=device, dtype=dtype), extra)
