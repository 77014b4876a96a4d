"""FLUX.2-klein (4B / 9B): what the rest of the project asks of the family (:class:`KleinFamily`), its
sizes, schedules, FLOP counts and memory coefficients."""

from __future__ import annotations

import math
import re

from dopsd_fast.families.spec import FAST_FEATURES, Convention, FamilySpec, Flavour, MemoryCoefficients
import torch
from dopsd_fast.context import Context
from dopsd_fast.errors import BackendError

# The default LoRA targets (the single blocks' to_out are named in full, per block: default_lora_targets).
BASE_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "linear_in", "linear_out", "to_qkv_mlp_proj")

# Tiny klein: the real classes, random weights (models.md's verified CPU configs; 4-block VAE -> x8).
TINY_KLEIN = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=32,
                  num_attention_heads=2, joint_attention_dim=96, timestep_guidance_channels=256, mlp_ratio=3.0,
                  axes_dims_rope=(8, 8, 8, 8), rope_theta=2000, eps=1e-6, guidance_embeds=False)
TINY_KLEIN_VAE = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                      block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                      sample_size=128)
TINY_TEXT_LAYERS = (1, 2, 3)


# The released VAE's widths and scheduler (dynamic shifting): a config-only folder (--dry-run without the model).
RELEASED_VAE = dict(block_out_channels=[128, 256, 512, 512])
RELEASED_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True)

KLEIN_4B = dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
                axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=False)

# The double blocks' image and text attention projections and feed-forwards, the single blocks' fused
# QKV + MLP projection and output.
FP8_LINEARS = (r"^(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
               r"|ff\.linear_(in|out)|ff_context\.linear_(in|out))"
               r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out))")


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """``Flux2KleinPipeline``'s empirical mu (imported from diffusers when available)."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu as mu

    return float(mu(image_seq_len, num_steps))


def forward_flops(cfg: dict, n_img: int, n_txt: int) -> tuple[float, float]:
    """Analytic FLOPs of one FLUX.2 forward for one sample, ``(GEMMs, attention)``."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    s = n_img + n_txt
    per_tok = 2 * 13 * d * d  # double: qkv 3 + out 1 + ff 6 + 3 (d^2 MACs), single: fused 9 + out 4
    blocks = cfg["num_layers"] + cfg["num_single_layers"]
    return blocks * s * per_tok + 2 * n_img * cfg["in_channels"] * d * 2, blocks * 4 * s * s * d


def _pack(y):
    """(B, C, h, w) -> the pipeline's packed (B, h*w, C)."""
    B, C, h, w = y.shape
    return y.reshape(B, C, h * w).permute(0, 2, 1)


class KleinFamily(FamilySpec):
    context_width_key = "joint_attention_dim"
    latent_layouts = ("(B, C, h, w), or the pipeline's packed (B, h*w, C) with latent_hw=(h, w) or its latent ids "
                      "(B, h*w, 4)")

    def latents_in(self, x, latent_hw=None):
        """(B, C, h, w) as it is; the pipeline's packed (B, h*w, C) (``_pack_latents``) with ``latent_hw``
        (``(h, w)``, or the pipeline's latent ids ``(B, h*w, 4)``: (t, h, w, l) per token): unpacked, and
        ``back`` packs results again. h and w are never guessed from h*w (a 16 x 64 image
        and a 32 x 32 one both have 1024 tokens)."""
        if torch.is_tensor(x) and x.dim() == 3:
            B, N, C = x.shape
            if latent_hw is None:
                raise BackendError(f"{self.title} packed latents {tuple(x.shape)} need latent_hw=(h, w) (h * w = {N}) "
                                   "or latent_hw=<the pipeline's latent ids>, or pass them unpacked: "
                                   "x.permute(0, 2, 1).reshape(B, C, h, w)")
            if torch.is_tensor(latent_hw) and latent_hw.dim() in (2, 3) and latent_hw.shape[-1] == 4:
                ids = latent_hw[0] if latent_hw.dim() == 3 else latent_hw  # the pipeline's (t, h, w, l) ids
                latent_hw = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
            h, w = (int(v) for v in latent_hw)
            if h * w != N:
                raise BackendError(f"{self.title} packed latents have {N} tokens, latent_hw={h, w} gives {h * w}")
            return x.permute(0, 2, 1).reshape(B, C, h, w), _pack
        return super().latents_in(x, latent_hw)

    def tiny_config(self):
        return dict(TINY_KLEIN)

    def default_lora_targets(self, transformer_config):
        # single blocks' to_out is a Linear, double blocks' a ModuleList: name the single ones in full
        n_single = int(dict(transformer_config)["num_single_layers"])
        return BASE_TARGETS + tuple(f"single_transformer_blocks.{i}.attn.to_out" for i in range(n_single))

    def schedule_ok(self, rollout):
        return super().schedule_ok(rollout) or re.fullmatch(r"klein-k[1-9]\d*(-authors)?", rollout) is not None

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
        mu = math.exp(compute_empirical_mu(latent_hw[0] * latent_hw[1], k))
        return [mu / (mu + (1 / s - 1)) for s in (1.0 - i / k for i in range(k))] + [0.0]

    def random_contexts(self, c, latent, cap_s, cap_t, batch, generator, device, dtype):
        d = self.context_width(c)  # padded text of one length; the target as a reference
        ctx_s = [Context(torch.randn(cap_s, d, generator=generator).to(device, dtype)) for _ in range(batch)]
        ctx_t = [Context(torch.randn(cap_t, d, generator=generator).to(device, dtype),
                         {"ref0": torch.randn(*latent, generator=generator).to(device)}) for _ in range(batch)]
        return ctx_s, ctx_t

    def memory_layers(self, c):
        c = dict(c)
        return (int(c["num_attention_heads"]) * int(c["attention_head_dim"]),
                {"double": int(c["num_layers"]), "single": int(c["num_single_layers"])})

    def forward_flops(self, c, n_img, caps, rank=0, teacher=False):
        """The adapters' FLOPs are not counted (< 3% at r64); the teacher carries the target image as a
        reference (2 x the image tokens)."""
        g = a = 0.0
        for cap in caps:
            fg, fa = forward_flops(dict(c), (2 if teacher else 1) * n_img, cap)
            g, a = g + fg, a + fa
        return g, a


SPEC = KleinFamily(
    name="klein", title="FLUX.2-klein", adapter_path="dopsd_fast.families.klein.adapter:KleinAdapter",
    fast_model_path="dopsd_fast.families.klein.fast:FastFlux2",
    velocity_path="dopsd_fast.families.klein.adapter:flux2_velocity", transformer_class="Flux2Transformer2DModel",
    pipeline_class="Flux2KleinPipeline",
    convention=Convention(time_is_one_minus_sigma=False, output_is_minus_v=False),
    presets={"tiny-klein": "dopsd_fast.families.klein.tiny:TinyPreset"},
    memory=MemoryCoefficients(per_token={"fast": {"double": 21.2, "single": 20.1},
                                         "eager": {"double": 27.7, "single": 25.3}},
                              transient_per_teacher_token={"fast": 20.2, "eager": 13.8},  # the teacher: 2 images
                              per_state_extra={"fast": 0.1, "eager": -9.8}),
    fp8_linears=FP8_LINEARS,
    flavours={
        "tiny-klein": Flavour("tiny-klein", None, 128, 48, 48, 8, "cpu", "fp32"),
        "klein-4b": Flavour("klein-4b", KLEIN_4B, 1024, 512, 512, 64, "cuda", "bf16", RELEASED_VAE, RELEASED_SCHEDULER,
                            encoders={"text": 8.04e9}),  # Qwen3-4B (4.02 B: 3 x 2560 = joint_attention_dim)
        "klein-9b": Flavour("klein-9b", dict(KLEIN_4B, num_layers=8, num_single_layers=24, num_attention_heads=32,
                                             joint_attention_dim=12288), 1024, 512, 512, 64, "cuda", "bf16",
                            RELEASED_VAE, RELEASED_SCHEDULER,
                            encoders={"text": 16.38e9}),  # Qwen3-8B (8.19 B: 3 x 4096 = joint_attention_dim)
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
    reference_recipes={"klein-4b-gtref-lora": 1},
    contexts_use_vae=True,  # the references and the teacher's target enter as VAE latents
    schedule_help="use klein-kN (the N-step inference schedule at the bucket's resolution), klein-kN-authors, "
                  "a named schedule or an explicit list of sigmas ending with 0",
    default_rollout="klein-k4",
    default_inference_steps=4,
    released_flavours=("klein-4b", "klein-9b"),
    model_fields=("text_layers", "teacher_instruction", "gt_instruction"),
)
