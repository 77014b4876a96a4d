"""Resumable checkpoints in ``torch.distributed.checkpoint`` (DCP) format, written atomically (temp
directory renamed when complete), the last N kept.

A checkpoint is a DCP directory: every tensor of the trainer's state under a flat key (``t00000``,
...), the rest of the state (structure, step, sampler, RNG, config) as JSON in one uint8 tensor
(``__state_json__``, rank 0's), and each rank's CRC-32 of every tensor chunk it wrote
(``__crc32_rank<r>__``, JSON). Every rank calls :func:`save_checkpoint` (DCP writes each replicated
tensor once); :func:`load_checkpoint` reads it in any process count (N ranks -> M), allocating from the
checkpoint's own metadata.

A checkpoint directory may come from someone else, so loading runs no code from it and reads nothing
outside it: DCP's ``.metadata`` (a pickle) goes through an unpickler that admits only DCP's own
metadata classes and plain types; every file it names must be a file in the directory; tensors are
read with ``torch.load(weights_only=True)``; then every chunk's checksum is verified (bytes damaged on
disk or in transit) and every floating-point tensor checked finite. Checkpoints of earlier versions
(the structure a pickled ``__meta__``, or a single ``state.pt``) load through restricted unpicklers too
(they hold tensor references and numpy's RNG arrays only) and carry no checksums.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch

from dopsd_fast.errors import load_error
from dopsd_fast.safety import file_in_folder
import warnings
from dopsd_fast.fsdp import is_dtensor

log = logging.getLogger("dopsd_fast")

_STEP_RE = re.compile(r"^step-(\d+)$")
FORMAT = 2  # 2: JSON structure + per-chunk CRC-32; 1 (earlier): pickled ``__meta__``
_STATE_KEY = "__state_json__"
_CRC_RE = re.compile(r"^__crc32_rank(\d+)__$")
_LEGACY_KEY = "__meta__"
RUN_ID_FILE = "run_id"  # the run a checkpoint belongs to (plain text; pruning reads it)
_RUN_ID_RE = re.compile(r"^[0-9a-f]{8,64}$")


class CheckpointError(RuntimeError):
    """A checkpoint that does not load: damaged, or holding something a checkpoint may not hold."""

def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # one state per GPU the saving process saw: a process that sees fewer (a run resumed on a smaller
        # machine) sets those it has (torch's set_rng_state_all raised at the first missing device)
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def _complete(p: Path) -> bool:
    return (p / ".metadata").is_file() or (p / "state.pt").is_file()


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and _complete(p):
            out.append((int(m.group(1)), p))
    return sorted(out)


def incomplete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """``step-*`` entries of ``root`` that are not complete checkpoints (no ``.metadata`` nor
    ``state.pt``: a folder emptied or left half-copied), by step: what ``--resume latest`` names as
    skipped."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir()
                  if (m := _STEP_RE.match(p.name)) and not (p.is_dir() and _complete(p)))


# ---- the structure as JSON -------------------------------------------------------------------------
# Tagged JSON: a tensor is {"$tensor": i} (key t0000i); a numpy array {"$ndarray": i, "dtype", "shape"}
# (its raw bytes as a uint8 tensor); a tuple {"$tuple": [...]}; a dict with a non-string key, or a key
# starting with "$", {"$dict": [[key, value], ...]}. Anything else is refused when writing.
def _encode(obj, tensors: list, where: str):
    if torch.is_tensor(obj):
        tensors.append(obj.detach())
        return {"$tensor": len(tensors) - 1}
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError(f"checkpoint state {where}: a numpy array of Python objects cannot be stored as data")
        tensors.append(torch.from_numpy(np.ascontiguousarray(obj).reshape(-1).view(np.uint8).copy()))
        return {"$ndarray": len(tensors) - 1, "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        return {"$dict": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"$tuple": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(f"checkpoint state {where}: a {type(obj).__name__} cannot be stored as plain data")


def _decode(obj, flat: dict, where: str, path: Path):
    if isinstance(obj, list):
        return [_decode(v, flat, f"{where}[{i}]", path) for i, v in enumerate(obj)]
    if not isinstance(obj, dict):
        return obj
    if "$tensor" in obj:
        return _checked(_tensor_ref(flat, obj["$tensor"], where, path), where, path)
    if "$ndarray" in obj:
        return _ndarray(_tensor_ref(flat, obj["$ndarray"], where, path), obj.get("dtype"), obj.get("shape"), where,
                        path)
    if "$tuple" in obj:
        return tuple(_decode(obj["$tuple"], flat, where, path))
    if "$dict" in obj:
        items = obj["$dict"]
        if not isinstance(items, list) or not all(isinstance(kv, list) and len(kv) == 2 for kv in items):
            raise CheckpointError(f"checkpoint {path}: the structure at {where} is malformed")
        out = {}
        for k, v in items:
            k = _decode(k, flat, where, path)
            out[k] = _decode(v, flat, f"{where}.{k}", path)
        return out
    return {k: _decode(v, flat, f"{where}.{k}", path) for k, v in obj.items()}


def _tensor_ref(flat: dict, index, where: str, path: Path) -> torch.Tensor:
    key = f"t{index:05d}" if isinstance(index, int) and not isinstance(index, bool) and index >= 0 else None
    if key not in flat:
        raise CheckpointError(f"checkpoint {path}: the structure at {where} names tensor {index!r}, which it does "
                              "not hold")
    return flat[key]


def _ndarray(t: torch.Tensor, dtype, shape, where: str, path: Path) -> np.ndarray:
    try:
        dt = np.dtype(dtype) if isinstance(dtype, str) else None
    except Exception:  # noqa: BLE001 - numpy raises several types for a malformed dtype string
        dt = None
    if dt is None or dt.hasobject or not isinstance(shape, list) or not all(isinstance(n, int) for n in shape):
        raise CheckpointError(f"checkpoint {path}: the array at {where} has no plain dtype and shape")
    try:
        return np.frombuffer(t.numpy().tobytes(), dtype=dt).reshape(shape).copy()
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: the array at {where} does not fit its bytes ({e})") from None


def _checked(t: torch.Tensor, where: str, path: Path) -> torch.Tensor:
    """Loaded weights and optimizer moments must be finite: a non-finite value is damage, never state
    to train on (the guard stops a run before it can write one)."""
    if t.is_meta:  # load_checkpoint(tensors=False): not read
        return t
    if (t.is_floating_point() or t.is_complex()) and t.numel() and not bool(torch.isfinite(t).all()):
        n = int((~torch.isfinite(t)).sum())
        raise CheckpointError(f"checkpoint {path}: {where} holds {n} non-finite value(s) (damaged)")
    return t


# ---- checksums -----------------------------------------------------------------------------------------
def _crc(t: torch.Tensor) -> int:
    t = t.detach().cpu().contiguous()
    return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy())


def _local_chunks(t) -> list[tuple[list, list, torch.Tensor]]:
    """(global offsets, sizes, data) of what this rank holds of ``t`` (as DCP writes it)."""

    if is_dtensor(t):
        (chunk,) = t.__create_chunk_list__()
        return [(list(chunk.offsets), list(chunk.sizes), t.to_local())]
    return [([0] * t.dim(), list(t.shape), t)]


def _json_tensor(obj) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)


def _json_of(t: torch.Tensor):
    return json.loads(t.numpy().tobytes().decode())


def _verify(flat: dict, md, path: Path) -> None:
    """Every chunk DCP read matches a CRC-32 one of the writing ranks recorded for it."""
    recorded: dict = {}
    for key in [k for k in flat if _CRC_RE.match(k)]:
        try:
            rows = _json_of(flat.pop(key))
            for name, offsets, sizes, crc in rows:
                recorded.setdefault((name, tuple(offsets)), set()).add((tuple(sizes), crc))
        except (ValueError, TypeError, UnicodeDecodeError, RecursionError) as e:
            raise CheckpointError(f"checkpoint {path}: its checksum record {key} is damaged "
                                  f"({'nested too deeply to read' if isinstance(e, RecursionError) else e})") from None
    if not recorded:
        raise CheckpointError(f"checkpoint {path}: no checksum record (__crc32_rank*__); damaged")
    bad = []
    for key, t in flat.items():
        for chunk in md.state_dict_metadata[key].chunks:
            part = t[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))]
            if (tuple(chunk.sizes), _crc(part)) not in recorded.get((key, tuple(chunk.offsets)), ()):
                bad.append(key)
                break
    if bad:
        raise CheckpointError(f"checkpoint {path}: checksum mismatch in {len(bad)} tensor(s) ({', '.join(bad[:4])}): "
                              "damaged bytes")


# ---- DCP's .metadata, read as untrusted ------------------------------------------------------------------
_DCP_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata", "BytesStorageMetadata",
        "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")} | {
    (m, n) for m in ("pathlib", "pathlib._local") for n in ("Path", "PosixPath", "WindowsPath", "PurePath",
                                                              "PurePosixPath", "PureWindowsPath")}


_TORCH_DTYPES = {n: v for n, v in vars(torch).items() if isinstance(v, torch.dtype)}


class _DcpMetadataUnpickler(pickle.Unpickler):
    """DCP's metadata classes (plain dataclasses), torch dtypes and sizes, paths (a name, never opened);
    any other global (a function to call, a class with a reducer) is refused before anything runs."""

    def find_class(self, module, name):
        if (module, name) in _DCP_METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and name in _TORCH_DTYPES:
            return _TORCH_DTYPES[name]
        raise pickle.UnpicklingError(f"{module}.{name} is not DCP metadata")


def _size(v, n=None) -> bool:
    return (isinstance(v, torch.Size) and all(isinstance(x, int) and x >= 0 for x in v)
            and (n is None or len(v) == n))


def read_metadata(path: Path):
    """DCP's ``.metadata`` of checkpoint ``path``, unpickled with only DCP's own classes admitted and
    checked: well-formed chunks, and every file it names a file in ``path``."""
    try:
        with open(file_in_folder(path, ".metadata"), "rb") as f:
            md = _DcpMetadataUnpickler(f).load()
    except (ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a refused global, or torn bytes
        raise CheckpointError(f"checkpoint {path}: .metadata does not load as DCP metadata ({type(e).__name__}: "
                              f"{str(e)[:200]}); not loaded") from None

    try:
        _check_metadata(md, path)
    except (AttributeError, TypeError) as e:  # a field of the wrong type
        raise CheckpointError(f"checkpoint {path}: .metadata is malformed ({type(e).__name__}: {e}); not loaded") \
            from None
    return md


def _check_metadata(md, path: Path) -> None:
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, Metadata, MetadataIndex,
                                                       TensorStorageMetadata)

    def bad(what):
        return CheckpointError(f"checkpoint {path}: .metadata is malformed ({what}); not loaded")

    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise bad("not a DCP Metadata")
    want = 0
    for key, m in md.state_dict_metadata.items():
        if not isinstance(key, str) or not isinstance(m, (TensorStorageMetadata, BytesStorageMetadata)):
            raise bad(f"entry {key!r}")
        if isinstance(m, TensorStorageMetadata):
            if not _size(m.size) or not isinstance(m.properties.dtype, torch.dtype) or not isinstance(m.chunks, list):
                raise bad(f"tensor {key}")
            covered = 0
            for c in m.chunks:
                if not (_size(c.offsets, len(m.size)) and _size(c.sizes, len(m.size))
                        and all(o + s <= n for o, s, n in zip(c.offsets, c.sizes, m.size))):
                    raise bad(f"a chunk of tensor {key}")
                covered += c.sizes.numel()
            if covered != m.size.numel():  # chunks tile the tensor: no part left unread
                raise bad(f"tensor {key}'s chunks do not cover it")
            want += m.size.numel() * m.properties.dtype.itemsize
    if not isinstance(md.storage_data, dict):
        raise bad("storage_data")
    sizes: dict = {}
    for index, info in md.storage_data.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise bad("storage_data entry")
        if info.relative_path not in sizes:
            try:
                sizes[info.relative_path] = file_in_folder(path, info.relative_path).stat().st_size
            except (ValueError, OSError) as e:
                raise CheckpointError(f"checkpoint {path}: .metadata names a data file: {e}; not loaded") from None
        if not (isinstance(info.offset, int) and isinstance(info.length, int) and info.offset >= 0
                and info.length >= 0):
            raise bad(f"the extent of {index.fqn} in {info.relative_path}")
        if info.offset + info.length > sizes[info.relative_path]:  # the data file is shorter than written
            raise CheckpointError(f"checkpoint {path}: {info.relative_path} is truncated or damaged ({index.fqn} ends "
                                  f"at byte {info.offset + info.length}, the file holds "
                                  f"{sizes[info.relative_path]}); not loaded")
        if info.transform_descriptors:  # compression and the like: never written here
            raise bad(f"{index.fqn} names stream transforms {info.transform_descriptors}")
    if want > sum(sizes.values()):  # a size claim beyond the bytes present: refused before allocating
        raise bad(f"its tensors claim {want} bytes, its files hold {sum(sizes.values())}")


def _dcp_load(flat: dict, path: Path, md) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):  # the checked metadata, not DCP's own pickle.load
            if md.storage_meta is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):  # DCP's own reads these with weights_only=False
            self.original_state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(flat, storage_reader=Reader(str(path)),
                     planner=Planner(flatten_state_dict=False, flatten_sharded_tensors=False))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - CheckpointException is a BaseException
        c = _cause(e)
        if isinstance(c, KeyboardInterrupt):  # a Ctrl-C while loading, wrapped by DCP: a stop, not damage
            raise c from None
        raise CheckpointError(f"checkpoint {path} does not load ({load_error(c)})") from None


# ---- checkpoints of earlier versions -------------------------------------------------------------------
class _Ref(int):
    """A tensor's place in the flat DCP dict, in the pickled structure of a format-1 checkpoint."""

def _numpy_globals() -> dict:
    reconstruct = np.ndarray((0,)).__reduce__()[0]
    return {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
            ("numpy.core.multiarray", "_reconstruct"): reconstruct}


class _LegacyStructureUnpickler(pickle.Unpickler):
    """A format-1 structure: plain containers, tensor references and numpy arrays (the RNG state)."""

    def find_class(self, module, name):
        allowed = {("dopsd_fast.checkpoint", "_Ref"): _Ref, **_numpy_globals()}
        if (module, name) in allowed:
            return allowed[(module, name)]
        raise pickle.UnpicklingError(f"{module}.{name} is not plain checkpoint data")


def _legacy_join(obj, flat: dict, where: str, path: Path):
    if torch.is_tensor(obj):  # state.pt holds its tensors in place
        return _checked(obj, where, path)
    if isinstance(obj, _Ref):
        return _checked(_tensor_ref(flat, int(obj), where, path), where, path)
    if isinstance(obj, dict):
        return {k: _legacy_join(v, flat, f"{where}.{k}", path) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_legacy_join(v, flat, f"{where}[{i}]", path) for i, v in enumerate(obj))
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        raise CheckpointError(f"checkpoint {path}: {where} is an array of Python objects; not loaded")
    return obj


def _load_legacy_dcp(flat: dict, path: Path) -> dict:
    blob = flat.pop(_LEGACY_KEY)
    try:
        structure = _LegacyStructureUnpickler(io.BytesIO(blob)).load() if isinstance(blob, bytes) else None
    except Exception as e:  # noqa: BLE001 - a refused global, or torn bytes
        raise CheckpointError(f"checkpoint {path}: its structure (__meta__, written by an earlier version) does not "
                              f"load as plain data ({type(e).__name__}: {str(e)[:200]}); not loaded") from None
    if not isinstance(structure, dict):
        raise CheckpointError(f"checkpoint {path}: its structure (__meta__) is not a state dict; not loaded")
    log.info("checkpoint %s predates checksums (written by an earlier version): loaded without a checksum check", path)
    return _legacy_join(structure, flat, "state", path)


def _load_state_pt(path: Path) -> dict:
    """The single-file checkpoint of the earliest versions, through ``torch.load(weights_only=True)``
    (numpy's RNG arrays admitted)."""
    try:
        f = file_in_folder(path, "state.pt")
        with torch.serialization.safe_globals(list({v for v in _numpy_globals().values()}
                                                   | {type(np.dtype(np.uint32))})):
            state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a refused global, a path outside, or torn bytes
        raise CheckpointError(f"checkpoint {path}/state.pt does not load as plain data ({load_error(e)}); "
                              "not loaded") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}/state.pt is not a state dict; not loaded")
    return _legacy_join(state, {}, "state", path)


# ---- writing and reading -------------------------------------------------------------------------------
def _cause(e: BaseException) -> BaseException:
    """The first rank's underlying error of a DCP ``CheckpointException`` (a BaseException), else ``e``."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) else first
    return e


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _barrier():
    d = _dist()
    if d is not None:
        d.barrier()


def _free_name(p: Path, what: str) -> Path:
    n = 1
    while p.with_name(f"{p.name}.{what}-{n}").exists():
        n += 1
    return p.with_name(f"{p.name}.{what}-{n}")


def folder_bytes(path: str | Path, *, recursive: bool = False) -> int | None:
    """The bytes of the regular files in folder ``path`` (in its subfolders too with ``recursive``;
    links not followed), or None when it cannot be read (moved or removed meanwhile, e.g. by a sync tool)."""
    path = Path(path)
    if not path.is_dir():  # rglob of a missing folder yields nothing: it would read as 0 bytes
        return None
    try:
        files = path.rglob("*") if recursive else path.iterdir()
        return sum(f.lstat().st_size for f in files if f.is_file() and not f.is_symlink())
    except OSError:
        return None


SET_ASIDE = ("damaged", "abandoned", "superseded")  # what a run moves aside in checkpoints/ (never deletes)


def set_aside_folders(root: str | Path) -> list[tuple[Path, int]]:
    """The folders of ``root`` moved aside (``step-N.damaged-K``, ``.abandoned-K``, ``.superseded-K``),
    each with its bytes: kept for inspection, read by no resume, deleted by no run."""
    root = Path(root)
    found = []
    if not root.is_dir():
        return found
    for p in sorted(root.iterdir()):
        if p.is_dir() and not p.is_symlink() and re.fullmatch(r"step-\d+\.(%s)-\d+" % "|".join(SET_ASIDE), p.name):
            found.append((p, folder_bytes(p, recursive=True) or 0))
    return found


def checkpoint_run_id(path: Path) -> str | None:
    """The run id recorded in checkpoint ``path`` (its ``run_id`` file), or None (an earlier version's
    checkpoint, or an unreadable record)."""
    try:  # a regular file in the folder: a received checkpoint's record may be a link or a pipe
        with open(file_in_folder(Path(path), RUN_ID_FILE), "rb") as f:
            text = f.read(65).decode("ascii").strip()
    except (OSError, ValueError):  # ValueError: UnicodeDecodeError, or file_in_folder's refusal
        return None
    return text if _RUN_ID_RE.match(text) else None


def save_checkpoint(root: str | Path, step: int, state: dict, keep: int, run_id: str | None = None) -> Path:
    """Write ``state`` as ``root/step-NNNNNNN`` (DCP). Call it on every rank of a distributed run (the
    directory must be on a filesystem all ranks share); rank 0 records ``run_id`` in it, renames the
    finished directory into place and prunes the run's old ones: only checkpoints carrying the same
    run id are pruned (another run's, or an earlier version's without one, are never touched)."""

    import torch.distributed.checkpoint as dcp

    d = _dist()
    rank = 0 if d is None else d.get_rank()
    root = Path(root)
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    tensors: list = []
    structure = _encode(state, tensors, "state")

    flat = {f"t{i:05d}": (t if is_dtensor(t) else t.cpu()) for i, t in enumerate(tensors)}  # DCP writes shards
    if rank == 0:  # one structure (ranks' Python RNG states may differ; DCP keeps one copy anyway)
        flat[_STATE_KEY] = _json_tensor({"format": FORMAT, "state": structure})
    # each rank records what it holds: whichever rank's copy of a replicated tensor DCP writes, it matches
    flat[f"__crc32_rank{rank}__"] = _json_tensor([[k, off, sz, _crc(part)] for k, t in flat.items()
                                                  for off, sz, part in _local_chunks(t)])
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():  # a single process: DCP says it assumes one
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.save(flat, checkpoint_id=str(tmp))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - a full disk as one line
        e = _cause(e)
        text = f"{type(e).__name__}: {e}"
        full = isinstance(e, OSError) and e.errno == 28 or "No space left" in text
        if rank == 0 and (isinstance(e, KeyboardInterrupt) or full or "unexpected pos" in text):
            shutil.rmtree(tmp, ignore_errors=True)  # the half-written folder: nothing of it is of use
        if isinstance(e, KeyboardInterrupt):  # a second Ctrl-C inside the write, wrapped by DCP: the stop it is
            raise e from None
        if full:
            raise OSError(28, "writing the checkpoint failed (no space left on the device); is the disk full?",
                          str(tmp)) from None
        if "unexpected pos" in text:  # the file stopped growing: a full disk, or a limit on a file's size
            raise OSError(27, "writing the checkpoint failed (a file could not grow: the disk is full, or a file "
                              "size limit was reached: ulimit -f, a FAT32 / exFAT drive's 4 GiB)", str(tmp)) from None
        raise RuntimeError(f"writing the checkpoint {final} failed: {text.splitlines()[0][:300]}") from None
    _barrier()
    if rank == 0:
        if run_id is not None:
            (tmp / RUN_ID_FILE).write_text(run_id + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        present = final.exists() or final.is_symlink()
        theirs = checkpoint_run_id(final) if present else None
        whole = present and final.is_dir() and not final.is_symlink() and _complete(final)
        if whole and theirs == run_id:
            shutil.rmtree(final)  # this run's own complete checkpoint of the same step, written again
        elif present and (whole or theirs not in (None, run_id)):  # another run's: kept, under another name
            aside = _free_name(final, "superseded")
            os.replace(final, aside)
            log.warning("checkpoint %s belongs to another run: moved to %s (not deleted)", final, aside)
        elif present:  # not a complete checkpoint (emptied, half-copied; skipped on resume): kept for inspection
            aside = _free_name(final, "damaged")
            os.replace(final, aside)
            log.warning("checkpoint %s is not a complete checkpoint: moved to %s (not deleted)", final, aside)
        os.replace(tmp, final)
        mine = [p for _, p in list_checkpoints(root) if run_id is not None and checkpoint_run_id(p) == run_id]
        for old in mine[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def set_aside_later(root: str | Path, step: int, run_id: str | None, damaged=()) -> list[Path]:
    """A resume from ``step`` with later checkpoints of the same run ``run_id`` in ``root`` (a run taken
    back to an earlier step): each moved aside to ``step-N.abandoned-K`` (not deleted), so that neither
    ``--resume latest`` nor the pruning of the resumed run reads the run it abandoned; -> the new names.
    Another run's checkpoints stay; those named in ``damaged`` (skipped as not loading) go to
    ``step-N.damaged-K``, kept for inspection, and so do the run's later ones that are not complete
    checkpoints (:func:`incomplete_checkpoints`: no ``.metadata``; the run's next save of that step would
    have replaced them). Also removes the temporary folders of writes that never finished
    (``.step-N.tmp``: one trainer per folder, so none is in progress)."""
    root = Path(root)
    moved = []
    complete = list_checkpoints(root)
    whole = {p.name for _, p in complete}
    for s, p in sorted(complete + incomplete_checkpoints(root)):
        if s > step and run_id is not None and checkpoint_run_id(p) == run_id:
            aside = _free_name(p, "damaged" if p.name in damaged or p.name not in whole else "abandoned")
            os.replace(p, aside)
            moved.append(aside)
    if root.is_dir():
        for p in root.glob(".step-*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
    return moved


def resolve_resume(root: str | Path, resume: str | None) -> Path | None:
    """``None`` -> no resume; ``"latest"`` -> the newest complete checkpoint (None if none);
    otherwise a checkpoint directory path."""
    if not resume:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(root)
        return ckpts[-1][1] if ckpts else None
    p = Path(resume)
    if not (p.exists() or p.is_symlink()):
        near = [c.name for _, c in list_checkpoints(p.parent)] if p.parent.is_dir() else []
        raise FileNotFoundError(f"--resume: {p} does not exist" + (
            f" (mistyped, or pruned by its run? {p.parent} holds {', '.join(near[-3:])})" if near else
            " (a checkpoint folder, e.g. <output_dir>/checkpoints/step-0000100, or --resume latest)"))
    if not _complete(p):
        raise FileNotFoundError(f"--resume: no checkpoint at {p} (expected a DCP directory with .metadata, or "
                                f"{p / 'state.pt'})")
    return p


PEEK_BYTES = 1 << 20  # load_checkpoint(tensors=False): larger tensors are not read


def load_checkpoint(path: Path, tensors: bool = True) -> dict:
    """The state :func:`save_checkpoint` wrote (any process count), or an earlier version's, checked
    as untrusted input (see the module's docstring); :class:`CheckpointError` names what is wrong.
    ``tensors`` false: the structure and the small entries (step, config, run id, random states) alone,
    every tensor of more than ``PEEK_BYTES`` a meta placeholder, neither read nor checked (what a dry run
    of a resume compares: a full fine-tuning checkpoint is ~100 GB)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    path = Path(path)
    if (path / "state.pt").is_file() and not (path / ".metadata").exists():
        return _load_state_pt(path)
    md = read_metadata(path)
    flat: dict = {}
    unread: dict = {}
    for key, m in md.state_dict_metadata.items():
        if isinstance(m, TensorStorageMetadata):  # zeros, not empty: nothing of this process's memory shows through
            size = tuple(m.size)
            if not tensors and key != _STATE_KEY and not _CRC_RE.match(key) and \
                    math.prod(size) * m.properties.dtype.itemsize > PEEK_BYTES:
                unread[key] = torch.empty(size, dtype=m.properties.dtype, device="meta")
            else:
                flat[key] = torch.zeros(size, dtype=m.properties.dtype)
        elif key == _LEGACY_KEY and isinstance(m, BytesStorageMetadata):
            flat[key] = b""
        else:
            raise CheckpointError(f"checkpoint {path}: entry {key!r} is not a tensor; not loaded")
    _dcp_load(flat, path, md)
    if _LEGACY_KEY in flat:
        return _load_legacy_dcp(flat, path)
    if _STATE_KEY not in flat:
        raise CheckpointError(f"checkpoint {path}: no {_STATE_KEY} (the run's structure); not loaded")
    _verify(flat, md, path)
    flat.update(unread)
    try:
        record = _json_of(flat.pop(_STATE_KEY))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"checkpoint {path}: {_STATE_KEY} is damaged "
                              f"({'nested too deeply to read' if isinstance(e, RecursionError) else e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: format {record.get('format') if isinstance(record, dict) else '?'}"
                              f" is not {FORMAT} (written by another version); not loaded")
    try:
        state = _decode(record.get("state"), flat, "state", path)
    except (TypeError, ValueError, RecursionError) as e:  # e.g. an unhashable key: not what save_checkpoint writes
        raise CheckpointError(f"checkpoint {path}: the structure is malformed ({type(e).__name__}: {e}); not loaded") \
            from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: the structure is not a state dict; not loaded")
    return state


_ADAM_STATE = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # what AdamW keeps per parameter


def _rng_problem(rng: dict) -> str | None:
    """Why ``rng`` (:func:`rng_state`'s) cannot be set, or None: set on trial (each generator checks its
    own state exactly), the current states restored after."""
    for k in ("python", "numpy", "torch"):
        if k not in rng:
            return f"lacks the {k} generator's state"
    cuda = rng.get("cuda")  # set only where a GPU is (set_rng_state): its form checked here, on any machine
    if cuda is not None and not (isinstance(cuda, (list, tuple)) and all(
            isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1 and t.device.type == "cpu"
            for t in cuda)):
        return "holds a CUDA generators' state that is not one (a list of byte tensors, one per GPU)"
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    try:
        random.setstate(rng["python"])  # as set_rng_state sets them
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        return None
    except Exception as e:  # noqa: BLE001 - each generator raises its own types for a state not its own
        first = str(e).splitlines()[0][:120] if str(e) else ""
        return f"is not the generators' state ({type(e).__name__}: {first})"
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


def _count(v, least: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def check_train_state(state: dict, path) -> None:
    """The trainer's fields of a loaded checkpoint, each of the kind the trainer writes, else a
    :class:`CheckpointError` naming the checkpoint and the field. A received checkpoint is untrusted:
    its values reach the optimizer, the scheduler and the step counter, and nothing but what the trainer
    itself writes may get there (tensor shapes are checked against the model where they are loaded)."""

    def bad(what: str):
        raise CheckpointError(f"checkpoint {path}: {what}; not loaded")

    for k in ("step", "weights", "optimizer", "lr_scheduler", "sampler", "rng"):
        if k not in state:
            bad(f"no {k!r} entry (not a training checkpoint)")
    if not _count(state["step"]):
        bad(f"step {state['step']!r} is not a step count")
    w = state["weights"]
    if not isinstance(w, dict) or set(w) != {"student", "teacher"}:
        bad("'weights' is not {student, teacher}")
    for which in ("student", "teacher"):
        if not isinstance(w[which], dict):
            bad(f"weights.{which} is not a mapping of named tensors")
        for n, t in w[which].items():
            if not (isinstance(n, str) and torch.is_tensor(t) and t.is_floating_point()):
                bad(f"weights.{which}[{n!r}] is not a floating-point tensor")
            if "lora_" in n and t.numel():  # the limit the LoRA export refuses: damage caught at the resume, not
                from dopsd_fast.export import LORA_MAX_ABS  # after more checkpoints carried it

                peak = float(t.detach().abs().max())
                if peak > LORA_MAX_ABS:
                    bad(f"weights.{which}[{n!r}] holds |w| up to {peak:.3g}, over the limit {LORA_MAX_ABS:g} (damaged or "
                        "diverged weights)")
    o = state["optimizer"]
    if not (isinstance(o, dict) and isinstance(o.get("state"), dict) and isinstance(o.get("param_groups"), list)):
        bad("'optimizer' is not an optimizer state ({state, param_groups})")
    for g in o["param_groups"]:
        if not (isinstance(g, dict) and isinstance(g.get("params"), list) and all(_count(i) for i in g["params"])):
            bad("an optimizer parameter group is not {params: [indices], ...}")
    for i, st in o["state"].items():
        if not (_count(i) and isinstance(st, dict)):
            bad(f"optimizer state entry {i!r} is not a parameter index with its state")
        for k, v in st.items():
            if k not in _ADAM_STATE or not (torch.is_tensor(v) and v.is_floating_point()):
                bad(f"optimizer state {i}[{k!r}] is not one of AdamW's tensors ({', '.join(_ADAM_STATE)})")
            if k == "step" and (v.dim() or float(v) < 0):
                bad(f"optimizer state {i}['step'] is not a scalar count")
            if k.endswith("_sq") and v.numel() and float(v.min()) < 0:
                bad(f"optimizer state {i}[{k!r}] holds negative values (a second moment is >= 0)")
    s = state["lr_scheduler"]
    if not (isinstance(s, dict) and _count(s.get("last_epoch"), -1) and _count(s.get("_step_count", 0))):
        bad("'lr_scheduler' is not {last_epoch: int >= -1, _step_count: int >= 0}")
    for k in ("sampler", "rng"):
        if not isinstance(state[k], dict):
            bad(f"{k!r} is not a mapping")
    smp = state["sampler"]
    for k in ("epoch", "position"):
        if not _count(smp.get(k)):
            bad(f"sampler[{k!r}] is not a count (an integer >= 0)")
    for k in ("seed", "global_batch"):
        if smp.get(k) is not None and not (_count(smp[k], -(1 << 63)) if k == "seed" else _count(smp[k], 1)):
            bad(f"sampler[{k!r}] is not {'an integer' if k == 'seed' else 'an integer >= 1'}")
    why = _rng_problem(state["rng"])
    if why:
        bad(f"'rng' {why}")
    rid = state.get("run_id")
    if rid is not None and not (isinstance(rid, str) and _RUN_ID_RE.match(rid)):
        bad(f"run_id {str(rid)[:40]!r} is not a run id (8-64 hex digits)")
    for k in ("config", "data_fingerprint"):
        if state.get(k) is not None and not isinstance(state[k], dict):
            bad(f"{k!r} is not a mapping")
    files = state.get("model_files")
    if files is not None and not (isinstance(files, dict) and all(
            isinstance(v, dict) and all(isinstance(n, str) and isinstance(f, str) for n, f in v.items())
            for v in files.values())):
        bad("'model_files' is not {field: {file: fingerprint}}")
