"""The authors' D-OPSD training loop, structure kept, with dopsd_fast's backend swapped in.

Their loop (Z-Image, ``train_dopsd.py``): accelerate (DDP or DeepSpeed ZeRO-2), one transformer with
two peft adapters, ``"student"`` (trained) and ``"teacher"`` (an EMA of the student, updated after each
optimizer step), a K = 4 roll-out in the model's own time (``t = timestep / 1000 = 1 - sigma``, the
output used as it comes, ``x0 = x + (1 - t) * out``), the x0 MSE averaged over the states, one
``accelerator.backward`` per micro-batch, and periodic sampling with ``set_adapter("teacher")``.

The backend replaces the roll-out (``authors_step`` below) by one call. The lines it adds are marked
``# backend``: an import, the ``wrap`` after ``accelerator.prepare``, and the step call in place of
``authors_step`` (the ``mode`` switch exists only so that a test can run both). Everything else
(adapters, optimizer, accumulation, clipping, EMA, sampling, checkpoints) stays the caller's. Here on a
tiny Z-Image with random weights, so that it runs on a CPU in seconds; a real run builds the model
with ``ZImagePipeline.from_pretrained``.

    python -m examples.authors_loop --mode backend --steps 4
    python -m torch.distributed.run --standalone --nproc_per_node 2 -m examples.authors_loop --out runs/b
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

TIMESTEPS = [0, 100, 250, 500]  # the authors' Z-Image K = 4 roll-out: t / 1000 = 1 - sigma
TARGETS = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
           "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]  # their LoRA targets


def build_model(seed: int = 0, rank: int = 4):
    """A tiny Z-Image transformer with the authors' two adapters, the teacher a copy of the student
    (their ``old_init_from_current``). LoRA B starts nonzero here so that step 0 has gradients on A."""
    from peft import LoraConfig

    from dopsd_fast.families import ZIMAGE

    torch.manual_seed(seed)
    model = ZIMAGE.diffusers_class()(**ZIMAGE.tiny_config()).float()
    ZIMAGE.init_random(model)
    model.requires_grad_(False)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights="gaussian", target_modules=TARGETS)
    model.add_adapter(cfg, adapter_name="student")
    model.add_adapter(cfg, adapter_name="teacher")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, p in params.items():
            if ".student." in n:
                p.add_(0.05 * torch.randn_like(p) * (p.abs().mean() + 1e-2))
                params[n.replace(".student.", ".teacher.")].copy_(p)
    model.set_adapter("student")  # peft: student trainable, teacher frozen
    return model


def batch(step: int, rank: int, bsz: int = 1):
    """Noise and the two contexts of one micro-batch (their ``prepare_latents`` and the text / VLM
    encoders; fixed per step and rank here so that two runs see the same data)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    noise = torch.randn(bsz, 16, 8, 8, generator=g)
    prompt_s = [torch.randn(7 + 3 * i, 32, generator=g) for i in range(bsz)]
    prompt_t = [torch.randn(15 + 2 * i, 32, generator=g) for i in range(bsz)]
    return noise, prompt_s, prompt_t


def authors_step(model, base, noise, prompt_s, prompt_t, accelerator):
    """Their roll-out, abridged: per state the teacher (no grad) and the student on the student's state,
    the x0 MSE, Euler in t; the mean over the states back-propagated once."""
    bsz = noise.shape[0]
    latents = noise
    total = 0.0
    for i in range(len(TIMESTEPS)):
        t = torch.full((bsz,), TIMESTEPS[i] / 1000)
        next_t = torch.full((bsz,), TIMESTEPS[i + 1] / 1000) if i < len(TIMESTEPS) - 1 else torch.ones_like(t)
        dt = (next_t - t).view(bsz, 1, 1, 1)
        latents = latents.detach()
        lat_list = list(latents.unsqueeze(2).unbind(0))
        with torch.no_grad(), accelerator.autocast():
            base.set_adapter("teacher")
            v_t = torch.stack(model(lat_list, t, prompt_t, return_dict=False)[0], 0).squeeze(2).float()
            x0_t = latents + (1 - t.view(bsz, 1, 1, 1)) * v_t
        with accelerator.autocast():
            base.set_adapter("student")
            v_s = torch.stack(model(lat_list, t, prompt_s, return_dict=False)[0], 0).squeeze(2).float()
        x0_s = latents + (1 - t.view(bsz, 1, 1, 1)) * v_s
        latents = latents + v_s * dt
        total = total + F.mse_loss(x0_s, x0_t.detach())
    total = total / len(TIMESTEPS)
    accelerator.backward(total)
    return total.detach()


@torch.no_grad()
def ema_update(base, decay: float) -> None:
    """Their EMA: the teacher adapter <- decay * teacher + (1 - decay) * student."""
    params = dict(base.named_parameters())
    for n, p in params.items():
        if ".student." in n:
            params[n.replace(".student.", ".teacher.")].lerp_(p, 1.0 - decay)


@torch.no_grad()
def sample(base, seed: int = 7):
    """Their periodic sampling: the teacher adapter selected, a 2-step Euler sample. The teacher stays
    selected afterwards (their step selects an adapter before every forward; peft's ``set_adapter`` has
    now turned the student's ``requires_grad`` off: the backend trains the student anyway)."""
    base.set_adapter("teacher")
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(seed))
    cap = [torch.randn(9, 32, generator=torch.Generator().manual_seed(seed + 1))]
    for t0, t1 in ((0.0, 0.5), (0.5, 1.0)):
        out = base(list(x.unsqueeze(2).unbind(0)), torch.full((1,), t0), cap, return_dict=False)[0]
        x = x + (t1 - t0) * torch.stack(out, 0).squeeze(2)
    return x


def train(mode: str = "backend", steps: int = 3, grad_accum: int = 1, sample_every: int = 2,
          mixed_precision: str = "no", backward: str = "once", decay: float = 0.9, lr: float = 1e-3) -> dict:
    """The loop. Returns per micro-step losses, the gradients at each optimizer step (before clipping),
    the final student and teacher adapters, and the backend's gradient all-reduce count."""
    from accelerate import Accelerator

    from dopsd_fast import backend  # backend

    accelerator = Accelerator(gradient_accumulation_steps=grad_accum, mixed_precision=mixed_precision, cpu=True)
    model = build_model()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    base = accelerator.unwrap_model(model)
    if mode == "backend":
        fast = backend.wrap(model, student_adapter="student", teacher_adapter="teacher")  # backend
    losses, grads = [], []
    for step in range(steps * grad_accum):
        noise, prompt_s, prompt_t = batch(step, accelerator.process_index)
        with accelerator.accumulate(model):
            if mode == "backend":  # backend
                loss = fast.dopsd_step(noise, prompt_s, prompt_t, timesteps=TIMESTEPS, backward=backward,  # backend
                                       backward_fn=accelerator.backward, autocast=accelerator.autocast()).loss
            else:
                loss = authors_step(model, base, noise, prompt_s, prompt_t, accelerator)
            losses.append(float(loss))
            if accelerator.sync_gradients:
                grads.append(torch.cat([p.grad.flatten() for p in params]).clone())
                accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            if accelerator.sync_gradients:
                ema_update(base, decay)
        if sample_every and (step + 1) % sample_every == 0:
            sample(base)
    named = dict(base.named_parameters())
    return {"losses": losses, "grads": grads,
            "student": torch.cat([p.detach().flatten() for n, p in named.items() if ".student." in n]),
            "teacher": torch.cat([p.detach().flatten() for n, p in named.items() if ".teacher." in n]),
            "syncs": fast.syncs if mode == "backend" else None, "rank": accelerator.process_index,
            "world": accelerator.num_processes}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["backend", "eager"], default="backend")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--sample-every", type=int, default=2)
    ap.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    ap.add_argument("--backward", choices=["once", "stepwise"], default="once")
    ap.add_argument("--out", default=None, help="a folder: each rank writes rank<r>.pt there")
    a = ap.parse_args(argv)
    res = train(a.mode, a.steps, a.grad_accum, a.sample_every, a.mixed_precision, a.backward)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        torch.save(res, Path(a.out) / f"rank{res['rank']}.pt")
    print(f"rank {res['rank']}/{res['world']}: losses {[round(v, 6) for v in res['losses']]}")


if __name__ == "__main__":
    main()
