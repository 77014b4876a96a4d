"""FSDP2 on the CPU: torchrun, gloo, 2 processes, the tiny Z-Image in fp32.

Full fine-tuning sharded (student, EMA teacher, gradients, AdamW state) on 2 ranks == 1 rank with the
global batch, EMA included, and so are its exported transformer folders; a sharded checkpoint resumes at 1 rank to the uninterrupted result; the
fast path under FSDP2 is refused with a message; a LoRA run with its base sharded (dist.shard_base)
== the replicated run."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.test_distributed import _lora, _rel, _run

FULL = ["--set", "lora.enabled=false", "--set", "optim.lr=1e-4", "--set", "dopsd.ema_decay=0.5"]


def _weights(out, step=4):
    from dopsd_fast.checkpoint import load_checkpoint

    st = load_checkpoint(Path(out) / "checkpoints" / f"step-{step:07d}")
    return {w: torch.cat([st["weights"][w][k].flatten().double() for k in sorted(st["weights"][w])])
            for w in ("student", "teacher")}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Full fine-tuning on 2 ranks under FSDP2 (dist.fsdp auto), validation at steps 0, 2, 4 (every rank
    runs its forwards; rank 0 writes the grid)."""
    out = tmp_path_factory.mktemp("fsdp") / "g2"
    r = _run(out, 2, 1, *FULL, "--set", "validation.every=2", "--set", "validation.at_start=true")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "FSDP2: student, EMA teacher, gradients and AdamW state sharded over 2 ranks" in r.stderr
    return out


def test_full_fine_tuning_sharded_equals_one_rank(sharded, tmp_path):
    one = tmp_path / "g1"
    r = _run(one, 1, 2, *FULL)
    assert r.returncode == 0, r.stderr[-4000:]
    l2 = [json.loads(l)["loss"] for l in (sharded / "metrics.jsonl").read_text().splitlines()]
    l1 = [json.loads(l)["loss"] for l in (one / "metrics.jsonl").read_text().splitlines()]
    assert len(l1) == len(l2) == 4 and all(a == pytest.approx(b, rel=1e-6) for a, b in zip(l2, l1))
    # the blocks kept gathered after their forward: the teacher (no backward) was never gathered again,
    # so the EMA's updates never reached it (it trained against its first weights, silently)
    kept = tmp_path / "g2-kept"
    r = _run(kept, 2, 1, *FULL, "--set", "dist.reshard_after_forward=false")
    assert r.returncode == 0, r.stderr[-4000:]
    lk = [json.loads(l)["loss"] for l in (kept / "metrics.jsonl").read_text().splitlines()]
    assert len(lk) == 4 and all(a == pytest.approx(b, rel=1e-6) for a, b in zip(lk, l1)), (lk, l1)
    w2, w1 = _weights(sharded), _weights(one)
    assert _rel(w2["student"], w1["student"]) <= 1e-6
    assert _rel(w2["teacher"], w1["teacher"]) <= 1e-6  # the sharded EMA master
    assert _rel(w2["teacher"], w2["student"]) > 1e-4  # ... which is not the student (decay 0.5)
    files = sorted(p.name for p in (sharded / "checkpoints" / "step-0000004").glob("*.distcp"))
    sizes = [(sharded / "checkpoints" / "step-0000004" / f).stat().st_size for f in files]
    assert len(files) == 2 and min(sizes) > 0.3 * max(sizes)  # each rank wrote its shards
    assert sorted(p.name for p in (sharded / "samples").glob("*.png")) == ["step-0000000.png", "step-0000002.png",
                                                                         "step-0000004.png"]
    # the sharded run's transformer/ and transformer_ema/ (gathered to rank 0) == the one-rank run's, and
    # each is its own last checkpoint's student / EMA teacher
    from safetensors.torch import load_file

    from dopsd_fast.checkpoint import load_checkpoint

    ck = load_checkpoint(sharded / "checkpoints" / "step-0000004")
    for name, which in (("transformer", "student"), ("transformer_ema", "teacher")):
        a = load_file(sharded / name / "diffusion_pytorch_model.safetensors")
        b = load_file(one / name / "diffusion_pytorch_model.safetensors")
        assert set(a) == set(b) and set(ck["weights"][which]) <= set(a), name
        cat = lambda sd: torch.cat([sd[k].flatten().double() for k in sorted(sd)])  # noqa: E731
        assert _rel(cat(a), cat(b)) <= 1e-6, name
        assert all(torch.equal(a[k], v.to(a[k].dtype)) for k, v in ck["weights"][which].items()), name
        # the config the one-rank run writes (it was FSDP2's own class name, FSDPZImageTransformer2DModel, which
        # diffusers' AutoModel does not know)
        assert json.loads((sharded / name / "config.json").read_text()) == \
            json.loads((one / name / "config.json").read_text()), name


def test_sharded_checkpoint_resumes_at_one_rank(sharded, tmp_path):
    out = tmp_path / "res"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(sharded / "checkpoints" / "step-0000002", out / "checkpoints" / "step-0000002")
    r = _run(out, 1, 2, *FULL, "--resume", "latest")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resumed from" in r.stderr
    w, ref = _weights(out), _weights(sharded)
    assert _rel(w["student"], ref["student"]) <= 1e-6 and _rel(w["teacher"], ref["teacher"]) <= 1e-6


def test_a_flipped_bit_in_one_ranks_shard_fails_its_checksum(sharded, tmp_path):
    """Each rank records the CRC-32 of the chunks it wrote; a bit flipped in rank 1's file is caught
    when the checkpoint is read at another world size (here 1 process)."""
    from dopsd_fast.checkpoint import CheckpointError, load_checkpoint, read_metadata
    from tests.test_integrity import _flip_exponent_bit

    ck = tmp_path / "step-0000002"
    shutil.copytree(sharded / "checkpoints" / "step-0000002", ck)
    assert {"__crc32_rank0__", "__crc32_rank1__"} <= set(read_metadata(ck).state_dict_metadata)
    student = load_checkpoint(ck)["weights"]["student"]
    name, w = next((k, v) for k, v in student.items() if v.dim() == 2 and v.shape[0] >= 2 and v.dtype == torch.float32
                   and 0 < v[-(v.shape[0] // 2):].reshape(-1)[0].abs() < 1)
    _flip_exponent_bit(ck / "__1_0.distcp", w[-(w.shape[0] // 2):])  # rows rank 1 holds (dim-0 shards)
    with pytest.raises(CheckpointError, match=r"checksum mismatch in 1 tensor\(s\)"):
        load_checkpoint(ck)


def test_fast_path_under_fsdp2_is_refused(tmp_path):
    r = _run(tmp_path / "f", 2, 1, *FULL, "--set", "fast.enabled=true")
    assert r.returncode != 0
    assert "error: config field 'fast.enabled': the fast path reads the parameters in place" in r.stderr
    assert "not implemented under FSDP2 (dist.fsdp)" in r.stderr


def test_lora_with_a_sharded_base_equals_the_replicated_run(tmp_path):
    shard, rep = tmp_path / "sb", tmp_path / "rep"
    logs = {}
    for out, extra in ((shard, ["--set", "dist.shard_base=true"]), (rep, [])):
        r = _run(out, 2, 1, *extra)
        assert r.returncode == 0, r.stderr[-4000:]
        logs[out] = r.stderr
    assert "FSDP2: base and adapters sharded over 2 ranks" in logs[shard]
    assert "FSDP2" not in logs[rep]
    assert _rel(_lora(shard), _lora(rep)) <= 1e-6


_TIMESTEP_SEEN = r'''
import json, os, socket, sys
import torch, torch.distributed as dist
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
dist.init_process_group("gloo", rank=0, world_size=1)
from torch.distributed.device_mesh import init_device_mesh
from dopsd_fast import fsdp
from dopsd_fast.adapters import build_adapter
from dopsd_fast.config import load_config

ad = build_adapter(load_config(None).model)
tr = ad.transformer
fsdp.shard(tr, ad.spec, init_device_mesh("cpu", (1,)), torch.bfloat16)  # an fp32 master, bf16 compute
seen = []
tr.register_forward_pre_hook(lambda m, args: seen.append((args[0][0].dtype, args[1])))  # after FSDP's own
with torch.no_grad():
    v = ad.velocity(tr, torch.randn(2, *ad.latent_shape(128, 128)), torch.tensor([0.4732, 0.6429]),
                    ad.encode_student(["a", "b c"]))
print(json.dumps({"x": str(seen[0][0]), "t": str(seen[0][1].dtype), "t_values": seen[0][1].tolist(),
                  "finite": bool(v.isfinite().all())}))
dist.destroy_process_group()
'''


def test_a_sharded_model_gets_the_timestep_in_fp32_and_the_latents_in_its_compute_dtype():
    """FSDP2's root cast every floating input to bf16, Z-Image's timestep included (1 - 0.4732 reached the
    model as 0.5273, where ZImagePipeline passes 0.5268 in fp32); the family's call now casts the inputs
    to the sharded model's compute dtype itself, and the timestep stays fp32."""
    import subprocess
    import sys

    from tests.test_distributed import ROOT

    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _TIMESTEP_SEEN], cwd=ROOT, env=dict(env, OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["x"] == "torch.bfloat16" and got["t"] == "torch.float32" and got["finite"], got
    assert got["t_values"] == (1 - torch.tensor([0.4732, 0.6429])).tolist()
