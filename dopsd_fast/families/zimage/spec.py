"""Z-Image (Z-Image-Turbo): what the rest of the project asks of the family (:class:`ZImageFamily`),
its sizes, schedules, FLOP counts and memory coefficients."""

from __future__ import annotations

from dopsd_fast.families.spec import Convention, FamilySpec, Flavour, MemoryCoefficients
import torch
from dopsd_fast.algorithm import resolve_schedule
from dopsd_fast.context import Context

# Tiny Z-Image: the real class at test size, random weights.
TINY_ZIMAGE = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2,
                   n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True,
                   cap_feat_dim=32, rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 12, 12],
                   axes_lens=[1536, 512, 512])
RELEASED = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30,
                n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560,
                rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])

# The released VAE's widths and scheduler (static shift 3): a config-only folder (--dry-run without the model).
RELEASED_VAE = dict(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                    block_out_channels=[128, 256, 512, 512], latent_channels=16)
RELEASED_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=False)

# Named roll-out schedules (K + 1 sigmas ending with 0).
SCHEDULES = {
    # K = 4: the authors' scripts' default (training only; inference stays 8-step).
    "zimage-k4": (1.0, 0.9, 0.75, 0.5, 0.0),
    # K = 8: the Turbo inference schedule, exactly the authors' timestep table / 1000
    # (1000 - [1000, 976.8991, 947.7647, 909.8782, 858.5987, 785.2998, 671.9212, 473.2203]).
    "zimage-k8": (1.0, 0.9768991, 0.9477647, 0.9098782, 0.8585987, 0.7852998, 0.6719212, 0.4732203, 0.0),
}

# The main layers' and refiners' attention projections and feed-forwards.
FP8_LINEARS = r"^(layers|noise_refiner|context_refiner)\.\d+\.(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.(w1|w2|w3))"


def forward_flops(cfg: dict, n_img: int, cap_lens: list[int], rank: int = 0) -> tuple[float, float]:
    """Analytic FLOPs of one Z-Image forward, ``(GEMMs, attention)``, summed over the samples; with
    ``rank`` the LoRA adapters on the default targets (q, k, v, out, w1, w2, w3 of every block and
    refiner) count with the GEMMs (spec: student forward 63.9 TFLOP at 1024^2, caption 512, r64)."""
    d, ffn = cfg["dim"], int(cfg["dim"] / 3 * 8)
    per_tok = 2 * (4 * d * d + 3 * d * ffn) + 2 * rank * (8 * d + 3 * (d + ffn))
    pad = lambda n: n + (-n) % 32  # noqa: E731
    n_i = pad(n_img)
    gemm = attn = 0.0
    for c in cap_lens:
        c = pad(c)
        s = n_i + c
        gemm += cfg["n_layers"] * s * per_tok + cfg["n_refiner_layers"] * (n_i + c) * per_tok
        attn += cfg["n_layers"] * 4 * s * s * d + cfg["n_refiner_layers"] * 4 * (n_i * n_i + c * c) * d
        gemm += 2 * n_img * 4 * cfg["in_channels"] * d * 2
    return gemm, attn


def _as_list(y):
    """(B, C, h, w) -> the model's input form: a list of (C, 1, h, w)."""
    return list(y.unsqueeze(2).unbind(0))


def _as_5d(y):
    return y.unsqueeze(2)


class ZImageFamily(FamilySpec):
    context_width_key = "cap_feat_dim"
    latent_layouts = "(B, C, h, w), (B, C, 1, h, w), or the model's list of B tensors (C, 1, h, w)"

    def latents_in(self, x, latent_hw=None):
        """(B, C, h, w) as it is; the transformer's own input form (a list of (C, 1, h, w), one frame)
        or (B, C, 1, h, w): stacked, and ``back`` returns results in that form."""
        if isinstance(x, (list, tuple)) and x and all(torch.is_tensor(t) and t.dim() == 4 and t.shape[1] == 1
                                                     and t.shape == x[0].shape for t in x):
            return torch.stack(list(x), 0).squeeze(2), _as_list
        if isinstance(x, (list, tuple)) and len(x) > 1 and all(torch.is_tensor(t) and t.dim() == 4 for t in x):
            sizes = sorted({tuple(t.shape) for t in x})
            if len(sizes) > 1:
                from dopsd_fast.errors import BackendError

                raise BackendError(f"backend: the list's latents differ in size ({', '.join(map(str, sizes[:3]))}): one "
                                   "step takes one size; give each size its own step (a micro-batch per bucket)")
        if torch.is_tensor(x) and x.dim() == 5 and x.shape[2] == 1:
            return x.squeeze(2), _as_5d
        return super().latents_in(x, latent_hw)

    def tiny_config(self):
        return dict(TINY_ZIMAGE)

    def default_lora_targets(self, transformer_config=None):
        # attention q/k/v/out and the SwiGLU FFN of every block and refiner (the authors' recipe)
        return ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")

    def image_tokens(self, latent_hw):
        return (latent_hw[0] // 2) * (latent_hw[1] // 2)  # 2x2 patches

    def latent_shape(self, c, resolution):
        return (int(dict(c)["in_channels"]), resolution // 8, resolution // 8)

    def rollout_sigmas(self, k, latent_hw=None):
        if f"zimage-k{k}" in self.named_schedules:
            return resolve_schedule(f"zimage-k{k}")
        return [float(3 * (1 - i / k) / (1 + 2 * (1 - i / k))) for i in range(k + 1)]  # shift 3, like the release

    def random_contexts(self, c, latent, cap_s, cap_t, batch, generator, device, dtype):
        d = self.context_width(c)  # caption lengths differ per sample (exercises the packing)
        ctx_s = [Context(torch.randn(cap_s + 3 * b, d, generator=generator).to(device, dtype)) for b in range(batch)]
        ctx_t = [Context(torch.randn(cap_t - 5 * b, d, generator=generator).to(device, dtype)) for b in range(batch)]
        return ctx_s, ctx_t

    def init_random(self, transformer):
        with torch.no_grad():
            transformer.x_pad_token.normal_()
            transformer.cap_pad_token.normal_()

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
        return forward_flops(dict(c), n_img, list(caps), rank)


SPEC = ZImageFamily(
    name="zimage", title="Z-Image", adapter_path="dopsd_fast.families.zimage.adapter:ZImageAdapter",
    fast_model_path="dopsd_fast.families.zimage.fast:FastZImage",
    velocity_path="dopsd_fast.families.zimage.adapter:zimage_velocity", transformer_class="ZImageTransformer2DModel",
    pipeline_class="ZImagePipeline",
    convention=Convention(time_is_one_minus_sigma=True, output_is_minus_v=True),
    presets={"tiny-zimage": "dopsd_fast.families.zimage.tiny:TinyPreset",
             "toy-zimage": "dopsd_fast.families.zimage.toy:ToyPreset"},
    # benchmarks/perf_model.py --calibrate: 20.2 x dim per token and layer is 0.715 GB per layer at 4608
    # tokens, dim 3840 (the slope of the peak from 20 to 30 layers, less those layers' adapters'
    # gradients and casts, which are terms of their own)
    memory=MemoryCoefficients(per_token={"fast": {"block": 20.2}, "eager": {"block": 39.1}},
                              transient_per_teacher_token={"fast": 27.0, "eager": 16.5},
                              per_state_extra={"fast": -5.2, "eager": -12.3}),
    fp8_linears=FP8_LINEARS,
    flavours={
        "tiny-zimage": Flavour("tiny-zimage", None, 128, 24, 80, 8, "cpu", "fp32"),
        # head dim 128 like the release, 8 layers: a quick GPU run
        "zimage-mid": Flavour("zimage-mid", dict(RELEASED, dim=1536, n_layers=8, n_heads=12), 1024, 512, 1024, 64,
                              "cuda", "bf16", RELEASED_VAE, RELEASED_SCHEDULER),
        "zimage-6b": Flavour("zimage-6b", RELEASED, 1024, 512, 1024, 64, "cuda", "bf16", RELEASED_VAE,
                              RELEASED_SCHEDULER,  # Qwen3-4B (4.02 B) and the teacher's Qwen3-VL-4B (4.44 B)
                              encoders={"text": 8.04e9, "teacher": 8.88e9}),
    },
    # the authors' train_dopsd.py: the same modules as the default (every block and refiner)
    authors_lora_targets=("feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "attention.to_k",
                          "attention.to_q", "attention.to_v", "attention.to_out.0"),
    named_schedules=SCHEDULES,
    schedule_help="use zimage-k4, zimage-k8 or an explicit list of sigmas ending with 0",
    default_rollout="zimage-k4",
    default_inference_steps=8,
    released_flavours=("zimage-6b",),
    model_fields=("vlm_path", "teacher_max_tokens", "teacher_min_pixels", "teacher_max_pixels"),
)
