"""The ComfyUI-ready LoRA (comfyui_lora.safetensors) for Z-Image and FLUX.2-klein, checked against
ComfyUI's LoRA rules as its public source states them (ComfyUI is not a test dependency;
benchmarks/comfyui_check.py runs ComfyUI's own loader on the same files):

* keys: ``<prefix><diffusers module>.lora_B.weight`` (up) / ``.lora_A.weight`` (down) are read, with
  the prefix ``transformer.`` accepted for both families' diffusers names (comfy/lora.py,
  ``model_lora_keys_unet``; comfy/utils.py ``z_image_to_diffusers`` / ``flux_to_diffusers``);
* strength: ``<module>.alpha / rank`` (rank = the down matrix's rows) when the alpha tensor is there,
  1.0 when it is not (comfy/weight_adapter/lora.py).

Applying exactly that rule to the base weights must reproduce the trained student: full strength."""

import pytest
import torch

from tests.conftest import assert_close, tiny_config


def _comfy_merge(transformer, lora: dict, prefix="transformer."):
    """W += strength * up @ down for every module the file names, ComfyUI's way."""
    mods = dict(transformer.named_modules())
    ups = {k[: -len(".lora_B.weight")]: v for k, v in lora.items() if k.endswith(".lora_B.weight")}
    merged = 0
    with torch.no_grad():
        for key, up in ups.items():
            down = lora[f"{key}.lora_A.weight"]
            alpha = lora.get(f"{key}.alpha")
            strength = float(alpha) / down.shape[0] if alpha is not None else 1.0
            assert key.startswith(prefix), key
            m = mods[key[len(prefix):]]
            assert isinstance(m, torch.nn.Linear) and m.weight.shape == (up.shape[0], down.shape[1]), key
            m.weight += strength * (up.float() @ down.float()).to(m.weight.dtype)
            merged += 1
    return merged


@pytest.mark.parametrize("family", ["zimage", "klein"])
def test_comfyui_file_loads_at_the_trained_strength(tmp_path, family):
    from safetensors.torch import load_file

    from dopsd_fast.adapters import build_adapter
    from dopsd_fast.export import COMFYUI_FILE
    from dopsd_fast.families import FAMILIES
    from dopsd_fast.trainer import Trainer

    extra = FAMILIES[family].tiny_overrides()
    tr = Trainer(tiny_config(tmp_path, "train.max_steps=2", "lora.alpha=16", "lora.rank=8", *extra))
    tr.train()
    lora = load_file(str(tmp_path / "run" / "lora" / COMFYUI_FILE))
    diffusers_file = load_file(str(tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors"))
    assert not any(k.endswith(".alpha") for k in diffusers_file)  # diffusers still loads its own file
    alphas = {k: float(v) for k, v in lora.items() if k.endswith(".alpha")}
    n_modules = len({k.rsplit(".lora_", 1)[0] for k in diffusers_file})
    assert len(alphas) == n_modules and set(alphas.values()) == {8.0}  # = rank: alpha / rank folded into lora_B
    import json

    mark = json.loads((tmp_path / "run" / "lora" / "export.json").read_text())
    assert mark["step"] == 2 and mark["adapter"] == "the student" and mark["rank"] == 8 and \
        mark["trained_alpha"] == 16 and mark["alpha_in_lora_B"] is True and mark["model"]["family"] == family
    assert json.loads((tmp_path / "run" / "lora_ema" / "export.json").read_text())["adapter"] == "the EMA teacher"
    # readable by other users and tools like any file written by hand (0644 with the usual umask 022)
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    for folder in ("lora", "lora_ema"):
        for f in (tmp_path / "run" / folder).iterdir():
            assert f.stat().st_mode & 0o777 == 0o666 & ~mask, (f, oct(f.stat().st_mode))

    samples = tr.next_samples(0, 0)
    x = tr.noise_for(samples, 0, 0)
    sigma = torch.full((x.shape[0],), 0.6)
    ctx = tr.contexts.student(samples)
    ours = tr.adapter.velocity(tr.weights.student(), x, sigma, ctx)
    fresh = build_adapter(tr.cfg.model)  # same seed: the same base weights, no LoRA
    before = fresh.velocity(fresh.transformer, x, sigma, ctx)
    assert _comfy_merge(fresh.transformer, lora) == n_modules
    comfy = fresh.velocity(fresh.transformer, x, sigma, ctx)
    assert (comfy - before).abs().max() > 1e-4
    assert_close(comfy, ours, 1e-5, 1e-4, "ComfyUI rule + our file vs the trained student", scaled=True)
    # the diffusers file read without its metadata (ComfyUI's rule without alpha tensors: strength 1.0; a
    # state dict handed to diffusers, which takes alpha = rank): the trained strength all the same, where the
    # factors without alpha / rank folded in gave half of it
    fresh2 = build_adapter(tr.cfg.model)
    _comfy_merge(fresh2.transformer, diffusers_file)
    assert_close(fresh2.velocity(fresh2.transformer, x, sigma, ctx), ours, 1e-5, 1e-4,
                 "ComfyUI rule, the diffusers file", scaled=True)
    fresh3 = build_adapter(tr.cfg.model)
    fresh3.transformer.load_lora_adapter(dict(diffusers_file), prefix="transformer", adapter_name="x")
    with torch.no_grad():
        assert_close(fresh3.velocity(fresh3.transformer, x, sigma, ctx), ours, 1e-5, 1e-4,
                     "diffusers, a state dict without the metadata", scaled=True)
