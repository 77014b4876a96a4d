"""The Qwen3-VL teacher-context encoder's language model takes a text encoder's weights (the paper's
"VLM context": the VLM's language model is the text encoder): :func:`swap_language_model`."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("dopsd_fast")


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
