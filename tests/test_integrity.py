"""Damaged bytes are caught and received files are untrusted input (tiny, CPU).

A flipped bit in a checkpoint tensor is refused by its checksum and ``--resume latest`` takes the
previous checkpoint; non-finite weights do not load, and the LoRA export refuses them and absurd
magnitudes; planted pickles (that write a file when run) in a checkpoint's ``.metadata``, its
structure, a ``state.pt`` or a toy state file run nothing; a checkpoint, cache manifest or LoRA folder
naming a file outside its folder is refused before anything is read; checkpoints of the previous
format load through the safe path; an EXIF-rotated portrait photo gets a portrait bucket;
``dopsd-sample --lora`` refuses weights that match no module of the model, or only some."""

import io
import json
import logging
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import tiny_config


# ---- helpers -----------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this runs ``exec``: it writes ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _live_payload(tmp_path) -> tuple[Path, bytes]:
    """A marker path and a pickle that creates it, proven live: plain ``pickle.loads`` does run it."""
    marker = tmp_path / "payload-ran"
    blob = pickle.dumps(_Payload(marker))
    pickle.loads(blob)
    assert marker.read_text() == "ran"
    marker.unlink()
    return marker, blob


def _same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _dcp_save(flat: dict, path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save(flat, checkpoint_id=str(path))


def _write_format_1(state: dict, path: Path) -> None:
    """A checkpoint as the previous version wrote it: tensors under t00000.., the structure pickled
    (tensors replaced by ``dopsd_fast.checkpoint._Ref``) as the bytes entry ``__meta__``."""
    from dopsd_fast.checkpoint import _Ref

    tensors = []

    def split(obj):
        if torch.is_tensor(obj):
            tensors.append(obj.detach())
            return _Ref(len(tensors) - 1)
        if isinstance(obj, dict):
            return {k: split(v) for k, v in obj.items()}
        if type(obj) in (list, tuple):
            return type(obj)(split(v) for v in obj)
        return obj

    skeleton = split(state)
    flat = {f"t{i:05d}": t.cpu() for i, t in enumerate(tensors)}
    flat["__meta__"] = pickle.dumps(skeleton)
    _dcp_save(flat, path)


def _flip_exponent_bit(file: Path, t: torch.Tensor) -> None:
    """Flip the top exponent bit of ``t``'s first fp32 value where its bytes sit in ``file``."""
    raw = t.detach().float().contiguous().view(torch.uint8).numpy().tobytes()
    data = bytearray(file.read_bytes())
    at = data.find(raw)
    assert at >= 0 and data.find(raw, at + 1) < 0, "the tensor's bytes are not found once in the file"
    data[at + 3] ^= 0x40  # little-endian fp32: byte 3 holds the sign and the top exponent bits
    file.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny LoRA run with checkpoints at steps 1, 2, 3 and its LoRA export."""
    from dopsd_fast.trainer import Trainer

    base = tmp_path_factory.mktemp("integrity")
    Trainer(tiny_config(base, "train.checkpoint_every=1", "train.max_steps=3")).train()
    return base / "run"


def _copy_run(trained, tmp_path) -> Path:
    shutil.copytree(trained, tmp_path / "run", ignore=shutil.ignore_patterns(".lock"))
    return tmp_path / "run"


def _trainer(tmp_path, *over, resume=None):
    from dopsd_fast.trainer import Trainer

    return Trainer(tiny_config(tmp_path, *over), resume=resume)


# ---- 1. damaged bytes ---------------------------------------------------------------------------------
def test_a_flipped_bit_fails_its_checksum_and_resume_takes_the_previous_checkpoint(trained, tmp_path, caplog):
    from dopsd_fast.checkpoint import CheckpointError, _dcp_load, load_checkpoint, read_metadata

    run = _copy_run(trained, tmp_path)
    newest = run / "checkpoints" / "step-0000003"
    weights = load_checkpoint(newest)["weights"]["student"]
    name = next(k for k, v in weights.items() if v.dtype == torch.float32 and 0 < v.view(-1)[0].abs() < 1.0)
    _flip_exponent_bit(newest / "__0_0.distcp", weights[name])
    # the bytes still read, and the value is finite: only the checksum tells
    md = read_metadata(newest)
    flat = {k: torch.zeros(tuple(m.size), dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()}
    _dcp_load(flat, newest, md)
    changed = [t for t in flat.values() if t.dtype == torch.float32 and t.numel() and t.abs().max() > 1e30]
    assert len(changed) == 1 and torch.isfinite(changed[0]).all()
    with pytest.raises(CheckpointError, match=r"step-0000003: checksum mismatch in 1 tensor\(s\) \(t\d+\): damaged"):
        load_checkpoint(newest)
    with caplog.at_level(logging.INFO, logger="dopsd_fast"):
        tr = _trainer(tmp_path, "train.max_steps=4", resume="latest")
    assert tr.step == 2
    assert "skipping" in caplog.text and "step-0000003" in caplog.text and "checksum mismatch" in caplog.text
    assert not newest.exists() and (run / "checkpoints" / "step-0000003.damaged-1").is_dir()  # kept for inspection
    assert "moved aside (step-0000003.damaged-1; not deleted)" in caplog.text


def test_non_finite_weights_in_a_checkpoint_are_refused(tmp_path):
    from dopsd_fast.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    w = torch.randn(4, 4)
    w[1, 2] = float("inf")
    path = save_checkpoint(tmp_path / "ck", 1, {"step": 1, "weights": {"student": {"a.lora_A": w}}}, keep=1)
    with pytest.raises(CheckpointError, match=r"state\.weights\.student\.a\.lora_A holds 1 non-finite value"):
        load_checkpoint(path)


def test_the_lora_export_refuses_non_finite_or_absurd_weights_and_keeps_the_last_export(trained, tmp_path):
    from dopsd_fast.export import LoraWeightsError

    run = _copy_run(trained, tmp_path)
    before = {p.name: p.read_bytes() for p in (run / "lora").iterdir()}
    tr = _trainer(tmp_path, "train.max_steps=3", resume="latest")  # the run's folder: continued, not restarted
    p = tr.weights.trainable_parameters()[0]
    for bad, msg in ((1.03e36, r"holds \|w\| up to 1\.03e\+36, over the limit 10000"),
                     (float("nan"), r"holds 1 non-finite value")):
        with torch.no_grad():
            p.view(-1)[0] = bad
        with pytest.raises(LoraWeightsError, match=rf"^LoRA export \(pytorch_lora_weights.safetensors\): \S+ {msg}"):
            tr.export_lora()
        assert {q.name: q.read_bytes() for q in (run / "lora").iterdir()} == before
        assert not [q for q in run.iterdir() if q.name.startswith(".lora")]  # no temporary folder left


def test_lora_weights_of_a_dtype_no_lora_is_kept_in_are_refused_in_one_line():
    """A received LoRA file with float8 factors: one line naming the tensor, not a NotImplementedError
    of isfinite asking for a bug report."""
    from dopsd_fast.export import LoraWeightsError, check_lora_weights

    sd = {"a.lora_A.weight": torch.zeros(4, 8, dtype=torch.float8_e4m3fn), "a.lora_B.weight": torch.zeros(8, 4)}
    with pytest.raises(LoraWeightsError, match=r"^--lora: f: a\.lora_A\.weight is float8_e4m3fn; LoRA weights are "):
        check_lora_weights(sd, "--lora: f")
    check_lora_weights({k: v.float() for k, v in sd.items()}, "--lora: f")


# ---- 2. no code from data -----------------------------------------------------------------------------
def test_a_pickle_planted_in_dcp_metadata_runs_nothing(trained, tmp_path):
    import torch.distributed.checkpoint as dcp

    from dopsd_fast.checkpoint import CheckpointError, load_checkpoint

    marker, _ = _live_payload(tmp_path)
    ck = tmp_path / "step-0000002"
    shutil.copytree(trained / "checkpoints" / "step-0000002", ck)
    md = dcp.FileSystemReader(str(ck)).read_metadata()
    md.storage_meta = _Payload(marker)  # nested inside an otherwise genuine Metadata
    (ck / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(CheckpointError, match=r"\.metadata does not load as DCP metadata .*builtins\.exec"):
        load_checkpoint(ck)
    assert not marker.exists()
    dcp.FileSystemReader(str(ck)).read_metadata()  # torch's own reader: the payload is live
    assert marker.exists()


def test_a_pickle_planted_in_the_structure_or_state_pt_runs_nothing(tmp_path):
    from dopsd_fast.checkpoint import CheckpointError, load_checkpoint

    marker, blob = _live_payload(tmp_path)
    as_structure = tmp_path / "structure"  # the previous format's __meta__ holding the payload
    _dcp_save({"t00000": torch.ones(2), "__meta__": blob}, as_structure)
    as_entry = tmp_path / "entry"  # the DCP bytes entry itself a pickled object
    _dcp_save({"t00000": torch.ones(2), "__meta__": _Payload(marker)}, as_entry)
    state_pt = tmp_path / "legacy"
    state_pt.mkdir()
    torch.save({"step": 1, "weights": _Payload(marker)}, state_pt / "state.pt")
    for ck, msg in ((as_structure, r"__meta__, written by an earlier version\) does not load as plain data .*builtins\.exec"),
                    (as_entry, r"does not load \(UnpicklingError: it holds Python objects a checkpoint may not hold"),
                    (state_pt, r"state\.pt does not load as plain data \(UnpicklingError: it holds Python objects a "
                               r"checkpoint may not hold \((builtins\.)?exec\)")):
        with pytest.raises(CheckpointError, match=msg) as e:
            load_checkpoint(ck)
        assert not marker.exists(), ck
        assert "weights_only" not in str(e.value)  # never torch's advice to load it unsafely


def test_a_pickle_planted_in_a_toy_state_file_runs_nothing(tmp_path):
    from dopsd_fast.toy.stages import Loop

    marker, _ = _live_payload(tmp_path)
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    (tmp_path / "toy" / "stage").mkdir(parents=True)
    torch.save({"modules": {"net": _Payload(marker)}, "step": 1}, tmp_path / "toy" / "stage" / "state.pt")
    with pytest.raises(RuntimeError, match=r"state\.pt does not load as tensors and plain data .*delete it"):
        Loop(tmp_path / "toy", "stage", {"net": net}, opt, steps=4)
    assert not marker.exists()
    # a state file the loop wrote itself resumes
    (tmp_path / "toy" / "stage" / "state.pt").unlink()
    loop = Loop(tmp_path / "toy", "stage", {"net": net}, opt, steps=4)
    loop._t0 = 0.0
    loop.save(3)
    assert Loop(tmp_path / "toy", "stage", {"net": net}, opt, steps=4).start == 3


def test_checkpoints_of_the_previous_format_load_through_the_safe_path(trained, tmp_path):
    from dopsd_fast.checkpoint import load_checkpoint

    state = load_checkpoint(trained / "checkpoints" / "step-0000002")
    assert isinstance(state["rng"]["numpy"][1], np.ndarray)  # numpy's RNG array: what format 1 pickled
    run = tmp_path / "run"
    _write_format_1(state, run / "checkpoints" / "step-0000002")
    legacy = run / "checkpoints" / "step-0000002"
    assert _same(load_checkpoint(legacy), state)
    single = tmp_path / "single"
    single.mkdir()
    torch.save(state, single / "state.pt")  # the earliest versions' one file
    assert _same(load_checkpoint(single), state)
    tr = _trainer(tmp_path, "train.max_steps=3", resume="latest")
    assert tr.step == 2
    assert _same(tr.weights.state_dict()["student"], state["weights"]["student"])


# ---- 3. nothing outside the folder ---------------------------------------------------------------------
def _opened(monkeypatch):
    """Paths DCP opens for data, and files safetensors opens."""
    import safetensors
    from torch.distributed.checkpoint.filesystem import FileSystem

    seen = []
    real_stream, real_open = FileSystem.create_stream, safetensors.safe_open

    def stream(self, path, mode):
        seen.append(Path(path))
        return real_stream(self, path, mode)

    def safe_open(path, *a, **kw):
        seen.append(Path(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(FileSystem, "create_stream", stream)
    monkeypatch.setattr(safetensors, "safe_open", safe_open)
    return seen


def test_a_checkpoint_naming_a_file_outside_its_folder_is_refused_unread(trained, tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from dopsd_fast.checkpoint import CheckpointError, load_checkpoint

    ck = tmp_path / "ckpts" / "step-0000002"
    shutil.copytree(trained / "checkpoints" / "step-0000002", ck)
    outside = tmp_path / "outside.distcp"
    shutil.move(ck / "__0_0.distcp", outside)
    md = dcp.FileSystemReader(str(ck)).read_metadata()
    for info in md.storage_data.values():
        info.relative_path = "../../outside.distcp"
    (ck / ".metadata").write_bytes(pickle.dumps(md))
    # torch's own loader follows the name out of the folder and reads the file there
    flat = {k: torch.zeros(tuple(m.size), dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()
            if isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(flat, checkpoint_id=str(ck))
    assert any(t.abs().sum() > 0 for t in flat.values())
    seen = _opened(monkeypatch)
    with pytest.raises(CheckpointError, match=r"names a data file: '\.\./\.\./outside\.distcp' is not a file name"):
        load_checkpoint(ck)
    # the same file reached by a symlink in the folder
    for info in md.storage_data.values():
        info.relative_path = "__0_0.distcp"
    (ck / ".metadata").write_bytes(pickle.dumps(md))
    (ck / "__0_0.distcp").symlink_to(outside)
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp leads outside"):
        load_checkpoint(ck)
    assert seen == []


def test_a_cache_manifest_naming_a_shard_outside_the_cache_is_refused_unread(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from dopsd_fast.cache import CacheError, FeatureCache

    cache = tmp_path / "cache"
    cache.mkdir()
    save_file({"k.features": torch.ones(2, 3)}, str(cache / "shard-00000.safetensors"))
    manifest = {"version": 1, "identity": {"model": "x"}, "entries": {"k": ["shard-00000.safetensors", "k"]}}
    (cache / "manifest.json").write_text(json.dumps(manifest))
    assert torch.equal(FeatureCache(cache, {"model": "x"}).get("k").features, torch.ones(2, 3))  # the genuine one
    shutil.move(cache / "shard-00000.safetensors", tmp_path / "outside.safetensors")
    seen = _opened(monkeypatch)
    manifest["entries"]["k"][0] = "../outside.safetensors"
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=r"names shard '\.\./outside\.safetensors': .* is not a file name"):
        FeatureCache(cache, {"model": "x"})
    manifest["entries"]["k"][0] = "shard-00000.safetensors"
    (cache / "manifest.json").write_text(json.dumps(manifest))
    (cache / "shard-00000.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(CacheError, match=r"names shard 'shard-00000\.safetensors': .* leads outside"):
        FeatureCache(cache, {"model": "x"})
    assert seen == []


# ---- 4. upright photos -----------------------------------------------------------------------------------
def _exif_jpeg(stored: Image.Image, orientation: int) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def test_upright_size_is_the_decoded_size_for_every_orientation():
    from dopsd_fast.data.dataset import decode_image, upright_size

    for orientation in range(1, 9):
        im = Image.open(io.BytesIO(_exif_jpeg(Image.new("RGB", (48, 32), (90, 30, 200)), orientation)))
        h, w = decode_image(im).shape[:2]
        assert upright_size(im) == (w, h), orientation
        assert (w, h) == ((32, 48) if orientation >= 5 else (48, 32))


def test_an_exif_rotated_portrait_photo_lands_in_a_portrait_bucket_whole(tmp_path):
    from dopsd_fast.config import load_config
    from dopsd_fast.data import build_dataset
    from dopsd_fast.data.dataset import load_image

    # upright: 160 wide, 240 high; red top rows, blue bottom rows
    upright = np.full((240, 160, 3), (20, 160, 20), np.uint8)
    upright[:24], upright[-24:] = (220, 20, 20), (20, 20, 220)
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # 240 x 160 on the sensor
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "p.jpg").write_bytes(_exif_jpeg(stored, 6))  # orientation 6: shown rotated back upright
    (folder / "p.txt").write_text("a portrait")
    ds = build_dataset(load_config(None, [f"data.folder={folder}", "data.bucket_scale=0.125"]).data, progress=False)
    rec = ds.records[0]
    assert (rec.width, rec.height) == (160, 240) and rec.bucket == (96, 160)  # portrait, not (160, 96)
    img = load_image(rec.image_path, rec.bucket)  # (3, 160, 96): the whole height kept
    assert img.shape == (3, 160, 96)
    assert img[0, :8].mean() > 0.7 and img[2, :8].mean() < 0.3  # the red top survives
    assert img[2, -8:].mean() > 0.7 and img[0, -8:].mean() < 0.3  # the blue bottom survives


# ---- 5. dopsd-sample --lora ------------------------------------------------------------------------------
def _sample(lora, tmp_path):
    from dopsd_fast.cli import sample_main

    return sample_main(["--config", "tiny-zimage", "--prompt", "a cat", "--steps", "1", "--lora", str(lora),
                        "--out", str(tmp_path / "s.png")])


def test_sample_refuses_a_lora_folder_that_matches_no_module_of_the_model(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    save_file({"net.fc.weight": torch.ones(2, 2), "net.fc.bias": torch.ones(2)},
              str(foreign / "pytorch_lora_weights.safetensors"))
    with pytest.raises(SystemExit, match=r"error: --lora: .* holds no LoRA weights \(2 tensors: net\.fc\.bias, "
                                         r"net\.fc\.weight\)"):
        _sample(foreign, tmp_path)
    other = tmp_path / "other-model"
    other.mkdir()
    save_file({"transformer.double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(8, 32),
               "transformer.double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(96, 8)},
              str(other / "pytorch_lora_weights.safetensors"))
    with pytest.raises(SystemExit, match=r"error: --lora: .*: 1 of its 1 LoRA modules match no module of this model "
                                         r"\(double_blocks\.0\.img_attn\.qkv\)"):
        _sample(other, tmp_path)
    partly = tmp_path / "partly"  # this model's LoRA plus a module it lacks: refused, not loaded in part
    shutil.copytree(trained / "lora", partly)
    sd = load_file(str(partly / "pytorch_lora_weights.safetensors"))
    n = len({k.split(".lora_")[0] for k in sd})
    sd["transformer.nothere.lora_A.weight"], sd["transformer.nothere.lora_B.weight"] = torch.zeros(8, 32), torch.zeros(32, 8)
    save_file(sd, str(partly / "pytorch_lora_weights.safetensors"))
    with pytest.raises(SystemExit, match=rf"error: --lora: .*: 1 of its {n + 1} LoRA modules match no module of this "
                                         r"model \(nothere\)"):
        _sample(partly, tmp_path)
    damaged = tmp_path / "damaged"
    shutil.copytree(trained / "lora", damaged)
    sd = load_file(str(damaged / "pytorch_lora_weights.safetensors"))
    key = sorted(sd)[0]
    sd[key].view(-1)[0] = float("inf")
    save_file(sd, str(damaged / "pytorch_lora_weights.safetensors"))
    with pytest.raises(SystemExit, match=rf"error: --lora: .*: {key} holds 1 non-finite value"):
        _sample(damaged, tmp_path)
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "pytorch_lora_weights.safetensors").symlink_to(trained / "lora" / "pytorch_lora_weights.safetensors")
    with pytest.raises(SystemExit, match=r"error: --lora: .*pytorch_lora_weights\.safetensors leads outside"):
        _sample(linked, tmp_path)


def _edited_lora(trained, tmp_path, name, weights=None, meta=None):
    """``trained``'s LoRA folder with its tensors and / or its metadata edited, as a received file."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    folder = tmp_path / name
    shutil.copytree(trained / "lora", folder)
    path = folder / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), framework="pt") as f:
        md = dict(f.metadata())
    sd = load_file(str(path))
    if weights is not None:
        sd = weights(sd)
    if meta is not None:
        md["lora_adapter_metadata"] = json.dumps(meta(json.loads(md["lora_adapter_metadata"])))
    save_file(sd, str(path), metadata=md)
    return folder


def _first_a(sd):
    return sorted(k for k in sd if ".lora_A." in k)[0]


@pytest.mark.parametrize("weights, meta, match", [
    (lambda sd: {k: v for k, v in sd.items() if ".lora_A." in k}, None, r"module .* has only its lora_A factor"),
    (lambda sd: {k: (v * 100).to(torch.int32) for k, v in sd.items()}, None, r"factors are torch.int32"),
    (lambda sd: {**sd, "transformer.layers.0.attention.to_q.weight": torch.zeros(2, 2)}, None,
     r"holds 1 tensor\(s\) that are not LoRA factors \(transformer.layers.0.attention.to_q.weight\)"),
    (lambda sd: {**sd, _first_a(sd): sd[_first_a(sd)][:, :-1].contiguous()}, None,
     r"module .* has lora_A \(8, \d+\) and lora_B .*; this model's .* needs \(r, \d+\)"),
    (None, lambda m: {**m, "transformer.r": 4}, r"metadata: r=4 but its factors have rank 8"),
    (None, lambda m: {**m, "transformer.lora_alpha": 1e12}, r"lora_alpha=1e\+12 scales the LoRA by 1.25e\+11"),
    (None, lambda m: {**m, "transformer.use_dora": True}, r"sets use_dora=True: not a plain LoRA"),
    (None, lambda m: {**m, "transformer.lora_alpha": "x"}, r"lora_alpha='x' is not a positive number"),
    (None, lambda m: {**m, "transformer.rank_pattern": {".*": 0.5}}, r"rank_pattern gives rank 0.5, but its factors "
                                                                     r"have rank 8"),
    (None, lambda m: {**m, "transformer.rank_pattern": {"to_q": 1}}, r"rank_pattern gives rank 1, but its factors"),
    (None, lambda m: {**m, "transformer.target_modules": 5}, r"target_modules=5 is not a module name pattern"),
], ids=["only-A", "integer", "base-weight", "in-width", "rank", "alpha", "dora", "alpha-text", "rank-fraction",
        "rank-pattern", "targets"])
def test_sample_refuses_a_lora_file_of_the_wrong_kind_naming_it(trained, tmp_path, weights, meta, match):
    folder = _edited_lora(trained, tmp_path, "edited", weights, meta)
    with pytest.raises(SystemExit, match=r"error: --lora: .*" + match) as e:
        _sample(folder, tmp_path)
    assert len(str(e.value).splitlines()) == 1


def test_lora_metadata_cannot_change_the_base_weights_at_load(trained, tmp_path):
    """peft's PiSSA initialisation (named in a received file's metadata) would rewrite every adapted base
    weight at load; only the plain LoRA settings are honoured, so the base weights stay the same and the
    loaded LoRA is the file's."""
    from dopsd_fast.config import load_config
    from dopsd_fast.families import build_adapter
    from dopsd_fast.sample import load_lora_into

    folder = _edited_lora(trained, tmp_path, "pissa", meta=lambda m: {**m, "transformer.init_lora_weights": "pissa",
                                                                       "transformer.layers_to_transform": [0]})
    results = {}
    for name, lora in (("plain", trained / "lora"), ("pissa", folder)):
        tr = build_adapter(load_config("tiny-zimage").model).transformer
        base = {n: p.detach().clone() for n, p in tr.named_parameters()}
        load_lora_into(tr, str(lora))
        after = {n.replace(".base_layer", ""): p for n, p in tr.named_parameters() if "lora_" not in n}
        assert set(after) == set(base) and all(torch.equal(after[n], base[n]) for n in base), name
        results[name] = {n: p.detach() for n, p in tr.named_parameters() if "lora_" in n}
    assert results["plain"].keys() == results["pissa"].keys()
    assert all(torch.equal(results["plain"][n], results["pissa"][n]) for n in results["plain"])


def test_a_lora_without_the_transformer_prefix_loads_as_the_prefixed_one(trained, tmp_path):
    """peft's own state dict (other trainers save it: no ``transformer.`` prefix) was refused as "28 of its
    28 LoRA modules match no module of this model", naming modules the model has; it loads, the same LoRA."""
    from dopsd_fast.config import load_config
    from dopsd_fast.families import build_adapter
    from dopsd_fast.sample import load_lora_into

    bare = _edited_lora(trained, tmp_path, "bare", weights=lambda sd: {k.removeprefix("transformer."): v
                                                                        for k, v in sd.items()})
    loaded = {}
    for name, lora in (("prefixed", trained / "lora"), ("bare", bare)):
        tr = build_adapter(load_config("tiny-zimage").model).transformer
        load_lora_into(tr, str(lora))
        loaded[name] = {n: p.detach() for n, p in tr.named_parameters() if "lora_" in n}
    assert loaded["bare"] and loaded["bare"].keys() == loaded["prefixed"].keys()
    assert all(torch.equal(loaded["bare"][n], loaded["prefixed"][n]) for n in loaded["prefixed"])


def test_dopsd_sample_loads_a_lora_on_modules_with_a_dash(tmp_path):
    """A LoRA on a module whose path holds a ``-`` (Z-Image's ``all_final_layer.2-1``, ``all_x_embedder.2-1``),
    dopsd-train's own export included, was refused by ``--lora`` as "tensors that are not LoRA factors"; it
    loads, every module of the file adapted, and computes what the trained student computes."""
    from dopsd_fast.families import build_adapter
    from dopsd_fast.sample import _loaded_lora_modules, load_lora_into
    from dopsd_fast.trainer import Trainer

    tr = Trainer(tiny_config(tmp_path, "train.max_steps=1", "lora.targets=[to_q,linear]"))
    tr.train()
    with torch.no_grad():  # a visible LoRA effect (B is one step from zero)
        for n, p in tr.weights.named_trainable().items():
            if "lora_B" in n:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    tr.export_lora()
    fresh = build_adapter(tr.cfg.model)
    load_lora_into(fresh.transformer, str(tmp_path / "run" / "lora"))
    assert "all_final_layer.2-1.linear" in _loaded_lora_modules(fresh.transformer, "lora")
    x = torch.randn(1, *fresh.latent_shape(128, 128), generator=torch.Generator().manual_seed(1))
    ctx = fresh.encode_student(["a red circle"])
    with torch.no_grad():
        ours = tr.adapter.velocity(tr.weights.student(), x, torch.tensor([0.6]), ctx)
        loaded = fresh.velocity(fresh.transformer, x, torch.tensor([0.6]), ctx)
    torch.testing.assert_close(loaded, ours, rtol=1e-5, atol=1e-6)


def test_a_truncated_checkpoint_data_file_is_named_not_its_metadata(trained, tmp_path):
    from dopsd_fast.checkpoint import CheckpointError, load_checkpoint

    ck = tmp_path / "step-0000002"
    shutil.copytree(trained / "checkpoints" / "step-0000002", ck)
    data = sorted(ck.glob("*.distcp"))[0]
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match=rf"{data.name} is truncated or damaged \(\S+ ends at byte \d+, the file "
                                              rf"holds {size // 2}\); not loaded") as e:
        load_checkpoint(ck)
    assert ".metadata" not in str(e.value)


def _loaded_deltas(lora) -> tuple[dict, set]:
    """Each module's delta ``scale * B @ A`` and the scales of the LoRA at ``lora`` (a folder or a file) as
    ``dopsd-sample --lora`` loads it into the tiny Z-Image transformer."""
    from dopsd_fast.config import load_config
    from dopsd_fast.families import build_adapter
    from dopsd_fast.sample import load_lora_into

    tr = build_adapter(load_config("tiny-zimage").model).transformer
    load_lora_into(tr, str(lora))
    deltas = {n: m.scaling["lora"] * (m.lora_B["lora"].weight @ m.lora_A["lora"].weight)
              for n, m in tr.named_modules() if hasattr(m, "lora_A") and "lora" in m.lora_A}
    return deltas, {m.scaling["lora"] for m in tr.modules() if hasattr(m, "scaling") and "lora" in m.scaling}


def _assert_same_deltas(got: dict, want: dict) -> None:
    assert want and got.keys() == want.keys()
    for n, d in want.items():
        assert d.abs().max() > 0, n
        torch.testing.assert_close(got[n], d, rtol=1e-5, atol=1e-7, msg=n)


def test_the_comfyui_export_renamed_to_the_diffusers_name_loads_as_the_same_lora(trained, tmp_path):
    """dopsd-train's comfyui_lora.safetensors (per-module ``.alpha``) copied to pytorch_lora_weights.safetensors
    was refused as "28 of its 28 LoRA modules match no module of this model" (diffusers prefixed it twice);
    it loads, and each module's delta ``scale * B @ A`` is the native file's."""
    comfy = _comfy_at_alpha(trained, tmp_path / "comfy", 16.0)
    deltas, scales = {}, {}
    for name, lora in (("native", trained / "lora"), ("comfy", comfy)):
        deltas[name], scales[name] = _loaded_deltas(lora)
    # the comfy file's alpha / rank matters (2 here, its lora_B halved): diffusers folds it into the factors
    # (their scaling 1), so equal deltas below need the fold; the native file holds it in lora_B (scaling 1)
    assert scales["native"] == {1.0} and scales["comfy"] == {1.0}, scales
    _assert_same_deltas(deltas["comfy"], deltas["native"])


def _comfy_at_alpha(trained, folder, alpha: float):
    """dopsd-train's LoRA as a kohya / ComfyUI-style file under the diffusers name: ``lora_B`` divided by
    alpha / rank (the export holds that factor in it) and a ``<module>.alpha`` tensor of ``alpha`` per module,
    the same deltas; no metadata."""
    from safetensors.torch import load_file, save_file

    folder.mkdir()
    sd = load_file(str(trained / "lora" / "comfyui_lora.safetensors"))
    rank = next(v.shape[0] for k, v in sd.items() if ".lora_A." in k)
    save_file({k: (torch.tensor(alpha) if k.endswith(".alpha") else v * (rank / alpha) if ".lora_B." in k else v)
               for k, v in sd.items()}, str(folder / "pytorch_lora_weights.safetensors"))
    return folder


def _comfy_with_alpha(trained, tmp_path, name, alpha):
    """dopsd-train's comfyui_lora.safetensors (kohya / ComfyUI style: a ``<module>.alpha`` tensor per module)
    under the diffusers name, each alpha set to ``alpha`` (a tensor, or a number)."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / name
    folder.mkdir()
    sd = load_file(str(trained / "lora" / "comfyui_lora.safetensors"))
    value = alpha if isinstance(alpha, torch.Tensor) else torch.tensor(float(alpha))
    save_file({k: (value.clone() if k.endswith(".alpha") else v) for k, v in sd.items()},
              str(folder / "pytorch_lora_weights.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("alpha, match", [
    (-16.0, r"\.alpha = -16 is not a positive number"),
    (0.0, r"\.alpha = 0 is not a positive number"),
    (float("nan"), r"\.alpha = nan is not a positive number"),
    (float("inf"), r"\.alpha = inf is not a positive number"),
    (8000.0, r"\.alpha = 8000 scales the LoRA by 1e\+03 \(alpha / r, r = 8\), over the limit 256"),
    (torch.ones(2), r"\.alpha has shape \(2,\), not one number"),
], ids=["negative", "zero", "nan", "inf", "over-the-limit", "not-one-number"])
def test_sample_refuses_lora_alpha_tensors_before_diffusers_reads_them(trained, tmp_path, monkeypatch, alpha, match):
    """A kohya / ComfyUI-style file's ``<module>.alpha`` tensors are folded into the factors by diffusers'
    lora_state_dict: a negative one looped it forever (100 % CPU, no output), and alpha / rank 1000 loaded
    a 500x LoRA silently (the metadata's lora_alpha has a limit, this route had none). Refused in one line
    naming the file and tensor, before diffusers reads the file."""
    from diffusers import ZImagePipeline

    folder = _comfy_with_alpha(trained, tmp_path, "alpha", alpha)

    def read(*a, **k):
        raise AssertionError("diffusers read the file before its .alpha tensors were checked")

    monkeypatch.setattr(ZImagePipeline, "lora_state_dict", read)
    with pytest.raises(SystemExit, match=r"error: --lora: .*pytorch_lora_weights\.safetensors: transformer\.\S+"
                                         + match) as e:
        _sample(folder, tmp_path)
    assert len(str(e.value).splitlines()) == 1


def test_sample_refuses_lora_alpha_tensors_beside_a_metadata_alpha(trained, tmp_path):
    """A file with per-module ``.alpha`` tensors (kohya / ComfyUI) and diffusers' metadata ``lora_alpha`` (the
    diffusers export with ``.alpha`` tensors added, its metadata kept) loaded at (alpha / r)^2: diffusers
    folded the tensors into the factors, then peft scaled them by the metadata's alpha again (scale 4 for a
    LoRA of alpha / r = 2, where ComfyUI applies 2). Refused in one line naming the file and both."""
    import json

    from safetensors.torch import load_file, save_file

    from safetensors import safe_open

    folder = _comfy_at_alpha(trained, tmp_path / "both", 16.0)
    with safe_open(str(trained / "lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        native = json.loads(f.metadata()["lora_adapter_metadata"])  # r 8, lora_alpha 8 (alpha / r in lora_B)
    meta = json.dumps({**native, "transformer.lora_alpha": 16.0})  # the training's alpha, beside the tensors'
    target = folder / "pytorch_lora_weights.safetensors"
    comfy = load_file(str(target))
    save_file(comfy, str(target), metadata={"format": "pt", "lora_adapter_metadata": meta})
    with pytest.raises(SystemExit, match=r"error: --lora: .*pytorch_lora_weights\.safetensors holds per-module \.alpha "
                                         r"tensors \(transformer\.\S+\.alpha = 16\) and lora_adapter_metadata with "
                                         r"lora_alpha=16\.0, r=8: two strengths") as e:
        _sample(folder, tmp_path)
    assert len(str(e.value).splitlines()) == 1
    # metadata at alpha = r (scale 1) beside the tensors is one strength: it loads, each delta the native file's
    meta = json.dumps({**native, "transformer.lora_alpha": 8.0})
    save_file(comfy, str(target), metadata={"format": "pt", "lora_adapter_metadata": meta})
    _assert_same_deltas(_loaded_deltas(folder)[0], _loaded_deltas(trained / "lora")[0])


def test_lora_alpha_tensors_within_the_limit_load(trained, tmp_path):
    """A file's alpha / rank up to the limit loads (dopsd-train's own export: alpha 16, rank 8)."""
    from dopsd_fast.config import load_config
    from dopsd_fast.families import build_adapter
    from dopsd_fast.sample import load_lora_into

    folder = _comfy_with_alpha(trained, tmp_path, "at-limit", 256 * 8)
    load_lora_into(build_adapter(load_config("tiny-zimage").model).transformer, str(folder))


def test_sample_lora_takes_a_file_and_hints_a_run_folder_and_a_folder_of_other_names(trained, tmp_path):
    """``--lora`` took a folder holding pytorch_lora_weights.safetensors alone: given a file it said "give its
    folder", and that folder then "has no pytorch_lora_weights.safetensors" (a downloaded LoRA has its own
    name: a circle). A .safetensors file is taken as the LoRA; a folder without that name names the
    .safetensors files it holds; a run's folder points at its lora/."""
    from safetensors.torch import load_file

    mine = tmp_path / "ext" / "my_style_lora.safetensors"
    mine.parent.mkdir()
    shutil.copy(trained / "lora" / "pytorch_lora_weights.safetensors", mine)
    assert _sample(mine, tmp_path) == 0
    assert _sample(trained / "lora" / "comfyui_lora.safetensors", tmp_path) == 0  # the ComfyUI copy, as it is
    with pytest.raises(SystemExit, match=rf"has no pytorch_lora_weights\.safetensors \(it holds my_style_lora"
                                         rf"\.safetensors: --lora {re.escape(str(mine))}\)$"):
        _sample(mine.parent, tmp_path)
    with pytest.raises(SystemExit, match=rf"has no pytorch_lora_weights\.safetensors \(a run's folder: its LoRA is "
                                         rf"--lora {re.escape(str(trained / 'lora'))}\)$"):
        _sample(trained, tmp_path)
    other = tmp_path / "ext" / "notes.txt"
    other.write_text("x")
    with pytest.raises(SystemExit, match=r"notes\.txt is not a \.safetensors file"):
        _sample(other, tmp_path)
    assert load_file(str(mine)).keys() == load_file(str(trained / "lora" / "pytorch_lora_weights.safetensors")).keys()


def test_a_lora_without_its_metadata_is_said_to_load_at_alpha_equal_rank(trained, tmp_path, caplog):
    """Without ``lora_adapter_metadata`` diffusers loads a LoRA at alpha = rank: dopsd-train's own export
    (alpha 16, rank 8) sampled at half its strength without a word. A warning says so (not for the file
    with its metadata, nor for a ComfyUI-style file, whose .alpha tensors give the strength)."""
    from safetensors.torch import load_file, save_file

    from dopsd_fast.config import load_config
    from dopsd_fast.families import build_adapter
    from dopsd_fast.sample import load_lora_into

    bare = tmp_path / "no-metadata"
    bare.mkdir()
    save_file(load_file(str(trained / "lora" / "pytorch_lora_weights.safetensors")),
              str(bare / "pytorch_lora_weights.safetensors"), metadata={"format": "pt"})
    comfy = tmp_path / "comfy"
    comfy.mkdir()
    shutil.copy(trained / "lora" / "comfyui_lora.safetensors", comfy / "pytorch_lora_weights.safetensors")
    said = {}
    for name, lora in (("native", trained / "lora"), ("bare", bare), ("comfy", comfy)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
            load_lora_into(build_adapter(load_config("tiny-zimage").model).transformer, str(lora))
        said[name] = [r.getMessage() for r in caplog.records if "lora_adapter_metadata" in r.getMessage()]
    assert not said["native"] and not said["comfy"], said
    assert len(said["bare"]) == 1 and "its strength is taken as alpha = rank" in said["bare"][0], said
    assert "\n" not in said["bare"][0]


def test_a_lora_for_another_model_hints_the_runs_config_when_none_was_given(trained, tmp_path):
    """A LoRA sampled without ``--config`` is read with the default recipe's model: "a LoRA for another
    model?" did not say so. It names the default and the run's own config.yaml beside the LoRA folder
    (or, without one, asks for the run's --config); with --config given, nothing is added."""
    from dopsd_fast.cli import DEFAULT_RECIPE, sample_main

    common = ["--prompt", "a cat", "--steps", "1", "--out", str(tmp_path / "s.png")]
    run_cfg = os.path.normpath(os.path.join(str(trained / "lora"), "..", "config.yaml"))
    assert Path(run_cfg).is_file()
    with pytest.raises(SystemExit, match=rf"\(a LoRA for another model\?\); it was read with the default config "
                                         rf"\({DEFAULT_RECIPE}\): give the run's own, --config {re.escape(run_cfg)}$"):
        sample_main(["--lora", str(trained / "lora"), *common])
    alone = tmp_path / "alone" / "lora"
    shutil.copytree(trained / "lora", alone)
    with pytest.raises(SystemExit, match=rf"\(a LoRA for another model\?\); it was read with the default config "
                                         rf"\({DEFAULT_RECIPE}\): give the --config of the run that trained it$"):
        sample_main(["--lora", str(alone), *common])
    with pytest.raises(SystemExit, match=r"\(a LoRA for another model\?\)$"):
        sample_main(["--config", DEFAULT_RECIPE, "--lora", str(alone), *common])


def test_dopsd_sample_reads_klein_loras_of_other_trainers_layouts(tmp_path):
    """dopsd-sample --lora read every family's file with Z-Image's converter: a FLUX.2-klein LoRA in the BFL /
    ai-toolkit layout (diffusion_model.double_blocks.N.img_attn.proj, single_blocks.N.linear1, the layout of
    most klein LoRAs), which Flux2KleinPipeline loads, was refused as 'a LoRA for another model?'. It is read
    with the family's own converter; a diffusers-named file with per-module .alpha tensors (a ComfyUI copy)
    still loads, its alpha / rank applied."""
    from safetensors.torch import save_file

    from dopsd_fast.config import load_config
    from dopsd_fast.families import build_adapter
    from dopsd_fast.sample import load_lora_into

    model = load_config("tiny-klein").model
    ad = build_adapter(model)
    x = torch.randn(1, *ad.latent_shape(128, 128), generator=torch.Generator().manual_seed(1))
    ctx = ad.encode_student(["a red circle"])
    sigma = torch.tensor([0.6])
    mods = dict(ad.transformer.named_modules())
    g = torch.Generator().manual_seed(3)
    targets = {"single_transformer_blocks.0.attn.to_qkv_mlp_proj": "single_blocks.0.linear1",
               "single_transformer_blocks.0.attn.to_out": "single_blocks.0.linear2",
               "transformer_blocks.0.attn.to_out.0": "double_blocks.0.img_attn.proj"}
    factors = {n: (torch.randn(4, mods[n].in_features, generator=g) * 0.3,
                   torch.randn(mods[n].out_features, 4, generator=g) * 0.2) for n in targets}
    with torch.no_grad():
        base = ad.velocity(ad.transformer, x, sigma, ctx)
        for n, (a, b) in factors.items():
            mods[n].weight += b @ a
        want = ad.velocity(ad.transformer, x, sigma, ctx)
    files = {
        "bfl": {f"diffusion_model.{bfl}.lora_{w}.weight": t for n, bfl in targets.items()
                for w, t in zip("AB", factors[n])},
        "comfy": {**{f"transformer.{n}.lora_{w}.weight": (t / 2 if w == "B" else t) for n in targets
                     for w, t in zip("AB", factors[n])}, **{f"transformer.{n}.alpha": torch.tensor(8.0) for n in targets}},
    }
    for name, sd in files.items():
        folder = tmp_path / name
        folder.mkdir()
        save_file(sd, str(folder / "pytorch_lora_weights.safetensors"))
        fresh = build_adapter(model)
        load_lora_into(fresh.transformer, str(folder))
        with torch.no_grad():
            got = fresh.velocity(fresh.transformer, x, sigma, ctx)
        assert (want - base).abs().max() > 1e-3
        torch.testing.assert_close(got - base, want - base, rtol=1e-4, atol=1e-5, msg=name)


def test_a_lora_whose_metadata_has_a_rank_and_no_alpha_loads_at_alpha_equal_rank_said(trained, tmp_path, caplog):
    """Metadata with ``r`` and no ``lora_alpha`` loaded at peft's default alpha 8 (scale 8 / r: 1 at rank 8, 2 at
    rank 4, 1/8 at rank 64) without a word, where a file without metadata is said to load at alpha = rank. It
    loads at alpha = rank too, with the same warning."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from dopsd_fast.config import load_config
    from dopsd_fast.families import build_adapter
    from dopsd_fast.sample import load_lora_into

    src = trained / "lora" / "pytorch_lora_weights.safetensors"
    with safe_open(str(src), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    meta.pop("transformer.lora_alpha")
    sd = load_file(str(src))
    rank = next(t.shape[0] for k, t in sd.items() if ".lora_A." in k)
    folder = tmp_path / "no-alpha"
    folder.mkdir()
    save_file({k: (t[: rank // 2] if ".lora_A." in k else t[:, : rank // 2] if ".lora_B." in k else t).contiguous()
               for k, t in sd.items()}, str(folder / "pytorch_lora_weights.safetensors"),
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps({**meta, "transformer.r": rank // 2})})
    tr = build_adapter(load_config("tiny-zimage").model).transformer
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        load_lora_into(tr, str(folder))
    assert f"its metadata gives r={rank // 2} and no lora_alpha: its strength is taken as alpha = rank" in caplog.text
    assert {m.scaling["lora"] for m in tr.modules() if hasattr(m, "scaling") and "lora" in m.scaling} == {1.0}


def test_dopsd_sample_takes_a_linked_lora_file_and_a_kohya_file_at_its_alpha(trained, tmp_path):
    """A LoRA file given by its path is taken where it leads (Hugging Face's cache links
    snapshots/<rev>/x.safetensors to ../../blobs/<sha>: refused as leading outside its folder), and a kohya
    file (lora_down / lora_up with .alpha) is folded by the family's converter, not taken for .alpha tensors
    beside lora_A / lora_B (its strength would have been 1, not alpha / rank)."""
    from safetensors.torch import load_file, save_file

    native = load_file(str(trained / "lora" / "pytorch_lora_weights.safetensors"))
    blob = tmp_path / "hub" / "blobs" / "0123abcd"
    blob.parent.mkdir(parents=True)
    shutil.copy(trained / "lora" / "pytorch_lora_weights.safetensors", blob)
    link = tmp_path / "hub" / "snapshots" / "rev" / "style.safetensors"
    link.parent.mkdir(parents=True)
    link.symlink_to("../../blobs/0123abcd")
    assert _sample(link, tmp_path) == 0
    kohya = {}
    for k, t in native.items():
        module = k.removeprefix("transformer.").rsplit(".lora_", 1)[0]
        name = "lora_unet_" + module.replace(".", "_")
        if ".lora_A." in k:
            kohya[f"{name}.lora_down.weight"] = t
            kohya[f"{name}.alpha"] = torch.tensor(2.0 * t.shape[0])
        else:
            kohya[f"{name}.lora_up.weight"] = t / 2  # alpha / rank = 2: the same delta
    folder = tmp_path / "kohya"
    folder.mkdir()
    save_file(kohya, str(folder / "pytorch_lora_weights.safetensors"))
    _assert_same_deltas(_loaded_deltas(folder)[0], _loaded_deltas(trained / "lora")[0])
