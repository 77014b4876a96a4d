"""Z-Image-Turbo adapter: diffusers ``ZImageTransformer2DModel`` + ``AutoencoderKL`` + the Qwen3
text encoder (student context) + a Qwen3-VL teacher encoder whose language model carries the text
encoder's weights (the paper's "VLM context").

Z-Image is called with ``t = 1 - sigma`` and returns ``-v``; this adapter exposes (sigma, v).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from dopsd_fast.adapters.base import Context, ModelAdapter

log = logging.getLogger(__name__)

TINY_PRESET_VERSION = "1"


class WeightSwapError(RuntimeError):
    """The text encoder's weights do not fit the VLM's language model."""


def swap_language_model(vlm_model: torch.nn.Module, text_encoder: torch.nn.Module) -> dict:
    """Load ``text_encoder``'s weights into the language model of a Qwen3-VL model (in place).

    ``vlm_model`` is a ``Qwen3VLModel`` (keys ``language_model.*``, ``visual.*``); the text encoder a
    ``Qwen3Model`` or ``Qwen3ForCausalLM`` (its ``lm_head`` is not part of the swap). Returns the
    report ``{matched, missing, unexpected, shape_mismatch}`` (lists of key names) and raises
    :class:`WeightSwapError` unless every language-model key is matched with the same shape.
    """
    src = {}
    for k, v in text_encoder.state_dict().items():
        if k.startswith("lm_head."):
            continue
        src[k[len("model."):] if k.startswith("model.") else k] = v
    dst = {k[len("language_model."):]: v for k, v in vlm_model.state_dict().items()
           if k.startswith("language_model.")}
    matched = sorted(set(src) & set(dst))
    missing = sorted(set(dst) - set(src))  # VLM language-model keys the text encoder lacks
    unexpected = sorted(set(src) - set(dst))  # text-encoder keys the VLM has no place for
    shape_mismatch = [k for k in matched if tuple(src[k].shape) != tuple(dst[k].shape)]
    report = {"matched": matched, "missing": missing, "unexpected": unexpected, "shape_mismatch": shape_mismatch}
    if missing or unexpected or shape_mismatch:
        raise WeightSwapError(
            f"text encoder -> VLM language model weight swap does not match: {len(matched)} matched, "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(shape_mismatch)} with other shapes (e.g. {shape_mismatch[:3]}); refusing to train"
        )
    with torch.no_grad():
        lm = vlm_model.language_model
        lm.load_state_dict({k: src[k].to(dst[k].dtype) for k in matched}, strict=True)
    log.info("VLM weight swap: %d language-model tensors matched, 0 missing, 0 unexpected", len(matched))
    return report


def _file_fingerprint(root: Path) -> dict:
    """Config contents plus names, sizes and mtimes of weight files: identifies local weights
    without reading gigabytes."""
    out = {}
    if not root.exists():
        return {"missing": str(root)}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = str(p.relative_to(root))
            if p.suffix in (".json", ".txt", ".jinja"):
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            elif p.suffix in (".safetensors", ".bin", ".pt"):
                st = p.stat()
                out[rel] = f"{st.st_size}:{int(st.st_mtime)}"
    return out


def _no_refs(references) -> None:
    if references and any(references):
        raise ValueError("Z-Image has no editing (reference-image) mode: rows with references need "
                         "model.family=klein")


def zimage_velocity(transformer, x, sigma, contexts):
    """The eager Z-Image call in the (sigma, v) convention: per-sample latents ``(C, 1, H, W)``, the
    caption features, the family's time/sign convention (:data:`dopsd_fast.families.ZIMAGE`)."""
    from dopsd_fast.families import ZIMAGE

    dtype = next(transformer.parameters()).dtype
    t = ZIMAGE.convention.model_time(sigma).to(dtype)
    xs = list(x.to(dtype).unsqueeze(2).unbind(0))  # (C, F=1, H, W) per sample
    caps = [c.features.to(x.device, dtype) for c in contexts]
    out = transformer(xs, t, caps, return_dict=False)[0]
    return ZIMAGE.convention.velocity(torch.stack(list(out), 0).squeeze(2))


class ZImageAdapter(ModelAdapter):
    family = "zimage"
    def __init__(self, cfg, device: torch.device, dtype: torch.dtype, load_encoders: bool = True,
                 empty_weights: bool = False):
        """``empty_weights``: the transformer and VAE built from their configs on the meta device, no
        weights read and no encoders (``dopsd-train --dry-run``: shapes, schedules, cache identity)."""
        self.cfg = cfg
        self.empty_weights = empty_weights
        self.device = torch.device("meta") if empty_weights else torch.device(device)
        self.dtype = dtype
        load_encoders = load_encoders and not empty_weights
        self.text_encoder = self.vlm = self.tokenizer = self.vlm_tokenizer = self.image_processor = None
        if cfg.preset is not None:
            if cfg.preset == "toy-zimage":
                self._build_toy(load_encoders)
            elif cfg.preset == "tiny-zimage":
                self._build_tiny(load_encoders)
            else:
                raise ValueError(f"model.preset: unknown preset {cfg.preset!r} for family zimage "
                                 "(known: tiny-zimage, toy-zimage)")
        else:
            self._load_local(load_encoders)
        self.transformer.to(self.device, self.dtype).requires_grad_(False)
        self.vae.to(self.device, torch.float32).requires_grad_(False).eval()

    # ---- construction ------------------------------------------------------------------------
    def _build_tiny(self, load_encoders: bool) -> None:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel

        from dopsd_fast.adapters import tiny

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            self.transformer = ZImageTransformer2DModel(**tiny.TINY_ZIMAGE)
            self.vae = AutoencoderKL(**tiny.TINY_VAE)
        self.scheduler_config = dict(FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False).config)
        self.min_pixels = self.cfg.teacher_min_pixels or tiny.TINY_IMAGE_PROCESSOR["min_pixels"]
        self.max_pixels = self.cfg.teacher_max_pixels or tiny.TINY_IMAGE_PROCESSOR["max_pixels"]
        if load_encoders:
            self._build_tiny_encoders()

    def _build_toy(self, load_encoders: bool) -> None:
        """The pretrained toy Z-Image of the toy world (``dopsd_fast.toy``): the K = 4 step-distilled
        student DiT, its VAE and encoders, from the package's safetensors."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        from dopsd_fast.toy import models as toy

        if not (toy.WEIGHTS_DIR / "student.safetensors").is_file():
            raise FileNotFoundError(f"model.preset=toy-zimage: no toy weights in {toy.WEIGHTS_DIR} "
                                    "(python -m dopsd_fast.toy all, then ship)")
        self.transformer = toy.build_transformer("student")
        self.vae = toy.build_vae()
        self.scheduler_config = dict(FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False).config)
        self.min_pixels = self.max_pixels = toy.TOY_IMAGE_PROCESSOR["max_pixels"]
        if load_encoders:
            self._build_toy_encoders()

    def _build_toy_encoders(self) -> None:
        from dopsd_fast.toy import models as toy

        self.tokenizer, self.text_encoder, self.vlm, self.image_processor = toy.build_encoders()
        self.vlm_tokenizer = self.tokenizer
        self.swap_report = swap_language_model(self.vlm, self.text_encoder)
        self._finish_encoders()

    def _build_tiny_encoders(self) -> None:
        from transformers import Qwen3Config, Qwen3Model, Qwen3VLConfig, Qwen3VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        from dopsd_fast.adapters import tiny

        self.tokenizer = tiny.build_tokenizer()
        self.vlm_tokenizer = self.tokenizer
        tid = self.tokenizer.convert_tokens_to_ids
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed + 1)
            self.text_encoder = Qwen3Model(Qwen3Config(**tiny.TINY_TEXT))
            text_cfg = dict(tiny.TINY_TEXT, rope_parameters={
                "rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2], "mrope_interleaved": True})
            vlm_cfg = Qwen3VLConfig(text_config=text_cfg, vision_config=dict(tiny.TINY_VISION),
                                    image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
                                    vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"))
            vlm = Qwen3VLForConditionalGeneration(vlm_cfg).model
        self.swap_report = swap_language_model(vlm, self.text_encoder)
        self.vlm = vlm
        proc = dict(tiny.TINY_IMAGE_PROCESSOR, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        self.image_processor = Qwen2VLImageProcessorPil(**proc)
        self._finish_encoders()

    def _load_local(self, load_encoders: bool) -> None:
        from diffusers import AutoencoderKL, ZImageTransformer2DModel

        path = Path(self.cfg.path)
        self.transformer, self.vae, self.scheduler_config = self._load_diffusers_parts(path, ZImageTransformer2DModel, AutoencoderKL)
        self.min_pixels = self.cfg.teacher_min_pixels or 512 * 512
        self.max_pixels = self.cfg.teacher_max_pixels or 768 * 768
        if load_encoders:
            self._load_local_encoders()

    def _load_local_encoders(self) -> None:
        from transformers import AutoModel, AutoTokenizer, Qwen3VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        path = Path(self.cfg.path)
        if self.cfg.vlm_path is None:
            raise ValueError("model.vlm_path: the teacher context needs a local Qwen3-VL directory "
                             "(e.g. Qwen3-VL-4B-Instruct), or a complete feature cache (cache.dir)")
        vlm_path = Path(self.cfg.vlm_path)
        if not vlm_path.is_dir():
            raise FileNotFoundError(f"model.vlm_path: not a directory: {vlm_path}")
        self.tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
        self.text_encoder = AutoModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=self.dtype)
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
            m.to(self.device, self.dtype).requires_grad_(False).eval()

    def ensure_encoders(self) -> None:
        if self.text_encoder is None:
            if self.cfg.preset == "toy-zimage":
                self._build_toy_encoders()
            elif self.cfg.preset is not None:
                self._build_tiny_encoders()
            else:
                self._load_local_encoders()

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
        if self.cfg.preset is not None:
            weights = {"preset": self.cfg.preset, "seed": self.cfg.seed, "version": TINY_PRESET_VERSION}
            if self.cfg.preset == "toy-zimage":
                from dopsd_fast.toy import models as toy

                weights["files"] = {n: hashlib.sha256((toy.WEIGHTS_DIR / n).read_bytes()).hexdigest()[:16]
                                    for n in ("text_encoder.safetensors", "vision.safetensors")}
        else:
            p = Path(self.cfg.path)
            weights = {
                "text_encoder": _file_fingerprint(p / "text_encoder"),
                "tokenizer": _file_fingerprint(p / "tokenizer"),
                "vlm": _file_fingerprint(Path(self.cfg.vlm_path)) if self.cfg.vlm_path else None,
            }
        return {"family": self.family, "weights": weights, "settings": settings}

    # ---- contexts ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_student(self, prompts: list[str], references=None) -> list[Context]:
        """Chat template (generation prompt, thinking enabled), hidden_states[-2], padding removed,
        at most ``student_max_tokens`` tokens: the ``ZImagePipeline`` prompt encoding."""
        _no_refs(references)
        self.ensure_encoders()
        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True, enable_thinking=True)
                 for p in prompts]
        enc = self.tokenizer(texts, padding="longest", max_length=self.cfg.student_max_tokens,
                             truncation=True, return_tensors="pt")
        ids = enc.input_ids.to(self.device)
        mask = enc.attention_mask.to(self.device).bool()
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        return [Context(hidden[i][mask[i]].float().cpu()) for i in range(len(prompts))]

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
            out.append(Context(hidden[0][mask[0].bool()].float().cpu()))
        return out

    # ---- transformer -------------------------------------------------------------------------
    def velocity(self, transformer, x, sigma, contexts):
        return zimage_velocity(transformer, x, sigma, contexts)

    @property
    def default_inference_steps(self) -> int:
        # the toy student is distilled for the K = 4 roll-out schedule (1, .9, .75, .5, 0), which 4 steps
        # of this scheduler give exactly; Z-Image-Turbo's own default is 8
        return 4 if self.cfg.preset == "toy-zimage" else self.spec.default_inference_steps

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

    def latent_shape(self, height, width):
        f = self.vae_scale_factor * 2  # the VAE factor times the 2x2 patch
        if height % f or width % f:
            raise ValueError(f"image size {width}x{height} must be a multiple of {f} for Z-Image")
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
