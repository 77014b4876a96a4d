"""A torchrun worker with one fault, on rank ``DOPSD_FAULT_RANK`` at optimizer step ``DOPSD_FAULT_STEP``
of torchrun's first attempt (TORCHELASTIC_RESTART_COUNT 0); otherwise it is ``dopsd-train``.
``DOPSD_FAULT_KIND``: ``exit`` (the process dies after the step, as a lost node would), ``nan`` (that
rank's loss of the step is NaN), ``hang`` (the rank stops for 60 s before the step), ``drift`` (the rank's EMA teacher is nudged before
the step: the in-sync check must catch it), ``nan_input`` (the rank's student contexts of the step are
NaN, as garbled cached features are), ``sigint`` (after the step the rank sends torchrun's agent
SIGINT, as a Ctrl-C in the terminal does; the agent passes it on to every worker), ``kill_agent`` (after
the step the rank SIGKILLs torchrun's agent, as ``kill -9`` or an out-of-memory kill of the launcher
does), ``stale_listing``
(from the start, the rank's listing of the checkpoints lacks the newest one), ``error`` (the rank's
step raises a DataError of its own), ``startup_error`` (the rank's model and data build raises one), ``exit_in_save`` (the rank dies
inside the checkpoint of that step), ``own_output`` (the rank writes to a folder of its own,
``DOPSD_FAULT_DIR``: an output_dir its node does not share), ``other_config`` (the rank's optim.lr differs),
``other_data`` (the rank's copy of the data differs: its fingerprint), ``bad_config`` (the rank's config
is refused before any process group: a file its node lacks). Used by
tests/test_distributed.py."""

import os
import signal
import sys
import time

import torch

from dopsd_fast.cache import ContextProvider
from dopsd_fast.trainer import Trainer

_step, _rollout, _student = Trainer.train_step, Trainer.compute_rollout, ContextProvider.student
_at = {"here": False}  # whether the running step is the faulty one
KIND = os.environ.get("DOPSD_FAULT_KIND", "exit")


def _here(self, step):
    return (self.rank == int(os.environ["DOPSD_FAULT_RANK"]) and step == int(os.environ["DOPSD_FAULT_STEP"])
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0")


def _faulty_step(self):
    _at["here"] = _here(self, self.step + 1)
    if KIND == "error" and _here(self, self.step + 1):
        from dopsd_fast.data import DataError

        raise DataError("train.jsonl:4: field 'image': 03.png: image file is truncated (this rank only)")
    if KIND == "hang" and _here(self, self.step + 1):
        time.sleep(60)
    if KIND == "drift" and _here(self, self.step + 1):
        with torch.no_grad():
            next(iter(self.weights.named_teacher().values())).add_(1e-3)
    m = _step(self)
    if KIND == "exit" and _here(self, self.step):
        os._exit(17)
    if KIND == "sigint" and _here(self, self.step):
        os.kill(os.getppid(), signal.SIGINT)
    if KIND == "kill_agent" and _here(self, self.step):
        os.kill(os.getppid(), signal.SIGKILL)
    return m


def _faulty_rollout(self, *a, **kw):
    res = _rollout(self, *a, **kw)
    if KIND == "nan" and _here(self, self.step + 1):
        res.loss = res.loss * float("nan")
    return res


def _faulty_student(self, samples):
    ctx = _student(self, samples)
    if KIND == "nan_input" and _at["here"]:
        ctx = [type(c)(torch.full_like(c.features, float("nan")), c.extra) for c in ctx]
    return ctx


Trainer.train_step, Trainer.compute_rollout = _faulty_step, _faulty_rollout
ContextProvider.student = _faulty_student

if KIND == "startup_error" and os.environ.get("RANK") == os.environ["DOPSD_FAULT_RANK"]:
    _build = Trainer._build_data_and_model

    def _failing_build(self):
        from dopsd_fast.data import DataError

        raise DataError("train.jsonl:2: field 'image': /data/01.png: image file not found (this node only)")

    Trainer._build_data_and_model = _failing_build

if KIND == "exit_in_save" and os.environ.get("RANK") == os.environ["DOPSD_FAULT_RANK"]:
    import dopsd_fast.trainer as _trainer_mod

    _save = _trainer_mod.save_checkpoint

    def _dying_save(root, step, *a, **kw):
        if step == int(os.environ["DOPSD_FAULT_STEP"]):
            os._exit(17)  # the rank dies inside the checkpoint, before DCP: rank 0 waits in its barrier
        return _save(root, step, *a, **kw)

    _trainer_mod.save_checkpoint = _dying_save

if KIND == "stale_listing" and os.environ.get("RANK") == os.environ["DOPSD_FAULT_RANK"]:
    import dopsd_fast.trainer as _trainer

    _listed = _trainer.list_checkpoints  # this rank's listing lacks the newest checkpoint (a lagging shared disk)
    _trainer.list_checkpoints = lambda root: _listed(root)[:-1]

_mine = os.environ.get("RANK") == os.environ.get("DOPSD_FAULT_RANK")
if KIND == "other_data" and _mine:
    from dopsd_fast.data.dataset import ImageTextDataset

    _fp = ImageTextDataset.fingerprint
    ImageTextDataset.fingerprint = lambda self: {**_fp(self), "images": "another copy"}

if __name__ == "__main__":
    from dopsd_fast.cli import train_main

    argv = sys.argv[1:]
    if KIND == "own_output" and _mine:
        argv += ["--set", f"train.output_dir={os.environ['DOPSD_FAULT_DIR']}"]
    if KIND == "other_config" and _mine:
        argv += ["--set", "optim.lr=0.01"]
    if KIND == "bad_config" and _mine:  # as the first process of another node, whose disk lacks the file
        os.environ["LOCAL_RANK"] = "0"
        argv = ["--config", "/nonexistent/node-1-only.yaml"] + argv[2:]
    sys.exit(train_main(argv))
