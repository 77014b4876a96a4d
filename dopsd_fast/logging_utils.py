"""Metrics to a JSONL file, TensorBoard and (optionally) wandb; rank 0 only."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("dopsd_fast")


class MetricsLogger:
    def __init__(self, out_dir: str | Path, tensorboard: bool = True, wandb: bool = False, config: dict | None = None,
                 enabled: bool = True):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.tb = self.wandb = None
        if not enabled:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed: logging to metrics.jsonl only")
        if wandb:
            try:
                import wandb as _wandb
            except ImportError:
                raise ImportError("train.wandb=true needs the wandb package: pip install wandb") from None
            self.wandb = _wandb.init(project="dopsd-fast", config=config, dir=str(out_dir))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
