"""The ``tiny-zimage`` preset: the real classes (Z-Image DiT, VAE, Qwen3 text encoder, Qwen3-VL
teacher-context encoder) at test size, random weights from ``model.seed``; no downloads."""

from __future__ import annotations

import torch

from dopsd_fast import offline
from dopsd_fast.families.spec import Preset
from dopsd_fast.families.zimage.spec import TINY_ZIMAGE
from dopsd_fast.vlm import swap_language_model


class TinyPreset(Preset):
    def build(self, adapter) -> None:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel

        cfg = adapter.cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            adapter.transformer = ZImageTransformer2DModel(**TINY_ZIMAGE)
            adapter.vae = AutoencoderKL(**offline.TINY_VAE)
        adapter.scheduler_config = dict(FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False).config)
        from dopsd_fast.families.zimage.adapter import teacher_pixel_bounds

        adapter.min_pixels, adapter.max_pixels = teacher_pixel_bounds(
            cfg, offline.TINY_IMAGE_PROCESSOR["min_pixels"], offline.TINY_IMAGE_PROCESSOR["max_pixels"])

    def build_encoders(self, adapter) -> None:
        from transformers import Qwen3Config, Qwen3Model, Qwen3VLConfig, Qwen3VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        adapter.tokenizer = adapter.vlm_tokenizer = offline.build_tokenizer()
        tid = adapter.tokenizer.convert_tokens_to_ids
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(adapter.cfg.seed + 1)
            adapter.text_encoder = Qwen3Model(Qwen3Config(**offline.TINY_TEXT))
            text_cfg = dict(offline.TINY_TEXT, rope_parameters={
                "rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2], "mrope_interleaved": True})
            vlm_cfg = Qwen3VLConfig(text_config=text_cfg, vision_config=dict(offline.TINY_VISION),
                                    image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
                                    vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"))
            vlm = Qwen3VLForConditionalGeneration(vlm_cfg).model
        adapter.swap_report = swap_language_model(vlm, adapter.text_encoder)
        adapter.vlm = vlm
        proc = dict(offline.TINY_IMAGE_PROCESSOR, min_pixels=adapter.min_pixels, max_pixels=adapter.max_pixels)
        adapter.image_processor = Qwen2VLImageProcessorPil(**proc)
