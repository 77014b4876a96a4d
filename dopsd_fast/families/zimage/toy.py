"""The ``toy-zimage`` preset: the toy Z-Image of the toy world (:mod:`dopsd_fast.toy`), the real classes
(``ZImageTransformer2DModel``, ``AutoencoderKL``, Qwen3 text encoder, Qwen3-VL teacher-context encoder
with the language-model weight swap) at toy sizes, a word-level tokenizer over the toy world's
vocabulary, the shipped weights, and how the toy pipeline calls them (:class:`ToyPreset` is what
``model.preset: toy-zimage`` builds: the step-distilled student DiT, its VAE and encoders).

Weights are safetensors files in one folder (package data: ``dopsd_fast/toy/weights/``):
``vae``, ``text_encoder`` (also the VLM's language model, by the swap), ``vision`` (the VLM's vision
tower), ``base`` (the many-step DiT), ``student`` (the step-distilled DiT: its sigmas in ``toy.json``;
the shipped curved-world student: K = 2, sigmas 1, 0.5, 0), ``classifier``
(the metric network) and ``toy.json`` (the VAE's latent shift / scale and what produced each file).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dopsd_fast.context import Context
from dopsd_fast.families.spec import Preset
from dopsd_fast.families.zimage.adapter import zimage_velocity
from dopsd_fast.offline import CHAT_TEMPLATE, SPECIAL_TOKENS
from dopsd_fast.toy import world
from dopsd_fast.toy.stages import atomic_write_text
from dopsd_fast.vlm import swap_language_model

WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "toy" / "weights"
EXTRA_WORDS = ["<unk>", "user", "assistant", "system"]

TOY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
# patch 8 and merge 2 at 64 x 64 px: 16 image tokens in the teacher context.
TOY_VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=8, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
TOY_IMAGE_PROCESSOR = dict(patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=64 * 64,
                           max_pixels=64 * 64, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
# 64 x 64 px -> 16 x 8 x 8 latents -> 16 image tokens (2 x 2 patches).
TOY_ZIMAGE = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=128, n_layers=4,
                  n_refiner_layers=1, n_heads=4, n_kv_heads=4, norm_eps=1e-5, qk_norm=True, cap_feat_dim=64,
                  rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 12, 12], axes_lens=[1536, 512, 512])
# Four blocks: the VAE downsamples by 8 like the real one.
TOY_VAE = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               block_out_channels=(16, 32, 32, 32), layers_per_block=1, latent_channels=16,
               norm_num_groups=8, sample_size=64, scaling_factor=1.0, shift_factor=0.0)


def build_tokenizer():
    """Word-level: one token per world word (so a caption is ~15 tokens), Qwen's special tokens and
    chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + EXTRA_WORDS + world.WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token="<unk>", chat_template=CHAT_TEMPLATE, padding_side="right")


def vocab_size() -> int:
    return len(SPECIAL_TOKENS) + len(EXTRA_WORDS) + len(world.WORDS)


@dataclass
class Toy:
    """The toy model's parts (any may be None when not built)."""

    tokenizer: object = None
    text_encoder: torch.nn.Module = None
    vlm: torch.nn.Module = None  # Qwen3VLModel; its language model shares the text encoder's weights
    image_processor: object = None
    vae: torch.nn.Module = None
    transformer: torch.nn.Module = None
    meta: dict = None


def read_meta(weights_dir: Path | None) -> dict:
    p = Path(weights_dir or WEIGHTS_DIR) / "toy.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def write_meta(weights_dir: Path, **updates) -> dict:
    meta = read_meta(weights_dir)
    meta.update(updates)
    atomic_write_text(Path(weights_dir) / "toy.json", json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return meta


def load_into(module: torch.nn.Module, path: Path, prefix: str = "") -> None:
    from safetensors.torch import load_file

    sd = load_file(str(path))
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    missing, unexpected = module.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{path}: {len(missing)} missing keys (e.g. {missing[:3]}), "
                           f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")


def build_vae(weights_dir: Path | None = None, seed: int = 0, load: bool = True):
    from diffusers import AutoencoderKL

    meta = read_meta(weights_dir)
    cfg = dict(TOY_VAE, scaling_factor=meta.get("vae_scaling_factor", 1.0), shift_factor=meta.get("vae_shift_factor", 0.0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**cfg)
    p = Path(weights_dir or WEIGHTS_DIR) / "vae.safetensors"
    if load and p.is_file():
        load_into(vae, p)
    return vae


def build_encoders(weights_dir: Path | None = None, seed: int = 1, load: bool = True,
                   vision_pos_std: float | None = None):
    """Tokenizer, Qwen3 text encoder, Qwen3-VL model (language model = the text encoder's weights,
    tied: one set of tensors), image processor. ``vision_pos_std``: re-initialise the vision tower's
    position embeddings at this scale (a tower trained from scratch: at the default 0.02 its 16
    tokens look alike to the DiT, which then copies a picture's colours but not where they are)."""
    from transformers import Qwen3Config, Qwen3Model, Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = build_tokenizer()
    tid = tok.convert_tokens_to_ids
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = Qwen3Model(Qwen3Config(vocab_size=vocab_size(), **TOY_TEXT))
        text_cfg = dict(TOY_TEXT, vocab_size=vocab_size(), rope_parameters={
            "rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True})
        vlm = Qwen3VLForConditionalGeneration(Qwen3VLConfig(
            text_config=text_cfg, vision_config=dict(TOY_VISION), image_token_id=tid("<|image_pad|>"),
            video_token_id=tid("<|video_pad|>"), vision_start_token_id=tid("<|vision_start|>"),
            vision_end_token_id=tid("<|vision_end|>"))).model
        if vision_pos_std is not None:
            vlm.visual.pos_embed.weight.data.normal_(0.0, vision_pos_std)
    wd = Path(weights_dir or WEIGHTS_DIR)
    if load and (wd / "text_encoder.safetensors").is_file():
        load_into(text_encoder, wd / "text_encoder.safetensors")
    if load and (wd / "vision.safetensors").is_file():
        load_into(vlm.visual, wd / "vision.safetensors")
    build_encoders.swap_report = swap_language_model(vlm, text_encoder)
    tie_language_model(vlm, text_encoder)
    return tok, text_encoder, vlm, Qwen2VLImageProcessorPil(**TOY_IMAGE_PROCESSOR)


def tie_language_model(vlm, text_encoder) -> None:
    """Make the VLM's language model use the text encoder's Parameter objects (after the swap they
    are equal; tied, training either path trains both, as one model)."""
    for name, p in text_encoder.named_parameters():
        mod_name, _, attr = name.rpartition(".")
        mod = vlm.language_model.get_submodule(mod_name) if mod_name else vlm.language_model
        setattr(mod, attr, p)


def build_transformer(which: str | None, weights_dir: Path | None = None, seed: int = 2):
    """The DiT; ``which``: "base", "student" (load that file) or None (random init)."""
    from diffusers import ZImageTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dit = ZImageTransformer2DModel(**TOY_ZIMAGE)
    if which is not None:
        load_into(dit, Path(weights_dir or WEIGHTS_DIR) / f"{which}.safetensors")
    return dit


def build(transformer: str | None = "student", weights_dir: Path | None = None) -> Toy:
    tok, te, vlm, ip = build_encoders(weights_dir)
    return Toy(tok, te, vlm, ip, build_vae(weights_dir), build_transformer(transformer, weights_dir)
               if transformer else None, read_meta(weights_dir))


# ---- contexts (batched, differentiable when the encoders train) ---------------------------------
def encode_text(tok, text_encoder, prompts: list[str]) -> list[torch.Tensor]:
    """Student context: the ZImagePipeline encoding (chat template with generation prompt,
    hidden_states[-2], padding removed)."""
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                                     enable_thinking=True) for p in prompts]
    enc = tok(texts, padding="longest", return_tensors="pt")
    mask = enc.attention_mask.bool()
    hidden = text_encoder(input_ids=enc.input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
    return [hidden[i][mask[i]] for i in range(len(prompts))]


def vlm_pixels(image_processor, images: torch.Tensor) -> dict:
    """Processor output for ``(B, 3, 64, 64)`` images in [0, 1] (no resize: 64 x 64 is the bound)."""
    return image_processor(images=list(images.float().clamp(0, 1)), return_tensors="pt", do_rescale=False,
                           do_resize=False)


def encode_teacher(tok, vlm, image_processor, prompts: list[str], images: torch.Tensor) -> list[torch.Tensor]:
    """Teacher context: one user message [image, prompt], generation prompt, hidden_states[-2] of the
    VLM, padding removed (the adapter's ``encode_teacher``, batched)."""
    image_token = "<|image_pad|>"
    image_id = tok.convert_tokens_to_ids(image_token)
    pix = vlm_pixels(image_processor, images)
    merge = TOY_IMAGE_PROCESSOR["merge_size"] ** 2
    texts = []
    for i, p in enumerate(prompts):
        msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}]
        t = tok.apply_chat_template(msg, tokenize=False, add_generation_prompt=True)
        n_img = int(pix["image_grid_thw"][i].prod()) // merge
        texts.append(t.replace(image_token, image_token * n_img, 1))
    enc = tok(texts, padding="longest", return_tensors="pt")
    ids, mask = enc.input_ids, enc.attention_mask
    hidden = vlm(input_ids=ids, attention_mask=mask, pixel_values=pix["pixel_values"],
                 image_grid_thw=pix["image_grid_thw"], mm_token_type_ids=(ids == image_id).long(),
                 output_hidden_states=True).hidden_states[-2]
    return [hidden[i][mask[i].bool()] for i in range(len(prompts))]


# ---- latents and the flow ---------------------------------------------------------------------
def vae_encode(vae, images: torch.Tensor) -> torch.Tensor:
    z = vae.encode(images * 2 - 1).latent_dist.mode()
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    img = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    return ((img + 1) / 2).clamp(0, 1)


def velocity(transformer, x: torch.Tensor, sigma: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
    """v = eps - x0 at noise level ``sigma`` (B,), latents ``(B, 16, 8, 8)`` (the family's call)."""
    return zimage_velocity(transformer, x, sigma, [Context(f) for f in feats])


def sigmas(steps: int, shift: float = 3.0) -> list[float]:
    """``steps`` + 1 noise levels from 1 to 0, the Z-Image shift-3 spacing: s' = shift s / (1 + (shift - 1) s)."""
    out = []
    for i in range(steps):
        s = 1.0 - i / steps
        out.append(shift * s / (1 + (shift - 1) * s))
    return out + [0.0]


STUDENT_SIGMAS = [1.0, 0.9, 0.75, 0.5, 0.0]  # the Z-Image K = 4 roll-out schedule (dopsd.md)


def guided_velocity(transformer, x: torch.Tensor, sigma: torch.Tensor, feats: list[torch.Tensor],
                    uncond: list[torch.Tensor] | None = None, guidance: float = 1.0) -> torch.Tensor:
    """Classifier-free guidance: v_u + w (v_c - v_u), the unconditional branch under ``uncond`` (the
    empty caption's features, one per sample); ``guidance`` 1 is the plain conditional velocity."""
    if guidance == 1.0 or uncond is None:
        return velocity(transformer, x, sigma, feats)
    v_c, v_u = velocity(transformer, torch.cat([x, x]), torch.cat([sigma, sigma]), list(feats) + list(uncond)).chunk(2)
    return v_u + guidance * (v_c - v_u)


@torch.no_grad()
def sample(transformer, feats: list[torch.Tensor], schedule: list[float], noise: torch.Tensor,
           keep: list[float] | None = None, uncond: list[torch.Tensor] | None = None, guidance: float = 1.0):
    """Euler ODE from ``noise`` along ``schedule`` (with classifier-free guidance ``guidance`` when
    ``uncond`` is given); returns the final latents and, with ``keep``, the states at those noise
    levels too (a dict sigma -> latents)."""
    x = noise
    states = {}
    for s, s_next in zip(schedule[:-1], schedule[1:]):
        if keep is not None and any(abs(s - k) < 1e-9 for k in keep):
            states[round(s, 6)] = x.clone()
        v = guided_velocity(transformer, x, torch.full((x.shape[0],), s), feats, uncond, guidance)
        x = x + (s_next - s) * v
    return (x, states) if keep is not None else x


def student_sigmas(weights_dir: Path | None = None) -> list[float]:
    """The shipped student's own schedule: the sigmas its meta records (the curved world's K = 2
    student: 1, 0.5, 0), else the Z-Image K = 4 roll-out (``STUDENT_SIGMAS``, the v1 world's student)."""
    return [float(s) for s in read_meta(weights_dir).get("student", {}).get("sigmas", STUDENT_SIGMAS)]


def scheduler_shift(schedule: list[float]) -> float:
    """The shift with which K steps of the shift-``s`` flow-matching scheduler (``sigmas``) give exactly
    ``schedule`` (K = 4, shift 3: the Z-Image K = 4 roll-out; K = 2, shift 1: 1, 0.5, 0); a schedule
    no shift gives is refused in one line."""
    k = len(schedule) - 1
    if k == 1:
        return 1.0
    t, s1 = 1.0 - 1.0 / k, schedule[1]  # s1 = shift t / (1 + (shift - 1) t), solved for the shift
    shift = s1 * (1 - t) / (t * (1 - s1))
    if any(abs(a - b) > 1e-6 for a, b in zip(sigmas(k, shift), schedule)):
        raise ValueError(f"toy student schedule {schedule}: no shifted {k}-step flow-matching schedule gives it")
    return shift


class ToyPreset(Preset):
    """``model.preset: toy-zimage``: the shipped step-distilled student, sampled at its own schedule
    (``student_sigmas``, from the weights' meta) by default: K steps of the flow-matching scheduler at
    the shift that gives exactly those sigmas (``scheduler_shift``; the shipped curved-world student:
    2 steps, shift 1: 1, 0.5, 0)."""

    @property
    def inference_steps(self) -> int:
        return len(student_sigmas()) - 1

    def build(self, adapter) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        if not (WEIGHTS_DIR / "student.safetensors").is_file():
            raise FileNotFoundError(f"model.preset=toy-zimage: no toy weights in {WEIGHTS_DIR} "
                                    "(python -m dopsd_fast.toy all, then ship)")
        adapter.transformer = build_transformer("student")
        adapter.vae = build_vae()
        adapter.scheduler_config = dict(FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=scheduler_shift(student_sigmas()), use_dynamic_shifting=False).config)
        adapter.min_pixels = adapter.max_pixels = TOY_IMAGE_PROCESSOR["max_pixels"]

    def build_encoders(self, adapter) -> None:
        adapter.tokenizer, adapter.text_encoder, adapter.vlm, adapter.image_processor = build_encoders()
        adapter.vlm_tokenizer = adapter.tokenizer
        adapter.swap_report = build_encoders.swap_report

    def shipped_weights(self):
        # not the many-step base nor the metric network: evaluation's, never trained on
        return WEIGHTS_DIR, ("student.safetensors", "text_encoder.safetensors", "vision.safetensors",
                             "vae.safetensors", "toy.json")

    def identity(self, cfg) -> dict:
        files = {n: hashlib.sha256((WEIGHTS_DIR / n).read_bytes()).hexdigest()[:16]
                 for n in ("text_encoder.safetensors", "vision.safetensors")}
        return {**super().identity(cfg), "files": files}
