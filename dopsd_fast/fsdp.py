"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for full fine-tuning at scale, and optionally the
frozen base of a LoRA run (``dist.shard_base``).

Full fine-tuning of Z-Image-Turbo (6.15 B) holds an fp32 student, a bf16 EMA teacher copy, an fp32 EMA
master, fp32 gradients and AdamW's two moments: ~16 bytes per parameter plus the teacher, more than
one 80 GB GPU. Under FSDP2 each repeated block (the family spec's ``shard_units``) and the root are
sharded over the ranks (Shard(0) on one mesh dimension): parameters, gradients (reduce-scattered in
fp32) and AdamW state live as shards; a block's weights are all-gathered (bf16 compute under the
mixed-precision policy) just before its forward and freed after it. The EMA teacher module is sharded
the same way and its fp32 master is this rank's shard of every tensor (on the GPU, or on the CPU with
``dopsd.ema_on_cpu``), so the EMA update is local.

The fast path reads the parameters in place without calling the modules' ``forward``, so FSDP2's
pre-forward all-gathers would never run: it is refused under FSDP2 (a one-line error), and sharded
runs use the eager diffusers forward.
"""

from __future__ import annotations

import logging

import torch
from dopsd_fast.errors import ConfigError

log = logging.getLogger("dopsd_fast")


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - very old torch
        return False
    return isinstance(t, DTensor)


def local(t):
    """A DTensor's shard on this rank (a plain tensor unchanged)."""
    return t.to_local() if is_dtensor(t) else t


def full_to_local(full: torch.Tensor, like) -> torch.Tensor:
    """This rank's Shard(0) piece of the full tensor ``full``, as FSDP2 lays out ``like`` (a DTensor)."""
    from torch.distributed.tensor import Shard

    if tuple(like.placements) != (Shard(0),):
        raise NotImplementedError(f"only Shard(0) placements are supported, got {like.placements}")
    mesh = like.device_mesh
    chunks = torch.chunk(full, mesh.size(), dim=0)
    loc = like.to_local()
    piece = chunks[mesh.get_local_rank()] if mesh.get_local_rank() < len(chunks) else full[:0]
    if tuple(piece.shape) != tuple(loc.shape):
        raise RuntimeError(f"shard of {tuple(full.shape)} is {tuple(piece.shape)} here, the parameter's local "
                           f"shard {tuple(loc.shape)}")
    return piece


def as_dtensor(local_t: torch.Tensor, like):
    """``local_t`` (this rank's shard, any device) as a DTensor laid out like ``like``."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local_t.to(like.to_local().device), like.device_mesh, like.placements,
                              shape=like.shape, stride=like.stride())


def wants_fsdp(cfg, world: int) -> bool:
    """``dist.fsdp``: on / off, or auto = on for full fine-tuning with more than one rank."""
    if cfg.dist.fsdp == "on":
        return True
    if cfg.dist.fsdp == "off":
        return False
    return world > 1 and not cfg.lora.enabled


INPUT_DTYPE_ATTR = "_dopsd_input_dtype"


def input_dtype(module) -> torch.dtype:
    """The dtype a family's eager call casts the model's inputs to: a sharded root's compute dtype (its
    parameters may be an fp32 master), else its parameters'."""
    return getattr(module, INPUT_DTYPE_ATTR, None) or next(module.parameters()).dtype


def shard(module, spec, mesh, param_dtype, reshard_after_forward: bool = True) -> None:
    """fully_shard every shard unit of ``module`` (its family's repeated blocks), then the root; bf16 (or
    the model's) compute, fp32 gradient reduction. The root casts none of its inputs (the family's call
    casts them to :func:`input_dtype`): FSDP's cast would round Z-Image's timestep to bf16, which
    ZImagePipeline passes in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for unit in spec.shard_units(module):
        fully_shard(unit, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    root = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    fully_shard(module, mesh=mesh, mp_policy=root, reshard_after_forward=reshard_after_forward)
    setattr(module, INPUT_DTYPE_ATTR, param_dtype or next(module.parameters()).dtype)


def apply(cfg, spec, weights, device, compute_dtype, world: int) -> bool:
    """Shard the run's modules under FSDP2 when ``dist`` asks for it; returns whether it did."""
    if world <= 1:  # dist.* set on one process: the trainer says so at start-up ("set, and not read")
        return False
    full_ft = not cfg.lora.enabled
    if not (wants_fsdp(cfg, world) if full_ft else cfg.dist.shard_base):
        return False

    if cfg.fast.enabled:
        raise ConfigError("config field 'fast.enabled': the fast path reads the parameters in place without calling "
                          "the modules' forward, so FSDP2's all-gathers would not run; not implemented under FSDP2 "
                          f"({'dist.fsdp' if full_ft else 'dist.shard_base'}): use fast.enabled=false (the eager "
                          "path) or a replicated run (dist.fsdp=off, dist.shard_base=false)")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world,))
    reshard = cfg.dist.reshard_after_forward
    shard(weights.transformer, spec, mesh, compute_dtype, reshard)
    if full_ft:  # the teacher always reshards: it runs no backward, so kept unsharded after its first forward
        # it would never gather again, and the EMA's updates of its shards would never reach its forwards
        shard(weights.teacher_module, spec, mesh, compute_dtype, True)
    weights.adopt_sharding()
    n = sum(local(p).numel() for p in weights.trainable_parameters())
    log.info("FSDP2: %s sharded over %d ranks (%s trainable elements on this rank)",
             "student, EMA teacher, gradients and AdamW state" if full_ft else "base and adapters", world, f"{n:,}")
    return True
