"""dopsd-fast: a kernel-backed PyTorch trainer for D-OPSD (on-policy self-distillation of
step-distilled diffusion transformers such as Z-Image-Turbo and FLUX.2-klein).

Importing this package touches no GPU and imports no optional heavy package (diffusers,
transformers, peft, TransformerEngine, flash-attn, torchao): those load when a feature needs them.
"""

import dopsd_fast.families  # noqa: F401 (the model families register their named roll-out schedules)
from dopsd_fast.algorithm import (
    NAMED_SCHEDULES,
    RolloutResult,
    ema_update_,
    euler_sample,
    resolve_schedule,
    rollout_loss,
    rollout_loss_paired,
    state_loss,
    x0_from_v,
)
from dopsd_fast.errors import check_library_versions

check_library_versions()  # an older transformers / peft / diffusers than the package runs on: one line, at import

__version__ = "0.1.0"

__all__ = [
    "NAMED_SCHEDULES",
    "RolloutResult",
    "ema_update_",
    "euler_sample",
    "resolve_schedule",
    "rollout_loss",
    "rollout_loss_paired",
    "state_loss",
    "x0_from_v",
    "__version__",
]
