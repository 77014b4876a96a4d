"""Two ranks on gloo, a plain torch DDP wrapper handed to the drop-in backend (run by
tests/test_backend_loops.py as ``python -m torch.distributed.run ... -m tests.backend_ddp_worker OUT``).

A counting DDP communication hook sees every all-reduce DDP's reducer would run: the backend's K = 4
stepwise backwards must run none (its fast forward bypasses DDP's forward), and the backend averages
the gradients once, at the step that is not under ``no_sync()``. Each rank writes what it saw."""

import gc
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from dopsd_fast import backend
    from examples.authors_loop import TIMESTEPS, batch, build_model

    import dopsd_fast.backend

    dopsd_fast.backend.SYNC_BUCKET = 5000  # several all-reduce buckets at this size
    ddp = torch.nn.parallel.DistributedDataParallel(build_model())
    hooked = []

    def counting(state, bucket):
        hooked.append(1)
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting)
    import logging

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("dopsd_fast.backend").addHandler(handler)
    fast = backend.wrap(ddp, student_adapter="student", teacher_adapter="teacher")
    params = fast.trainable
    with ddp.no_sync():  # an accumulation micro-step: nothing communicated
        fast.dopsd_step(*batch(0, rank), timesteps=TIMESTEPS, backward="stepwise")
    syncs_in_no_sync = fast.syncs
    fast.dopsd_step(*batch(1, rank), timesteps=TIMESTEPS, backward="stepwise")  # the boundary: one average
    synced = torch.cat([p.grad.flatten() for p in params])

    # the reference: the same two micro-steps on an unwrapped copy, summed locally, averaged by hand
    ref_model = build_model()
    ref = backend.wrap(ref_model, student_adapter="student", teacher_adapter="teacher")  # unwrapped: said, and at a step
    for step in (0, 1):
        ref.dopsd_step(*batch(step, rank), timesteps=TIMESTEPS, backward="stepwise")
    local = torch.cat([p.grad.flatten() for p in ref.trainable])
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    expected = torch.stack(gathered).mean(0)
    warned = [m for m in seen if "does not average" in m]

    # a module trained beside the LoRA (the caller's requires_grad): DDP would average its gradient, so
    # the backend does too (it was left to each rank's own, and the replicas drifted apart)
    def beside():
        m = build_model()
        m.cap_embedder.requires_grad_(True)
        return m

    ddp2 = torch.nn.parallel.DistributedDataParallel(beside())
    fast2 = backend.wrap(ddp2, student_adapter="student", teacher_adapter="teacher")
    fast2.dopsd_step(*batch(2, rank), timesteps=TIMESTEPS, backward="stepwise")
    extra = torch.cat([p.grad.flatten() for p in ddp2.module.cap_embedder.parameters()])
    ref2_model = beside()
    backend.wrap(ref2_model, student_adapter="student", teacher_adapter="teacher").dopsd_step(
        *batch(2, rank), timesteps=TIMESTEPS, backward="stepwise")
    local2 = torch.cat([p.grad.flatten() for p in ref2_model.cap_embedder.parameters()])
    gathered2 = [torch.empty_like(local2) for _ in range(world)]
    dist.all_gather(gathered2, local2)
    expected2 = torch.stack(gathered2).mean(0)

    # the ranks disagree on what requires grad (one unfroze a module after wrap()): the flags' all-reduce
    # is the same on every rank, so the collectives still match; the module is averaged (zeros where absent)
    ddp3 = torch.nn.parallel.DistributedDataParallel(build_model())
    fast3 = backend.wrap(ddp3, student_adapter="student", teacher_adapter="teacher")
    if rank == 1:
        ddp3.module.cap_embedder.requires_grad_(True)
    fast3.dopsd_step(*batch(3, rank), timesteps=TIMESTEPS, backward="stepwise")
    g3 = [p.grad for p in ddp3.module.cap_embedder.parameters()]
    disagree = torch.cat([g.flatten() for g in g3]) if all(g is not None for g in g3) else torch.zeros(0)
    sizes = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([float(disagree.numel())]))
    same3 = None
    if all(float(n) == disagree.numel() > 0 for n in sizes):
        parts = [torch.empty_like(disagree) for _ in range(world)]
        dist.all_gather(parts, disagree)
        same3 = all(torch.equal(parts[0], q) for q in parts)
    del fast3, ddp3
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.save({"rank": rank, "disagree_same": same3, "ddp_hook_calls": len(hooked), "syncs_in_no_sync": syncs_in_no_sync,
                "syncs": fast.syncs, "rel_err": float((synced - expected).norm() / expected.norm()),
                "local_vs_mean": float((local - expected).norm() / expected.norm()),
                "warned": warned,
                "beside_rel_err": float((extra - expected2).norm() / expected2.norm()),
                "beside_local_vs_mean": float((local2 - expected2).norm() / expected2.norm())},
               Path(out) / f"rank{rank}.pt")
    del fast2, ddp2
    # DDP's reducer released (gc: DDP sits in reference cycles, so `del` alone may leave it alive) and both
    # ranks done before the group goes: tearing the group down under a live reducer can abort the process
    # at exit ("terminate called without an active exception"). Then leave without the interpreter's
    # finalization, where Gloo's worker threads can still abort the process the same way (a PyTorch
    # teardown issue, pytorch/pytorch#179291): this rank's results are written and the group is gone.
    del fast, ddp
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
