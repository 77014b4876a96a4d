"""Data parallel on the CPU: torchrun, gloo, 2 processes, the tiny Z-Image (fp32).

(a) 2 ranks x batch 1 == 1 rank x batch 2; (b) a checkpoint written by 2 ranks resumes at 1 and at 2
ranks to the uninterrupted result; (c) a rank killed mid-run with --max-restarts 1 finishes with the
uninterrupted weights; the divergence guard stops every rank; a hung rank times the others out with
a message."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--config", "tiny-zimage", "--set", "train.max_steps=4", "--set", "train.checkpoint_every=2", "--set", "validation.every=0",
          "--set", "validation.at_start=false", "--set", "train.tensorboard=false", "--set", "train.progress=false",
          "--set", "model.device=cpu", "--set", "train.check_sync_every=1"]


def _run(out, nproc, batch, *extra, worker=None, restarts=0, env=None, timeout=240):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    e.pop("TRITON_INTERPRET", None)
    # the worker as a module of the tests package (cwd = the root first on sys.path), never as a script: a
    # script's folder goes first on sys.path, and tests/kernels/ would then shadow Hugging Face's `kernels`
    target = ["-m", f"tests.{worker.removesuffix('.py')}"] if worker else ["-m", "dopsd_fast"]
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "--max-restarts", str(restarts)] if nproc > 1 or restarts else [sys.executable])
    cmd = launch + target + COMMON + ["--set", f"train.output_dir={out}", "--set", f"data.batch_size={batch}",
                                      *extra]
    # a session of its own: on a timeout the launcher AND its workers are killed (no orphaned ranks)
    p = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out_, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out_, err = p.communicate()
        raise AssertionError(f"timed out after {timeout} s: {' '.join(cmd[:8])} ...\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, p.returncode, out_, err)


def _lora(out):
    from safetensors.torch import load_file

    sd = load_file(str(Path(out) / "lora" / "pytorch_lora_weights.safetensors"))
    return torch.cat([sd[k].flatten() for k in sorted(sd)])


def _losses(out):
    return [json.loads(l)["loss"] for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _same_run(a, b, steps: int, rel: float) -> None:
    """Runs ``a`` and ``b`` logged ``steps`` equal losses and ended with the same LoRA, within ``rel``."""
    la, lb = _losses(a), _losses(b)
    assert len(la) == len(lb) == steps
    for x, y in zip(la, lb):
        assert x == pytest.approx(y, rel=rel)
    assert _rel(_lora(a), _lora(b)) <= rel


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The uninterrupted 2-rank run (batch 1 per rank), checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("ddp") / "r2"
    r = _run(out, 2, 1)
    assert r.returncode == 0, r.stderr[-4000:]
    return out


def test_two_ranks_equal_one_rank_with_the_global_batch(two_ranks, tmp_path):
    """(a) the math does not depend on how the samples are spread over ranks (up to reduction order):
    losses to 1e-6, the LoRA weights after 4 AdamW steps to 1e-6 (relative norm). The ranks' weights
    were checked identical every step (train.check_sync_every=1)."""
    one = tmp_path / "r1"
    r = _run(one, 1, 2)
    assert r.returncode == 0, r.stderr[-4000:]
    _same_run(two_ranks, one, 4, 1e-6)
    assert (two_ranks / "checkpoints" / "step-0000004" / ".metadata").is_file()
    assert {p.name for p in (two_ranks / "checkpoints" / "step-0000004").glob("*.distcp")} == {"__0_0.distcp",
                                                                                             "__1_0.distcp"}


def test_sft_two_ranks_equal_one_rank_with_the_global_batch(tmp_path):
    """The SFT baseline too: its sigma per sample is drawn from the sample's place in the global batch
    (each rank drew its first sample's sigma from the same seed before: 2 ranks x 1 differed from 1 x 2)."""
    two, one = tmp_path / "s2", tmp_path / "s1"
    for out, nproc, batch in ((two, 2, 1), (one, 1, 2)):
        r = _run(out, nproc, batch, "--set", "method=sft", "--set", "train.max_steps=3")
        assert r.returncode == 0, r.stderr[-4000:]
    _same_run(two, one, 3, 1e-5)


@pytest.mark.parametrize("nproc,batch", [(1, 2), (2, 1)])
def test_resume_a_two_rank_checkpoint_at_another_world_size(two_ranks, tmp_path, nproc, batch):
    """(b) N -> M: the step-2 checkpoint of the 2-rank run resumed at 1 rank (batch 2) and at 2 ranks
    ends where the uninterrupted run ended."""
    out = tmp_path / "res"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(two_ranks / "checkpoints" / "step-0000002", out / "checkpoints" / "step-0000002")
    r = _run(out, nproc, batch, "--resume", "latest")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resumed from" in r.stderr and "at step 2" in r.stderr
    assert _rel(_lora(out), _lora(two_ranks)) <= 1e-6


def test_killed_rank_elastic_restart_finishes_with_the_uninterrupted_weights(two_ranks, tmp_path):
    """(c) rank 1 dies after step 3 (step 2 checkpointed); torchrun --max-restarts 1 restarts both ranks,
    which resume from step 2: the final LoRA and the metrics are those of the uninterrupted run."""
    out = tmp_path / "kill"
    r = _run(out, 2, 1, "--resume", "latest", worker="dist_fault_worker.py", restarts=1,
             env={"DOPSD_FAULT_RANK": "1", "DOPSD_FAULT_STEP": "3", "DOPSD_FAULT_KIND": "exit"})
    assert r.returncode == 0, r.stderr[-4000:]
    assert "exitcode: 17" in r.stderr or "exitcode : 17" in r.stderr  # the fault did happen
    assert "the collective 'gradients' failed" in r.stderr  # rank 0 named it
    assert "rank 1 did not answer the roll call" in r.stderr, r.stderr[-3000:]  # and the rank that died
    assert "resumed from" in r.stderr and "step-0000002" in r.stderr
    assert _rel(_lora(out), _lora(two_ranks)) <= 1e-6
    assert [round(x, 9) for x in _losses(out)] == [round(x, 9) for x in _losses(two_ranks)]


def test_ranks_that_see_different_checkpoints_refuse_to_resume(two_ranks, tmp_path):
    """Each rank lists the checkpoints itself: rank 1 seeing an older listing (a shared disk lagging) made
    the ranks train on from different states; now every rank stops at once, nothing written."""
    out = tmp_path / "stale"
    shutil.copytree(two_ranks / "checkpoints", out / "checkpoints")
    r = _run(out, 2, 1, "--resume", "latest", worker="dist_fault_worker.py", timeout=120,
             env={"DOPSD_FAULT_RANK": "1", "DOPSD_FAULT_STEP": "0", "DOPSD_FAULT_KIND": "stale_listing"})
    assert r.returncode != 0
    assert "the ranks picked different checkpoints" in r.stderr and "step 2 and step 4" in r.stderr, r.stderr[-3000:]
    assert not (out / "metrics.jsonl").exists() and not (out / "lora").exists()
    from dopsd_fast.checkpoint import list_checkpoints

    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2, 4]


@pytest.mark.parametrize("kind,line", [
    ("startup_error", "error: [rank 1] train.jsonl:2: field 'image': /data/01.png: image file not found"),
    ("error", "error: [rank 1] train.jsonl:4: field 'image': 03.png: image file is truncated"),
])
def test_an_error_of_one_rank_only_reaches_the_screen(tmp_path, kind, line):
    """A failure only rank 1 meets (a file its node cannot read) was kept in errors.rank1.log alone; the
    screen showed torchrun's block, or rank 0's lost collective. Now rank 1's line is on the screen,
    named, once; rank 0's message about the collective names rank 1's error, not a death."""
    out = tmp_path / kind
    r = _run(out, 2, 1, worker="dist_fault_worker.py", timeout=150,
             env={"DOPSD_FAULT_RANK": "1", "DOPSD_FAULT_STEP": "2", "DOPSD_FAULT_KIND": kind})
    assert r.returncode != 0
    assert r.stderr.count(line) == 1, r.stderr[-3000:]
    assert line.removeprefix("error: [rank 1] ") in (out / "errors.rank1.log").read_text()
    assert "rank 1 did not answer the roll call" not in r.stderr


def test_a_rank_dying_in_the_checkpoint_is_named_in_one_line(tmp_path):
    """The checkpoint's barriers (and DCP, FSDP2's collectives) are not ours: a rank dying there gave
    gloo's raw text, naming no rank; now the same one line as a failed all-reduce."""
    out = tmp_path / "ck"
    r = _run(out, 2, 1, worker="dist_fault_worker.py", timeout=150,
             env={"DOPSD_FAULT_RANK": "1", "DOPSD_FAULT_STEP": "2", "DOPSD_FAULT_KIND": "exit_in_save"})
    assert r.returncode != 0
    lines = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
    assert lines and "rank 0/2: the collective 'a collective of FSDP2, the checkpoint or the step' failed" in lines[0]
    assert "rank 1 did not answer the roll call after it: died or hangs" in lines[0], r.stderr[-3000:]
    from dopsd_fast.checkpoint import list_checkpoints

    assert list_checkpoints(out / "checkpoints") == []  # nothing half-written in place


def test_one_ranks_nan_stops_every_rank_before_anything_is_written(tmp_path):
    out = tmp_path / "nan"
    r = _run(out, 2, 1, "--set", "train.checkpoint_every=1", worker="dist_fault_worker.py",
             env={"DOPSD_FAULT_RANK": "1", "DOPSD_FAULT_STEP": "3", "DOPSD_FAULT_KIND": "nan"})
    assert r.returncode != 0
    # both ranks stopped; rank 0 says why in one line, rank 1 keeps its own line in its errors log
    assert r.stderr.count("step 3: the loss is nan") == 1, r.stderr[-3000:]
    assert "step 3: the loss is nan" in (out / "errors.rank1.log").read_text()
    from dopsd_fast.checkpoint import list_checkpoints, load_checkpoint

    ck = list_checkpoints(out / "checkpoints")
    assert [s for s, _ in ck] == [1, 2]  # the last good state kept, nothing of step 3
    state = load_checkpoint(ck[-1][1])
    assert all(torch.isfinite(v).all() for v in state["weights"]["student"].values())


def test_one_ranks_nonfinite_input_is_named_by_rank_0_with_its_row_and_rank(tmp_path):
    """Rank 1's sample of step 3 carries NaN contexts: rank 0 (which never saw that sample) names it,
    its row and the rank, in one line; nothing of step 3 is written."""
    out = tmp_path / "nan_input"
    r = _run(out, 2, 1, "--set", "train.checkpoint_every=1", worker="dist_fault_worker.py",
             env={"DOPSD_FAULT_RANK": "1", "DOPSD_FAULT_STEP": "3", "DOPSD_FAULT_KIND": "nan_input"})
    assert r.returncode != 0
    import re

    lines = [l for l in r.stderr.splitlines() if "carries non-finite values" in l]
    assert len(lines) == 1, r.stderr[-3000:]
    assert re.search(r"error: step 3: sample \d+ \(.*train\.jsonl:\d+, image .*\) on rank 1 carries non-finite values "
                     r"\(NaN or Inf\) in its student context \(encoded from the prompt of ", lines[0]), lines[0]
    from dopsd_fast.checkpoint import list_checkpoints

    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [1, 2]


def test_start_up_warnings_are_said_once_and_each_ranks_own_after(tmp_path):
    """Every rank printed each start-up warning (a removed config field, a data note): at 64 ranks, 64
    times. The start-up checks that every rank's config and data are rank 0's, so rank 0's line speaks
    for all; from the first step a rank's warnings are its own again (a prompt of its own data cut)."""
    r = _run(tmp_path / "run", 2, 1, "--set", "cache.mode=auto", "--set", "model.student_max_tokens=6",
             "--set", "train.max_steps=1", timeout=150)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("config field cache.mode is ignored") == 1, r.stderr[-3000:]
    assert "[rank 1] dopsd_fast.config" not in r.stderr
    assert re.search(r"\[rank 1\] \S+: student context: a prompt of \d+ tokens passes model.student_max_tokens=6",
                     r.stderr), r.stderr[-3000:]


def test_a_hung_rank_times_the_collective_out_with_a_message(tmp_path):
    r = _run(tmp_path / "hang", 2, 1, "--set", "train.dist_timeout_s=4", worker="dist_fault_worker.py",
             env={"DOPSD_FAULT_RANK": "1", "DOPSD_FAULT_STEP": "2", "DOPSD_FAULT_KIND": "hang"}, timeout=120)
    assert r.returncode != 0
    assert "rank 0/2: the collective 'gradients' failed" in r.stderr, r.stderr[-3000:]
    assert "rank 1 did not answer the roll call after it: died or hangs" in r.stderr, r.stderr[-3000:]
    assert "train.dist_timeout_s=4 s" in r.stderr


@pytest.mark.parametrize("kind,line", [
    ("own_output", "is not one folder for every rank: rank 0 does not see the files of rank(s) 1"),
    ("other_config", "error: the config differs between the ranks, in its optim section"),
    ("other_data", "error: the data differs between the ranks"),
])
def test_ranks_that_do_not_share_the_output_folder_config_or_data_are_refused_at_start(tmp_path, kind, line):
    """A node whose output_dir is not the shared one (not mounted; a relative path) ran to 'done' with no
    checkpoint loadable (each lacked the other ranks' shards); a node with another config or copy of the
    data trained on silently, its checkpoints mixing the ranks' weights. Each refused at start-up."""
    r = _run(tmp_path / "run", 2, 1, worker="dist_fault_worker.py", timeout=150,
             env={"DOPSD_FAULT_RANK": "1", "DOPSD_FAULT_STEP": "1", "DOPSD_FAULT_KIND": kind,
                  "DOPSD_FAULT_DIR": str(tmp_path / "elsewhere")})
    assert r.returncode != 0 and line in r.stderr, r.stderr[-3000:]
    assert not list((tmp_path / "run").glob("checkpoints/step-*")) and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_startup_error_of_one_rank_before_the_process_group_reaches_the_screen(tmp_path):
    """A config file one node lacks: that rank failed before any process group, its line only in a log
    (the screen showed torchrun's exit code alone); now the first process of each node prints it."""
    r = _run(tmp_path / "run", 2, 1, worker="dist_fault_worker.py", timeout=150,
             env={"DOPSD_FAULT_RANK": "1", "DOPSD_FAULT_STEP": "1", "DOPSD_FAULT_KIND": "bad_config"})
    assert r.returncode != 0
    assert r.stderr.count("error: [rank 1] config file not found: /nonexistent/node-1-only.yaml") == 1, r.stderr[-3000:]


def test_ranks_that_drift_apart_are_caught(tmp_path):
    """The in-sync check (train.check_sync_every) compares every rank's student and EMA teacher with rank
    0's: a nudge on one rank's teacher stops the run, naming the step."""
    r = _run(tmp_path / "drift", 2, 1, worker="dist_fault_worker.py",
             env={"DOPSD_FAULT_RANK": "1", "DOPSD_FAULT_STEP": "2", "DOPSD_FAULT_KIND": "drift"})
    assert r.returncode != 0
    assert "step 2: the ranks' weights drifted apart" in r.stderr, r.stderr[-3000:]


def test_a_killed_launcher_stops_every_rank_with_a_checkpoint_and_resume_is_exact(two_ranks, tmp_path):
    """torchrun's agent SIGKILLed (kill -9, an out-of-memory kill; here by rank 0 after step 1): the
    workers trained on as orphans, holding their GPUs and the output folder to the end. Each now gets a
    SIGTERM at the agent's death (PR_SET_PDEATHSIG), finishes the same step, writes its checkpoint and
    stops, saying why; the resumed run ends where the uninterrupted one ended."""
    import re

    from dopsd_fast.checkpoint import list_checkpoints

    out = tmp_path / "killed"
    r = _run(out, 2, 1, worker="dist_fault_worker.py",
             env={"DOPSD_FAULT_RANK": "0", "DOPSD_FAULT_STEP": "1", "DOPSD_FAULT_KIND": "kill_agent"})
    assert r.returncode == -9
    stops = re.findall(r"(?:\[rank (\d)\] )?dopsd_fast: SIGTERM \(torchrun's agent, the launcher, died\) at step "
                       r"(\d+): stopped after writing its checkpoint", r.stderr)
    assert len(stops) == 2 and {rank for rank, _ in stops} == {"", "1"}, r.stderr[-3000:]
    (step,) = {int(s) for _, s in stops}
    assert 1 <= step < 4 and "done: step 4" not in r.stderr
    last = list_checkpoints(out / "checkpoints")[-1]
    assert last[0] == step and {p.name for p in last[1].glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    r = _run(out, 2, 1, "--resume", "latest")
    assert r.returncode == 0, r.stderr[-4000:]
    assert _rel(_lora(out), _lora(two_ranks)) <= 1e-6


def test_ctrl_c_stops_every_rank_after_the_same_step_and_resume_is_exact(two_ranks, tmp_path):
    """Ctrl-C at the terminal reaches torchrun's agent (sent here by rank 0 after step 1), which passes it
    on to every worker, each at its own point of its step: every rank finishes the same step and writes
    its part of that step's checkpoint; the resumed run ends where the uninterrupted one ended."""
    import re

    from dopsd_fast.checkpoint import list_checkpoints

    out = tmp_path / "int"
    r = _run(out, 2, 1, worker="dist_fault_worker.py",
             env={"DOPSD_FAULT_RANK": "0", "DOPSD_FAULT_STEP": "1", "DOPSD_FAULT_KIND": "sigint"})
    assert r.returncode != 0
    stops = re.findall(r"(?:\[rank (\d)\] )?dopsd_fast: Ctrl-C at step (\d+): stopped after writing its checkpoint", r.stderr)
    assert len(stops) == 2 and {rank for rank, _ in stops} == {"", "1"}, r.stderr[-3000:]  # rank 0 and rank 1
    (step,) = {int(s) for _, s in stops}
    assert 1 <= step < 4
    last = list_checkpoints(out / "checkpoints")[-1]
    assert last[0] == step
    assert {p.name for p in last[1].glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    r = _run(out, 2, 1, "--resume", "latest")
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"at step {step}" in r.stderr
    assert _rel(_lora(out), _lora(two_ranks)) <= 1e-6
    assert [round(x, 9) for x in _losses(out)] == [round(x, 9) for x in _losses(two_ranks)]


def test_a_collective_failed_by_a_rank_that_stopped_with_an_error_names_no_timeout_and_no_missing_log(monkeypatch):
    """Rank 0 stopped with its own one-line error (its output folder moved away mid-run); rank 1's collective
    then failed, and its line named rank 0's errors.rank0.log (rank 0 keeps none for its own one-line errors)
    and 'timeout train.dist_timeout_s=1800 s', where nothing timed out. Both are said only where true."""
    import time

    from dopsd_fast import distributed as D

    class Store:
        def __init__(self, errors):
            self.data = {**{f"error/{r}": line.encode() for r, line in errors.items()}}

        def set_timeout(self, t):
            pass

        def set(self, k, v):
            self.data[k] = v.encode() if isinstance(v, str) else v

        def check(self, keys):
            return all(k in self.data for k in keys)

        def get(self, k):
            return self.data[k]

    for failed, hint in ((0, ""), (2, " (its errors.rank2.log has the full text)")):
        store = Store({failed: "error: train.output_dir /x was removed, moved or replaced"})
        monkeypatch.setattr(D, "_STORE", [store])
        monkeypatch.setattr(time, "sleep", lambda s: None)
        d = D.Dist(rank=1, world=3, store=store, roll_call_s=0.05)
        store.set("roll_call/gradients/" + str(3 - failed - 1), "here")  # the third rank answers
        msg = str(d.failure("gradients", RuntimeError("Connection closed by peer")))
        assert f"rank {failed} stopped with an error: train.output_dir /x was removed, moved or replaced{hint}" in msg
        assert msg.endswith(f"replaced{hint}") and "timeout" not in msg, msg
    d = D.Dist(rank=1, world=2, store=Store({}), roll_call_s=0.05)  # a rank that never answers: a timeout's tail
    monkeypatch.setattr(D, "_STORE", [d.store])
    assert "(timeout train.dist_timeout_s=1800 s)" in str(d.failure("gradients", RuntimeError("timed out")))
