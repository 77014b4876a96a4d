"""Run configuration: small nested dataclasses, one YAML file plus ``--set a.b=value`` overrides.

Every value is validated in ``__post_init__``; an error names the dotted field (``optim.lr``).
The resolved configuration is written next to every run (``config.yaml`` in the output dir).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import reprlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from dopsd_fast.algorithm import resolve_schedule
from dopsd_fast.errors import ConfigError  # re-exported: dopsd_fast.config.ConfigError
from dopsd_fast.families import DEFAULT_FAMILY, FAMILIES, family
import importlib.util
from dopsd_fast.safety import atomic_write

LORA_MAX_SCALE = 256.0  # alpha / rank: trained LoRAs use about 1 to 4; a file past it is refused as damaged

log = logging.getLogger(__name__)


_REPR = reprlib.Repr()  # (keyword arguments from Python 3.12 only)
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxtuple, _REPR.maxstring, _REPR.maxother = 2, 4, 4, 4, 60, 60


def short(value) -> str:
    """``repr`` of a value named in an error, bounded (a YAML alias bomb's nested lists, a pasted novel):
    the line stays a line."""
    return _REPR.repr(value)


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config field '{name}': {msg}")


def _strings(value) -> bool:
    """A non-empty list of non-empty strings."""
    return isinstance(value, list) and len(value) > 0 and all(isinstance(v, str) and v.strip() for v in value)


def _paths(value) -> bool:
    """A list of non-empty path strings."""
    return isinstance(value, list) and all(isinstance(p, str) and p.strip() for p in value)


def _one_of(value, choices, name):
    _check(value in choices, name, f"must be one of {list(choices)}, got {short(value)}")


@dataclass(kw_only=True)
class ModelConfig:
    family: str = DEFAULT_FAMILY
    # A built-in preset of the family (tiny: random weights; toy: shipped; fully offline) or None to load
    # from `path`.
    preset: Optional[str] = FAMILIES[DEFAULT_FAMILY].tiny_preset
    # Local diffusers-format directory (transformer/, vae/, text_encoder/, tokenizer/, scheduler/).
    path: Optional[str] = None
    # Local Qwen3-VL directory for the teacher context encoder (its language model weights are
    # replaced by the text encoder's).
    vlm_path: Optional[str] = None
    # Weight dtype of the frozen parts: auto = bf16 on CUDA, fp32 on CPU.
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0  # initialisation seed of the tiny presets
    # Gradient checkpointing of the main layers, on either path: auto (the memory model picks the fewest
    # layers that fit: none where everything fits) | none | all | N (the first N; the fast path only, the
    # eager path checkpoints every block or none). true / false = all / none.
    gradient_checkpointing: Union[bool, int, str] = "auto"
    student_max_tokens: int = 512
    teacher_max_tokens: int = 1024
    # Pixel bounds of the teacher's image processor (512^2 .. 768^2 for the real model).
    teacher_min_pixels: Optional[int] = None
    teacher_max_pixels: Optional[int] = None
    # FLUX.2-klein: text-encoder layers whose hidden states are stacked (None = 9, 18, 27; tiny: 1, 2, 3)
    text_layers: Optional[list] = None
    # FLUX.2-klein editing-branch teacher: appended to the prompt (None = the built-in instruction,
    # "authors" = the authors' launch-script text, or any text)
    teacher_instruction: Optional[str] = None
    # FLUX.2-klein ground-truth-reference editing rows: the teacher's instruction (None = built-in,
    # "authors" = the authors' text, or any text)
    gt_instruction: Optional[str] = None

    def __post_init__(self):
        _one_of(self.family, tuple(FAMILIES), "model.family")
        if self.preset is not None:
            _one_of(self.preset, FAMILIES[self.family].presets, "model.preset")
        _one_of(self.dtype, ("auto", "fp32", "bf16", "fp16"), "model.dtype")
        _check(self.preset is not None or self.path is not None, "model.preset",
               "set either model.preset (a tiny built-in model) or model.path (local weights)")
        _check(self.preset is None or self.path is None, "model.path",
               f"{self.path} is read only without a preset, and model.preset is {self.preset!r} (a built-in model): "
               "set model.preset=null to load model.path, or model.path=null to run the preset")
        if isinstance(self.gradient_checkpointing, bool):
            self.gradient_checkpointing = "all" if self.gradient_checkpointing else "none"
        if isinstance(self.gradient_checkpointing, str):
            _one_of(self.gradient_checkpointing, ("auto", "none", "all"), "model.gradient_checkpointing")
        else:
            _check(self.gradient_checkpointing >= 0, "model.gradient_checkpointing",
                   f"must be >= 0 layers, got {self.gradient_checkpointing}")
        _check(self.student_max_tokens > 0, "model.student_max_tokens", "must be > 0")
        _check(self.teacher_max_tokens > 0, "model.teacher_max_tokens", "must be > 0")
        for name in ("teacher_min_pixels", "teacher_max_pixels"):
            v = getattr(self, name)
            _check(v is None or v >= 1, f"model.{name}", f"must be null (the model's) or a pixel count >= 1, got {v}")
        _check(self.teacher_min_pixels is None or self.teacher_max_pixels is None
               or self.teacher_min_pixels <= self.teacher_max_pixels, "model.teacher_min_pixels",
               f"{self.teacher_min_pixels} is over model.teacher_max_pixels {self.teacher_max_pixels}: the lower "
               "bound must not pass the upper one")
        if self.text_layers is not None and self.text_layers != []:  # [] (as null) was accepted
            _check(isinstance(self.text_layers, list) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in self.text_layers), "model.text_layers",
                f"must be null or a list of layer indices (integers), got {short(self.text_layers)}")


@dataclass(kw_only=True)
class LoraConfig:
    enabled: bool = True  # False = full fine-tuning with a full EMA teacher
    rank: int = 64
    alpha: float = 128.0
    # None = the adapter's default targets; "authors" = the authors' list for this family; or a list
    targets: Optional[Union[str, list]] = None
    init: str = "gaussian"

    def __post_init__(self):
        if isinstance(self.targets, str):
            _one_of(self.targets, ("authors",), "lora.targets")
        elif self.targets is not None and self.targets != []:  # [] (as null: the family's default) was accepted
            _check(_strings(self.targets), "lora.targets",
                   f"must be null, 'authors' or a non-empty list of module names (strings), got {short(self.targets)}")
        _check(self.rank > 0, "lora.rank", f"must be > 0, got {self.rank}")
        _check(self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha}")
        _check(self.alpha / max(self.rank, 1) <= LORA_MAX_SCALE, "lora.alpha",
               f"scales the LoRA by alpha / rank = {self.alpha / max(self.rank, 1):g}, over {LORA_MAX_SCALE:g} (a LoRA "
               "file with that scale is refused as damaged when loaded); lower lora.alpha or raise lora.rank")
        _one_of(self.init, ("gaussian", "default"), "lora.init")


@dataclass(kw_only=True)
class DopsdConfig:
    # A named schedule of the model family (Z-Image: zimage-k4, zimage-k8; FLUX.2-klein: klein-kN) or an
    # explicit list of K + 1 sigmas ending with 0 (the family checks the name: FamilySpec.schedule_ok).
    # None: the family's own (FamilySpec.default_rollout), set by Config (a FLUX.2-klein config that left it
    # out rolled out on Z-Image's sigmas, the field's earlier default, silently).
    rollout: Optional[Union[str, list]] = None
    loss: str = "x0"
    # auto: "once" (the authors' schedule) where the memory model says it fits, else "stepwise" (same
    # gradient, one state's activations alive); see dopsd_fast.memory
    backward: str = "auto"
    # Teacher weights: EMA decay (0.9999 default), 1.0 = frozen initial teacher, 0.0 = live student.
    ema_decay: float = 0.9999
    # Full fine-tuning only: keep the fp32 EMA master copy on the CPU.
    ema_on_cpu: bool = False

    def __post_init__(self):
        _one_of(self.loss, ("x0", "v"), "dopsd.loss")
        _one_of(self.backward, ("auto", "once", "stepwise"), "dopsd.backward")
        _check(0.0 <= self.ema_decay <= 1.0, "dopsd.ema_decay", f"must be in [0, 1], got {self.ema_decay}")
        if self.rollout is None or isinstance(self.rollout, str):
            return  # the family's own, or a name: the model family knows its schedules (Config validates it)
        try:
            resolve_schedule(self.rollout)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"config field 'dopsd.rollout': {e}") from None


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0  # 0 disables clipping

    def __post_init__(self):
        _check(math.isfinite(self.lr) and self.lr > 0, "optim.lr", f"must be a finite number > 0, got {self.lr}")
        _check(self.lr <= 1, "optim.lr", f"{self.lr:g} is over 1: AdamW moves each weight by about lr per step "
                                          "(LoRA runs train at about 1e-4); did you mean a smaller number?")
        if isinstance(self.betas, list):  # YAML 1.1 reads 9e-1 (no dot) as text
            with contextlib.suppress(TypeError, ValueError):
                self.betas = [float(b) if isinstance(b, str) else b for b in self.betas]
        _check(len(self.betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                            for b in self.betas), "optim.betas",
               f"must be two numbers in [0, 1), got {short(self.betas)}")
        _check(math.isfinite(self.eps) and self.eps > 0, "optim.eps", f"must be a finite number > 0, got {self.eps}")
        _check(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "optim.weight_decay",
               f"must be a finite number >= 0, got {self.weight_decay}")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables)")


@dataclass(kw_only=True)
class DataConfig:
    # Exactly one source: the built-in tiny dataset, a JSONL file, or a folder of image + .txt.
    builtin: Optional[str] = None
    jsonl: Optional[str] = None
    folder: Optional[str] = None
    image_key: str = "image"
    # Prompt variants: each sample draws one of these keys at random.
    prompt_keys: list = field(default_factory=lambda: ["prompt"])
    # "1mp" = the authors' 11 one-megapixel buckets, or a list of [width, height].
    buckets: Union[str, list] = "1mp"
    bucket_scale: float = 1.0  # multiplies every bucket side (rounded to bucket_multiple)
    bucket_multiple: int = 16
    batch_size: int = 1
    skip_bad: bool = False
    num_workers: int = 2  # threads decoding the next micro-batch's images during the step (0: in the loop)
    # RGB (0-255) that images with an alpha channel are composited on
    alpha_background: list = field(default_factory=lambda: [255, 255, 255])
    # images over this many pixels are refused before decoding (a decode takes ~27 bytes a pixel)
    max_image_pixels: int = 1 << 26

    def __post_init__(self):
        for s in ("jsonl", "folder"):
            v = getattr(self, s)
            _check(v is None or v.strip() != "", f"data.{s}", "must not be empty (an unset variable?): give a path, or "
                   "leave the field out")
        sources = [s for s in ("builtin", "jsonl", "folder") if getattr(self, s)]
        _check(len(sources) == 1, "data", f"set exactly one of data.builtin / data.jsonl / data.folder, got {sources or 'none'}")
        if self.builtin is not None:
            _one_of(self.builtin, ("tiny", "toy-concept", "toy-concept-prior"), "data.builtin")
        _check(_strings(self.prompt_keys), "data.prompt_keys",
               f"must be a non-empty list of JSONL keys (strings), got {short(self.prompt_keys)}")
        _check(self.batch_size >= 1, "data.batch_size", "must be >= 1")
        _check(isinstance(self.num_workers, int) and self.num_workers >= 0, "data.num_workers",
               "must be an integer >= 0 (threads decoding the next micro-batch's images; 0: in the loop)")
        _check(isinstance(self.alpha_background, (list, tuple)) and len(self.alpha_background) == 3
               and all(isinstance(v, (int, float)) and 0 <= v <= 255 for v in self.alpha_background),
               "data.alpha_background", f"must be three values in [0, 255], got {short(self.alpha_background)}")
        _check(isinstance(self.max_image_pixels, int) and not isinstance(self.max_image_pixels, bool)
               and self.max_image_pixels >= 1, "data.max_image_pixels", f"must be an integer >= 1, got "
               f"{short(self.max_image_pixels)}")
        _check(self.bucket_scale > 0, "data.bucket_scale", "must be > 0")
        _check(self.bucket_multiple >= 1, "data.bucket_multiple", "must be >= 1")
        if isinstance(self.buckets, str):
            _one_of(self.buckets, ("1mp",), "data.buckets")
        else:
            _check(isinstance(self.buckets, (list, tuple)) and len(self.buckets) > 0
                   and all(isinstance(b, (list, tuple)) and len(b) == 2 for b in self.buckets), "data.buckets",
                   "must be '1mp' or a list of [width, height]")
            bad = [b for b in self.buckets if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in b)]
            _check(not bad, "data.buckets", f"each [width, height] must be whole pixels > 0, got {bad[:1]}")


@dataclass(kw_only=True)
class CacheConfig:
    # Directory of the feature cache written by `dopsd-cache`; None = encode on the fly (memoised).
    # A cache dir is always required to be complete (an incomplete one is refused with a count).
    dir: Optional[str] = None
    shard_size: int = 256  # entries per safetensors shard

    def __post_init__(self):
        _check(self.shard_size >= 1, "cache.shard_size", "must be >= 1")


@dataclass(kw_only=True)
class TrainConfig:
    output_dir: str = f"runs/{FAMILIES[DEFAULT_FAMILY].tiny_preset}"
    max_steps: int = 2000
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    tensorboard: bool = True
    wandb: bool = False
    progress: bool = True
    # The divergence guard (dopsd_fast.safety.Guard): an update this many times the weights' norm stops
    # the run before anything is written (LoRA: against a copy of the adapters; full fine-tuning: the update
    # read from AdamW's state); a gradient norm or update ratio warn_factor x its
    # running median warns.
    max_update_ratio: float = 1e6
    warn_factor: float = 10.0
    # torchrun (data parallel): a collective that waits longer than this fails with a message naming the
    # rank (another rank died or hangs); every N steps the ranks check their weights are identical (0: never)
    dist_timeout_s: float = 1800.0
    check_sync_every: int = 100

    def __post_init__(self):
        _check(self.max_steps >= 0, "train.max_steps", "must be >= 0")
        _check(self.max_update_ratio > 0, "train.max_update_ratio", "must be > 0")
        _check(self.warn_factor > 1, "train.warn_factor", "must be > 1")
        _check(math.isfinite(self.dist_timeout_s) and self.dist_timeout_s > 0, "train.dist_timeout_s",
               f"must be a finite number of seconds > 0, got {self.dist_timeout_s}")
        _check(self.check_sync_every >= 0, "train.check_sync_every", "must be >= 0 (0 = never)")
        _check(self.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        _check(self.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0 (0 = only at the end)")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")


@dataclass(kw_only=True)
class ValidationConfig:
    every: int = 250  # 0 disables periodic validation (step 0 still runs if at_start)
    at_start: bool = True
    num_samples: int = 2  # first N dataset rows: their prompt (first key) and target image
    steps: Optional[int] = None  # inference steps; None = the model's few-step default
    # the samples' sigmas instead of the pipeline's schedule: a roll-out schedule's name or a list ending with 0
    schedule: Union[None, str, list] = None
    seed: int = 1234
    # extra prompts without a target (held-out prompts: does the concept generalise, does the rest stay):
    # one row each with the student's sample, at the first bucket; an entry {prompt: ..., references: [...]}
    # is that prompt on its own reference images (an editing model's; [] = none)
    prompts: list = field(default_factory=list)
    # reference images the other held-out prompts are conditioned on (an editing model's: a run on rows
    # with references), each at the data.buckets bucket nearest its aspect; a prompt samples at its first one's
    references: list = field(default_factory=list)

    def __post_init__(self):
        _check(self.every >= 0, "validation.every", "must be >= 0")
        _check(self.num_samples >= 0, "validation.num_samples", "must be >= 0")
        _check(self.steps is None or self.steps >= 1, "validation.steps",
               f"must be >= 1 inference steps (null = the model's default), got {self.steps}")
        _check(self.schedule is None or self.steps is None, "validation.schedule",
               f"names the sigmas and so the steps: leave validation.steps null (it is {self.steps})")
        if isinstance(self.schedule, list):
            try:
                resolve_schedule(self.schedule)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"config field 'validation.schedule': {e}") from None
        _check(self.schedule is None or isinstance(self.schedule, (str, list)), "validation.schedule",
               f"must be null, a schedule's name or a list of sigmas ending with 0, got {short(self.schedule)}")
        _check(isinstance(self.prompts, list), "validation.prompts",
               "must be a list of prompts (a string, or {prompt: ..., references: [...]})")
        for i, p in enumerate(self.prompts):
            name = f"validation.prompts[{i}]"
            if isinstance(p, dict):
                unknown = sorted(set(p) - {"prompt", "references"})
                _check(not unknown, name, f"unknown key(s) {unknown}: an entry is a prompt string or "
                                          "{prompt: ..., references: [...]}")
                _check(isinstance(p.get("prompt"), str) and p["prompt"].strip(), f"{name}.prompt",
                       "must be a non-empty prompt string")
                _check(_paths(p.get("references", [])), f"{name}.references", "must be a list of image file paths")
            else:
                _check(isinstance(p, str) and p.strip(), name, "must be a non-empty prompt string (or "
                                                               "{prompt: ..., references: [...]})")
        _check(_paths(self.references), "validation.references", "must be a list of image file paths")

    def reference_fields(self) -> dict[str, list]:
        """Every field naming reference images (``validation.references``, each entry's own ``references``)
        -> its paths: what the run and the dry run check, used or not."""
        return {"validation.references": list(self.references), **{name: paths for _, paths, name in self.held_out()}}

    def held_out(self) -> list[tuple[str, list, str]]:
        """Per held-out prompt: (its text, its reference image paths, the field naming them): an entry's
        own ``references``, else ``validation.references``."""
        out = []
        for i, p in enumerate(self.prompts):
            if isinstance(p, dict) and "references" in p:
                out.append((p["prompt"], list(p["references"]), f"validation.prompts[{i}].references"))
            else:
                out.append((p["prompt"] if isinstance(p, dict) else p, list(self.references), "validation.references"))
        return out


@dataclass(kw_only=True)
class SftConfig:
    """``method: sft``: the plain flow-matching fine-tuning baseline on the same data (the
    sigma sampling of diffusers' DreamBooth LoRA scripts, then the model's timestep shift)."""

    weighting: str = "none"  # none (uniform) | logit_normal | mode
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def __post_init__(self):
        _one_of(self.weighting, ("none", "logit_normal", "mode"), "sft.weighting")
        _check(math.isfinite(self.logit_mean), "sft.logit_mean", f"must be a finite number, got {self.logit_mean}")
        _check(math.isfinite(self.logit_std) and self.logit_std > 0, "sft.logit_std",
               f"must be a finite number > 0, got {self.logit_std}")
        _check(math.isfinite(self.mode_scale) and self.mode_scale >= -1, "sft.mode_scale",
               f"must be a finite number >= -1 (below -1 the sampled u leaves [0, 1] and is clamped), got "
               f"{self.mode_scale}")


@dataclass(kw_only=True)
class FastConfig:
    """The fast path (``dopsd_fast.models``): packed student/teacher forward, fused kernels, FP8,
    CUDA graphs. ``enabled: false`` runs the eager diffusers model (the reference)."""

    enabled: bool = False
    kernels: str = "auto"  # auto (Triton kernels on CUDA) | on | off (same structure, eager PyTorch ops)
    attention: str = "auto"  # auto (measured fastest on this GPU, else sdpa) | triton | sdpa | flash_attn
    # the paired LoRA linear's base GEMM: auto (per shape, the faster at this GPU's measured rates) | cublas | triton
    gemm: str = "auto"
    # the memory budget of the automatic choices (dopsd.backward and model.gradient_checkpointing auto);
    # None = 85% of the free GPU memory
    memory_budget_gb: Optional[float] = None
    graphs: bool = False  # CUDA graphs: the no-grad single-branch forwards (validation, sampling); never the roll-out
    fp8: str = "off"  # off | native (ours: torch._scaled_mm, LoRA runs) | te (TransformerEngine) | torchao
    fp8_recipe: Optional[str] = None  # native: rowwise|tensorwise; te: delayed|current; torchao: tensorwise|rowwise
    fp8_teacher: bool = True  # run the no-grad teacher forward in FP8 too (te only can turn it off)
    fp8_dgrad: bool = True  # native: the student's backward dX GEMMs in FP8 too (one per group of linears)
    nvtx: bool = False  # nvtx ranges around roll-out states, teacher, student, backward, optimizer
    # torch.compile: off | ops (the fast path's element-wise ops compiled instead of our kernels; needs
    # kernels != on) | regional (the eager path: diffusers' regional compilation of the repeated blocks)
    compile: Union[bool, str] = "off"
    compile_backend: str = "inductor"

    def __post_init__(self):
        _one_of(self.kernels, ("auto", "on", "off"), "fast.kernels")
        _one_of(self.attention, ("auto", "cudnn", "triton", "sdpa", "flash_attn"), "fast.attention")
        _one_of(self.gemm, ("auto", "cublas", "triton"), "fast.gemm")
        _one_of(self.fp8, ("off", "native", "te", "torchao"), "fast.fp8")
        if isinstance(self.compile, bool):  # configs of earlier releases: true meant what each path compiles
            new = ("ops" if self.enabled else "regional") if self.compile else "off"
            if self.compile:
                log.warning("config field fast.compile: true is deprecated: it means fast.compile: %s here", new)
            self.compile = new
        _one_of(self.compile, ("off", "ops", "regional"), "fast.compile")
        _check(self.compile != "ops" or self.enabled, "fast.compile",
               "ops compiles the fast path's element-wise ops: set fast.enabled=true, or use regional")
        _check(self.compile != "regional" or not self.enabled, "fast.compile",
               "regional compiles the eager path's diffusers blocks: set fast.enabled=false, or use ops")
        if self.memory_budget_gb is not None:
            _check(self.memory_budget_gb > 0, "fast.memory_budget_gb", "must be > 0")
        recipes = {"native": ("rowwise", "tensorwise"), "te": ("delayed", "current"),
                   "torchao": ("tensorwise", "rowwise")}
        if self.fp8 != "off":
            _check(self.enabled, "fast.fp8", "FP8 runs on the fast path: set fast.enabled=true")
            if self.fp8_recipe is None:
                self.fp8_recipe = recipes[self.fp8][0]
            _one_of(self.fp8_recipe, recipes[self.fp8], "fast.fp8_recipe")
            _check(self.fp8_teacher or self.fp8 == "te", "fast.fp8_teacher",
                   "only fp8=te can run the teacher forward in bf16 (torchao converts the layers for both)")
            _check(self.fp8_dgrad or self.fp8 == "native", "fast.fp8_dgrad",
                   "only fp8=native can keep the backward's dX GEMMs in bf16 (te and torchao choose their own)")
        else:
            _check(self.fp8_recipe is None, "fast.fp8_recipe", "set only with fast.fp8 = native, te or torchao")
        _check(not (self.compile == "ops" and self.kernels == "on"), "fast.compile",
               "compiles the eager ops in place of our kernels: set fast.kernels=auto or off")
        _check(not self.graphs or self.enabled, "fast.graphs", "CUDA graphs run on the fast path: set fast.enabled=true")


@dataclass(kw_only=True)
class DistConfig:
    """torchrun runs (``dopsd_fast.distributed``, ``dopsd_fast.fsdp``)."""

    # FSDP2 (fully_shard per transformer block): auto = on for full fine-tuning with more than one rank
    # (student, EMA teacher, gradients and AdamW state sharded), off for LoRA (the base replicated)
    fsdp: str = "auto"  # auto | on | off
    shard_base: bool = False  # LoRA: shard the frozen base (and the adapters) with FSDP2 too, for memory
    reshard_after_forward: bool = True  # free each block's gathered weights after its forward (ZeRO-3)

    def __post_init__(self):
        _one_of(self.fsdp, ("auto", "on", "off"), "dist.fsdp")


@dataclass(kw_only=True)
class Config:
    method: str = "dopsd"  # dopsd | sft (the plain fine-tuning baseline: change this one line to compare)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    dopsd: DopsdConfig = field(default_factory=DopsdConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(builtin="tiny"))
    cache: CacheConfig = field(default_factory=CacheConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    fast: FastConfig = field(default_factory=FastConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def __post_init__(self):
        _one_of(self.method, ("dopsd", "sft"), "method")
        if self.dist.fsdp == "on" and self.lora.enabled and not self.dist.shard_base:
            raise ConfigError("config field 'dist.fsdp': on shards full fine-tuning (lora.enabled: false); a LoRA run "
                              "is replicated unless dist.shard_base: true shards its frozen base (eager path): set "
                              "that, or dist.fsdp: auto")
        if self.dopsd.rollout is None and self.model.family in FAMILIES:
            self.dopsd.rollout = FAMILIES[self.model.family].default_rollout
        family(self.model.family).validate(self)  # what the family cannot run, before any weight is loaded

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def ignored_fields(self) -> list[str]:
        """The fields set away from their defaults that this run's method does not read (SFT: the roll-out,
        D-OPSD loss and backward; D-OPSD: the SFT sigma sampling): said at start-up."""
        if self.method == "sft":
            d, default = self.dopsd, DopsdConfig()
            rollout = FAMILIES[self.model.family].default_rollout if self.model.family in FAMILIES else d.rollout
            out = [f"dopsd.{k}" for k in ("loss", "backward") if getattr(d, k) != getattr(default, k)]
            return out + (["dopsd.rollout"] if d.rollout not in (rollout, default.rollout) else [])
        default = SftConfig()
        return [f"sft.{f.name}" for f in dataclasses.fields(SftConfig)
                if getattr(self.sft, f.name) != getattr(default, f.name)]

    def unread_fields(self) -> list[tuple[str, str]]:
        """``(field, why)`` for each field set away from its default that this run does not read (besides
        :meth:`ignored_fields`, the other method's): said at start-up, one warning per reason."""
        out: list[tuple[str, str]] = []

        # not lora.* under full fine-tuning: lora.enabled=false on a LoRA recipe is the way to it (its rank unread)
        if self.lora.enabled and self.dopsd.ema_on_cpu:
            out.append(("dopsd.ema_on_cpu", "LoRA runs keep their EMA adapters beside the student (full fine-tuning "
                                            "only)"))
        if self.model.family in FAMILIES:
            spec, default = FAMILIES[self.model.family], ModelConfig()
            others = {n for s in FAMILIES.values() for n in s.model_fields} - set(spec.model_fields)
            for n in sorted(others, key=[f.name for f in fields(ModelConfig)].index):
                if getattr(self.model, n) != getattr(default, n):
                    out.append((f"model.{n}", f"model.family={self.model.family} does not read it"))
            if self.model.preset is not None and "vlm_path" in spec.model_fields and self.model.vlm_path is not None:
                out.append(("model.vlm_path", f"model.preset={self.model.preset} builds its own teacher encoder"))
        fc, fd = self.fast, FastConfig()
        if not fc.enabled:
            for n in ("kernels", "attention", "gemm"):
                if getattr(fc, n) != getattr(fd, n):
                    out.append((f"fast.{n}", "the eager path (fast.enabled=false) runs diffusers' own modules"))
        if fc.compile == "off" and fc.compile_backend != fd.compile_backend:
            out.append(("fast.compile_backend", "fast.compile=off compiles nothing"))
        if self.method == "sft":
            sd = SftConfig()
            if self.sft.weighting != "logit_normal":
                for n in ("logit_mean", "logit_std"):
                    if getattr(self.sft, n) != getattr(sd, n):
                        out.append((f"sft.{n}", f"sft.weighting={self.sft.weighting} (read with logit_normal)"))
            if self.sft.weighting != "mode" and self.sft.mode_scale != sd.mode_scale:
                out.append(("sft.mode_scale", f"sft.weighting={self.sft.weighting} (read with mode)"))
        return out

    def save(self, path: str | Path) -> None:
        atomic_write(Path(path), lambda t: t.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False)))


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Coerce a YAML/CLI value to the annotated type, with an error naming the field."""
    origin = get_origin(tp)
    if origin is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            if type(None) in get_args(tp):
                return None
            raise ConfigError(f"config field '{name}': must not be null")
        if isinstance(value, str) and str in args:  # an optional text: "" is a value (teacher_instruction: none)
            return value
        errors = []
        for a in args:
            try:
                return _coerce(value, a, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config field '{name}': {short(value)} does not fit {tp}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config field '{name}': expected true/false, got {short(value)}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config field '{name}': expected an integer, got {short(value)}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config field '{name}': expected an integer, got {short(value)}") from None
    if tp is float:
        if isinstance(value, bool):  # true read as 1.0: dopsd.ema_decay=true froze the teacher without a word
            raise ConfigError(f"config field '{name}': expected a number, got {short(value)}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config field '{name}': expected a number, got {short(value)}") from None
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads a bare off/on/no/yes as a boolean
            return "on" if value else "off"
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config field '{name}': expected a string, got {short(value)}")
        if value is None or not str(value).strip():  # `--set train.output_dir=` with an unset variable
            raise ConfigError(f"config field '{name}': must not be empty")
        return str(value)
    if tp is list or origin is list:
        if isinstance(value, str):  # one entry (a quoted "[V] dog" is that prompt, not YAML read again)
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field '{name}': expected a list, got {short(value)}")
        return list(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name)
    return value


# Fields that existed and were never read: accepted with a warning (a saved config.yaml of an older
# run still loads), then dropped.
REMOVED_FIELDS = {
    "cache.mode": "removed (a cache dir is always required to be complete)",
    "train.export_lora_every": "removed (the LoRA is exported with every checkpoint and at the end)",
}
# Fields of earlier releases under their new names: the value moves, with one line naming the new field.
RENAMED_FIELDS = {"fast.checkpoint": "model.gradient_checkpointing"}


def _apply_renames(data: dict) -> dict:
    for old, new in RENAMED_FIELDS.items():
        (sec_old, key_old), (sec_new, key_new) = old.split("."), new.split(".")
        section = data.get(sec_old)
        if not isinstance(section, dict) or key_old not in section:
            continue
        value = section.pop(key_old)
        target = data.setdefault(sec_new, {})
        if key_new in target and target[key_new] != value:
            raise ConfigError(f"config fields {old} (deprecated) and {new} are both set, to {short(value)} and "
                              f"{short(target[key_new])}: keep {new} only")
        target[key_new] = value
        log.warning("config field %s is deprecated: use %s (read as %s: %r)", old, new, new, value)
    return data


def _field_paths(cls=None, prefix: str = "") -> list[str]:
    """Every config field's dotted name (``optim.lr``, ..., sections too), from the dataclasses."""
    cls = cls or Config
    hints = get_type_hints(cls)
    out = []
    for f in fields(cls):
        name = f"{prefix}.{f.name}" if prefix else f.name
        out.append(name)
        if dataclasses.is_dataclass(hints[f.name]):
            out += _field_paths(hints[f.name], name)
    return out


def _did_you_mean(unknown: list[str], prefix: str, known) -> str:
    """``" (did you mean 'train.max_steps'?)"``: for each unknown key, at most two of: a field of this
    section with the key as a word of its name (``steps`` -> ``max_steps``), a field of the same name in
    another section (``train.lr`` -> ``optim.lr``), a close spelling in this section; else a close
    spelling in another section; "" if none."""
    import difflib

    paths = _field_paths()
    name = lambda k: f"'{prefix}.{k}'" if prefix else f"'{k}'"  # noqa: E731
    hints = []
    for key in unknown:
        if not isinstance(key, str) or not key:
            continue
        token = [name(k) for k in sorted(known) if key in k.split("_")]  # steps -> max_steps, ema -> ema_decay
        elsewhere = [f"'{p}'" for p in paths if p.rsplit(".", 1)[-1] == key
                     and (p.rsplit(".", 1)[0] if "." in p else "") != prefix]  # lr -> optim.lr
        close = [name(k) for k in difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.7)]
        found = list(dict.fromkeys(token + elsewhere + close))[:2]
        if found:
            hints.append(" or ".join(found))
        elif prefix:  # a close spelling in another section
            near = difflib.get_close_matches(key, [p.rsplit(".", 1)[-1] for p in paths], n=1, cutoff=0.75)
            hints += [f"'{p}'" for p in paths if near and p.rsplit(".", 1)[-1] == near[0]][:1]
    return f" (did you mean {', '.join(hints)}?)" if hints else ""


def _build(cls, data: Any, prefix: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix or 'root'}': expected a mapping, got {short(data)}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for gone in [k for k in data if f"{prefix}.{k}" in REMOVED_FIELDS]:  # configs of older runs still load
        log.warning("config field %s.%s is ignored: %s", prefix, gone, REMOVED_FIELDS[f"{prefix}.{gone}"])
        data = {k: v for k, v in data.items() if k != gone}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f"section '{prefix}'" if prefix else "top level"
        hint = _did_you_mean(unknown, prefix, known)
        raise ConfigError(f"unknown config field(s) {unknown} in {where}{hint}; known: {sorted(known)}")
    kwargs = {}
    for f in fields(cls):
        name = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], name)
        elif dataclasses.is_dataclass(hints[f.name]) and f.name != "data":
            kwargs[f.name] = _build(hints[f.name], {}, name)
    return cls(**kwargs)


def parse_overrides(overrides: list[str] | None) -> dict:
    """``["a.b=1", "c=x"]`` -> nested dict; values are parsed as YAML scalars/lists."""
    out: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:  # e.g. a prompt beginning with "[V]" or holding ": "
            why = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({why}); quote text that holds "
                              f"brackets, ': ' or ' #': --set '{key.strip()}=\"...\"' (a list: "
                              f"--set '{key.strip()}=[\"...\", \"...\"]')") from None
        except RecursionError:
            raise ConfigError(f"--set {item[:60]!r}...: the value nests too deeply to read") from None
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: '{p}' is not a section")
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


# The base of ``load_config(None)`` (programmatic use, the tests): the default family's classes at tiny
# size (its tiny preset), random weights, the built-in tiny dataset, a short run on the CPU.
# configs/tiny-zimage.yaml holds the same values (a test keeps them equal). The command line's default
# run is the shipped recipe configs/toy-concept.yaml (``dopsd_fast.cli.DEFAULT_RECIPE``).
_TINY = FAMILIES[DEFAULT_FAMILY]
EMBEDDED_DEFAULT: dict = {
    "model": {"family": _TINY.name, "preset": _TINY.tiny_preset},
    "lora": {"rank": 8, "alpha": 16},
    "dopsd": {"loss": "x0", "backward": "auto", "ema_decay": 0.9},  # rollout: the family's own
    "optim": {"lr": 1.0e-3},
    "data": {"builtin": "tiny", "prompt_keys": ["prompt", "prompt_detailed"], "bucket_scale": 0.125},
    "train": {"output_dir": f"runs/{_TINY.tiny_preset}", "max_steps": 30, "checkpoint_every": 10,
              "keep_checkpoints": 2},
    "validation": {"every": 15, "num_samples": 2},
}


def shipped_configs() -> dict[str, Path]:
    """The recipes shipped with the package (``configs/*.yaml`` in the source tree, installed as
    ``dopsd_fast/configs``), by name."""

    spec = importlib.util.find_spec("dopsd_fast.configs")
    dirs = list(spec.submodule_search_locations or []) if spec else []
    root = Path(__file__).resolve().parents[1]
    if (root / "setup.py").is_file():  # a source checkout without install (not an installed copy's neighbours)
        dirs.append(str(root / "configs"))
    out: dict[str, Path] = {}
    for d in dirs:
        for f in sorted(Path(d).glob("*.yaml")):
            out.setdefault(f.stem, f)
    return out


def resolve_config_path(path: str | Path) -> Path:
    """A YAML file, or the name of a shipped recipe (``zimage-turbo-lora``)."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = shipped_configs()
    name = p.name[:-5] if p.name.endswith(".yaml") else p.name
    if p.parent == Path(".") and name in shipped:
        return shipped[name]
    raise ConfigError(f"config file not found: {p} (shipped recipes: {', '.join(sorted(shipped)) or 'none'})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last silently: a
    second ``train:`` section dropped the first whole, its ``output_dir`` included). Checked on each mapping
    as written (composed), before merge keys (``<<``) are flattened into it: a merged key overridden is no
    duplicate."""

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = (key_node.tag, key_node.value)
            if key in seen:
                raise yaml.composer.ComposerError(
                    None, None, f"key {short(key_node.value)} is given twice in one mapping (first on line "
                    f"{seen[key] + 1}): keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return node


def yaml_error_line(e: yaml.YAMLError) -> str:
    """PyYAML's error (several lines, with ``^`` markers) as one: what, and where (line, column)."""
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None)
    if problem is None:
        return " ".join(str(e).split())[:300]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    context = getattr(e, "context", None)
    return f"{where}{' '.join(problem.split())}" + (f" ({' '.join(context.split())})" if context else "")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config or a shipped recipe's name (or :data:`EMBEDDED_DEFAULT`, the tiny random-weight
    run, when ``path`` is None) plus overrides."""
    data: dict = copy.deepcopy(EMBEDDED_DEFAULT) if path is None else {}
    if path is not None:
        p = resolve_config_path(path)
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {p} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                              "save it as UTF-8") from None
        except OSError as e:
            raise ConfigError(f"config file {p}: {e.strerror or e}") from None
        try:
            data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {yaml_error_line(e)}") from None
        except RecursionError:
            raise ConfigError(f"config file {p} nests too deeply to read (a config is a few levels of mappings)") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping")
        if not data:  # the fields' own defaults are no run (the built-in tiny data at 1024-pixel buckets)
            raise ConfigError(f"config file {p} holds no settings; start from a shipped recipe (--config NAME: "
                              f"{', '.join(sorted(shipped_configs()))}) or copy one and edit it")
    for item in overrides or []:  # `--set data.jsonl=$DATA` with DATA unset: the recipe's own data trained silently
        key, sep, raw = item.partition("=")
        if sep and key.strip() in ("data.jsonl", "data.folder") and not raw.strip():
            raise ConfigError(f"config field '{key.strip()}': --set {key.strip()}= is empty (an unset variable?): "
                              "give a path, or leave the --set out")
    over = parse_overrides(overrides)
    given = over.get("data", {}) if isinstance(over.get("data"), dict) else {}
    sources = ("builtin", "jsonl", "folder")
    if any(given.get(k) for k in sources) and isinstance(data.get("data"), dict):
        # a data source given on the command line replaces the config's (data.builtin=null not needed)
        data["data"] = {k: v for k, v in data["data"].items() if k not in sources or k in given}
    model = over.get("model") if isinstance(over.get("model"), dict) else {}
    for given, other in (("path", "preset"), ("preset", "path")):
        # a model path given on the command line replaces the config's built-in model, and a preset the
        # config's path, as a data source does the config's
        if model.get(given) not in (None, "") and other not in model and isinstance(data.get("model"), dict) \
                and data["model"].get(other) is not None:
            log.info("model.%s %s replaces the config's model.%s %s", given, model[given], other, data["model"][other])
            data["model"] = {k: v for k, v in data["model"].items() if k != other}
    from_file = copy.deepcopy(data) if path is not None else None
    data = _path_means_no_preset(_apply_renames(_merge(_apply_renames(data), _apply_renames(over))))
    if "data" not in data:
        data["data"] = {"builtin": "tiny"}
    try:
        return _build(Config, data, "")
    except ConfigError as e:
        if from_file is None or (over and str(e) != _file_alone_error(from_file)):
            raise
        raise ConfigError(f"config file {p}: {e}") from None  # the file's own field, not an override's


def _path_means_no_preset(data: dict) -> dict:
    """A model section that gives model.path and no model.preset loads the path: its preset is null (the
    field's default, a built-in model, would be taken instead of the weights the config names)."""
    m = data.get("model")
    if isinstance(m, dict) and m.get("path") not in (None, "") and "preset" not in m:
        m["preset"] = None
    return data


def _file_alone_error(data: dict) -> str | None:
    """The error the config file's data raises alone (no overrides; its warnings not repeated), or None."""
    was = log.disabled
    log.disabled = True
    try:
        data = _path_means_no_preset(_apply_renames(data))
        data.setdefault("data", {"builtin": "tiny"})
        _build(Config, data, "")
    except ConfigError as e:
        return str(e)
    finally:
        log.disabled = was
    return None


def config_from_dict(data: dict) -> Config:
    return _build(Config, _path_means_no_preset(_apply_renames(copy.deepcopy(data))), "")


# One line per field, the reference of docs/config.md: that file is generated from these texts, the
# dataclasses' defaults and types, and the choices their validation accepts
# (``python -m dopsd_fast.config --markdown > docs/config.md``; a test keeps the file up to date and
# every field documented).
FIELD_HELP: dict[str, str] = {
    "method": "`dopsd`, or `sft` (the flow-matching baseline on the same data: change this one line to compare)",
    "model.family": "the model family",  # + each family's name and title (config_markdown)
    "model.preset": "a built-in model of the family, fully offline: the pretrained toy Z-Image (K = 2 student; the "
                    "default run's) or a tiny random-weight model (tests); `null` to load `model.path`",
    "model.path": "local diffusers-format model directory (`transformer/ vae/ text_encoder/ tokenizer/ scheduler/`); "
                  "a config or `--set` that gives it and no `model.preset` loads it (with a preset in the same file: "
                  "refused)",
    "model.vlm_path": "Z-Image: local Qwen3-VL directory, the teacher context encoder (its language model's weights "
                      "are replaced by the text encoder's)",
    "model.dtype": "weight dtype of the frozen parts: `auto` = bf16 on CUDA, fp32 on the CPU; `fp16` trains "
                   "without loss scaling (said at start-up)",
    "model.device": "`auto` (CUDA if present, else the CPU), or a torch device string",
    "model.seed": "initialisation seed of the tiny random-weight presets",
    "model.gradient_checkpointing": "gradient checkpointing of the main layers, either path: `auto` (the fewest "
                                    "layers the memory model needs to fit the budget), `none`, `all`, or N (the "
                                    "first N; fast path only: the eager path checkpoints every block or none); "
                                    "`true` / `false` = `all` / `none`; `fast.checkpoint` is read as this field",
    "model.student_max_tokens": "student context length (FLUX.2: every prompt padded to it)",
    "model.teacher_max_tokens": "Z-Image: teacher context length (FLUX.2's teacher prompt is padded to "
                                "`student_max_tokens`, its prompt part cut where prompt + instruction pass it)",
    "model.teacher_min_pixels": "Z-Image: lower pixel bound of the teacher's image processor (`null` = the model's: "
                                "512²)",
    "model.teacher_max_pixels": "Z-Image: upper pixel bound of the teacher's image processor (`null` = the model's: "
                                "768²)",
    "model.text_layers": "FLUX.2: the text-encoder layers whose hidden states are stacked (`null` = 9, 18, 27; "
                         "tiny: 1, 2, 3)",
    "model.teacher_instruction": "FLUX.2 editing-branch teacher: the instruction appended to the prompt (`null` = the "
                                 "built-in text, `authors` = the authors' launch-script text, or any text)",
    "model.gt_instruction": "FLUX.2 ground-truth-reference editing: the teacher's instruction (`null` = built-in, "
                            "`authors`, or any text)",
    "lora.enabled": "`false` = full fine-tuning with a full EMA teacher",
    "lora.rank": "LoRA rank",
    "lora.alpha": "LoRA alpha (the delta is scaled by alpha / rank)",
    "lora.targets": "`null` = the family's default modules (Z-Image: `to_q to_k to_v to_out.0 w1 w2 w3`); "
                    "`authors` = the authors' list for the family; or a list of module names",
    "lora.init": "initialisation of the adapters' A matrices (B starts at zero)",
    "dopsd.rollout": "the roll-out schedule: a name the family knows, or a list of K + 1 sigmas ending with 0; "
                     "left out (`null`): the family's own, its distilled model's inference schedule (docs/models.md)",
    "dopsd.loss": "`x0` (sigma²-weighted velocity MSE, the authors' default) or `v` (plain velocity MSE)",
    "dopsd.backward": "`auto` (`once` where the memory model says it fits, else `stepwise`), `once` (the "
                      "authors') or `stepwise` (the same gradient, one state's activations alive)",
    "dopsd.ema_decay": "teacher weights: EMA decay of the student's; 1.0 = frozen initial teacher, 0.0 = live student",
    "dopsd.ema_on_cpu": "full fine-tuning: keep the fp32 EMA master on the CPU",
    "optim.lr": "AdamW learning rate (fused AdamW on CUDA, foreach on the CPU)",
    "optim.betas": "AdamW betas",
    "optim.eps": "AdamW epsilon",
    "optim.weight_decay": "AdamW weight decay",
    "optim.warmup_steps": "linear warm-up steps, then a constant learning rate",
    "optim.grad_clip": "gradient norm clip (0 = off)",
    "data.builtin": "a built-in data set: `tiny` (random-weight tests; 160 px images, so small buckets, e.g. "
                    "`bucket_scale: 0.125`), `toy-concept` (the 6 toy `[V]` pairs), `toy-concept-prior` (the same "
                    "then 18 ordinary toy-world pairs; the default run's). Exactly one of `data.builtin`, "
                    "`data.jsonl`, `data.folder`; one given with `--set` replaces the config's. The default `tiny` "
                    "applies only to a config with no `data` section: a `data` section names its source",
    "data.jsonl": "a JSONL file, one row per line ([its format](models.md#data))",
    "data.folder": "a folder of `name.png` + `name.txt` (the caption); png, jpg, webp, bmp, tif, gif; subfolders "
                   "are not read",
    "data.image_key": "JSONL field of the image (a path, or a list whose last element is the target)",
    "data.prompt_keys": "JSONL prompt variants: each sample draws one of these keys at random (seeded by step)",
    "data.buckets": "`1mp` (the authors' 11 one-megapixel aspect buckets) or a list of `[width, height]`",
    "data.bucket_scale": "multiplies every bucket side (rounded to `data.bucket_multiple`)",
    "data.bucket_multiple": "bucket sides are multiples of this",
    "data.batch_size": "samples per micro-batch per rank (same bucket)",
    "data.skip_bad": "skip unreadable or malformed rows, report how many and list each with why in the run's `skipped_rows.txt` (else the run stops, naming the row)",
    "data.num_workers": "threads decoding the next micro-batch's images while the step computes (0: in the loop)",
    "data.alpha_background": "RGB (0-255) that images with an alpha channel are composited on",
    "data.max_image_pixels": "images (and references) over this many pixels are refused by name before they are "
                             "decoded: a decode holds ~27 bytes a pixel per worker (the default, 67 MP, ~1.8 GB)",
    "cache.dir": "feature cache directory written by `dopsd-cache` (`null` = encode on first use, kept in memory)",
    "cache.shard_size": "cache entries per safetensors shard",
    "train.output_dir": "where everything of the run is written",
    "train.max_steps": "optimizer steps",
    "train.grad_accum": "micro-batches per optimizer step",
    "train.seed": "seed of the run: every random draw derives from (seed, step, the sample's place in the batch)",
    "train.log_every": "log every N steps (that step's values, not the mean of the N: curves.png draws the moving mean)",
    "train.checkpoint_every": "write a checkpoint every N steps (0 = only at the end)",
    "train.keep_checkpoints": "checkpoints kept (the oldest deleted)",
    "train.tensorboard": "write TensorBoard logs",
    "train.wandb": "log to Weights & Biases (`pip install wandb`): a wandb run named after `train.output_dir`, "
                   "continued by a resume (a resume that drops rows past its checkpoint starts a new one, \"(from "
                   "step N)\", in the same group); the project is `$WANDB_PROJECT`, else `dopsd-fast`; "
                   "`$WANDB_RUN_ID` is not used",
    "train.progress": "show a progress bar",
    "train.max_update_ratio": "divergence guard: an update this many times the weights' norm stops the run before "
                              "anything of the step is written",
    "train.warn_factor": "divergence guard: warn when a gradient norm or update ratio is this multiple of its "
                         "running median (the first spike printed; later ones within 500 steps counted, the "
                         "count printed with the next one or at the end)",
    "train.dist_timeout_s": "torchrun: a collective waiting longer fails with a message naming the rank (it also "
                            "bounds how long the other ranks wait while rank 0 validates and exports: keep it above "
                            "the longest validation)",
    "train.check_sync_every": "torchrun: every N steps the ranks check their student and EMA teacher are "
                              "identical (0: never)",
    "validation.every": "sample grids every N steps (0: none)",
    "validation.at_start": "sample grids at step 0 too",
    "validation.num_samples": "the first N data rows sampled: their prompt (first key) and target image",
    "validation.steps": "inference steps (`null` = the model's few-step default: Z-Image 8, FLUX.2 4; toy: 2)",
    "validation.schedule": "the samples' sigmas in place of the pipeline's inference schedule: a roll-out schedule's "
                           "name, as `dopsd.rollout` takes (docs/models.md names the authors' tables), or a list of "
                           "sigmas ending with 0 (`null` = the pipeline's, at `validation.steps`); `dopsd-sample "
                           "--schedule` too",
    "validation.seed": "seed of the validation noise",
    "validation.prompts": "extra prompts without a target (held-out prompts): one row each, the student's sample; "
                          "an entry `{prompt: ..., references: [...]}` is that prompt on its own reference images "
                          "(an editing model's; `[]`: none)",
    "validation.references": "reference images the held-out prompts without their own `references` are conditioned "
                             "on (an editing model's); a prompt samples at its first reference's bucket; these paths, "
                             "and an entry's own, are relative to the working directory (data rows: to their JSONL)",
    "sft.weighting": "`method: sft` sigma sampling, as diffusers' DreamBooth scripts: `none` (uniform), "
                     "`logit_normal` or `mode`",
    "sft.logit_mean": "`logit_normal`: mean",
    "sft.logit_std": "`logit_normal`: standard deviation",
    "sft.mode_scale": "`mode`: scale, >= -1 (below it the sampled u leaves [0, 1])",
    "fast.enabled": "the fast path (packed student/teacher pass, fused kernels); `false` = the eager diffusers "
                    "reference (the Z-Image-Turbo LoRA and SFT recipes set `true`; FLUX.2's fast path is verified "
                    "on the CPU only: set it there to use it)",
    "fast.kernels": "`auto` (our Triton kernels on CUDA), `on`, `off` (the same structure with eager PyTorch ops)",
    "fast.attention": "`auto` (the order measured for this GPU: cuDNN on H200 and H100, elsewhere PyTorch SDPA's own "
                      "choice, the reason logged), `cudnn` (SDPA, cuDNN first), `triton` (ours: both branches in "
                      "one launch), `sdpa`, `flash_attn`",
    "fast.gemm": "the paired LoRA linear's base GEMM: `auto` (per shape, the faster at this GPU's measured rates; "
                 "`cublas` on a GPU with no measurement), `cublas` (the LoRA delta first, the base GEMM accumulating "
                 "into it), or `triton` (ours, the LoRA delta in its tile)",
    "fast.memory_budget_gb": "the budget of the automatic choices (`dopsd.backward`, "
                             "`model.gradient_checkpointing`); `null` = 85% of the free GPU memory",
    "fast.graphs": "CUDA graphs for the no-grad single-branch forwards (validation, sampling); the training "
                   "roll-out stays the packed pair; an input structure whose capture fails runs eagerly, with "
                   "one warning",
    "fast.fp8": "FP8 on the blocks' linears (LoRA runs): `native` (ours: `torch._scaled_mm`, base weights "
                "quantized once), `te` (TransformerEngine), `torchao`",
    "fast.fp8_recipe": "`native`: `rowwise` | `tensorwise`; `te`: `delayed` | `current`; `torchao`: `tensorwise` | "
                       "`rowwise` (`null` = the first)",
    "fast.fp8_teacher": "run the no-grad teacher forward in FP8 too (only `te` can turn it off)",
    "fast.fp8_dgrad": "`native`: the student's backward dX GEMMs in FP8 too, one per group of linears (the output "
                      "gradients quantized per row as one, e4m3); `false`: dX in bf16 (only `native` can turn it off)",
    "fast.nvtx": "nvtx ranges around roll-out states, student + teacher, backward, optimizer",
    "fast.compile": "torch.compile: `ops` (the fast path's element-wise ops instead of our kernels) or `regional` "
                    "(the eager path: diffusers' regional compilation of the blocks); `true` (deprecated, read for "
                    "earlier configs with a warning) = the one that fits the path",
    "fast.compile_backend": "torch.compile backend (read with `fast.compile` on; a name torch does not know is "
                            "refused at start)",
    "dist.fsdp": "FSDP2 with several ranks: `auto` = full fine-tuning sharded (student, EMA teacher, gradients, "
                 "AdamW state), LoRA replicated; `on` with LoRA needs `dist.shard_base: true`",
    "dist.shard_base": "LoRA: shard the frozen base (and the adapters) with FSDP2 too (eager path)",
    "dist.reshard_after_forward": "free each block's gathered weights after its forward (the student's; the EMA teacher, "
                                  "which runs no backward, always frees them, so that its forwards see its EMA updates)",
}

# Fields whose accepted values depend on another field (the family, the FP8 backend): their choices are
# in the help text, not probed.
_DEPENDENT_CHOICES = {"model.preset", "dopsd.rollout", "fast.fp8_recipe", "lora.targets"}


# What each family adds to a field's help, read from the family registry.
_FAMILY_HELP = {
    "model.family": lambda: ": " + ", ".join(f"`{s.name}` ({s.title})" for s in FAMILIES.values()),
    "model.preset": lambda: ". Presets: " + "; ".join(
        ", ".join(f"`{p}`" for p in s.presets) + f" ({s.title})" for s in FAMILIES.values()),
    "dopsd.rollout": lambda: ". " + "; ".join(f"{s.title}: {s.schedule_help}" for s in FAMILIES.values()),
}


_RESOLVED_BY_FAMILY = ("dopsd.rollout",)  # null in the dataclass; Config sets the model family's own


def config_fields(cls=None, prefix: str = "", default=None) -> list[tuple[str, Any, Any]]:
    """Every leaf field of the config as ``(dotted name, annotated type, default)``, in declaration order; the
    defaults are those of ``Config()`` (the dataclasses' own, not a preset's)."""
    cls = Config if cls is None else cls
    default = Config() if default is None else default
    hints = get_type_hints(cls)
    out = []
    for f in fields(cls):
        name = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            out += config_fields(hints[f.name], name, value)
        else:
            out.append((name, hints[f.name], value))
    return out


def _type_text(tp: Any) -> str:
    if get_origin(tp) is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        text = " or ".join(_type_text(a) for a in args)
        return text + (" or null" if type(None) in get_args(tp) else "")
    if get_origin(tp) is list:
        return "list"
    return getattr(tp, "__name__", str(tp))


def _choices(name: str) -> Optional[list]:
    """The values the validation accepts for a string field, read from its own error message."""
    if name in _DEPENDENT_CHOICES:
        return None
    section, _, key = name.rpartition(".")
    probe = {key: "<not-a-choice>"} if not section else {section: {key: "<not-a-choice>"}}
    try:
        config_from_dict(probe)
    except ConfigError as e:
        msg = str(e)
        if msg.startswith(f"config field '{name}': must be one of "):
            return yaml.safe_load(msg.split("must be one of ", 1)[1].split(", got", 1)[0])
    return None


def _value_text(value: Any) -> str:
    if isinstance(value, str):
        return f"`{value}`"
    return "`" + yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip() + "`"


def config_markdown() -> str:
    """docs/config.md: every config field with its default, type or choices, and help."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m dopsd_fast.config --markdown > docs/config.md`, from the config dataclasses",
        "     and FIELD_HELP in dopsd_fast/config.py: edit those, then regenerate. -->",
        "",
        "`dopsd-train --config FILE.yaml --set section.field=value ...`. `--config` takes a YAML file or the name",
        "of a shipped recipe (`configs/*.yaml`, installed with the package); without it the default run, the",
        "recipe `toy-concept`, runs. A field a YAML file leaves out takes the default below:",
        "the dataclasses' own, not a recipe's. Unknown fields and bad values stop with an error naming the field;",
        "the resolved configuration of every run is written to `<output_dir>/config.yaml`.",
        "",
    ]
    if REMOVED_FIELDS or RENAMED_FIELDS:
        lines += ["Read for configs written by earlier versions: " + "; ".join(
            [f"`{k}` ignored with a warning" for k in REMOVED_FIELDS]
            + [f"`{k}` read as `{v}`" for k, v in RENAMED_FIELDS.items()]) + ".", ""]
    section = None
    for name, tp, value in config_fields():
        head = name.split(".")[0] if "." in name else ""
        if head != section:
            section = head
            lines += ["", f"## {section or 'top level'}", "",
                      "| field | default | type / choices | meaning |", "|---|---|---|---|"]
        choices = _choices(name) if "str" in _type_text(tp) else None
        kind = _type_text(tp)
        if choices:  # the string's choices, then the other types the field takes
            others = [t for t in kind.split(" or ") if t != "str"]
            kind = " \\| ".join(f"`{c}`" for c in choices) + "".join(f" or {t}" for t in others)
        help_text = (FIELD_HELP.get(name, "") + _FAMILY_HELP.get(name, lambda: "")()).replace("|", "\\|")
        shown = "the family's" if name in _RESOLVED_BY_FAMILY else _value_text(value)
        lines.append(f"| `{name}` | {shown} | {kind} | {help_text} |")
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--markdown"]:
        raise SystemExit("usage: python -m dopsd_fast.config --markdown  (prints docs/config.md)")
    sys.stdout.write(config_markdown())
