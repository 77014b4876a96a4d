"""What a model family is, as data and a few methods: :class:`FamilySpec` (the way torchtitan's
TrainSpec bundles a model). A family's folder (``dopsd_fast/families/<name>/``) holds its spec, its
adapter (:class:`~dopsd_fast.families.adapter.ModelAdapter`), its fast model (the pair entry point
``velocity_pair(x, sigma, ctx_s, ctx_t)`` on :class:`~dopsd_fast.models.paired.PairedModel`) and its
built-in presets; :mod:`dopsd_fast.families` registers it. Code outside ``families/`` asks the spec
(``family(cfg.model.family)``) and never names a family.

A spec says: its adapter and fast model classes (imported when used), its diffusers transformer class,
its presets (built-in models, no downloads) and flavours (tiny / mid / real-size configs with the
benchmarks' sizes), its default and the authors' LoRA targets, the fast features it supports, its
named roll-out schedules, its time/sign convention (written here once), the FLOP counts, the memory
model's coefficients and the linears FP8 may take.
"""

from __future__ import annotations

import importlib
import re

import torch
from dataclasses import dataclass, field

from dopsd_fast.algorithm import NAMED_SCHEDULES
from dopsd_fast.errors import BackendError, ConfigError

def _same_layout(y):
    return y


def _describe(x) -> str:
    """A latent argument in a few words (for the layout errors)."""
    if torch.is_tensor(x):
        return f"a tensor of shape {tuple(x.shape)}"
    if isinstance(x, (list, tuple)):
        inner = tuple(x[0].shape) if x and torch.is_tensor(x[0]) else "?"
        return f"a {type(x).__name__} of {len(x)} tensors of shape {inner}"
    return type(x).__name__


FAST_FEATURES = ("kernels", "attention", "compile", "fp8", "graphs", "checkpoint")


def _load(path: str):
    mod, _, name = path.partition(":")
    return getattr(importlib.import_module(mod), name)


@dataclass(frozen=True)
class Convention:
    """How a diffusers transformer's call maps onto this project's (sigma, v) convention (sigma = 1
    is noise, ``v = eps - x0``): the time the model takes and the sign of what it returns."""

    time_is_one_minus_sigma: bool  # Z-Image: t = 1 - sigma (t = 1 is clean); FLUX.2: t = sigma
    output_is_minus_v: bool  # Z-Image returns -v; FLUX.2 returns v

    def model_time(self, sigma):
        """sigma (fp32 tensor) -> the timestep the diffusers model takes (in [0, 1])."""
        s = sigma.float()
        return 1.0 - s if self.time_is_one_minus_sigma else s

    def sigma_of(self, model_time):
        """The inverse of :meth:`model_time` (a trainer's own timesteps / 1000 -> sigma)."""
        return 1.0 - model_time if self.time_is_one_minus_sigma else model_time

    def velocity(self, output):
        """The model's output (any dtype) -> v in fp32."""
        return -output.float() if self.output_is_minus_v else output.float()


@dataclass(frozen=True)
class Flavour:
    """One size of a family's transformer: its diffusers config (None: the tiny preset's) and the
    sizes ``benchmarks/step_time.py`` runs it at (resolution, student / teacher context tokens, LoRA
    rank, device, dtype)."""

    name: str
    config: dict | None
    resolution: int
    cap_s: int
    cap_t: int
    rank: int
    device: str
    dtype: str
    vae: dict | None = None  # the released VAE's config (real sizes): what a config-only model folder holds
    scheduler: dict | None = None  # the released scheduler's config
    # the released encoders' weights in bytes (parameters x 2, bf16), for a dry run without them on disk:
    # "text" (the prompts' encoder, both branches) and "teacher" (an encoder only the teacher's context needs)
    encoders: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MemoryCoefficients:
    """The memory model's per-family constants (:mod:`dopsd_fast.memory`), per path (``fast`` /
    ``eager``): elements kept per student token and layer of each block kind, and the transient per
    teacher token, in units of the model width; what a roll-out state holds beyond its layers, in units
    of width^2 (measured by ``benchmarks/perf_model.py --calibrate``)."""

    per_token: dict  # path -> {block kind: elements per student token and layer / width}
    transient_per_teacher_token: dict  # path -> elements per teacher token / width
    per_state_extra: dict  # path -> elements per roll-out state alive / width^2 (an intercept)


@dataclass(frozen=True)
class FamilySpec:
    name: str
    title: str
    adapter_path: str  # "module:Class", imported when used
    fast_model_path: str
    velocity_path: str  # "module:function": the eager diffusers call in the (sigma, v) convention
    transformer_class: str  # the diffusers class name
    convention: Convention
    presets: dict  # model.preset value -> "module:Class" of its Preset (built-in models, no downloads)
    memory: MemoryCoefficients
    fp8_linears: str  # regex over module names: the block linears FP8 may take (dopsd_fast.fp8)
    flavours: dict = field(default_factory=dict)
    authors_lora_targets: tuple = ()
    fast_features: frozenset = frozenset(FAST_FEATURES)
    editing: bool = False  # rows with reference images (an editing model)
    # shipped recipes for rows with reference images (their data is not shipped) -> the references per row
    # the dry-run table counts for them
    reference_recipes: dict = field(default_factory=dict)
    contexts_use_vae: bool = False  # encoding a context runs the VAE (reference latents): dopsd-cache loads it
    named_schedules: dict = field(default_factory=dict)  # roll-out schedule name -> K + 1 sigmas
    schedule_help: str = ""
    default_rollout: str = ""  # the tiny runs' (and the recipes') roll-out schedule
    default_inference_steps: int = 8
    released_flavours: tuple = ()  # the flavours of the released models, the default first
    # the family-specific ModelConfig fields this family reads (another family's, set, are said unread)
    model_fields: tuple = ()
    pipeline_class: str = ""  # the diffusers pipeline class name (its LoRA loader converts other trainers' layouts)

    # ---- classes ---------------------------------------------------------------------------
    def adapter_class(self):
        return _load(self.adapter_path)

    def fast_model_class(self):
        return _load(self.fast_model_path)

    def preset(self, name: str):
        """The :class:`Preset` ``name`` (``model.preset``)."""
        if name not in self.presets:
            raise ConfigError(f"config field 'model.preset': must be one of {list(self.presets)} for model.family="
                              f"{self.name}, got {name!r}")
        return _load(self.presets[name])()

    @property
    def tiny_preset(self) -> str:
        """The random-weight tiny preset (tests, ``load_config(None)``): the first one."""
        return next(iter(self.presets))

    def diffusers_class(self):
        import diffusers

        return getattr(diffusers, self.transformer_class)

    def pipeline(self):
        """The diffusers pipeline class (its LoRA loading: ``lora_state_dict``, ``load_lora_into_transformer``)."""
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def tiny_config(self) -> dict:
        raise NotImplementedError

    def tiny_overrides(self) -> list:
        """Config overrides that turn ``load_config(None)``'s tiny run into this family's tiny run."""
        return [f"model.family={self.name}", f"model.preset={self.tiny_preset}", f"dopsd.rollout={self.default_rollout}"]

    def flavour_config(self, name: str) -> dict:
        fl = self.flavours[name]
        return dict(fl.config) if fl.config is not None else self.tiny_config()

    def flavour_for(self, model_cfg) -> str:
        """The released flavour a model folder stands for when it is absent (``dopsd-train --dry-run``):
        the one whose size tag (``4b``, ``9b``) the folder's name carries, else the first (a guess the
        dry run says)."""
        name = str(model_cfg.path or "").rstrip("/").rsplit("/", 1)[-1].lower()
        tagged = [f for f in self.released_flavours if f.rsplit("-", 1)[-1] in name]
        return (tagged or list(self.released_flavours))[0]

    def write_config_folder(self, flavour: str, path) -> None:
        """A diffusers-layout folder holding only the config files of ``flavour`` (transformer, VAE,
        scheduler; no weights): what ``--dry-run`` builds the architecture from without a download."""
        from pathlib import Path
        import json

        fl = self.flavours[flavour]
        parts = {"transformer/config.json": {"_class_name": self.transformer_class, **self.flavour_config(flavour)},
                 "vae/config.json": dict(fl.vae or {}), "scheduler/scheduler_config.json": dict(fl.scheduler or {})}
        for rel, conf in parts.items():
            f = Path(path) / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps(conf, indent=1))

    # ---- LoRA ------------------------------------------------------------------------------
    def default_lora_targets(self, transformer_config) -> tuple:
        raise NotImplementedError

    def lora_targets(self, lora_cfg, transformer_config) -> list:
        """``lora.targets``: None -> the family's default, ``authors`` -> the authors' list, or the list."""
        if lora_cfg.targets == "authors":
            return list(self.authors_lora_targets)
        return list(lora_cfg.targets or self.default_lora_targets(transformer_config))

    # ---- schedules -------------------------------------------------------------------------
    def schedule_ok(self, rollout) -> bool:
        """Whether ``dopsd.rollout`` names a schedule this family runs (explicit lists always do): a named
        schedule of the registry (:data:`dopsd_fast.algorithm.NAMED_SCHEDULES`, every family's)."""
        return not isinstance(rollout, str) or rollout in NAMED_SCHEDULES

    # ---- shapes (memory model, FLOPs) ------------------------------------------------------
    def image_tokens(self, latent_hw) -> int:
        raise NotImplementedError

    def memory_layers(self, transformer_config) -> tuple[int, dict]:
        """(width, {block kind: count}) for :mod:`dopsd_fast.memory`."""
        raise NotImplementedError

    def shard_units(self, transformer) -> list:
        """The modules FSDP2 shards one by one (the repeated blocks), in forward order."""
        raise NotImplementedError

    def checkpointable_layers(self, transformer_config) -> int:
        """The main layers ``model.gradient_checkpointing`` counts on the fast path (0: none checkpointable)."""
        return 0

    def forward_flops(self, transformer_config, n_img: int, caps: list, rank: int = 0, teacher: bool = False):
        """Analytic ``(GEMM, attention)`` FLOPs of one forward over samples with caption lengths ``caps``."""
        raise NotImplementedError

    def teacher_image_tokens(self, n_img: int) -> int:
        """Image tokens the teacher sees for ``n_img`` of the state's (an editing teacher: + the target)."""
        return n_img

    def step_tokens(self, model_cfg, n_img: int) -> tuple[int, int]:
        """(student, teacher) tokens of one sample with ``n_img`` image tokens at the config's context
        lengths (``n_img = 0``: the context tokens alone)."""
        return n_img + model_cfg.student_max_tokens, self.teacher_image_tokens(n_img) + self.teacher_context_tokens(
            model_cfg)

    def teacher_context_tokens(self, model_cfg) -> int:
        return model_cfg.teacher_max_tokens

    def context_tokens(self, model_cfg) -> dict:
        """{kind: the most tokens the config's encoders give a context of that kind} (a cache's bound)."""
        return {"student": model_cfg.student_max_tokens, "teacher": self.teacher_context_tokens(model_cfg)}

    # ---- what benchmarks and tests build without an adapter ---------------------------------------
    def latent_shape(self, transformer_config, resolution: int) -> tuple:
        """A state's per-sample shape at ``resolution`` x ``resolution`` pixels (the VAE's 8x)."""
        raise NotImplementedError

    def rollout_sigmas(self, k: int, latent_hw) -> list:
        """A K-state roll-out schedule without a scheduler config (benchmarks, the drop-in backend's
        default): the family's K-step schedule at this resolution."""
        raise NotImplementedError

    context_width_key = None  # the transformer config's entry for a context token's width

    def context_width(self, transformer_config) -> int | None:
        """The width of a context token (``Context.features``' last dim) this transformer takes."""
        if self.context_width_key is None:
            return None
        return int(dict(transformer_config)[self.context_width_key])

    def random_contexts(self, transformer_config, latent, cap_s: int, cap_t: int, batch: int, generator,
                        device, dtype) -> tuple[list, list]:
        """Random stand-in contexts (student, teacher) of the given lengths, the shapes the trainer builds."""
        raise NotImplementedError

    def init_random(self, transformer) -> None:
        """Random weights for what diffusers initialises to zero and the fast path must get right."""

    # ---- latents as other trainers hold them (the drop-in backend) ------------------------------
    latent_layouts = "(B, C, h, w)"  # what :meth:`latents_in` takes, for the docs and the errors

    def latents_in(self, x, latent_hw=None):
        """A trainer's latents -> ``(x_BCHW, back)``: the fast model's (B, C, h, w) tensor, and ``back(y)``
        that puts a (B, C, h, w) result (a state, a velocity) into the caller's layout again. The default
        takes (B, C, h, w) only; a family whose trainers hold another layout overrides this."""
        if torch.is_tensor(x) and x.dim() == 4:
            return x, _same_layout
        raise BackendError(f"{self.title} latents must be {self.latent_layouts}, got "
                           f"{_describe(x)}")

    def eager_velocity(self, transformer, x, sigma, contexts):
        """The eager diffusers call in the (sigma, v) convention (the reference every fast path meets)."""
        return _load(self.velocity_path)(transformer, x, sigma, contexts)

    # ---- validation ------------------------------------------------------------------------
    def fp8_linear(self, fqn: str) -> bool:
        """Whether the linear named ``fqn`` (a peft ``.base_layer`` suffix allowed) is one FP8 may take."""
        return re.match(self.fp8_linears + r"(\.base_layer)?$", fqn) is not None

    def fp8_module(self, fqn: str, module) -> bool:
        """Whether FP8 takes ``module`` named ``fqn``: a linear :meth:`fp8_linear` names, with dimensions
        that are multiples of 16 (what ``torch._scaled_mm`` needs)."""
        if not isinstance(module, torch.nn.Linear) or not self.fp8_linear(fqn):
            return False
        return module.in_features % 16 == 0 and module.out_features % 16 == 0

    def validate(self, cfg) -> None:
        """Refuse what this family cannot run, before any weight is loaded (one line naming the field)."""
        m = cfg.model
        if m.preset is not None and m.preset not in self.presets:
            raise ConfigError(f"config field 'model.preset': must be one of {list(self.presets)} for model.family="
                              f"{self.name}, got {m.preset!r}")
        for name, schedule in (("dopsd.rollout", cfg.dopsd.rollout), ("validation.schedule", cfg.validation.schedule)):
            if schedule is not None and not self.schedule_ok(schedule):
                raise ConfigError(f"config field '{name}': {schedule!r} is not a {self.title} schedule; "
                                  f"{self.schedule_help}")
        if cfg.fast.enabled:
            fc = cfg.fast
            used = {"fp8": fc.fp8 != "off", "graphs": fc.graphs, "compile": fc.compile != "off",
                    "checkpoint": cfg.model.gradient_checkpointing not in ("auto", "none", 0)}
            for feat, on in used.items():
                if on and feat not in self.fast_features:
                    field = "model.gradient_checkpointing" if feat == "checkpoint" else f"fast.{feat}"
                    raise ConfigError(f"config field '{field}': not implemented on the {self.title} fast path "
                                      f"(it supports: {', '.join(sorted(self.fast_features))})")


class Preset:
    """A built-in model of a family (``model.preset``): no downloads, weights random (tiny) or shipped
    with the package (toy). The adapter asks it for its parts instead of branching on names."""

    version = "1"  # part of the feature cache's key: bump when the preset's models change
    inference_steps: int | None = None  # None: the family's default

    def build(self, adapter) -> None:
        """Set ``adapter.transformer``, ``.vae``, ``.scheduler_config`` (and family-specific settings)."""
        raise NotImplementedError

    def build_encoders(self, adapter) -> None:
        """Set the adapter's encoders (text encoder, tokenizer, ... as the family's adapter names them)."""
        raise NotImplementedError

    def shipped_weights(self):
        """(folder, the names of its files the preset loads) of the weights the package ships for this
        preset, or None (weights made from the seed): a checkpoint records those files, and a resume on other
        ones (another version of the package) is refused as a changed model.path is."""
        return None

    def identity(self, cfg) -> dict:
        """What identifies the preset's encoder weights (the feature cache's key)."""
        return {"preset": cfg.preset, "seed": cfg.seed, "version": self.version}
