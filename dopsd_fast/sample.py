"""Few-step generation with the base model, a trained LoRA or a fine-tuned transformer
(``dopsd-sample``); for an editing model, with reference images."""

from __future__ import annotations

import inspect
import json
import logging
import math
import re
from pathlib import Path

import torch
from PIL import Image

from dopsd_fast.algorithm import euler_sample
from dopsd_fast.config import LORA_MAX_SCALE
from dopsd_fast.data import dataset as _data
from dopsd_fast.data.buckets import assign_bucket, make_buckets, nearest_aspect
from dopsd_fast.export import LORA_FILE, check_lora_weights
from dopsd_fast.families import FAMILIES, build_adapter, family
from dopsd_fast.safety import SAFETENSORS_FLOAT_DTYPES, file_in_folder, why_not_written
from dopsd_fast.validation import save_grid

log = logging.getLogger(__name__)


def load_lora_into(transformer, lora_dir: str) -> None:
    """Load a LoRA written by ``dopsd-train`` (diffusers format) as the active adapter. The folder is
    untrusted input: its weights file must be a file in it; weights that are not finite or of an absurd
    magnitude, a file whose LoRA weights match no module of this model (or only some), tensors that are
    not LoRA factors, a module without both factors or with factors of other shapes, per-module
    ``.alpha`` tensors that are not positive numbers within the scale limit (:func:`_checked_alpha_tensors`,
    before diffusers reads the file) and metadata that is not a plain LoRA's (:func:`_checked_metadata`)
    are refused in one line naming what the file holds; a file without metadata (loaded at alpha = rank)
    is said in a warning."""
    from dopsd_fast.families import family_of_transformer

    pipe = family_of_transformer(transformer).pipeline()  # its converter reads other trainers' layouts (BFL, kohya)
    d, name, typed = Path(lora_dir), LORA_FILE, None
    if d.is_file() or d.suffix == ".safetensors":  # a LoRA's own file (a downloaded one has its own name)
        if d.suffix != ".safetensors":
            raise ValueError(f"--lora {d} is not a .safetensors file: give a LoRA's .safetensors file, or the folder "
                             "dopsd-train wrote")
        typed, d, name = d, d.parent, d.name  # the path the user typed, taken where it leads (Hugging Face's cache
    try:  # links snapshots/<rev>/x.safetensors to ../../blobs/<sha>); a folder's file must be a file in it
        weights = typed if typed is not None and typed.is_file() else file_in_folder(d, name)
    except FileNotFoundError:
        full = next((d / n for n in ("transformer", "../transformer") if (d / n / "config.json").is_file()), None)
        hint = f" (a full fine-tuning run's weights: --transformer {full.resolve()})" if full is not None else ""
        others = sorted(p.name for p in d.glob("*.safetensors")) if d.is_dir() and name == LORA_FILE else []
        if (d / "lora" / LORA_FILE).is_file():  # the run's folder given: its LoRA is in lora/
            hint = f" (a run's folder: its LoRA is --lora {d / 'lora'})"
        elif others:  # a LoRA under its own name (a downloaded one), or the ComfyUI copy alone
            hint = f" (it holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}: --lora {d / others[0]})"
        raise FileNotFoundError(f"--lora: {d} has no {name}{hint}") from None
    except ValueError as e:
        raise ValueError(f"--lora: {e}") from None
    alphas = _checked_alpha_tensors(weights)  # before diffusers folds them (a negative one loops it forever)
    try:
        state, meta = pipe.lora_state_dict(str(d), weight_name=name, use_safetensors=True,  # never a pickle
                                           return_lora_metadata=True)
        folded = _fold_alphas(weights, alphas) if alphas else None
        if folded is not None:
            # .alpha tensors beside lora_A / lora_B factors (a ComfyUI / SimpleTuner file, dopsd-train's ComfyUI copy
            # renamed): folded into lora_B here, each family's converter then reads the factors alone (FLUX.2's
            # keeps the .alpha keys, which peft refuses); a kohya file (lora_down / lora_up) its converter folds
            state = pipe.lora_state_dict(folded)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: one line naming it
        raise FileNotFoundError(f"--lora: {weights} does not load as a LoRA for this model ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if state and all(k.startswith("transformer.transformer.") for k in state):
        # dopsd-train's comfyui_lora.safetensors (diffusers keys + per-module .alpha) renamed to this file's name:
        # diffusers takes it for a foreign format, folds each alpha / rank into the factors and prefixes it again
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
    check_lora_weights(state, f"--lora: {weights}")  # a LoraWeightsError (ValueError): one line
    wanted = _lora_modules(state)
    if not wanted:
        if not state:  # the family's converter kept none of its tensors: a layout it does not read
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as f:
                raw = {k: None for k in f.keys()}
            if raw:
                raise ValueError(f"--lora: {weights} holds {_found(raw)}, none of them in a layout this model's "
                                 f"diffusers pipeline ({pipe.__name__}) reads as a LoRA; a LoRA for another model?")
        raise ValueError(f"--lora: {weights} holds no LoRA weights ({_found(state)}); expected "
                         "transformer.<module>.lora_A/lora_B.weight as dopsd-train writes")
    others = sorted(k for k in state if not _LORA_KEY.match(k))
    if others:
        raise ValueError(f"--lora: {weights} holds {len(others)} tensor(s) that are not LoRA factors "
                         f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); expected only "
                         "<module>.lora_A.weight / .lora_B.weight as dopsd-train writes")
    if not any(k.startswith("transformer.") for k in state):  # peft's own state dict (other trainers write it):
        state = {f"transformer.{k}": v for k, v in state.items()}  # diffusers loads the prefixed keys alone
    modules = dict(transformer.named_modules())
    _refuse_unmatched(weights, wanted, set(modules))
    _check_factors(weights, state, modules)
    meta = _checked_metadata(weights, meta, {t.shape[0] for k, t in state.items() if ".lora_A." in k},
                             alpha_tensors=bool(alphas))
    m = {k.removeprefix("transformer."): v for k, v in (meta or {}).items()}
    if alphas and meta and not (m.get("lora_alpha") is not None and m.get("lora_alpha") == m.get("r")
                                and not m.get("alpha_pattern") and not m.get("use_rslora")):
        # diffusers folds the .alpha tensors into the factors, then peft scales them by the metadata's alpha / r
        # (its own default alpha where the metadata has none): applied one over the other
        raise ValueError(f"--lora: {weights} holds per-module .alpha tensors ({next(iter(alphas))} = "
                         f"{next(iter(alphas.values())):g}) and lora_adapter_metadata with lora_alpha="
                         f"{m.get('lora_alpha')!r}, r={m.get('r')!r}: two strengths, which would be applied one over "
                         "the other; remove one of them")
    if meta is None and not alphas:  # diffusers then loads it at alpha = rank (scale 1), whatever it was trained at
        log.warning("--lora: %s has no lora_adapter_metadata (its alpha): its strength is taken as alpha = rank "
                    "(scale 1); a LoRA trained at another alpha samples at another strength (--lora-scale sets it)",
                    weights)
    try:
        pipe.load_lora_into_transformer(state, transformer=transformer, adapter_name="lora", metadata=meta)
    except Exception as e:  # noqa: BLE001 - a foreign file: one line naming it
        raise FileNotFoundError(f"--lora: {weights} does not load as a LoRA for this model ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    _refuse_unmatched(weights, wanted, _loaded_lora_modules(transformer, "lora"))


_LORA_KEY = re.compile(r"^(transformer\.)?[\w.-]+\.lora_[AB]\.weight$")  # Z-Image's all_x_embedder.2-1


class LoraMismatchError(ValueError):
    """A LoRA whose modules or factor shapes are not this model's (a LoRA for another model, or for this
    family sampled with another config)."""


def _fold_alphas(weights: Path, alphas: dict) -> dict:
    """The file's tensors with each module's ``.alpha`` (checked: :func:`_checked_alpha_tensors`) folded into its
    ``lora_B`` as alpha / rank, the ``.alpha`` keys dropped: the same deltas at scale 1; None where an ``.alpha``
    has no ``lora_A`` / ``lora_B`` pair beside it (a kohya file's lora_down / lora_up: its converter folds them)."""
    from safetensors.torch import load_file

    sd = load_file(str(weights))
    pairs = {key: (sd.get(f"{key[:-6]}.lora_A.weight"), sd.get(f"{key[:-6]}.lora_B.weight")) for key in alphas}
    if any(a is None or b is None or not a.shape[0] for a, b in pairs.values()):
        return None
    for key, alpha in alphas.items():
        a, b = pairs[key]
        sd[f"{key[:-6]}.lora_B.weight"] = b * (float(alpha) / a.shape[0])
        sd.pop(key)
    return sd


def _checked_alpha_tensors(weights: Path) -> dict:
    """The per-module ``<module>.alpha`` tensors of a kohya / ComfyUI-style file (which diffusers folds
    into the factors as alpha / rank), read from the file before diffusers is: each must be one finite
    number over 0 whose alpha / rank (the rank of its module's ``lora_A`` / ``lora_down`` factor, else
    the file's smallest) is within :data:`LORA_MAX_SCALE`; else a ValueError in one line naming the file
    and tensor (diffusers' conversion loops forever on a negative alpha). Returns {key: alpha}."""
    from safetensors import safe_open

    ranks, alphas = {}, {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            for k in f.keys():
                if k.endswith((".lora_A.weight", ".lora_down.weight")):
                    shape = f.get_slice(k).get_shape()
                    if shape and shape[0] > 0:
                        ranks[k.rsplit(".", 2)[0]] = shape[0]
                elif k.endswith(".alpha"):
                    shape = f.get_slice(k).get_shape()
                    alphas[k] = f.get_tensor(k) if math.prod(shape) == 1 else tuple(shape)  # no more than one number
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: one line naming it
        raise FileNotFoundError(f"--lora: {weights} does not load as a LoRA for this model ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    smallest = min(ranks.values(), default=None)
    out = {}
    for k, t in sorted(alphas.items()):
        where = f"--lora: {weights}: {k}"
        if isinstance(t, tuple):
            raise ValueError(f"{where} has shape {t}, not one number (a module's alpha); refused")
        if t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{where} is {str(t.dtype).replace('torch.', '')}, not a number (a module's alpha); "
                             "refused")
        alpha = float(t.reshape(()).double())
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"{where} = {alpha:g} is not a positive number (a module's alpha); refused")
        rank = ranks.get(k.removesuffix(".alpha")) or smallest
        if rank and alpha / rank > LORA_MAX_SCALE:
            raise ValueError(f"{where} = {alpha:g} scales the LoRA by {alpha / rank:.3g} (alpha / r, r = {rank}), over "
                             f"the limit {LORA_MAX_SCALE:g} (damaged or foreign weights); refused")
        out[k] = alpha
    return out


def _check_factors(weights: Path, state: dict, modules: dict) -> None:
    """Each adapted module has both factors, floating-point, ``A (r, in)`` and ``B (out, r)`` with this
    model's ``in`` / ``out`` and one ``r``: else one line naming the module (a LoRA with only its A's
    would load and do nothing)."""
    for m in sorted(_lora_modules(state)):
        pre = next(p for p in ("transformer.", "") if f"{p}{m}.lora_A.weight" in state or f"{p}{m}.lora_B.weight" in state)
        a, b = state.get(f"{pre}{m}.lora_A.weight"), state.get(f"{pre}{m}.lora_B.weight")
        if a is None or b is None:
            raise ValueError(f"--lora: {weights}: module {m} has only its lora_{'A' if b is None else 'B'} factor; "
                             "a LoRA needs both (a damaged or partial file?)")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise ValueError(f"--lora: {weights}: module {m}'s factors are {a.dtype} / {b.dtype}, not floating-point")
        mod = modules[m]
        want_in, want_out = getattr(mod, "in_features", None), getattr(mod, "out_features", None)
        if (a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or not a.shape[0]
                or (want_in is not None and a.shape[1] != want_in) or (want_out is not None and b.shape[0] != want_out)):
            raise LoraMismatchError(f"--lora: {weights}: module {m} has lora_A {tuple(a.shape)} and lora_B "
                                    f"{tuple(b.shape)}; this model's {m} needs (r, {want_in}) and ({want_out}, r) (a "
                                    "LoRA for another model?)")


def _checked_metadata(weights: Path, meta, ranks: set, alpha_tensors: bool = False):
    """The LoRA settings of a file's metadata that this loader honours (``r``, ``lora_alpha``,
    ``target_modules``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``), checked; everything else
    is dropped, so a received file cannot change the base weights at load (peft's PiSSA / OLoRA / LoftQ
    initialisations), add modules or a DoRA magnitude, or scale the LoRA past :data:`LORA_MAX_SCALE`."""
    if meta is None:
        return None
    where = f"--lora: {weights}: metadata"
    if not isinstance(meta, dict):
        raise ValueError(f"{where} is not a mapping of LoRA settings")
    # diffusers reads the transformer's settings under "transformer." and ignores the rest
    meta = {k.removeprefix("transformer."): v for k, v in meta.items() if isinstance(k, str) and k.startswith("transformer.")}
    for k in ("use_dora", "lora_bias"):
        if meta.get(k):
            raise ValueError(f"{where} sets {k}={meta[k]!r}: not a plain LoRA, which is what this loader takes")
    kept = {k: meta[k] for k in ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora")
            if k in meta and meta[k] is not None}
    r = kept.get("r")
    if r is not None and not (isinstance(r, int) and not isinstance(r, bool) and r > 0):
        raise ValueError(f"{where}: r={r!r} is not a positive rank")
    if r is not None and not kept.get("rank_pattern") and ranks - {r}:
        raise ValueError(f"{where}: r={r} but its factors have rank {', '.join(map(str, sorted(ranks)))}")
    rsl = kept.get("use_rslora", False)
    if not isinstance(rsl, bool):
        raise ValueError(f"{where}: use_rslora={rsl!r} is not true / false")
    for pat in ("alpha_pattern", "rank_pattern"):
        v = kept.get(pat)
        if v is not None and not (isinstance(v, dict) and all(isinstance(x, str) for x in v)
                                  and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0
                                          for x in v.values())):
            raise ValueError(f"{where}: {pat} is not a mapping of module patterns to positive numbers")
    stray = sorted({v for v in (kept.get("rank_pattern") or {}).values()} - ranks, key=str)
    if stray:  # a rank is the factors' shape: one they do not have would load them into other shapes
        raise ValueError(f"{where}: rank_pattern gives rank {stray[0]!r}, but its factors have rank "
                         f"{', '.join(map(str, sorted(ranks)))}")
    tm = kept.get("target_modules")
    if tm is not None and not (isinstance(tm, str) or (isinstance(tm, list) and all(isinstance(x, str) for x in tm))):
        raise ValueError(f"{where}: target_modules={tm!r} is not a module name pattern or a list of names")
    if r is not None and kept.get("lora_alpha") is None and not kept.get("alpha_pattern"):
        # peft's LoraConfig would take its own default (8: scale 8 / r); read as a file without metadata is (said
        # unless .alpha tensors give the strength)
        if not alpha_tensors:
            log.warning("--lora: %s: its metadata gives r=%d and no lora_alpha: its strength is taken as alpha = "
                        "rank (scale 1); a LoRA trained at another alpha samples at another strength (--lora-scale "
                        "sets it)", weights, r)
        kept["lora_alpha"] = r
    alphas = [("lora_alpha", kept.get("lora_alpha"))]
    alphas += [(f"alpha_pattern[{k!r}]", v) for k, v in (kept.get("alpha_pattern") or {}).items()]
    smallest = min(ranks | ({r} if r else set()) or {1})  # the largest scale any module can get
    for name, alpha in alphas:
        if alpha is None:
            continue
        if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"{where}: {name}={alpha!r} is not a positive number")
        scale = alpha / (math.sqrt(smallest) if rsl else smallest)
        if scale > LORA_MAX_SCALE:
            raise ValueError(f"{where}: {name}={alpha:g} scales the LoRA by {scale:.3g} (alpha / r), over the limit "
                             f"{LORA_MAX_SCALE:g} (damaged or foreign metadata); refused")
    return {f"transformer.{k}": v for k, v in kept.items()} or None


def _refuse_unmatched(weights: Path, wanted: set, present: set) -> None:
    missing = sorted(wanted - present)
    if missing:
        raise LoraMismatchError(f"--lora: {weights}: {len(missing)} of its {len(wanted)} LoRA modules match no module "
                                f"of this model ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); a LoRA "
                                "for another model?")


def _lora_modules(state: dict) -> set:
    """The modules a diffusers-format LoRA state dict adapts (``transformer.`` prefix dropped)."""
    out = set()
    for key in state:
        for tag in (".lora_A.", ".lora_B."):
            if tag in key:
                out.add(key.split(tag)[0].removeprefix("transformer."))
    return out


def _loaded_lora_modules(transformer, adapter: str) -> set:
    from peft.tuners.lora import LoraLayer

    return {name for name, m in transformer.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


def _found(state: dict) -> str:
    keys = sorted(state)
    return f"{len(keys)} tensors: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}" if keys else "no tensors"


def _where(name: str, i: int, path) -> str:
    """A reference named in an error: ``--reference x.png`` (a flag), ``'validation.references[1]' x.png`` (a
    config field, quoted as every config field is)."""
    return f"{name} {path}" if name.startswith("--") else f"'{name}[{i}]' {path}"


def load_references(data_cfg, family_name: str, paths, name: str = "--reference", first: int = 0) -> list[torch.Tensor]:
    """Reference images (``--reference``, ``validation.references``: ``name``), (3, H, W) in [0, 1]: each
    decoded as a training row's reference is (its EXIF orientation, an alpha channel on
    ``data.alpha_background``) at the bucket of the config's ``data.buckets`` nearest its aspect that
    fits inside it. A ValueError naming the file for a missing or unreadable image, one too small for
    every bucket, or a family without an editing mode. ``first``: the index of ``paths[0]`` in the field
    (its entries are named ``name[i]``)."""
    paths = list(paths or [])
    if not paths:
        return []
    spec = family(family_name)
    if not spec.editing:
        editing = [s.name for s in FAMILIES.values() if s.editing]
        raise ValueError(f"{name if name.startswith('--') else repr(name)}: model.family={spec.name} has no editing mode (reference images are for "
                         f"model.family={' or '.join(editing)})")
    buckets = make_buckets(data_cfg.buckets, data_cfg.bucket_scale, data_cfg.bucket_multiple)
    _data.ALPHA_BACKGROUND[:] = list(data_cfg.alpha_background)
    _data.set_max_image_pixels(data_cfg.max_image_pixels)
    out = []
    for i, path in enumerate(paths):
        where = _where(name, first + i, path)
        if not Path(path).is_file():
            raise ValueError(f"{where}: {'a folder, not an image file' if Path(path).is_dir() else 'no such image file'}")
        try:
            with _data.open_image(path, where, _TooLarge) as im:  # the size checked before the decode
                im.load()  # the whole file: a truncated one is named here, not at the first step
                w, h = _data.upright_size(im)
        except _TooLarge as e:
            raise ValueError(str(e)) from None
        except Exception as e:  # noqa: BLE001 - PIL raises many types for a broken file
            raise ValueError(f"{where}: cannot read the image ({type(e).__name__}: {e})") from None
        bucket = assign_bucket(w, h, buckets)
        if bucket is None:
            near = nearest_aspect(w, h, buckets)
            raise ValueError(f"{where} is {w}x{h}, which fits inside no bucket of data.buckets (the nearest "
                             f"aspect's is {near[0]}x{near[1]}); upscaling is not done: use a larger image, or smaller "
                             "buckets (data.bucket_scale)")
        out.append(_data.load_image(path, bucket))
    return out


class _TooLarge(ValueError):
    """A reference image over data.max_image_pixels (raised before its decode)."""


def check_reference_grid(adapter, refs, paths, name: str = "--reference", first: int = 0) -> None:
    """Each reference's bucket is one the model takes (its latent grid): a ValueError naming it.
    ``first``: the index of ``paths[0]`` in the field."""
    for i, (path, r) in enumerate(zip(paths, refs)):
        try:
            adapter.latent_shape(r.shape[-2], r.shape[-1])
        except ValueError as e:
            where = _where(name, first + i, path)
            raise ValueError(f"{where}: its bucket {r.shape[-1]}x{r.shape[-2]}: {e}") from None


@torch.no_grad()
def sample_images(adapter, prompts, width: int, height: int, steps=None, seed: int = 0, transformer=None,
                  sigmas=None, references=None) -> list[torch.Tensor]:
    """One image per prompt, (3, H, W) in [0, 1] on the CPU: the Euler ODE from noise seeded
    ``seed + i``, along the model's inference schedule of ``steps`` (or ``sigmas`` when given), with
    ``transformer`` (the adapter's own by default). ``references``: reference images (3, h, w) every
    prompt is conditioned on (an editing model's, as its training rows' references)."""
    transformer = transformer if transformer is not None else adapter.transformer
    shape = adapter.latent_shape(height, width)
    sig = sigmas if sigmas is not None else adapter.inference_sigmas(steps, shape[-2:])
    out = []
    for i, p in enumerate(prompts):
        enc = adapter.encode_student([p], [list(references)]) if references else adapter.encode_student([p])
        ctx = [c.to(adapter.device) for c in enc]
        noise = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed + i)).to(adapter.device)
        x = euler_sample(lambda x, s: adapter.velocity(transformer, x, s, ctx), noise, sig)
        out.append(adapter.decode(x)[0].float().clamp(0, 1).cpu())
    return out


def _small_json(path: Path, what: str, limit: int):
    """A received folder's small JSON file (a config, a shard index), read and parsed, or a ValueError in
    one line naming it: over ``limit`` bytes, not UTF-8, not JSON, nested too deeply, not an object."""
    if path.stat().st_size > limit:
        raise ValueError(f"{what}: {path} is {path.stat().st_size} bytes, over the {limit} a JSON file of a model "
                         "folder holds; refused")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except RecursionError:
        raise ValueError(f"{what}: {path} nests too deeply to read") from None
    except ValueError as e:  # not UTF-8, not JSON, a number past json's digit limit
        raise ValueError(f"{what}: {path} is not JSON text ({str(e)[:200]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what}: {path} must hold a JSON object, got {type(data).__name__}")
    return data


def _check_shard_index(d: Path) -> None:
    """A sharded folder's index (``*.safetensors.index.json``, which diffusers follows): each shard it names
    a .safetensors file in the folder (diffusers would read another extension with pickle, and follow a
    link out of the folder)."""
    for index in sorted(d.glob("*.index.json")):
        data = _small_json(file_in_folder(d, index.name), "--transformer", 64 << 20)
        shards = data.get("weight_map")
        if not isinstance(shards, dict) or not all(isinstance(v, str) for v in shards.values()):
            raise ValueError(f"--transformer: {index}: 'weight_map' must map tensor names to shard file names")
        for shard in sorted(set(shards.values())):
            if not shard.endswith(".safetensors"):
                raise ValueError(f"--transformer: {index} names the shard {shard!r}, not a .safetensors file "
                                 "(another format may hold code); refused")
            try:
                file_in_folder(d, shard)
            except (ValueError, FileNotFoundError) as e:
                raise ValueError(f"--transformer: {index} names the shard {shard!r}: {e}") from None


# a transformer's weights as diffusers reads them; the LoRA loader takes the same
WEIGHT_DTYPES = SAFETENSORS_FLOAT_DTYPES


def _check_weight_dtypes(d: Path, weights: list, names: set) -> None:
    """The weight files diffusers reads from the folder ``d`` (the shards its index files name, else
    ``diffusion_pytorch_model.safetensors``, else every ``.safetensors`` of ``weights``): each tensor's
    dtype, from the file's header before anything is loaded, one of :data:`WEIGHT_DTYPES` (diffusers
    casts integer, bool and fp8 tensors to the model's dtype without a word); else a ValueError in one
    line naming the file and tensor. Tensors the model lacks (``names``) are said in a warning."""
    from safetensors import safe_open

    read = {shard for index in d.glob("*.index.json")
            for shard in (_small_json(d / index.name, "--transformer", 64 << 20).get("weight_map") or {}).values()}
    if not read and (d / "diffusion_pytorch_model.safetensors").is_file():
        read = {"diffusion_pytorch_model.safetensors"}
    read = sorted(read) or sorted(w.name for w in weights)
    extra = []
    for name in read:
        path = d / name
        try:
            with safe_open(str(path), framework="pt") as f:
                dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: one line naming it
            raise ValueError(f"--transformer: {path} does not read as a safetensors file ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
        bad = next(((k, t) for k, t in sorted(dtypes.items()) if t not in WEIGHT_DTYPES), None)
        if bad is not None:
            raise ValueError(f"--transformer: {path}: {bad[0]} is {bad[1]}; a transformer's weights are "
                             f"{' / '.join(WEIGHT_DTYPES)} (integer, bool and fp8 files are another model's format, "
                             "which would be cast without a word); refused")
        extra += sorted(set(dtypes) - names)
    if extra:
        log.warning("--transformer: %s holds %d tensor(s) this model has not (%s%s); they are not loaded", d,
                    len(extra), ", ".join(extra[:3]), ", ..." if len(extra) > 3 else "")


def load_transformer(adapter, folder: str) -> None:
    """A fully fine-tuned transformer (``dopsd-train``'s ``transformer/`` or ``transformer_ema/``, or any
    diffusers folder of the family's class) in place of the model's own. The folder is untrusted input:
    safetensors only, and a file of it must be a file in it."""
    d = Path(folder)
    weights = [p for p in d.glob("*.safetensors")] if d.is_dir() else []
    if not (d / "config.json").is_file() or not weights:
        hint = (f"; {d / 'transformer'} is one" if (d / "transformer" / "config.json").is_file() else "")
        raise FileNotFoundError(f"--transformer: {d} is not a transformer folder (config.json and a .safetensors "
                                f"file, as dopsd-train writes transformer/ and transformer_ema/){hint}")
    for w in weights + [d / "config.json"]:
        try:
            file_in_folder(d, w.name)
        except ValueError as e:  # a link leading out of the folder: named as every --transformer problem is
            raise ValueError(f"--transformer: {e}") from None
    _check_shard_index(d)
    _check_weight_dtypes(d, weights, set(adapter.transformer.state_dict()))

    def plain(c):  # tuples and lists alike (a config read back from JSON)
        return json.loads(json.dumps({k: v for k, v in dict(c).items() if not k.startswith("_")}, default=str))

    def differ_from(theirs):
        return sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))

    mine = plain(adapter.transformer.config)
    cls = type(adapter.transformer)
    # the received config.json sizes the model diffusers would build: compared before anything is built,
    # a field it leaves out at the class's default (what diffusers would build with)
    raw = _small_json(d / "config.json", "--transformer", 1 << 20)
    defaults = {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    early = [k for k in differ_from(plain({**defaults, **raw})) if k in raw or k in defaults]
    if early:
        raise ValueError(f"--transformer: {d} is another model than the config's (its config differs in: "
                         f"{', '.join(early[:6])}); give the --config / --set of the run that wrote it")
    try:
        loaded = cls.from_pretrained(str(d), torch_dtype=adapter.dtype, use_safetensors=True)
    except Exception as e:  # noqa: BLE001 - another model's folder, a torn file: one line naming it
        raise ValueError(f"--transformer: {d} does not load as a {cls.__name__} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:500] if str(e) else ''})") from None
    differ = differ_from(plain(loaded.config))
    if differ:
        raise ValueError(f"--transformer: {d} is another model than the config's (its config differs in: "
                         f"{', '.join(differ[:6])}); give the --config / --set of the run that wrote it")
    # diffusers leaves a tensor the files lack on the meta device, without a word
    lacking = [n for n, t in list(loaded.named_parameters()) + list(loaded.named_buffers()) if t.is_meta]
    if lacking:
        raise ValueError(f"--transformer: {d}: its weights lack {len(lacking)} tensor(s) of the model ({lacking[0]}"
                         f"{', ...' if len(lacking) > 1 else ''}): a partial or damaged file?")
    bad = next((n for n, t in loaded.named_parameters() if not torch.isfinite(t).all()), None)
    if bad is not None:
        raise ValueError(f"--transformer: {d}: {bad} holds NaN or Inf (damaged or diverged weights); refused")
    adapter.transformer = loaded.to(adapter.device).requires_grad_(False).eval()


def generate(cfg, prompts, lora=None, width=None, height=None, steps=None, seed=0, out="samples.png",
             transformer=None, references=None, lora_scales=None, schedule=None) -> Path:
    """``dopsd-sample``: one grid, a row per prompt (its references, then its samples). ``lora_scales``:
    the LoRA's strengths (peft's adapter weight: its update times S), a column each from the same noise.
    ``schedule``: the sigmas (a roll-out schedule's name or list) in place of the pipeline's ``steps``."""
    refs = load_references(cfg.data, cfg.model.family, references)  # before any weights are read
    # a fine-tuned transformer in place of the model's: the model's own weights are not read
    adapter = build_adapter(cfg.model, load_encoders=False, transformer_weights=not transformer)
    check_reference_grid(adapter, refs, references or [])
    # the default size: the first reference's bucket (an edit keeps its picture's aspect), else the first bucket
    bw, bh = ((refs[0].shape[-1], refs[0].shape[-2]) if refs
              else make_buckets(cfg.data.buckets, cfg.data.bucket_scale, cfg.data.bucket_multiple)[0])
    w, h = width or bw, height or bh
    try:  # before the encoder, the fine-tuned transformer and the LoRA are read
        adapter.latent_shape(h, w)
    except ValueError as e:
        what = ("--width / --height" if width or height else
                "the default size (the first --reference's bucket)" if refs else "the default size (data.buckets)")
        raise ValueError(f"{what}: {e}") from None
    adapter.ensure_student_encoder()  # the prompts' encoder alone: no teacher VLM for sampling
    if transformer:
        load_transformer(adapter, transformer)
    if lora:
        load_lora_into(adapter.transformer, lora)
    sigmas = adapter.sampling_sigmas(steps, schedule, adapter.latent_shape(h, w)[-2:])
    n_steps = len(sigmas) - 1
    scales = list(lora_scales or [1.0]) if lora else [None]
    columns = []
    for scale in scales:
        if scale is not None:
            adapter.transformer.set_adapters(["lora"], weights=[scale])
        columns.append(sample_images(adapter, prompts, w, h, steps, seed, sigmas=sigmas, references=refs))
        if not all(bool(torch.isfinite(im).all()) for im in columns[-1]):  # else a grid of cast garbage
            at = f" at --lora-scale {scale:g}" if lora_scales else ""
            raise ValueError(f"the samples{at} are not finite (NaN / inf): the model's output overflowed"
                             + (" (a smaller --lora-scale)" if lora_scales else "") + "; nothing written")
    rows = [(p, [*refs, *ims]) for p, *ims in zip(prompts, *columns)]
    label = "lora" if lora else "fine-tuned" if transformer else "base"
    labels = [f"{label} x{s:g}" for s in scales] if lora and lora_scales else [label]
    headers = [f"reference {k + 1}" for k in range(len(refs))] + labels
    try:
        return save_grid(rows, headers, out, title=f"{n_steps} steps" + (f", {len(refs)} reference(s)" if refs else ""))
    except OSError as e:  # not the writer's hidden temporary file nor an errno: --out and the cause
        raise ValueError(f"--out {out}: cannot write it ({why_not_written(e)})") from None
