"""The model adapter interface: the one seam between the D-OPSD algorithm and a model family.

An adapter owns the model's components (transformer, encoders, VAE, scheduler config) and hides
its conventions. The algorithm sees only:

* ``velocity(transformer, x, sigma, ctx) -> v`` in ONE convention: sigma time (1 = noise),
  ``v = eps - x0``, latents ``x`` of shape ``(B, *latent_shape)`` in fp32, ``sigma`` of shape
  ``(B,)``. ``transformer`` is passed in so a full-fine-tuning run can call its separate teacher
  copy through the same code; with LoRA the trainer selects the adapter (student / teacher).
* ``encode_student(prompts)`` / ``encode_teacher(prompts, images)`` -> a :class:`Context` per
  sample (what the transformer is conditioned on), computed once and cacheable.
* ``training_sigmas(spec)`` / ``inference_sigmas(steps, latent_hw)``: roll-out and sampling
  schedules.
* ``default_lora_targets`` (from the family spec), ``latent_shape(h, w)``, ``encode_images`` / ``decode``,
  ``encoder_identity()`` (cache keys) and ``export_lora`` (a file diffusers loads).

How FLUX.2-klein maps onto it (``families/klein/adapter.py``):

* student context: Qwen3 hidden states of layers 9/18/27 stacked, 512 tokens -> ``Context.features``;
  the text position ids are derived inside ``velocity``.
* teacher context ("editing branch"): ``Context.features`` = the teacher prompt (prompt + a
  consistency instruction) and ``Context.extra["ref0"]``, ``["ref1"]``, ... = the clean VAE latents of
  the reference images, the target last (time coordinates 10, 20, ... in the 4-axis ids). ``velocity``
  concatenates ``[x tokens ; reference tokens]``, runs the DiT, and returns only the first N
  (target) output tokens, so the algorithm still sees a ``v`` of ``x``'s shape. The feature cache
  stores the reference latents with the context.
* FLUX.2 takes ``timestep = sigma`` and returns ``v`` directly: no sign or time change (each family's
  convention is its spec's, :class:`dopsd_fast.families.spec.Convention`).
"""

from __future__ import annotations

import json
import logging
import os
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from dopsd_fast.algorithm import resolve_schedule
from dopsd_fast.context import Context

log = logging.getLogger(__name__)


def resolve_device_dtype(cfg) -> tuple[torch.device, torch.dtype]:
    """``auto``: CUDA + bf16 when a GPU is there, else CPU + fp32 (called at run time, not import)."""
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(cfg.device)
        except RuntimeError as e:
            raise ValueError(f"model.device: {cfg.device!r} is not a device ({str(e).splitlines()[0]}); use auto, cpu, "
                             "cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"model.device: {cfg.device!r}, but this machine has no CUDA GPU; use auto or cpu")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"model.device: {cfg.device!r}, but only {torch.cuda.device_count()} GPU(s) are visible")
    if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # torchrun: one GPU per process
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


def _on_meta(module: torch.nn.Module) -> bool:
    p = next(module.parameters(), None)
    return p is not None and p.is_meta


class ModelAdapter(ABC):
    """Base class of the model families (see the module docstring)."""

    spec = None  # the family's FamilySpec (each family's adapter sets it): its facts live there
    encoder_attrs: tuple = ()  # the encoder parts ensure_encoders fills (None until then)

    def __init__(self, cfg, device: torch.device, dtype: torch.dtype, load_encoders: bool = True,
                 empty_weights: bool = False, encoding_only: bool = False, transformer_weights: bool = True):
        """Build the family's parts: from its preset (``model.preset``, :class:`~dopsd_fast.families.spec.Preset`)
        or the local diffusers folder (``_load_local``); then the encoders when asked. ``empty_weights``:
        the transformer and VAE built from their configs on the meta device, no weights read and no
        encoders (``dopsd-train --dry-run``: shapes, schedules, cache identity). ``encoding_only``
        (``dopsd-cache``): a local folder's transformer from its config on the meta device (no weights
        read: encoding contexts never runs it), and its VAE too where the family's contexts do not use
        it (``FamilySpec.contexts_use_vae``). ``transformer_weights`` False: a local folder's transformer
        from its config on the meta device, the rest as usual (``dopsd-sample --transformer`` loads
        another in its place)."""
        self.cfg = cfg
        self.transformer_weights = transformer_weights
        self.empty_weights = empty_weights
        self.encoding_only = encoding_only and not empty_weights
        self.device = torch.device("meta") if empty_weights else torch.device(device)
        self.dtype = dtype
        for name in self.encoder_attrs:
            setattr(self, name, None)
        self.preset = self.spec.preset(cfg.preset) if cfg.preset is not None else None
        if self.preset is not None:
            self.preset.build(self)
        else:
            self._load_local()
        if load_encoders and not empty_weights:
            self.ensure_encoders()
        for part, dtype in ((self.transformer, self.dtype), (self.vae, torch.float32)):
            if not _on_meta(part):  # a part left unread (encoding_only) stays on the meta device
                part.to(self.device, dtype)
            part.requires_grad_(False)
        self.vae.eval()
        self.check_settings(teacher=False)

    def check_settings(self, teacher: bool = True) -> None:
        """Refuse settings the loaded model cannot run (a ``ConfigError`` naming the field), at start-up
        rather than at the first sample that reaches them; ``teacher``: the teacher's too (training, the
        feature cache; sampling runs the student alone). The family's own; none by default."""

    transformer: torch.nn.Module
    device: torch.device
    dtype: torch.dtype

    @property
    def family(self) -> str:
        return self.spec.name

    @property
    def default_lora_targets(self) -> tuple[str, ...]:
        return tuple(self.spec.default_lora_targets(self.transformer.config))

    @property
    def authors_lora_targets(self) -> tuple[str, ...]:
        """The authors' scripts' list (``lora.targets: authors``)."""
        return tuple(self.spec.authors_lora_targets)

    @property
    def default_inference_steps(self) -> int:
        return self.spec.default_inference_steps

    # ---- the transformer, in the (sigma, v) convention -------------------------------------
    @abstractmethod
    def velocity(self, transformer: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor,
                 contexts: list[Context]) -> torch.Tensor:
        """v = eps - x0 predicted at (x, sigma) under per-sample ``contexts``; fp32, x's shape."""

    # ---- contexts --------------------------------------------------------------------------
    @abstractmethod
    def encode_student(self, prompts: list[str]) -> list[Context]:
        """Student contexts (text only)."""

    @abstractmethod
    def encode_teacher(self, prompts: list[str], images: list[torch.Tensor]) -> list[Context]:
        """Teacher contexts from (prompt, target image in [0, 1], (3, H, W))."""

    teacher_identity_fields: tuple = ()  # fields of encoder_identity() only the teacher's contexts read

    @abstractmethod
    def encoder_identity(self) -> dict:
        """A JSON-able description of everything the contexts depend on (weights, settings),
        known without loading the encoders: the feature cache's key."""

    def _first_time(self, key) -> bool:
        """True the first time ``key`` is asked on this adapter, then False: a warning said once per run."""
        told = self.__dict__.setdefault("_told", set())
        if key in told:
            return False
        told.add(key)
        return True

    def _say_if_cut(self, what: str, field: str, limit: int, lengths, prompts) -> None:
        """Warn once per ``what`` (a context kind) when a prompt's tokens pass ``limit`` (the config
        ``field``): the encoder reads only the first ``limit`` tokens, so the prompt's end does not
        reach the model. ``lengths``: each prompt's untruncated token count."""
        over = [(n, p) for n, p in zip(lengths, prompts) if n > limit]
        if over and self._first_time(("cut", what)):
            n, p = over[0]
            log.warning("%s: a prompt of %d tokens passes %s=%d; its end is cut (%r...; raise %s; further "
                        "ones are not reported)", what, n, field, limit, p[:40], field)

    def ensure_student_encoder(self) -> None:
        """What encoding the student's prompts needs (sampling); a family whose teacher needs more
        (Z-Image's VLM) loads less here."""
        self.ensure_encoders()

    def release_encoders(self) -> None:
        """Free the encoders (after their features are cached)."""

    def _load_diffusers_parts(self, path, transformer_cls, vae_cls):
        """transformer (model dtype), VAE (fp32) and scheduler config of a local diffusers directory,
        with errors that name what is missing."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"model.path: not a directory: {path}")
        for sub in ("transformer", "vae", "scheduler"):
            if not (path / sub).is_dir():
                raise FileNotFoundError(f"model.path: {path} has no '{sub}/' folder (expected the diffusers layout)")
        empty = self.empty_weights  # --dry-run: the real architecture, no weights read
        encoding = self.encoding_only  # dopsd-cache: only what encoding contexts runs

        def part(cls, sub, dtype, read):
            if read:
                return cls.from_pretrained(path, subfolder=sub, torch_dtype=dtype)
            with torch.device("meta"):
                return cls.from_config(cls.load_config(path, subfolder=sub))

        read = not (empty or encoding) and self.transformer_weights
        transformer = part(transformer_cls, "transformer", self.dtype, read)
        vae = part(vae_cls, "vae", torch.float32, not empty and not (encoding and not self.spec.contexts_use_vae))
        return transformer, vae, json.loads((path / "scheduler" / "scheduler_config.json").read_text())

    # ---- schedules ---------------------------------------------------------------------------
    def training_sigmas(self, spec, latent_hw=None) -> list[float]:
        return resolve_schedule(spec)

    def sampling_sigmas(self, steps=None, schedule=None, latent_hw=None) -> list[float]:
        """The sigmas a sample follows: ``schedule`` (a roll-out schedule's name or list, resolved as the
        roll-out's are) when given, else the pipeline's inference schedule of ``steps``."""
        if schedule is not None:
            return self.training_sigmas(schedule, latent_hw)
        return self.inference_sigmas(steps, latent_hw)

    def shift_sigmas(self, s: torch.Tensor, latent_hw=None) -> torch.Tensor:
        """The model's training-time timestep shift applied to unshifted sigmas ``s`` in (0, 1]
        (what the diffusers scheduler's ``sigmas`` table holds): static ``shift`` (Z-Image: 3), or the
        dynamic shift with the resolution's mu (klein: exponential, empirical mu)."""
        cfg = self.scheduler_config
        if cfg.get("use_dynamic_shifting"):
            mu = torch.tensor(self.dynamic_mu(latent_hw), dtype=s.dtype)
            if cfg.get("time_shift_type", "exponential") == "exponential":
                return torch.exp(mu) / (torch.exp(mu) + (1 / s - 1))
            return mu / (mu + (1 / s - 1))
        shift = float(cfg.get("shift", 1.0))
        return shift * s / (1 + (shift - 1) * s)

    def dynamic_mu(self, latent_hw) -> float:
        raise NotImplementedError(f"{type(self).__name__}: no dynamic timestep shift")

    @abstractmethod
    def inference_sigmas(self, steps: int | None = None, latent_hw: tuple[int, int] | None = None) -> list[float]:
        """The model's few-step sampling schedule (K + 1 values ending with 0)."""

    # ---- latents -----------------------------------------------------------------------------
    @abstractmethod
    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Per-sample latent shape for an image of ``height`` x ``width`` pixels."""

    def cache_extra_problem(self, kind: str, name: str, shape: tuple, record) -> str | None:
        """What is wrong with a cached context's (``kind``: "student" / "teacher") extra tensor ``name`` of
        ``shape`` for its dataset row ``record`` (a received cache is untrusted), or None. A family whose
        contexts carry extras checks them."""
        return None

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], (B, 3, H, W)."""

    @abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (B, 3, H, W) -> normalised latents (deterministic: the mode)."""

    # ---- LoRA export -------------------------------------------------------------------------
    @abstractmethod
    def export_lora(self, state_dict: dict, out_dir: str, lora_config: dict) -> None:
        """Write a LoRA state dict (peft names) in the format the diffusers pipeline loads."""
