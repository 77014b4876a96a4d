"""The model families: one spec per family, the one place that knows which families exist.

A :class:`FamilySpec` bundles what the rest of the project asks of a family (the way torchtitan's
TrainSpec bundles a model): its adapter class and fast model class (imported lazily), its diffusers
transformer class, its flavours (tiny / mid / real-size configs with the benchmark's sizes), its
default and the authors' LoRA targets, the fast features it supports, its roll-out schedules, its
time/sign convention (written here once), and the shape facts the memory model and the FLOP counts
need. Code outside this module asks the spec (``family(cfg.model.family)``) and never compares
family names.

Adding a family = one subclass here, an adapter (:mod:`dopsd_fast.adapters.base`) and a fast model
with the pair entry point ``velocity_pair(x, sigma, ctx_s, ctx_t)`` (:mod:`dopsd_fast.models.paired`).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field

from dopsd_fast.config import ConfigError

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


@dataclass(frozen=True)
class FamilySpec:
    name: str
    title: str
    adapter_path: str  # "module:Class", imported when used
    fast_model_path: str
    transformer_class: str  # the diffusers class name
    convention: Convention
    presets: tuple  # model.preset values (tiny, random weights)
    flavours: dict = field(default_factory=dict)
    authors_lora_targets: tuple = ()
    fast_features: frozenset = frozenset(FAST_FEATURES)
    editing: bool = False  # rows with reference images (an editing model)
    schedule_help: str = ""
    default_rollout: str = ""  # the tiny runs' (and the recipes') roll-out schedule
    default_inference_steps: int = 8

    # ---- classes ---------------------------------------------------------------------------
    def adapter_class(self):
        return _load(self.adapter_path)

    def fast_model_class(self):
        return _load(self.fast_model_path)

    def diffusers_class(self):
        import diffusers

        return getattr(diffusers, self.transformer_class)

    def tiny_config(self) -> dict:
        raise NotImplementedError

    def tiny_overrides(self) -> list:
        """Config overrides that turn ``load_config(None)``'s tiny run into this family's tiny run."""
        return [f"model.family={self.name}", f"model.preset={self.presets[0]}", f"dopsd.rollout={self.default_rollout}"]

    def flavour_config(self, name: str) -> dict:
        fl = self.flavours[name]
        return dict(fl.config) if fl.config is not None else self.tiny_config()

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
        """Whether ``dopsd.rollout`` names a schedule of this family (explicit lists always do)."""
        raise NotImplementedError

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
        """The main layers ``fast.checkpoint`` counts (0: no gradient checkpointing on the fast path)."""
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

    # ---- what benchmarks and tests build without an adapter ---------------------------------------
    def latent_shape(self, transformer_config, resolution: int) -> tuple:
        """A state's per-sample shape at ``resolution`` x ``resolution`` pixels (the VAE's 8x)."""
        raise NotImplementedError

    def rollout_sigmas(self, k: int, latent_hw) -> list:
        """A K-state roll-out schedule without a scheduler config (benchmarks, the drop-in backend's
        default): the family's K-step schedule at this resolution."""
        raise NotImplementedError

    def random_contexts(self, transformer_config, latent, cap_s: int, cap_t: int, batch: int, generator,
                        device, dtype) -> tuple[list, list]:
        """Random stand-in contexts (student, teacher) of the given lengths, the shapes the trainer builds."""
        raise NotImplementedError

    def init_random(self, transformer) -> None:
        """Random weights for what diffusers initialises to zero and the fast path must get right."""

    def eager_velocity(self, transformer, x, sigma, contexts):
        """The eager diffusers call in the (sigma, v) convention (the reference every fast path meets)."""
        raise NotImplementedError

    # ---- validation ------------------------------------------------------------------------
    def validate(self, cfg) -> None:
        """Refuse what this family cannot run, before any weight is loaded (one line naming the field)."""
        m = cfg.model
        if m.preset is not None and m.preset not in self.presets:
            raise ConfigError(f"config field 'model.preset': must be one of {list(self.presets)} for model.family="
                              f"{self.name}, got {m.preset!r}")
        if not self.schedule_ok(cfg.dopsd.rollout):
            raise ConfigError(f"config field 'dopsd.rollout': {cfg.dopsd.rollout!r} is not a {self.title} schedule; "
                              f"{self.schedule_help}")
        if cfg.fast.enabled:
            fc = cfg.fast
            used = {"fp8": fc.fp8 != "off", "graphs": fc.graphs, "compile": fc.compile,
                    "checkpoint": fc.checkpoint not in ("auto", "none", 0)}
            for feat, on in used.items():
                if on and feat not in self.fast_features:
                    raise ConfigError(f"config field 'fast.{feat}': not implemented on the {self.title} fast path "
                                      f"(it supports: {', '.join(sorted(self.fast_features))})")


class ZImageFamily(FamilySpec):
    def tiny_config(self):
        from dopsd_fast.adapters.tiny import TINY_ZIMAGE

        return dict(TINY_ZIMAGE)

    def default_lora_targets(self, transformer_config=None):
        # attention q/k/v/out and the SwiGLU FFN of every block and refiner (the authors' recipe)
        return ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")

    def schedule_ok(self, rollout):
        from dopsd_fast.algorithm import NAMED_SCHEDULES

        return not isinstance(rollout, str) or rollout in NAMED_SCHEDULES

    def image_tokens(self, latent_hw):
        return (latent_hw[0] // 2) * (latent_hw[1] // 2)  # 2x2 patches

    def latent_shape(self, c, resolution):
        return (int(dict(c)["in_channels"]), resolution // 8, resolution // 8)

    def rollout_sigmas(self, k, latent_hw=None):
        from dopsd_fast.algorithm import resolve_schedule

        if k in (4, 8):
            return resolve_schedule(f"zimage-k{k}")
        return [float(3 * (1 - i / k) / (1 + 2 * (1 - i / k))) for i in range(k + 1)]  # shift 3, like the release

    def random_contexts(self, c, latent, cap_s, cap_t, batch, generator, device, dtype):
        import torch

        from dopsd_fast.adapters.base import Context

        d = int(dict(c)["cap_feat_dim"])  # caption lengths differ per sample (exercises the packing)
        ctx_s = [Context(torch.randn(cap_s + 3 * b, d, generator=generator).to(device, dtype)) for b in range(batch)]
        ctx_t = [Context(torch.randn(cap_t - 5 * b, d, generator=generator).to(device, dtype)) for b in range(batch)]
        return ctx_s, ctx_t

    def init_random(self, transformer):
        import torch

        with torch.no_grad():
            transformer.x_pad_token.normal_()
            transformer.cap_pad_token.normal_()

    def eager_velocity(self, transformer, x, sigma, contexts):
        from dopsd_fast.adapters.zimage import zimage_velocity

        return zimage_velocity(transformer, x, sigma, contexts)

    def memory_layers(self, c):
        # refiners run on the image (noise refiner) and caption (context refiner) tokens only: counted as
        # full layers over the student tokens, a slight overestimate
        c = dict(c)
        return int(c["dim"]), {"block": int(c["n_layers"]) + int(c.get("n_refiner_layers", 0))}

    def checkpointable_layers(self, c):
        return int(dict(c)["n_layers"])

    def shard_units(self, tr):
        return [*tr.noise_refiner, *tr.context_refiner, *tr.layers]

    def forward_flops(self, c, n_img, caps, rank=0, teacher=False):
        from dopsd_fast.memory import zimage_forward_flops

        return zimage_forward_flops(dict(c), n_img, list(caps), rank)


class KleinFamily(FamilySpec):
    def tiny_config(self):
        from dopsd_fast.adapters.klein import TINY_KLEIN

        return dict(TINY_KLEIN)

    def default_lora_targets(self, transformer_config):
        from dopsd_fast.adapters.klein import BASE_TARGETS

        # single blocks' to_out is a Linear, double blocks' a ModuleList: name the single ones in full
        n_single = int(dict(transformer_config)["num_single_layers"])
        return BASE_TARGETS + tuple(f"single_transformer_blocks.{i}.attn.to_out" for i in range(n_single))

    def schedule_ok(self, rollout):
        from dopsd_fast.algorithm import NAMED_SCHEDULES

        return (not isinstance(rollout, str) or rollout in NAMED_SCHEDULES
                or re.fullmatch(r"klein-k\d+(-authors)?", rollout) is not None)

    def image_tokens(self, latent_hw):
        return latent_hw[0] * latent_hw[1]  # patch 1 on the 128-channel packed latents

    def shard_units(self, tr):
        return [*tr.transformer_blocks, *tr.single_transformer_blocks]

    def checkpointable_layers(self, c):
        c = dict(c)  # the double blocks, then the single blocks (the memory model's order)
        return int(c["num_layers"]) + int(c["num_single_layers"])

    def teacher_image_tokens(self, n_img):
        return 2 * n_img  # the editing teacher also sees the target image (a reference)

    def teacher_context_tokens(self, model_cfg):
        return model_cfg.student_max_tokens  # prompts padded to student_max_tokens for both branches

    def latent_shape(self, c, resolution):
        return (int(dict(c)["in_channels"]), resolution // 16, resolution // 16)  # VAE 8x, 2x2 packed

    def rollout_sigmas(self, k, latent_hw):
        import math

        from dopsd_fast.adapters.klein import compute_empirical_mu

        mu = math.exp(compute_empirical_mu(latent_hw[0] * latent_hw[1], k))
        return [mu / (mu + (1 / s - 1)) for s in (1.0 - i / k for i in range(k))] + [0.0]

    def random_contexts(self, c, latent, cap_s, cap_t, batch, generator, device, dtype):
        import torch

        from dopsd_fast.adapters.base import Context

        d = int(dict(c)["joint_attention_dim"])  # padded text of one length; the target as a reference
        ctx_s = [Context(torch.randn(cap_s, d, generator=generator).to(device, dtype)) for _ in range(batch)]
        ctx_t = [Context(torch.randn(cap_t, d, generator=generator).to(device, dtype),
                         {"ref0": torch.randn(*latent, generator=generator).to(device)}) for _ in range(batch)]
        return ctx_s, ctx_t

    def eager_velocity(self, transformer, x, sigma, contexts):
        from dopsd_fast.adapters.klein import flux2_velocity

        return flux2_velocity(transformer, x, sigma, contexts)

    def memory_layers(self, c):
        c = dict(c)
        return (int(c["num_attention_heads"]) * int(c["attention_head_dim"]),
                {"double": int(c["num_layers"]), "single": int(c["num_single_layers"])})

    def forward_flops(self, c, n_img, caps, rank=0, teacher=False):
        """The adapters' FLOPs are not counted (< 3% at r64); the teacher carries the target image as a
        reference (2 x the image tokens)."""
        from dopsd_fast.memory import flux2_forward_flops

        g = a = 0.0
        for cap in caps:
            fg, fa = flux2_forward_flops(dict(c), (2 if teacher else 1) * n_img, cap)
            g, a = g + fg, a + fa
        return g, a


_ZIMAGE_RELEASED = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30,
                        n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560,
                        rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])
_KLEIN_4B = dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
                 axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=False)

ZIMAGE = ZImageFamily(
    name="zimage", title="Z-Image", adapter_path="dopsd_fast.adapters.zimage:ZImageAdapter",
    fast_model_path="dopsd_fast.models.zimage:FastZImage", transformer_class="ZImageTransformer2DModel",
    convention=Convention(time_is_one_minus_sigma=True, output_is_minus_v=True), presets=("tiny-zimage", "toy-zimage"),
    flavours={
        "tiny-zimage": Flavour("tiny-zimage", None, 128, 24, 80, 8, "cpu", "fp32"),
        # head dim 128 like the release, 8 layers: a quick GPU run
        "zimage-mid": Flavour("zimage-mid", dict(_ZIMAGE_RELEASED, dim=1536, n_layers=8, n_heads=12), 1024, 512,
                              1024, 64, "cuda", "bf16"),
        "zimage-6b": Flavour("zimage-6b", _ZIMAGE_RELEASED, 1024, 512, 1024, 64, "cuda", "bf16"),
    },
    # the authors' train_dopsd.py: the same modules as the default (every block and refiner)
    authors_lora_targets=("feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "attention.to_k",
                          "attention.to_q", "attention.to_v", "attention.to_out.0"),
    schedule_help="use zimage-k4, zimage-k8 or an explicit list of sigmas ending with 0",
    default_rollout="zimage-k4",
    default_inference_steps=8,
)

KLEIN = KleinFamily(
    name="klein", title="FLUX.2-klein", adapter_path="dopsd_fast.adapters.klein:KleinAdapter",
    fast_model_path="dopsd_fast.models.flux2:FastFlux2", transformer_class="Flux2Transformer2DModel",
    convention=Convention(time_is_one_minus_sigma=False, output_is_minus_v=False), presets=("tiny-klein",),
    flavours={
        "tiny-klein": Flavour("tiny-klein", None, 128, 48, 48, 8, "cpu", "fp32"),
        "klein-4b": Flavour("klein-4b", _KLEIN_4B, 1024, 512, 512, 64, "cuda", "bf16"),
        "klein-9b": Flavour("klein-9b", dict(_KLEIN_4B, num_layers=8, num_single_layers=24, num_attention_heads=32,
                                             joint_attention_dim=12288), 1024, 512, 512, 64, "cuda", "bf16"),
    },
    # The authors' LoRA targets (their train_dopsd.py). peft matches them by suffix: in diffusers' Flux2
    # the feed-forward names (`ff.net.0.proj`, `ff.net.2`, `ff_context.net.*`) match no module (its
    # feed-forwards are `ff.linear_in` / `ff.linear_out`) and `attn.to_out.0` no single block, so their runs
    # train the double blocks' attention only. `lora.targets: authors` selects exactly this list.
    authors_lora_targets=("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                          "attn.to_q", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2",
                          "ff_context.net.0.proj", "ff_context.net.2"),
    # every fast feature: the packed pass, the kernels, FP8 (ours, te, torchao), gradient checkpointing,
    # CUDA graphs (the forward holds no host work: its tables are built once per shape)
    fast_features=frozenset(FAST_FEATURES),
    editing=True,
    schedule_help="use klein-kN (the N-step inference schedule at the bucket's resolution), klein-kN-authors, "
                  "a named schedule or an explicit list of sigmas ending with 0",
    default_rollout="klein-k4",
    default_inference_steps=4,
)

FAMILIES: dict[str, FamilySpec] = {s.name: s for s in (ZIMAGE, KLEIN)}


def family(name: str) -> FamilySpec:
    """The spec of ``model.family`` ``name`` (one line naming the known ones otherwise)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"config field 'model.family': unknown family {name!r}; known: {sorted(FAMILIES)}") from None


def family_of_transformer(module) -> FamilySpec:
    """The family of a diffusers transformer instance (by its class), for the drop-in backend."""
    cls = type(getattr(module, "base_model", module)).__name__
    for spec in FAMILIES.values():
        if any(c.__name__ == spec.transformer_class for c in type(module).__mro__) or cls == spec.transformer_class:
            return spec
    raise TypeError(f"{type(module).__name__}: not a transformer of a known family "
                    f"({', '.join(s.transformer_class for s in FAMILIES.values())})")


def require_editing_support(spec: FamilySpec, dataset) -> None:
    """Refuse rows with reference images (editing rows) for a family without an editing mode."""
    if spec.editing:
        return
    from dopsd_fast.data import DataError

    bad = next((r for r in dataset.records if r.reference_paths), None)
    if bad is not None:
        editing = [s.name for s in FAMILIES.values() if s.editing]
        raise DataError(f"{bad.where}: a row with reference images (an editing row), but model.family={spec.name} "
                        f"has no editing mode; use model.family={' or '.join(editing)}")


def flavour(name: str) -> tuple[FamilySpec, Flavour]:
    """A flavour by name across families (``zimage-6b``, ``tiny-klein``, ...)."""
    for spec in FAMILIES.values():
        if name in spec.flavours:
            return spec, spec.flavours[name]
    known = [n for s in FAMILIES.values() for n in s.flavours]
    raise KeyError(f"unknown flavour {name!r}; known: {known}")
