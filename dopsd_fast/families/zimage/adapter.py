"""Z-Image-Turbo adapter: diffusers ``ZImageTransformer2DModel`` + ``AutoencoderKL`` + the Qwen3
text encoder (student context) + a Qwen3-VL teacher encoder whose language model carries the text
encoder's weights (the paper's "VLM context").

Z-Image is called with ``t = 1 - sigma`` and returns ``-v``; this adapter exposes (sigma, v).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dopsd_fast.context import Context
from dopsd_fast.errors import ConfigError
from dopsd_fast.families.adapter import ModelAdapter
from dopsd_fast.fsdp import input_dtype
from dopsd_fast.families.common import file_fingerprint
from dopsd_fast.families.zimage.spec import SPEC
from dopsd_fast.vlm import WeightSwapError, swap_language_model  # noqa: F401 (re-exported)


def _no_refs(references) -> None:
    if references and any(references):
        raise ValueError("Z-Image has no editing (reference-image) mode: rows with references need "
                         "model.family=klein")


def zimage_velocity(transformer, x, sigma, contexts):
    """The eager Z-Image call in the (sigma, v) convention: per-sample latents ``(C, 1, H, W)``, the
    caption features, the family's time/sign convention (its spec's)."""
    dtype = input_dtype(transformer)  # a sharded model's compute dtype
    t = SPEC.convention.model_time(sigma)  # fp32, as ZImagePipeline passes it (bf16 made 1 - 0.4732 0.528)
    xs = list(x.to(dtype).unsqueeze(2).unbind(0))  # (C, F=1, H, W) per sample
    caps = [c.features.to(x.device, dtype) for c in contexts]
    out = transformer(xs, t, caps, return_dict=False)[0]
    return SPEC.convention.velocity(torch.stack(list(out), 0).squeeze(2))



def teacher_pixel_bounds(cfg, default_min: int, default_max: int) -> tuple[int, int]:
    """The teacher image processor's pixel bounds: ``model.teacher_min_pixels`` / ``teacher_max_pixels``,
    each the model's where null; a lower bound over the upper one is refused naming the fields (the config
    compares them only where both are set)."""
    lo, hi = cfg.teacher_min_pixels or default_min, cfg.teacher_max_pixels or default_max
    if lo > hi:
        def name(v, field):
            return f"model.{field} {v}" if getattr(cfg, field) else f"{v} (the model's, model.{field} null)"
        raise ConfigError(f"config field 'model.teacher_min_pixels': the teacher's lower pixel bound "
                          f"{name(lo, 'teacher_min_pixels')} is over its upper one {name(hi, 'teacher_max_pixels')}; "
                          "set both, the lower at most the upper")
    return lo, hi

class ZImageAdapter(ModelAdapter):
    spec = SPEC
    # filled by ensure_encoders
    encoder_attrs = ("text_encoder", "vlm", "tokenizer", "vlm_tokenizer", "image_processor")
    teacher_identity_fields = ("weights.vlm", "settings.teacher_max_tokens", "settings.teacher_min_pixels",
                               "settings.teacher_max_pixels")

    # ---- construction ------------------------------------------------------------------------
    def _load_local(self) -> None:
        from diffusers import AutoencoderKL, ZImageTransformer2DModel

        path = Path(self.cfg.path)
        self.transformer, self.vae, self.scheduler_config = self._load_diffusers_parts(path, ZImageTransformer2DModel, AutoencoderKL)
        self.min_pixels, self.max_pixels = teacher_pixel_bounds(self.cfg, 512 * 512, 768 * 768)

    def _load_local_encoders(self, teacher: bool = True) -> None:
        """The student's text encoder (when not loaded yet) and, with ``teacher``, the teacher's VLM with
        the text encoder's weights swapped into its language model."""
        from transformers import AutoModel, AutoTokenizer, Qwen3VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        path = Path(self.cfg.path)
        if teacher:
            if self.cfg.vlm_path is None:
                raise ValueError("model.vlm_path: the teacher context needs a local Qwen3-VL directory "
                                 "(e.g. Qwen3-VL-4B-Instruct), or a complete feature cache (cache.dir) for training")
            vlm_path = Path(self.cfg.vlm_path)
            if not vlm_path.is_dir():
                raise FileNotFoundError(f"model.vlm_path: not a directory: {vlm_path}")
        if self.text_encoder is None:
            self.tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
            self.text_encoder = AutoModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=self.dtype)
        if not teacher:
            self._finish_encoders()
            return
        vlm = Qwen3VLForConditionalGeneration.from_pretrained(vlm_path, torch_dtype=self.dtype)
        self.swap_report = swap_language_model(vlm.model, self.text_encoder)
        self.vlm = vlm.model
        del vlm
        self.vlm_tokenizer = AutoTokenizer.from_pretrained(vlm_path)
        self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(
            vlm_path, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        self._finish_encoders()

    def _finish_encoders(self) -> None:
        for m in (self.text_encoder, self.vlm):
            if m is not None:
                m.to(self.device, self.dtype).requires_grad_(False).eval()

    def ensure_encoders(self) -> None:
        if self.text_encoder is None or self.vlm is None:
            if self.preset is not None:
                self.preset.build_encoders(self)
                self._finish_encoders()
            else:
                self._load_local_encoders()

    def ensure_student_encoder(self) -> None:
        """The student's text encoder alone (sampling): a local model's VLM (the teacher's, GBs) is not
        loaded, and ``model.vlm_path`` not needed."""
        if self.text_encoder is None:
            if self.preset is not None:
                self.ensure_encoders()
            else:
                self._load_local_encoders(teacher=False)

    def release_encoders(self) -> None:
        self.text_encoder = self.vlm = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- identity (cache key) ----------------------------------------------------------------
    def encoder_identity(self) -> dict:
        settings = {
            "student_max_tokens": self.cfg.student_max_tokens,
            "teacher_max_tokens": self.cfg.teacher_max_tokens,
            "teacher_min_pixels": self.min_pixels,
            "teacher_max_pixels": self.max_pixels,
            "dtype": str(self.dtype),
            "format": "zimage-vlm-context-v2",  # v2: the teacher image resized in float (v1: via 8 bits)
        }
        if self.preset is not None:
            weights = self.preset.identity(self.cfg)
        else:
            p = Path(self.cfg.path)
            weights = {
                "text_encoder": file_fingerprint(p / "text_encoder"),
                "tokenizer": file_fingerprint(p / "tokenizer"),
                "vlm": file_fingerprint(Path(self.cfg.vlm_path)) if self.cfg.vlm_path else None,
            }
        return {"family": self.family, "weights": weights, "settings": settings}

    # ---- contexts ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_student(self, prompts: list[str], references=None) -> list[Context]:
        """Chat template (generation prompt, thinking enabled), hidden_states[-2], padding removed,
        at most ``student_max_tokens`` tokens: the ``ZImagePipeline`` prompt encoding."""
        _no_refs(references)
        self.ensure_student_encoder()
        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True, enable_thinking=True)
                 for p in prompts]
        self._say_if_cut("student context", "model.student_max_tokens", self.cfg.student_max_tokens,
                         [len(t) for t in self.tokenizer(texts).input_ids], prompts)
        enc = self.tokenizer(texts, padding="longest", max_length=self.cfg.student_max_tokens,
                             truncation=True, return_tensors="pt")
        ids = enc.input_ids.to(self.device)
        mask = enc.attention_mask.to(self.device).bool()
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        return [Context(hidden[i][mask[i]].cpu()) for i in range(len(prompts))]

    @torch.no_grad()
    def vlm_pixels(self, image: torch.Tensor) -> dict:
        """The VLM's ``pixel_values`` / ``image_grid_thw`` for an image in [0, 1], resized in floating
        point as the authors' processor path does (Qwen2-VL's torchvision processor on a float tensor:
        ``smart_resize`` to multiples of patch x merge within the pixel bounds, bicubic with antialias,
        no 8-bit round trip), then the processor's own normalisation and patch layout."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        ip = self.image_processor
        img = image.detach().float().clamp(0, 1).cpu()
        h, w = img.shape[-2:]
        rh, rw = smart_resize(h, w, factor=ip.patch_size * ip.merge_size, min_pixels=ip.size.shortest_edge,
                              max_pixels=ip.size.longest_edge)
        if (rh, rw) != (h, w):
            img = torch.nn.functional.interpolate(img[None], size=(rh, rw), mode="bicubic", antialias=True,
                                                  align_corners=False)[0]
        return ip(images=[img], return_tensors="pt", do_rescale=False, do_resize=False)

    def encode_teacher(self, prompts: list[str], images: list[torch.Tensor], references=None) -> list[Context]:
        """One user message [target image, prompt], no system prompt, generation prompt; image in
        [0, 1] within the pixel bounds; hidden_states[-2] of the VLM, padding removed, at most
        ``teacher_max_tokens`` tokens (the prompt's tail is what truncation cuts)."""
        _no_refs(references)
        self.ensure_encoders()
        out = []
        image_token = "<|image_pad|>"
        image_token_id = self.vlm_tokenizer.convert_tokens_to_ids(image_token)
        merge = int(self.image_processor.merge_size) ** 2
        for prompt, image in zip(prompts, images):
            msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            text = self.vlm_tokenizer.apply_chat_template(msg, tokenize=False, add_generation_prompt=True)
            pix = self.vlm_pixels(image)
            n_img = int(pix["image_grid_thw"][0].prod()) // merge
            if n_img + 8 > self.cfg.teacher_max_tokens:
                raise ValueError(f"teacher context: the image alone takes {n_img} tokens, more than "
                                 f"model.teacher_max_tokens={self.cfg.teacher_max_tokens}; lower model.teacher_max_pixels")
            text = text.replace(image_token, image_token * n_img, 1)
            self._say_if_cut("teacher context", "model.teacher_max_tokens", self.cfg.teacher_max_tokens,
                             [len(self.vlm_tokenizer(text).input_ids)], [prompt])
            enc = self.vlm_tokenizer([text], max_length=self.cfg.teacher_max_tokens, truncation=True, return_tensors="pt")
            ids = enc.input_ids.to(self.device)
            mask = enc.attention_mask.to(self.device)
            hidden = self.vlm(
                input_ids=ids, attention_mask=mask,
                pixel_values=pix["pixel_values"].to(self.device, self.dtype),
                image_grid_thw=pix["image_grid_thw"].to(self.device),
                mm_token_type_ids=(ids == image_token_id).long(),
                output_hidden_states=True,
            ).hidden_states[-2]
            out.append(Context(hidden[0][mask[0].bool()].cpu()))
        return out

    # ---- transformer -------------------------------------------------------------------------
    def velocity(self, transformer, x, sigma, contexts):
        return zimage_velocity(transformer, x, sigma, contexts)

    @property
    def default_inference_steps(self) -> int:
        steps = self.preset.inference_steps if self.preset is not None else None
        return steps or self.spec.default_inference_steps

    def inference_sigmas(self, steps=None, latent_hw=None) -> list[float]:
        """The ``ZImagePipeline`` schedule: ``linspace(1, 1/N, N)`` through the model's
        FlowMatchEulerDiscreteScheduler config (shift 3, no dynamic shifting for Turbo), + 0."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

        sched = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        steps = steps or self.default_inference_steps
        seq = (latent_hw[0] // 2) * (latent_hw[1] // 2) if latent_hw else 4096
        mu = calculate_shift(seq, sched.config.get("base_image_seq_len", 256), sched.config.get("max_image_seq_len", 4096),
                             sched.config.get("base_shift", 0.5), sched.config.get("max_shift", 1.15))
        base = torch.linspace(1.0, 1.0 / steps, steps).tolist()
        sched.set_timesteps(sigmas=base, device="cpu", mu=mu)
        return [float(s) for s in sched.sigmas]

    # ---- latents -----------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # ---- the position range -----------------------------------------------------------------
    # Z-Image's RoPE reads tables of axes_lens rows: a context's tokens at positions 1..P (P: its length
    # padded to 32), the image at frame position P + 1 and at (row, column) in patches from 0. A position
    # past a table is an IndexError deep in the model: these name the setting instead.
    PAD = 32

    def context_limit(self) -> int:
        """The longest context (tokens) the transformer's positions hold: padded to 32, plus the image's."""
        n = int(self.transformer.config.axes_lens[0])
        return (n - 2) // self.PAD * self.PAD

    def check_settings(self, teacher: bool = True) -> None:
        limit = self.context_limit()
        for name in ("student_max_tokens", "teacher_max_tokens")[:2 if teacher else 1]:
            value = getattr(self.cfg, name)
            if value > limit:
                raise ConfigError(f"config field 'model.{name}': {value} is past the model's position range: "
                                  f"contexts of at most {limit} tokens (the transformer's axes_lens[0] = "
                                  f"{self.transformer.config.axes_lens[0]}, contexts padded to {self.PAD})")

    def latent_shape(self, height, width):
        f = self.vae_scale_factor * 2  # the VAE factor times the 2x2 patch
        if height % f or width % f:
            raise ValueError(f"image size {width}x{height} must be a multiple of {f} for Z-Image")
        _, rows, cols = (int(n) for n in self.transformer.config.axes_lens)
        if height // f > rows or width // f > cols:
            raise ValueError(f"image size {width}x{height} is past Z-Image's position range: at most "
                             f"{cols * f}x{rows * f} pixels ({cols}x{rows} patches of {f} px, the transformer's "
                             f"axes_lens)")
        return (int(self.transformer.config.in_channels), height // self.vae_scale_factor, width // self.vae_scale_factor)

    @torch.no_grad()
    def decode(self, latents):
        z = latents.to(self.device, torch.float32) / self.vae.config.scaling_factor + self.vae.config.shift_factor
        img = self.vae.decode(z, return_dict=False)[0]
        return ((img.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images):
        z = self.vae.encode(images.to(self.device, torch.float32) * 2 - 1).latent_dist.mode()
        return (z - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    # ---- export ------------------------------------------------------------------------------
    def export_lora(self, state_dict, out_dir, lora_config):
        from diffusers import ZImagePipeline

        os.makedirs(out_dir, exist_ok=True)
        ZImagePipeline.save_lora_weights(out_dir, transformer_lora_layers=state_dict,
                                         transformer_lora_adapter_metadata=lora_config)
