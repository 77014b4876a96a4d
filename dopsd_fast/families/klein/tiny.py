"""The ``tiny-klein`` preset: the real classes (FLUX.2 DiT, its VAE, a Qwen3 text encoder) at test size,
random weights from ``model.seed``; no downloads."""

from __future__ import annotations

import torch

from dopsd_fast import offline
from dopsd_fast.families.klein.spec import TINY_KLEIN, TINY_KLEIN_VAE, TINY_TEXT_LAYERS
from dopsd_fast.families.spec import Preset


class TinyPreset(Preset):
    def build(self, adapter) -> None:
        from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(adapter.cfg.seed)
            adapter.transformer = Flux2Transformer2DModel(**TINY_KLEIN)
            adapter.vae = AutoencoderKLFlux2(**TINY_KLEIN_VAE)
        adapter.scheduler_config = {"num_train_timesteps": 1000, "use_dynamic_shifting": True,
                                    "time_shift_type": "exponential", "shift": 3.0}
        adapter.text_layers = tuple(adapter.cfg.text_layers or TINY_TEXT_LAYERS)

    def build_encoders(self, adapter) -> None:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        adapter.tokenizer = offline.build_tokenizer()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(adapter.cfg.seed + 1)
            adapter.text_encoder = Qwen3ForCausalLM(Qwen3Config(**offline.TINY_TEXT))
