"""Our ComfyUI LoRA file through ComfyUI's own loader, on tiny models of both families.

For Z-Image and FLUX.2-klein: a two-step tiny run writes ``lora/comfyui_lora.safetensors``; the same
seed rebuilds the base transformer (diffusers layout), which ComfyUI's own code converts and loads
(``comfy.sd.load_diffusion_model_state_dict``: ``convert_diffusers_mmdit``, model detection, its
``NextDiT`` / ``Flux`` classes). ComfyUI then applies the file (``comfy.sd.load_lora_for_models``:
``model_lora_keys_unet`` + ``lora_convert`` + ``load_lora``) and its ModelPatcher patches the weights.
Every weight of the patched model is compared with the diffusers merge of the same file,
W + (alpha / rank) * B @ A per module, converted to ComfyUI's layout by ComfyUI's converter (q / k / v
land in the fused ``qkv`` at their offsets). A module ComfyUI does not map shows up twice: in its
"lora key not loaded" warnings, counted here, and as an unpatched weight.

ComfyUI's model detection recognises these families by their released sizes (Z-Image by dim 3840,
FLUX.2 by fixed head / rope widths), so for a tiny model the size fields it would otherwise hard-code
are filled in from the diffusers config (``_TINY_FIELDS``); everything else is ComfyUI's.

    python benchmarks/comfyui_check.py --comfyui /path/to/ComfyUI            # both families
    python benchmarks/comfyui_check.py --comfyui /path/to/ComfyUI --family klein

One line per family: ComfyUI version and commit, modules mapped of total, the largest difference
from the diffusers merge, PASS / FAIL; exit status 1 on any FAIL. CPU only, about a minute.
ComfyUI is imported only from ``--comfyui`` (appended to ``sys.path``, after our own paths); its
small pure-Python dependencies (einops, scipy, comfy-aimdo) must be importable, e.g. from a
``pip install --target`` folder passed with ``--deps``. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import re
import subprocess
import sys
import tempfile
import types
import warnings
from pathlib import Path

import torch

FAMILIES = ("zimage", "klein")
# A patched weight is W + s * B @ A summed in fp32 on both sides, in possibly different orders.
ATOL = 1e-6


def train_tiny(family: str, out_dir: Path):
    """Two D-OPSD steps of the family's tiny preset; returns (config, LoRA file)."""
    from dopsd_fast.config import load_config
    from dopsd_fast.export import COMFYUI_FILE
    from dopsd_fast.families import FAMILIES as SPECS
    from dopsd_fast.trainer import Trainer

    overrides = [f"train.output_dir={out_dir}", "train.max_steps=2", "train.checkpoint_every=0",
                 "train.progress=false", "train.tensorboard=false", "validation.every=0",
                 "validation.at_start=false", *SPECS[family].tiny_overrides()]
    trainer = Trainer(load_config(None, overrides))
    trainer.train()
    return trainer.cfg, out_dir / "lora" / COMFYUI_FILE


def diffusers_merge(base_sd: dict, lora_sd: dict, prefix="transformer.") -> tuple[dict, int]:
    """W + (alpha / rank) * B @ A for every module the file names (what diffusers' fuse_lora gives)."""
    merged = dict(base_sd)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in lora_sd if ".lora_A." in k})
    for m in modules:
        down, up = lora_sd[f"{m}.lora_A.weight"].double(), lora_sd[f"{m}.lora_B.weight"].double()
        scale = float(lora_sd[f"{m}.alpha"]) / down.shape[0]
        key = f"{m[len(prefix):]}.weight"
        merged[key] = (base_sd[key].double() + scale * (up @ down)).to(base_sd[key].dtype)
    return merged, len(modules)


def import_comfyui(path: Path, deps: Path | None):
    """ComfyUI's modules from ``path`` only, on the CPU; call it after our models are built."""
    for p in (deps, path):
        if p is not None and str(p) not in sys.path:
            sys.path.append(str(p))
    # ComfyUI imports torchvision / torchaudio at module level for models not used here (SAM 3,
    # Cosmos, audio VAEs); where they are missing, stand-ins that fail on use. Installed only now:
    # diffusers / transformers would take them for the real packages.
    missing = [name for name in ("torchvision", "torchaudio") if importlib.util.find_spec(name) is None]
    if missing:
        sys.meta_path.append(_StubFinder(missing))
        print(f"comfyui_check: {' and '.join(missing)} missing: stand-in modules are used")
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management picks its device
    import comfy.lora  # noqa: F401
    import comfy.model_detection  # noqa: F401
    import comfy.sd

    return comfy


class _Stub(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub(f"{self.__name__}.{name}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.__name__} is a stand-in (the package is not installed)")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports of ``roots`` and their submodules give ``_Stub`` modules."""

    def __init__(self, roots):
        self.roots = tuple(roots)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _Stub(spec.name)

    def exec_module(self, module):
        pass


def comfyui_version(path: Path) -> str:
    found = re.search(r"__version__\s*=\s*[\"']([^\"']+)", (path / "comfyui_version.py").read_text())
    try:
        commit = subprocess.run(["git", "-C", str(path), "rev-parse", "--short=12", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "no-git"
    return f"{found.group(1) if found else 'unknown version'} ({commit})"


# Tensors of the tiny models that ComfyUI's classes cannot hold at that size (never LoRA targets):
# NextDiT builds the timestep MLP as min(dim, 1024) -> 256 (right for dim 3840), diffusers as
# 1024 -> min(dim, 256); at dim 64 the shapes differ. ComfyUI keeps its own init for them and they are
# left out of the comparison.
_NOT_REPRESENTABLE = {"zimage": ("t_embedder.",), "klein": ()}


def _zimage_fields(config) -> dict:
    return dict(n_heads=config.n_heads, n_kv_heads=config.n_kv_heads, n_refiner_layers=config.n_refiner_layers,
                axes_dims=list(config.axes_dims), axes_lens=list(config.axes_lens), rope_theta=config.rope_theta,
                time_scale=config.t_scale, norm_eps=config.norm_eps, z_image_modulation=True,
                ffn_dim_multiplier=8.0 / 3.0, multiple_of=1,  # diffusers: int(dim / 3 * 8), no rounding
                pad_tokens_multiple=32)


def _klein_fields(config) -> dict:
    return dict(axes_dim=list(config.axes_dims_rope), num_heads=config.num_attention_heads,
                theta=config.rope_theta, mlp_ratio=config.mlp_ratio, out_channels=config.out_channels or config.in_channels)


# The unet_config fields ComfyUI's detection hard-codes for the released sizes, from our config.
_TINY_FIELDS = {"zimage": _zimage_fields, "klein": _klein_fields}


def comfy_model(comfy, family: str, diffusers_sd: dict, config):
    """ComfyUI's ModelPatcher for our base weights, loaded by load_diffusion_model_state_dict.

    Z-Image goes in in diffusers layout (ComfyUI converts it). FLUX.2 goes in in its original (BFL)
    layout, the one ComfyUI users load: ComfyUI 0.19.3's converter cannot read a diffusers FLUX.2 (it
    takes the hidden size from x_embedder.bias, which FLUX.2 lacks, and maps none of its global
    modulation / timestep keys), so its blocks go through that converter and the global keys are
    renamed after diffusers' single-file map. ``diffusers_layout`` checks the result round-trips."""
    detect = comfy.model_detection.detect_unet_config

    def detect_tiny(state_dict, key_prefix, metadata=None):
        unet_config = detect(state_dict, key_prefix, metadata=metadata)
        if unet_config is not None:
            unet_config.update(_TINY_FIELDS[family](config))
        return unet_config

    # Copies: ComfyUI's converter writes some tensors in place (FLUX's final scale / shift swap).
    sd = {k: v.clone() for k, v in diffusers_sd.items() if not k.startswith(_NOT_REPRESENTABLE[family])}
    sd = _COMFY_LAYOUT[family](comfy, sd)
    comfy.model_detection.detect_unet_config = detect_tiny
    try:
        patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.float32},
                                                           disable_dynamic=True)
    finally:
        comfy.model_detection.detect_unet_config = detect
    if patcher is None:
        raise RuntimeError(f"{family}: ComfyUI did not recognise the model")
    return patcher


# diffusers' FLUX2_TRANSFORMER_KEYS_RENAME_DICT (single_file_utils), the keys ComfyUI 0.19.3 lacks, reversed.
_FLUX2_GLOBAL_KEYS = {
    "time_guidance_embed.timestep_embedder.linear_1.": "time_in.in_layer.",
    "time_guidance_embed.timestep_embedder.linear_2.": "time_in.out_layer.",
    "double_stream_modulation_img.linear.": "double_stream_modulation_img.lin.",
    "double_stream_modulation_txt.linear.": "double_stream_modulation_txt.lin.",
    "single_stream_modulation.linear.": "single_stream_modulation.lin.",
}


def _flux2_original_layout(comfy, sd: dict) -> dict:
    sd = dict(sd, **{"x_embedder.bias": torch.zeros(sd["x_embedder.weight"].shape[0])})
    out = comfy.model_detection.convert_diffusers_mmdit(dict(sd), "")
    out.pop("img_in.bias")
    for key, value in sd.items():
        for old, new in _FLUX2_GLOBAL_KEYS.items():
            if key.startswith(old):
                out[new + key[len(old):]] = value
    return out


# What ComfyUI is given: Z-Image in the diffusers layout (its converter reads it), FLUX.2 in the original.
_COMFY_LAYOUT = {"zimage": lambda comfy, sd: sd, "klein": _flux2_original_layout}


def diffusers_layout(family: str, comfy_sd: dict) -> dict:
    """ComfyUI's model weights in diffusers layout, by diffusers' own single-file converter (fused
    qkv split by diffusers, not by ComfyUI's offset tables)."""
    from diffusers.loaders import single_file_utils as sfu

    convert = {"zimage": sfu.convert_z_image_transformer_checkpoint_to_diffusers,
               "klein": sfu.convert_flux2_transformer_checkpoint_to_diffusers}[family]
    return convert({k: v.detach().clone() for k, v in comfy_sd.items()})


def max_abs_diff(got: dict, want: dict, family: str) -> tuple[float, list]:
    """Largest difference over every weight of ``want`` (the representable ones); keys absent from ``got``."""
    keys = [k for k in want if not k.startswith(_NOT_REPRESENTABLE[family])]
    missing = [k for k in keys if k not in got]
    diffs = [(got[k].double() - want[k].double()).abs().max().item() for k in keys if k in got]
    return max(diffs, default=float("inf")), missing


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def prepare(family: str, work: Path) -> dict:
    """Our side: the trained file, the run's base weights (diffusers layout) and their merge."""
    from safetensors.torch import load_file

    from dopsd_fast.adapters import build_adapter

    cfg, lora_path = train_tiny(family, work / family)
    lora_sd = load_file(str(lora_path))
    base = build_adapter(cfg.model).transformer  # same seed: the run's base weights, no LoRA
    base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    merged_sd, n_modules = diffusers_merge(base_sd, lora_sd)
    return dict(family=family, lora_sd=lora_sd, base_sd=base_sd, merged_sd=merged_sd, n_modules=n_modules,
                config=base.config)


def check(comfy, family: str, lora_sd: dict, base_sd: dict, merged_sd: dict, n_modules: int, config) -> dict:
    """ComfyUI's side: load the base, apply the file, compare every weight with the merge."""
    patcher = comfy_model(comfy, family, base_sd, config)
    caught = _Warnings()
    logging.getLogger().addHandler(caught)
    try:
        patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora_sd, 1.0, 0.0)
        patched.patch_model()
    finally:
        logging.getLogger().removeHandler(caught)
    not_loaded = sorted({m.split(": ", 1)[1].rsplit(".lora_", 1)[0].rsplit(".alpha", 1)[0]
                         for m in caught.messages if m.startswith("lora key not loaded")})
    dropped = [m for m in caught.messages if m.startswith("NOT LOADED")]

    patched_sd = diffusers_layout(family, patched.model.diffusion_model.state_dict())
    patched.unpatch_model()
    # Control: the same file with its .alpha tensors doubled (ComfyUI then applies twice the strength:
    # the export's alpha is its rank, the trained alpha / rank folded into lora_B) must be told apart, or
    # the comparison tests nothing.
    doubled = {k: (2 * v if k.endswith(".alpha") else v) for k, v in lora_sd.items()}
    control, _ = comfy.sd.load_lora_for_models(patcher, None, doubled, 1.0, 0.0)
    control.patch_model()
    control_diff, _ = max_abs_diff(diffusers_layout(family, control.model.diffusion_model.state_dict()), merged_sd, family)
    control.unpatch_model()
    base_again = diffusers_layout(family, patcher.model.diffusion_model.state_dict())
    round_trip, missing = max_abs_diff(base_again, base_sd, family)
    max_diff, missing_patched = max_abs_diff(patched_sd, merged_sd, family)
    # exactly the LoRA targets move (diffusers names: a fused qkv split back into to_q / to_k / to_v)
    targets = {f"{k[len('transformer.'):-len('.lora_A.weight')]}.weight" for k in lora_sd if k.endswith(".lora_A.weight")}
    compared = [k for k in base_sd if not k.startswith(_NOT_REPRESENTABLE[family])]
    changed = [k for k in compared if k in patched_sd and not torch.equal(patched_sd[k], base_sd[k])]
    if os.environ.get("COMFYUI_CHECK_VERBOSE"):
        print(family, "changed:", changed)
        print(family, "round trip:", {k: (base_again[k] - base_sd[k]).abs().max().item() for k in compared
                                      if k in base_again and not torch.equal(base_again[k], base_sd[k])})
    ok = (not not_loaded and not dropped and not missing and not missing_patched and round_trip == 0.0
          and max_diff <= ATOL and set(changed) == targets and control_diff > 1e3 * ATOL)
    return dict(family=family, modules=n_modules, mapped=n_modules - len(not_loaded), not_loaded=not_loaded,
                dropped=dropped, missing=sorted(set(missing) | set(missing_patched)), changed=len(changed),
                compared=len(compared), round_trip=round_trip, max_diff=max_diff, control_diff=control_diff, ok=ok)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="a ComfyUI checkout (its root folder)")
    parser.add_argument("--deps", type=Path, help="a folder holding ComfyUI's extra pip packages")
    parser.add_argument("--family", choices=FAMILIES, action="append", help="default: both")
    parser.add_argument("--keep", type=Path, help="write the tiny runs here instead of a temporary folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*should be kept in float32.*")  # diffusers on .to(), as the CLI
    import diffusers.utils.logging

    diffusers.utils.logging.set_verbosity_error()  # the same notice, logged

    families = args.family or list(FAMILIES)
    version = comfyui_version(args.comfyui)
    with tempfile.TemporaryDirectory(prefix="comfyui-check-") as tmp:
        work = args.keep or Path(tmp)
        # Our side first, whole: ComfyUI's import may install the torchvision stand-in.
        prepared = [prepare(family, work) for family in families]
        comfy = import_comfyui(args.comfyui.resolve(), args.deps)
        results = [check(comfy, **p) for p in prepared]
    for r in results:
        print(f"{r['family']:<7} ComfyUI {version}: {r['mapped']}/{r['modules']} modules mapped, "
              f"{r['changed']} of {r['compared']} weights changed, base round trip {r['round_trip']:.3g}, "
              f"max |ComfyUI - diffusers merge| = "
              f"{r['max_diff']:.3g} (.alpha doubled: {r['control_diff']:.3g})  {'PASS' if r['ok'] else 'FAIL'}")
        for name, items in (("lora key not loaded", r["not_loaded"]), ("NOT LOADED", r["dropped"]),
                            ("absent from ComfyUI's model", r["missing"])):
            if items:
                print(f"        {name}: {len(items)}: {', '.join(map(str, items[:8]))}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
