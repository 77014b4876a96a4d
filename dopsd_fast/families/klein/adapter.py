"""FLUX.2-klein adapter: diffusers ``Flux2Transformer2DModel`` + ``AutoencoderKLFlux2`` + the Qwen3
text encoder (hidden states of layers 9 / 18 / 27 stacked, 512 padded tokens, as ``Flux2KleinPipeline``).

Latents are the pipeline's: VAE latents 2x2-patchified to 128 channels (tiny: 16) and normalised by
the VAE's BatchNorm running statistics; a state is ``(B, 128, H/16, W/16)``. FLUX.2 takes
``timestep = sigma`` and returns ``v`` directly, in this project's convention.

Rows with reference images (**ground-truth-reference editing**): the student is the editing model on
prompt + references; the teacher gets prompt + ``model.gt_instruction`` and the references with
the target appended as the last reference.

Teacher context, **editing branch** (the authors' klein recipe): the teacher prompt is the prompt
followed by ``model.teacher_instruction``; the clean latents of the target image ride along as a
reference image: the DiT sequence is ``[x_k tokens ; reference tokens]`` with the reference's ids
``(10, h, w, 0)`` (the pipeline's ``_prepare_image_ids``), and the output is sliced to the first N
tokens. References are stored as ``Context.extra["ref0"], ["ref1"], ...`` (latents ``(C, h, w)``), so
the feature cache keeps them with the features.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

from dopsd_fast.context import Context
from dopsd_fast.errors import ConfigError
from dopsd_fast.families.adapter import ModelAdapter
from dopsd_fast.fsdp import input_dtype
from dopsd_fast.families.common import file_fingerprint
from dopsd_fast.families.klein.spec import SPEC, compute_empirical_mu

log = logging.getLogger(__name__)

DEFAULT_TEACHER_INSTRUCTION = ("Keep the subject, its identity details, the background and the composition consistent "
                               "with the reference image.")
DEFAULT_GT_INSTRUCTION = "The last image is the expected output of this edit."
# The authors' texts (their launch scripts' --edit-sys-prompt): `model.teacher_instruction: authors`,
# `model.gt_instruction: authors`.
AUTHORS_TEACHER_INSTRUCTION = ("Make the main subject (facial/ip details), background, and overall composition "
                               "consistent with the reference image.")
AUTHORS_GT_INSTRUCTION = ("Note that the last image is the output image I expect to be. Your output must be as similar "
                          "as the last reference image, based on the first reference image and the editing instructions.")
def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C) (the pipeline's ``_pack_latents``)."""
    B, C, h, w = latents.shape
    return latents.reshape(B, C, h * w).permute(0, 2, 1)


def image_ids(h: int, w: int, t: int = 0) -> torch.Tensor:
    return torch.cartesian_prod(torch.tensor([t]), torch.arange(h), torch.arange(w), torch.arange(1))


def text_ids(n: int) -> torch.Tensor:
    return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(n))


def refs_of(ctx: Context) -> list[torch.Tensor]:
    out, i = [], 0
    while f"ref{i}" in ctx.extra:
        out.append(ctx.extra[f"ref{i}"])
        i += 1
    return out


def flux2_velocity(transformer, x, sigma, contexts):
    """The eager klein call in the (sigma, v) convention: ``[x tokens ; reference tokens]``, text
    features, ids as ``Flux2KleinPipeline`` builds them; the output sliced to x's tokens."""
    refs = [refs_of(c) for c in contexts]
    shapes = [tuple(tuple(r.shape) for r in rr) for rr in refs]
    if len(set(shapes)) > 1:  # different references per sample: one call each
        return torch.cat([flux2_velocity(transformer, x[i:i + 1], sigma[i:i + 1], [contexts[i]])
                          for i in range(len(contexts))])
    dtype = input_dtype(transformer)  # a sharded model's compute dtype
    B, C, h, w = x.shape
    hidden = pack(x.to(dtype))
    ids = [image_ids(h, w)]
    for i, r in enumerate(refs[0]):
        rr = torch.stack([ref[i] for ref in refs]).to(x.device, dtype)
        hidden = torch.cat([hidden, pack(rr)], 1)
        ids.append(image_ids(rr.shape[-2], rr.shape[-1], t=10 * (i + 1)))
    txt = torch.stack([c.features for c in contexts]).to(x.device, dtype)
    conv = SPEC.convention
    out = transformer(hidden_states=hidden, encoder_hidden_states=txt, timestep=conv.model_time(sigma).to(dtype),
                      img_ids=torch.cat(ids).to(x.device), txt_ids=text_ids(txt.shape[1]).to(x.device),
                      guidance=None, return_dict=False)[0]
    return conv.velocity(out[:, :h * w]).permute(0, 2, 1).reshape(B, C, h, w)



class KleinAdapter(ModelAdapter):
    spec = SPEC
    encoder_attrs = ("text_encoder", "tokenizer")  # filled by ensure_encoders
    teacher_identity_fields = ("settings.teacher_instruction", "settings.gt_instruction")

    # ---- construction ------------------------------------------------------------------------
    def _load_local(self):
        from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

        path = Path(self.cfg.path)
        self.transformer, self.vae, self.scheduler_config = self._load_diffusers_parts(path, Flux2Transformer2DModel, AutoencoderKLFlux2)
        self.text_layers = tuple(self.cfg.text_layers or (9, 18, 27))
        te = path / "text_encoder" / "config.json"
        if te.is_file():  # before any weight is read: the layers exist and their features fit the transformer
            import json

            c = json.loads(te.read_text())
            self.check_text_layers(c.get("num_hidden_layers"), c.get("hidden_size"))

    def check_text_layers(self, n_layers, hidden) -> None:
        """``model.text_layers`` against the text encoder (``n_layers`` layers, ``hidden`` wide): each an
        index of its hidden states (0 = the embeddings, 1..n the layers' outputs), their stacked width
        the transformer's ``joint_attention_dim``; one line naming the field otherwise."""
        if n_layers is None or hidden is None:
            return
        bad = [k for k in self.text_layers if not -(n_layers + 1) <= k <= n_layers]  # negative: from the end
        if bad:
            raise ConfigError(f"config field 'model.text_layers': {list(self.text_layers)}: {bad} not among the text "
                              f"encoder's hidden states (0 = embeddings, 1..{n_layers} = its layers; -1 the last)")
        want = int(self.transformer.config.joint_attention_dim)
        if len(self.text_layers) * hidden != want:
            raise ConfigError(f"config field 'model.text_layers': {len(self.text_layers)} layers x {hidden} wide = "
                              f"{len(self.text_layers) * hidden} features, the transformer takes {want} "
                              f"(joint_attention_dim): give {want // hidden} layers" if want % hidden == 0 else
                              f"config field 'model.text_layers': the text encoder ({hidden} wide) cannot make the "
                              f"transformer's {want} features (joint_attention_dim)")

    def _load_local_encoders(self):
        from transformers import AutoTokenizer, Qwen3ForCausalLM

        path = Path(self.cfg.path)
        self.tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
        self.text_encoder = Qwen3ForCausalLM.from_pretrained(path, subfolder="text_encoder", torch_dtype=self.dtype)
        self.text_encoder.to(self.device).requires_grad_(False).eval()

    def ensure_encoders(self):
        if self.text_encoder is None:
            if self.preset is not None:
                self.preset.build_encoders(self)
                self.text_encoder.to(self.device, self.dtype).requires_grad_(False).eval()
            else:
                self._load_local_encoders()
            c = self.text_encoder.config
            self.check_text_layers(getattr(c, "num_hidden_layers", None), getattr(c, "hidden_size", None))

    def release_encoders(self):
        self.text_encoder = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def encoder_identity(self) -> dict:
        settings = {"max_tokens": self.cfg.student_max_tokens, "text_layers": list(self.text_layers),
                    "teacher_instruction": self.teacher_instruction, "gt_instruction": self.gt_instruction, "dtype": str(self.dtype),
                    "format": "klein-editing-branch-v3"}  # v2: images decoded in float (EXIF, 16-bit); v3: a
        # teacher prompt over the token limit keeps its instruction (its prompt part is cut)
        if self.preset is not None:
            weights = self.preset.identity(self.cfg)
        else:
            p = Path(self.cfg.path)
            weights = {n: file_fingerprint(p / n) for n in ("text_encoder", "tokenizer", "vae")}
        return {"family": self.family, "weights": weights, "settings": settings}

    @property
    def teacher_instruction(self) -> str:
        if self.cfg.teacher_instruction == "authors":
            return AUTHORS_TEACHER_INSTRUCTION
        return self.cfg.teacher_instruction if self.cfg.teacher_instruction is not None else DEFAULT_TEACHER_INSTRUCTION

    # ---- contexts ----------------------------------------------------------------------------
    def _template(self, prompt: str) -> str:
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=False)

    def _fit(self, prompt: str, instruction: str) -> str:
        """``prompt instruction``, its prompt part cut (at a token) where the whole would pass
        ``model.student_max_tokens``: the tokenizer cuts from the right, which took the instruction (the
        teacher's mode) and the template's end; said once per run."""
        text = f"{prompt} {instruction}".strip()
        limit = self.cfg.student_max_tokens
        over = len(self.tokenizer(self._template(text)).input_ids) - limit
        if over <= 0 or not instruction:
            return text
        ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
        keep = len(ids) - over
        while keep > 0:
            fitted = f"{self.tokenizer.decode(ids[:keep]).rstrip()} {instruction}"
            if len(self.tokenizer(self._template(fitted)).input_ids) <= limit:
                break
            keep -= 1
        if keep <= 0:  # the instruction alone does not fit: the tokenizer's cut, as before
            if self._first_time("instruction_cut"):
                log.warning("klein teacher: the instruction alone passes model.student_max_tokens=%d; the teacher "
                            "prompt is cut at that length (raise model.student_max_tokens)", limit)
            return text
        if self._first_time("prompt_cut"):
            log.warning("klein teacher: a prompt plus its instruction passes model.student_max_tokens=%d tokens; the "
                        "prompt's end is cut to keep the instruction (%r...; further ones are not reported)",
                        limit, prompt[:40])
        return fitted

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], student: bool = False) -> torch.Tensor:
        """The ``Flux2KleinPipeline`` prompt encoding: chat template (generation prompt, thinking
        off), padded to ``model.student_max_tokens``, hidden states of ``text_layers`` stacked ->
        (B, L, 3 * hidden). Padding tokens are kept: klein attends all of them."""
        self.ensure_encoders()
        texts = [self._template(p) for p in prompts]
        if student:  # a teacher prompt is fitted to the limit by _fit, which says so itself
            self._say_if_cut("student context", "model.student_max_tokens", self.cfg.student_max_tokens,
                             [len(t) for t in self.tokenizer(texts).input_ids], prompts)
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.cfg.student_max_tokens,
                             return_tensors="pt")
        out = self.text_encoder(input_ids=enc.input_ids.to(self.device), attention_mask=enc.attention_mask.to(self.device),
                                output_hidden_states=True, use_cache=False)
        h = torch.stack([out.hidden_states[k] for k in self.text_layers], dim=1)  # (B, 3, L, D)
        B, n, L, D = h.shape
        return h.permute(0, 2, 1, 3).reshape(B, L, n * D).cpu()

    def teacher_prompt(self, prompt: str) -> str:
        """``prompt teacher_instruction``, fitted to the token limit (:meth:`_fit`)."""
        self.ensure_encoders()
        return self._fit(prompt, self.teacher_instruction or "")

    @property
    def gt_instruction(self) -> str:
        if self.cfg.gt_instruction == "authors":
            return AUTHORS_GT_INSTRUCTION
        return self.cfg.gt_instruction if self.cfg.gt_instruction is not None else DEFAULT_GT_INSTRUCTION

    def _ref_latents(self, images) -> dict:
        return {f"ref{i}": self.encode_images(im[None].float())[0].cpu() for i, im in enumerate(images)}

    def encode_student(self, prompts, references=None):
        """Text-only, or (ground-truth-reference editing rows) prompt + the row's reference images."""
        references = references or [[] for _ in prompts]
        features = self.encode_prompts(prompts, student=True)
        return [Context(f, self._ref_latents(refs)) for f, refs in zip(features, references)]

    def encode_teacher(self, prompts, images, references=None):
        """Editing branch (text-to-image rows): prompt + ``teacher_instruction``, the target as the
        reference. Ground-truth-reference editing rows: prompt + ``gt_instruction``, the row's
        references and the target as the LAST reference."""
        references = references or [[] for _ in prompts]
        self.ensure_encoders()
        texts = [self._fit(p, self.gt_instruction or "") if refs else self.teacher_prompt(p)
                 for p, refs in zip(prompts, references)]
        return [Context(f, self._ref_latents(list(refs) + [img]))
                for f, img, refs in zip(self.encode_prompts(texts), images, references)]

    # ---- transformer -------------------------------------------------------------------------
    def velocity(self, transformer, x, sigma, contexts):
        return flux2_velocity(transformer, x, sigma, contexts)


    # ---- schedules ---------------------------------------------------------------------------
    def _shifted(self, steps: int, latent_hw) -> list[float]:
        from diffusers import FlowMatchEulerDiscreteScheduler

        seq = (latent_hw[0] * latent_hw[1]) if latent_hw else 4096
        sched = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        base = torch.linspace(1.0, 1.0 / steps, steps).tolist()
        sched.set_timesteps(sigmas=base, device="cpu", mu=compute_empirical_mu(seq, steps))
        return [float(s) for s in sched.sigmas]

    def dynamic_mu(self, latent_hw) -> float:
        seq = (latent_hw[0] * latent_hw[1]) if latent_hw else 4096
        return compute_empirical_mu(seq, self.default_inference_steps)

    def _authors_shifted(self, steps: int, latent_hw) -> list[float]:
        """The authors' training roll-out: ``set_timesteps(N, mu=mu)`` without sigmas, i.e. the
        scheduler's own ``linspace(1, 1/1000, N)`` time-shifted by mu; at 1024^2, N = 4:
        (1, .952, .832, .0098, 0). Their inference (the pipeline) uses ``klein-k4``."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        seq = (latent_hw[0] * latent_hw[1]) if latent_hw else 4096
        sched = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        sched.set_timesteps(steps, device="cpu", mu=compute_empirical_mu(seq, steps))
        return [float(s) for s in sched.sigmas]

    def training_sigmas(self, spec, latent_hw=None):
        """``klein-k4`` (or ``klein-kN``): the distilled model's N-step inference schedule for this
        resolution (the pipeline's sigmas, empirical mu of the image sequence length): the roll-out is
        the trajectory the model follows at inference (on-policy). ``klein-k4-authors``: the authors'
        training roll-out instead (see :meth:`_authors_shifted`). Fixed names and lists as usual."""
        if isinstance(spec, str) and re.fullmatch(r"klein-k\d+-authors", spec):
            return self._authors_shifted(int(spec[len("klein-k"):-len("-authors")]), latent_hw)
        if isinstance(spec, str) and re.fullmatch(r"klein-k\d+", spec):
            return self._shifted(int(spec[len("klein-k"):]), latent_hw)
        return super().training_sigmas(spec)

    def inference_sigmas(self, steps=None, latent_hw=None):
        return self._shifted(steps or self.default_inference_steps, latent_hw)

    # ---- latents -----------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def cache_extra_problem(self, kind, name, shape, record):
        """A reference latent ``ref{i}``: the i-th reference of the context at its bucket, ``(C, h, w)``: the
        row's references, then (the teacher's) its target (:meth:`encode_teacher`)."""
        m = re.fullmatch(r"ref(\d+)", name)
        if m is None:
            return None  # not read
        buckets = list(record.reference_buckets) + ([record.bucket] if kind == "teacher" else [])
        i = int(m.group(1))
        if i >= len(buckets):
            return f"is a reference latent the context does not have (it has {len(buckets)} reference(s))"
        bw, bh = buckets[i]
        try:
            want = tuple(self.latent_shape(bh, bw))
        except ValueError:
            return None  # a bucket this model does not take: the buckets' own check names it

        if tuple(shape) != want:
            return f"has shape {tuple(shape)}; its reference {i}, at its bucket {bw}x{bh}, is {want}"
        return None

    def latent_shape(self, height, width):
        f = self.vae_scale_factor * 2
        if height % f or width % f:
            raise ValueError(f"image size {width}x{height} must be a multiple of {f} for FLUX.2-klein")
        return (int(self.transformer.config.in_channels), height // f, width // f)

    def _bn(self, like):
        mean = self.vae.bn.running_mean.view(1, -1, 1, 1).to(like)
        std = torch.sqrt(self.vae.bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like)
        return mean, std

    @torch.no_grad()
    def encode_images(self, images):
        """Images in [0, 1] -> the pipeline's normalised, 2x2-patchified latents (mode of the posterior)."""
        z = self.vae.encode(images.to(self.device, torch.float32) * 2 - 1).latent_dist.mode()
        B, c, H, W = z.shape
        z = z.view(B, c, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(B, c * 4, H // 2, W // 2)
        mean, std = self._bn(z)
        return (z - mean) / std

    @torch.no_grad()
    def decode(self, latents):
        z = latents.to(self.device, torch.float32)
        mean, std = self._bn(z)
        z = z * std + mean
        B, c4, h, w = z.shape
        z = z.reshape(B, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(B, c4 // 4, h * 2, w * 2)
        img = self.vae.decode(z, return_dict=False)[0]
        return ((img.float() + 1) / 2).clamp(0, 1)

    # ---- export ------------------------------------------------------------------------------
    def export_lora(self, state_dict, out_dir, lora_config):
        from diffusers import Flux2KleinPipeline

        os.makedirs(out_dir, exist_ok=True)
        Flux2KleinPipeline.save_lora_weights(out_dir, transformer_lora_layers=state_dict,
                                             transformer_lora_adapter_metadata=lora_config)
