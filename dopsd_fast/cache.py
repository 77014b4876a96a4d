"""Feature cache: student and teacher contexts computed once (``dopsd-cache``), read by training.

Layout of a cache directory::

    manifest.json            {"version", "identity", "entries": {key: [shard, name]}, "kinds": [student, teacher],
                              "checksums": {key: CRC-32 of the context's bytes}}
    shard-00000.safetensors  tensors "<key>.features" and "<key>.extra.<name>"

``identity`` is the adapter's :meth:`~dopsd_fast.adapters.ModelAdapter.encoder_identity` (encoder
weights fingerprint + every setting the features depend on). A cache written under another
identity is refused with the differing fields named, never used. Entries are keyed by
(kind, prompt, image content hash, bucket). Shards and the manifest are written atomically, so an
interrupted ``dopsd-cache`` resumes where it stopped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import zlib
from pathlib import Path

import torch

from dopsd_fast.context import Context
from dopsd_fast.safety import SAFETENSORS_FLOAT_DTYPES, atomic_write, file_in_folder
from dopsd_fast.data.dataset import load_image
from tqdm.auto import tqdm

log = logging.getLogger(__name__)
_told_unchecked: set = set()  # caches whose entries without a checksum were said (once per process)

CACHE_VERSION = 1
_SHARD_RE = re.compile(r"shard-[0-9]+\.safetensors")  # the only names write() gives a shard (fullmatch)
_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2}
_IDENTITY_KEY = "dopsd_identity"  # a shard's metadata: the digest of the identity it was written under


class CacheError(RuntimeError):
    """The feature cache is stale, mismatched or incomplete."""

def context_crc(features: torch.Tensor, extra: dict) -> int:
    """CRC-32 of a context's bytes (its features, then its extras by name): written with each entry,
    checked at its first read in a process, so bytes changed in a shard since (a bad copy, a disk) are
    named, not trained on."""
    crc = 0
    for t in [features] + [extra[k] for k in sorted(extra)]:
        crc = zlib.crc32(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy(), crc)
    return crc


def entry_key(kind: str, prompt: str, image_hash: str | None = None, bucket=None) -> str:
    payload = json.dumps([kind, prompt, image_hash, list(bucket) if bucket else None], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def record_key(kind: str, prompt: str, rec) -> str:
    """The cache key of a record's context: the student's depends on the prompt (and the references
    of an editing row, with the bucket each is loaded at), the teacher's also on the target image and
    its bucket; a row with an alpha channel also on ``data.alpha_background`` (its pixels do). A row
    with a 32-bit float image is keyed apart from the contexts of versions that scaled it by its maximum
    (one pixel over 1: 255x darker). A row without references, alpha or a float image keeps the key it
    had before these were part of it."""
    refs = getattr(rec, "reference_hash", None)
    if refs is not None:
        refs = f"{refs}@{json.dumps([list(b) for b in rec.reference_buckets])}"
    background = getattr(rec, "background", None)
    tag = "" if background is None else f"+bg{list(background)}"
    if getattr(rec, "float_image", False):  # decoded by float_image_scale: not the earlier versions' pixels
        tag += "+float-range"
    if kind == "student":
        return entry_key("student", prompt, None if refs is None else refs + tag, None)
    image = rec.image_hash if refs is None else f"{rec.image_hash}+{refs}"
    return entry_key("teacher", prompt, image + tag, rec.bucket)


KINDS = ("student", "teacher")


def kinds_of(method: str) -> tuple[str, ...]:
    """The contexts a run of ``method`` reads: D-OPSD both, the SFT baseline the student's alone."""
    return ("student",) if method == "sft" else KINDS


def needed_entries(dataset, kinds=KINDS) -> list[tuple[str, str, object]]:
    """(key, kind, (prompt, record)) for every context of ``kinds`` a run over ``dataset`` can ask for."""
    out, seen = [], set()
    for rec in dataset.records:
        for p in rec.prompts:
            for kind in kinds:
                k = record_key(kind, p, rec)
                if k not in seen:
                    seen.add(k)
                    out.append((k, kind, (p, rec)))
    return out


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    if a != b and ".weights." in f".{prefix}.":  # a weight file: a copy of it (another mtime) is the same weights
        from dopsd_fast.families.common import same_weights

        if same_weights(a, b):
            return []
    return [] if a == b else [prefix or "identity"]


class FeatureCache:
    @classmethod
    def for_run(cls, directory: str | Path, adapter, method: str, create: bool = False) -> "FeatureCache":
        """The cache a run of ``method`` reads with ``adapter``'s encoders: a run that reads no teacher
        contexts (SFT) does not compare the fields only the teacher's contexts depend on; one that does
        takes them as its own on a cache that holds no teacher context yet (written by SFT)."""
        teacher = "teacher" in kinds_of(method)
        return cls(directory, adapter.encoder_identity(), create=create,
                   teacher_fields=None if teacher else adapter.teacher_identity_fields,
                   new_teacher_fields=adapter.teacher_identity_fields if teacher else ())

    def __init__(self, directory: str | Path, identity: dict, create: bool = False, teacher_fields=None,
                 new_teacher_fields=()):
        """``teacher_fields``: for a run that reads the student's contexts alone (SFT), the identity's
        fields only the teacher's contexts depend on (``ModelAdapter.teacher_identity_fields``): not
        compared, and a cache's own identity kept (an SFT run on a D-OPSD run's cache, without the
        teacher's encoder). ``new_teacher_fields``: for a run that reads the teacher's contexts, the same
        fields: where the cache holds no teacher context (its manifest's ``kinds``: one an SFT run wrote),
        they are not compared either, and take this run's values (the teacher's contexts it writes)."""
        self.dir = Path(directory)
        self.identity = json.loads(json.dumps(identity))  # normalise (tuples -> lists)
        manifest = self.dir / "manifest.json"
        if self.dir.exists() and not self.dir.is_dir():
            raise CacheError(f"cache.dir {self.dir} is a file, not a folder; point cache.dir at a folder (dopsd-cache "
                             "creates it)")
        self._manifest_seen = None  # (inode, mtime) of the manifest read: a rewrite since is told from damage
        if manifest.is_file() or manifest.is_symlink():
            try:  # a regular file in the folder (a received cache's manifest may be a link elsewhere)
                path = file_in_folder(self.dir, manifest.name)
                st = path.stat()
                data = json.loads(path.read_text())
                self._manifest_seen = (st.st_ino, st.st_mtime_ns)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CacheError(f"feature cache {manifest} is damaged ({e}); delete the directory and run dopsd-cache "
                                 "again") from None
            except RecursionError:
                raise CacheError(f"feature cache {manifest} is damaged (its JSON nests too deeply to read); delete the "
                                 "directory and run dopsd-cache again") from None
            except (OSError, ValueError) as e:
                raise CacheError(f"feature cache {manifest}: {e}") from None
            if not isinstance(data, dict):
                raise CacheError(f"feature cache {manifest} is not a manifest (a JSON object); delete the directory "
                                 "and run dopsd-cache again")
            if data.get("version") != CACHE_VERSION:
                raise CacheError(f"feature cache {self.dir}: format version {data.get('version')!r} != {CACHE_VERSION!r}; "
                                 "delete it and run dopsd-cache again")
            changed = _diff(data.get("identity"), self.identity)
            kinds = data.get("kinds")
            self.kinds = (set(kinds) if isinstance(kinds, list) and all(isinstance(k, str) and k in KINDS for k in kinds)
                          else None)  # None: unknown (an earlier version's cache, or a record not its own)
            if new_teacher_fields and self.kinds is not None and "teacher" not in self.kinds and changed:
                own = [c for c in changed if any(c == f or c.startswith(f + ".") for f in new_teacher_fields)]
                if len(own) == len(changed):  # written by SFT: nothing in it depends on the teacher's fields
                    log.info("feature cache %s holds no teacher context yet: its teacher settings (%s) are this "
                             "run's", self.dir, ", ".join(own))
                    changed = []
            if not create:  # a run reading the cache without an encoder's folder (its weights None here: e.g. the
                ours = self.identity.get("weights") if isinstance(self.identity, dict) else None  # teacher's VLM
                unknown = [c for c in changed if c.startswith("weights.") and isinstance(ours, dict)
                           and c.split(".", 1)[1] in ours and ours[c.split(".", 1)[1]] is None]
                if unknown and len(unknown) == len(changed):  # takes the cache's contexts as written with it
                    log.info("feature cache %s: %s not given here: the cache's contexts are used as written with "
                             "its own", self.dir, ", ".join(u.split(".", 1)[1] for u in unknown))
                    self.identity, changed = data.get("identity"), []
            if teacher_fields is not None:
                changed = [c for c in changed if not any(c == f or c.startswith(f + ".") for f in teacher_fields)]
                if not changed:
                    self.identity = data.get("identity")  # its teacher part stays the writer's
            if changed:
                raise CacheError(
                    f"feature cache {self.dir} was written for other encoders or settings "
                    f"(differs in: {', '.join(changed[:8])}); refusing to use stale features. "
                    "Delete the directory or point cache.dir elsewhere, then run dopsd-cache")
            self.entries = self._checked_entries(data.get("entries", {}))
            sums = data.get("checksums", {})  # absent in an earlier version's cache: its entries are not checked
            if not (isinstance(sums, dict) and all(isinstance(v, int) and not isinstance(v, bool) for v in sums.values())):
                raise CacheError(f"feature cache {manifest}: 'checksums' is not {{key: CRC-32}}; delete the directory "
                                 "and run dopsd-cache again")
            self.checksums = sums
            unchecked = sum(k not in sums for k in self.entries)
            if unchecked and str(self.dir) not in _told_unchecked:
                _told_unchecked.add(str(self.dir))
                log.warning("feature cache %s: %d of its %d contexts have no checksum (an earlier version's cache, or "
                            "an edited manifest): read without the check; dopsd-cache into a new folder writes them",
                            self.dir, unchecked, len(self.entries))
        elif manifest.exists():  # a folder, a FIFO, a device: never opened (a FIFO would block the read)
            raise CacheError(f"feature cache {manifest} is not a regular file; delete the directory and run "
                             "dopsd-cache again")
        elif create:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.entries, self.kinds, self.checksums = {}, set(), {}
        else:
            raise CacheError(f"feature cache {self.dir} does not exist (no manifest.json); run dopsd-cache first")
        self._open: dict = {}
        self._verified: set = set()  # entries whose checksum was checked in this process

    def _checked_entries(self, entries) -> dict:
        """The manifest's entries, each ``[shard, name]`` with ``shard`` a file name in this folder that
        :meth:`write` gives a shard (``shard-NNNNN.safetensors``): a received cache is untrusted, and a
        name such as ``../x.safetensors`` is refused before any read; another file of the folder (a
        user's notes, the lock) is never taken for a shard, so :meth:`repair` never deletes it."""
        if not isinstance(entries, dict):
            raise CacheError(f"feature cache {self.dir / 'manifest.json'}: 'entries' is not a mapping; delete the "
                             "directory and run dopsd-cache again")
        for key, entry in entries.items():
            if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(v, str) for v in entry)):
                raise CacheError(f"feature cache {self.dir / 'manifest.json'}: entry {key} is not [shard, name]; delete "
                                 "the directory and run dopsd-cache again")
            if entry[1] != key:  # dopsd-cache stores each context under its own key: another name is another context
                raise CacheError(f"feature cache {self.dir / 'manifest.json'}: entry {key} points at the tensors of "
                                 f"{entry[1][:40]!r}, not its own; delete the directory and run dopsd-cache again")
        for shard in sorted({s for s, _ in entries.values()}):
            try:
                file_in_folder(self.dir, shard)
            except FileNotFoundError:
                pass  # a missing shard is named by check_shards, which says how to rebuild it
            except ValueError as e:
                raise CacheError(f"feature cache {self.dir / 'manifest.json'} names shard {shard!r}: {e}") from None
            if not _SHARD_RE.fullmatch(shard):  # notes.txt, .lock, manifest.json: never read nor deleted as a shard
                raise CacheError(f"feature cache {self.dir / 'manifest.json'} names shard {shard[:60]!r}, not a "
                                 "shard name dopsd-cache writes (shard-NNNNN.safetensors); refused, that file left "
                                 "as it is: run dopsd-cache into a new cache.dir")
        return entries

    def _save_manifest(self) -> None:
        record = {"version": CACHE_VERSION, "identity": self.identity, "entries": self.entries}
        if self.kinds is not None:  # the kinds of context it holds (unknown in an earlier version's cache)
            record["kinds"] = sorted(self.kinds)
        record["checksums"] = {k: v for k, v in self.checksums.items() if k in self.entries}
        text = json.dumps(record, indent=1)
        atomic_write(self.dir / "manifest.json", lambda t: t.write_text(text))

    def _identity_tag(self) -> str:
        """A digest of the identity the contexts are written under, stamped in each shard's metadata: a shard
        the manifest does not name is adopted (:meth:`_adopt`) only where it was written under this one."""
        return hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:32]

    def missing(self, dataset, kinds=KINDS) -> list:
        return [e for e in needed_entries(dataset, kinds) if e[0] not in self.entries]

    def require_complete(self, dataset, width: int | None = None, kinds=KINDS, extra_problem=None,
                         max_tokens: dict | None = None) -> None:
        """Every context the run over ``dataset`` reads is there, in sound shards (:meth:`check_shards`);
        ``extra_problem(kind, name, shape, record)``: what is wrong with a context's extra tensor for its row
        (the family adapter's :meth:`cache_extra_problem`; a reference latent of another size), or None;
        ``max_tokens``: {kind: the most tokens the run's encoders give a context of that kind} (the cache's
        identity holds the same limits: a longer context is not one they wrote)."""
        miss = self.missing(dataset, kinds)
        if miss:
            _key, kind, (prompt, rec) = miss[0]
            shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            raise CacheError(f"feature cache {self.dir} lacks {len(miss)} of {len(needed_entries(dataset, kinds))} "
                             f"contexts this dataset needs (the first: {rec.where}, the {kind} context of "
                             f"{shown!r}: " + ("a row with a 32-bit float image, added since, or in a cache an "
                                               "earlier version wrote (it read such images by their maximum)"
                                               if getattr(rec, "float_image", False) else
                                               "a row or image edited or added since the cache was written?")
                             + "); run dopsd-cache with the same config first")
        self.check_shards(width)
        if extra_problem is None and not max_tokens:
            return
        by_shard: dict = {}  # shard -> {entry name: (features shape, {extra: shape})}, each header read once
        for key, kind, (_prompt, rec) in needed_entries(dataset, kinds):
            shard, name = self.entries[key]
            if shard not in by_shard:
                by_shard[shard] = {}
                for t, (shape, _dtype) in self._heads(shard).items():
                    entry, sep, extra = t.partition(".extra.")
                    if sep:
                        by_shard[shard].setdefault(entry, [None, {}])[1][extra] = tuple(shape)
                    elif t.endswith(".features"):
                        by_shard[shard].setdefault(t[: -len(".features")], [None, {}])[0] = tuple(shape)
            features, extras = by_shard[shard][name]
            most = (max_tokens or {}).get(kind)
            if most is not None and features[0] > most:
                raise CacheError(f"feature cache {self.dir}: shard {shard}: the {kind} context of {rec.where} "
                                 f"({key[:12]}) has {features[0]} tokens, more than the {most} this config's encoder "
                                 "gives; run dopsd-cache again with this config into a new cache.dir")
            for extra, shape in sorted(extras.items()) if extra_problem is not None else ():
                why = extra_problem(kind, extra, shape, rec)
                if why:
                    raise CacheError(f"feature cache {self.dir}: shard {shard}: the context of {rec.where} ({key[:12]}): "
                                     f"its {extra[:40]} {why}; run dopsd-cache again with this config into a new "
                                     "cache.dir")

    def _heads(self, shard: str) -> dict:
        """{tensor name: (shape, dtype)} of a shard, from its header alone."""
        from safetensors import safe_open

        with safe_open(str(self.dir / shard), framework="pt") as f:
            return {t: (list(f.get_slice(t).get_shape()), f.get_slice(t).get_dtype()) for t in f.keys()}

    def _shard_problem(self, shard: str, width: int | None = None) -> str | None:
        """What is wrong with ``shard`` (the message's tail), or None: it exists, its header reads, it
        holds every entry the manifest gives it, each context a floating-point ``(tokens >= 1, width)``
        tensor, extras floating-point. Only the header is read."""
        from safetensors import safe_open

        path = self.dir / shard
        if not path.is_file():
            return f"shard {shard} is missing"
        try:  # the header only: each tensor's name, shape and dtype
            heads = self._heads(shard)
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a torn file
            return f"shard {shard} is damaged ({type(e).__name__}: {str(e)[:120]})"
        want = {f"{name}.features" for s, name in self.entries.values() if s == shard}
        if not want <= heads.keys():
            return f"shard {shard} lacks {len(want - heads.keys())} of its {len(want)} entries"
        for t, (shape, dtype) in sorted(heads.items()):
            why = None
            if dtype not in SAFETENSORS_FLOAT_DTYPES:
                why = f"is {dtype}, not floating-point"
            elif t.endswith(".features") and (len(shape) != 2 or not shape[0]):
                why = f"has shape {tuple(shape)}, not (tokens >= 1, width)"
            elif t.endswith(".features") and width is not None and shape[1] != width:
                why = f"is {shape[1]} wide, this model's contexts are {width}"
            if why:
                return f"shard {shard}: tensor {t[:60]} {why}"
        return None

    def check_shards(self, width: int | None = None) -> None:
        """Every shard the manifest names is sound (:meth:`_shard_problem`; ``width``: the model's
        context width, where the caller knows it). At start-up, not at first use."""
        for shard in sorted({s for s, _ in self.entries.values()}):
            why = self._shard_problem(shard, width)
            if why:
                raise CacheError(f"feature cache {self.dir}: {why}; run dopsd-cache again with this config (it "
                                 "re-encodes that shard's contexts)")

    def repair(self, width: int | None = None) -> list[str]:
        """Drop from the manifest (and the folder) every shard :meth:`_shard_problem` finds wrong, so
        that :meth:`write` encodes its contexts again; returns one line per dropped shard. Only a file
        with a shard's name (``shard-NNNNN.safetensors``) is ever deleted."""
        said = []
        for shard in sorted({s for s, _ in self.entries.values()}):
            why = self._shard_problem(shard, width)
            if why:
                self.entries = {k: v for k, v in self.entries.items() if v[0] != shard}
                path = self.dir / shard
                if _SHARD_RE.fullmatch(shard) and path.is_file() and not path.is_symlink():
                    path.unlink()
                said.append(why)
        if said:
            self._save_manifest()
        return said

    def get(self, key: str) -> Context:
        from safetensors import safe_open

        if key not in self.entries:
            raise CacheError(f"feature cache {self.dir}: no entry {key}")
        shard, name = self.entries[key]
        f = self._open.get(shard)
        if f is None:
            if not (self.dir / shard).is_file():  # checked at the start: gone since (pruned, the folder replaced)
                raise CacheError(f"feature cache {self.dir}: {shard} is gone since the run started (dopsd-cache --prune, "
                                 "or the cache written again, meanwhile); run dopsd-cache with this config, then resume")
            # pread: safetensors 0.8's mmap backend leaks ~60 B (Python) per tensor read, every step; an older
            # safetensors (an environment the package was dropped into) has no backend argument: its default
            try:
                f = safe_open(str(self.dir / shard), framework="pt", backend="pread")
            except TypeError:
                f = safe_open(str(self.dir / shard), framework="pt")
            self._open[shard] = f
        extra = {}
        prefix = f"{name}.extra."
        for k in f.keys():
            if k.startswith(prefix):
                extra[k[len(prefix):]] = f.get_tensor(k)
        features = f.get_tensor(f"{name}.features")
        want = self.checksums.get(key)
        if want is not None and key not in self._verified:  # once per entry and process (~4 ms per 10 MiB)
            if context_crc(features, extra) == want:
                self._verified.add(key)
        if want is not None and key not in self._verified:
            if self._manifest_rewritten():
                raise CacheError(f"feature cache {self.dir}: a context in {shard} is not the one this run read of it: "
                                 "the cache was written again since the run started (dopsd-cache into the same folder "
                                 "meanwhile); start the run again (it checks the cache's settings at its start)")
            raise CacheError(f"feature cache {self.dir}: a context in {shard} is damaged (its bytes changed since "
                             f"dopsd-cache wrote them: checksum of {key[:12]}); delete {self.dir / shard} and run "
                             "dopsd-cache again (it re-encodes that shard's contexts)")
        if features.dtype == torch.float32 and self.context_dtype is not None:
            features = features.to(self.context_dtype)  # an earlier version's fp32 upcast: exact, one dtype per run
        return Context(features, extra)

    def _manifest_rewritten(self) -> bool:
        """Whether manifest.json is another file, or was written again, since this cache read it."""
        try:
            st = (self.dir / "manifest.json").stat()
        except OSError:
            return True
        return self._manifest_seen is not None and (st.st_ino, st.st_mtime_ns) != self._manifest_seen

    @functools.cached_property
    def context_dtype(self) -> torch.dtype | None:
        """The encoders' dtype the identity records (``settings.dtype``) where it is a 16-bit float: an earlier
        version stored their contexts upcast to fp32 (exactly), this one stores them as given; read, both come
        back in it (a cache extended after an upgrade holds both; batches of mixed dtypes would capture CUDA
        graphs per pattern). None: fp32 encoders, or no such record."""
        settings = self.identity.get("settings") if isinstance(self.identity, dict) else None
        name = settings.get("dtype") if isinstance(settings, dict) else None
        return {"torch.bfloat16": torch.bfloat16, "torch.float16": torch.float16}.get(name)

    def write(self, adapter, dataset, batch_size: int = 8, shard_size: int = 256, progress: bool = True,
              kinds=KINDS, stop=None) -> int:
        """Compute and store every missing entry of ``kinds``; returns how many were written. ``stop``: a
        callable, true once an interruption was asked for (dopsd-cache's signal handler sets a flag: an
        exception raised in a handler while a finalizer runs is discarded by Python); checked after each
        batch: the contexts gathered so far are written as a shard, then ``KeyboardInterrupt`` raised."""
        from safetensors.torch import save_file

        todo = self.missing(dataset, kinds)
        if not todo:
            return 0
        taken = {s for s, _ in self.entries.values()} | {p.name for p in self.dir.glob("shard-*.safetensors")}
        adopted = self._adopt(todo, taken)
        if adopted:
            todo = [e for e in todo if e[0] not in self.entries]
            if not todo:
                return adopted
        if "teacher" in kinds:
            adapter.ensure_encoders()
        else:  # the student's contexts alone (SFT): a Z-Image teacher's VLM is not loaded
            adapter.ensure_student_encoder()
        saver = _ManifestSaver(self._save_manifest)
        bar = tqdm(total=len(todo), desc="caching contexts", disable=not progress)
        try:
            self._write_shards(adapter, todo, batch_size, shard_size, stop, taken, saver, bar, save_file)
        except BaseException:  # an error (a full disk, an encoder's) or a stop: the shards written kept in the manifest
            try:
                saver.flush()
            except Exception as e:  # noqa: BLE001 - the error that stopped the write is the one to say
                log.warning("feature cache %s: the manifest could not be saved (%s): the shards written since its "
                            "last save are taken in by the next dopsd-cache", self.dir, e)
            raise
        finally:
            bar.close()
        saver.flush()
        return adopted + len(todo)

    def _adopt(self, todo, taken) -> int:
        """Contexts this run needs found in shards of the folder the manifest does not name (a dopsd-cache
        killed after writing a shard, before the manifest's next save): named in the manifest, each with the
        checksum of its bytes, instead of being encoded again; returns how many. Only a shard whose metadata
        records this identity is read; one that does not read is deleted; one of another identity, or whose
        entries are not sound, is left as it is (``--prune`` deletes it)."""
        from safetensors import safe_open

        wanted = {key: kind for key, kind, _ in todo}
        named = {s for s, _ in self.entries.values()}
        adopted, shards = 0, 0
        for shard in sorted(taken - named):
            path = self.dir / shard
            if not _SHARD_RE.fullmatch(shard) or path.is_symlink() or not path.is_file():
                continue
            try:
                with safe_open(str(path), framework="pt") as f:
                    if (f.metadata() or {}).get(_IDENTITY_KEY) != self._identity_tag():
                        # written under other encoders or settings (a manifest deleted or never saved, then a run
                        # with another config), or by an earlier version: its contexts are not this identity's
                        log.warning("feature cache %s: %s, not named in the manifest, was not written with this "
                                    "config's encoders and settings; left as it is, its contexts encoded again",
                                    self.dir, shard)
                        continue
                    names = set(f.keys())
                    found = {}
                    for t in sorted(names):
                        key = t[: -len(".features")] if t.endswith(".features") else None
                        if key in wanted and key not in self.entries:
                            extra = {n[len(key) + 7:]: f.get_tensor(n) for n in names if n.startswith(key + ".extra.")}
                            found[key] = context_crc(f.get_tensor(t), extra)
            except Exception as e:  # noqa: BLE001 - a damaged file of an interrupted run: deleted, as repair() does
                path.unlink(missing_ok=True)  # a named one (a shard-NNNNN name, a file in the folder: checked above)
                log.warning("feature cache %s: %s, not named in the manifest, does not read (%s): deleted",
                            self.dir, shard, str(e).splitlines()[0][:120] if str(e) else type(e).__name__)
                continue
            for key in found:
                self.entries[key] = [shard, key]
            if found and self._shard_problem(shard) is not None:
                for key in found:
                    del self.entries[key]
                continue
            self.checksums.update(found)
            if self.kinds is not None:
                self.kinds |= {wanted[key] for key in found}
            adopted += len(found)
            shards += bool(found)
        if adopted:
            self._save_manifest()
            log.info("feature cache %s: %d contexts taken from %d shard%s the manifest did not name yet (a dopsd-cache "
                     "stopped before saving it)", self.dir, adopted, shards, "s" if shards > 1 else "")
        return adopted

    def unused(self, dataset) -> tuple[list[str], int]:
        """The entries no context of ``dataset`` (of either kind) is keyed by (rows, captions or images edited
        since they were written; another dataset's), with their bytes from the shards' headers."""
        needed = {k for k, _, _ in needed_entries(dataset, KINDS)}
        keys = [k for k in self.entries if k not in needed]
        by_shard: dict = {}
        for k in keys:
            by_shard.setdefault(self.entries[k][0], set()).add(self.entries[k][1])
        size = 0
        for shard, names in by_shard.items():
            try:
                heads = self._heads(shard)
            except Exception:  # noqa: BLE001 - a damaged shard: its size is not counted
                continue
            for t, (shape, dtype) in heads.items():
                if t.partition(".")[0] in names:
                    size += math.prod(shape) * _DTYPE_BYTES.get(dtype, 4)
        return keys, size

    READERS = ".readers"  # the lock file a training run holds shared while it reads the folder

    def hold_for_reading(self) -> None:
        """A shared lock on ``<cache>/.readers`` for this object's life (a training run's): dopsd-cache --prune,
        which rewrites and deletes shards, is refused while one is held (extending the cache is not: its new
        shards leave the others as they are). A folder the run cannot write (a read-only copy) takes none."""
        import fcntl

        try:
            fd = self._open_readers()
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:  # a prune holds it this moment
            os.close(fd)
            return
        self._readers_fd = fd

    def _open_readers(self) -> int:
        """The descriptor of ``.readers`` (created; a planted link refused by O_NOFOLLOW: an OSError)."""
        return os.open(self.dir / self.READERS, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)

    def __del__(self):
        fd = getattr(self, "_readers_fd", None)
        if fd is not None:
            self._readers_fd = None
            os.close(fd)

    def _no_readers(self) -> int:
        """The exclusive lock of ``.readers`` (its descriptor), or a CacheError: a training run reads the folder."""
        import fcntl

        fd = self._open_readers()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CacheError(f"feature cache {self.dir}: a training run reads it now; --prune rewrites and deletes "
                             "shards under it: prune after the run ends (adding contexts, without --prune, is safe)") \
                from None
        return fd

    def prune(self, dataset) -> tuple[int, int]:
        """Drop the :meth:`unused` entries: a shard holding none of the others is deleted, one holding some is
        written again with those alone (under a new name, the manifest saved, then the old file deleted: an
        interruption leaves a file no manifest names, never an entry without its file), and shards no entry
        names (of a killed run, holding nothing this dataset needs) are deleted. Returns (entries dropped,
        bytes freed)."""
        keys, _size = self.unused(dataset)
        named = {s for s, _ in self.entries.values()}
        if not keys and all(p.name in named for p in self.dir.glob("shard-*.safetensors")):
            return 0, 0
        lock = self._no_readers()
        try:
            return self._prune(set(keys))
        finally:
            os.close(lock)

    def _prune(self, drop: set) -> tuple[int, int]:
        from safetensors import safe_open
        from safetensors.torch import save_file

        shards = {s for s, _ in self.entries.values()}
        before = {p.name: p.stat().st_size for p in self.dir.glob("shard-*.safetensors")
                  if _SHARD_RE.fullmatch(p.name) and p.is_file() and not p.is_symlink()}
        taken = set(before) | shards
        gone = [s for s in before if s not in shards]  # named by no entry
        next_shard, written = 0, []
        by_shard: dict = {}
        for k, (s, _) in self.entries.items():
            by_shard.setdefault(s, []).append(k)
        for shard, mine in sorted(by_shard.items()):
            if not any(k in drop for k in mine):
                continue
            kept = [k for k in mine if k not in drop]
            if kept:
                while f"shard-{next_shard:05d}.safetensors" in taken:
                    next_shard += 1
                new = f"shard-{next_shard:05d}.safetensors"
                taken.add(new)
                names = {self.entries[k][1] for k in kept}
                with safe_open(str(self.dir / shard), framework="pt") as f:
                    tensors = {t: f.get_tensor(t) for t in f.keys() if t.partition(".")[0] in names}
                atomic_write(self.dir / new, lambda t, tensors=tensors: save_file(
                    tensors, str(t), metadata={_IDENTITY_KEY: self._identity_tag()}))
                written.append((new, (self.dir / new).stat().st_size))
                for k in kept:
                    self.entries[k] = [new, self.entries[k][1]]
            for k in mine:
                if k in drop:
                    del self.entries[k]
                    self.checksums.pop(k, None)
            gone.append(shard)
        if not gone:
            return 0, 0
        self._save_manifest()
        self._open.clear()
        freed = -sum(size for _, size in written)
        for shard in gone:
            path = self.dir / shard
            if shard in before and path.is_file() and not path.is_symlink():
                freed += before[shard]
                path.unlink()
        return len(drop), freed

    def _write_shards(self, adapter, todo, batch_size, shard_size, stop, taken, saver, bar, save_file) -> None:
        next_shard = 0
        stopped = False
        for s0 in range(0, len(todo), shard_size):
            chunk = todo[s0:s0 + shard_size]
            tensors, names, sums = {}, {}, {}
            for b0 in range(0, len(chunk), batch_size):
                part = chunk[b0:b0 + batch_size]
                stud = [e for e in part if e[1] == "student"]
                teach = [e for e in part if e[1] == "teacher"]
                ctxs = []
                def refs_of(rec):
                    return [load_image(p, b) for p, b in zip(rec.reference_paths, rec.reference_buckets)]

                plain = [e for e in stud if not e[2][1].reference_paths]
                if plain:
                    ctxs += list(zip(plain, adapter.encode_student([e[2][0] for e in plain])))
                for e in stud:
                    if e[2][1].reference_paths:
                        ctxs.append((e, adapter.encode_student([e[2][0]], references=[refs_of(e[2][1])])[0]))
                plain = [e for e in teach if not e[2][1].reference_paths]
                if plain:
                    imgs = [load_image(e[2][1].image_path, e[2][1].bucket) for e in plain]
                    ctxs += list(zip(plain, adapter.encode_teacher([e[2][0] for e in plain], imgs)))
                for e in teach:
                    if e[2][1].reference_paths:
                        img = load_image(e[2][1].image_path, e[2][1].bucket)
                        ctxs.append((e, adapter.encode_teacher([e[2][0]], [img], references=[refs_of(e[2][1])])[0]))
                for (key, _, _), ctx in ctxs:
                    name = key
                    tensors[f"{name}.features"] = ctx.features.contiguous()
                    for k, v in ctx.extra.items():
                        tensors[f"{name}.extra.{k}"] = v.contiguous()
                    names[key] = name
                    sums[key] = context_crc(tensors[f"{name}.features"],
                                            {k: tensors[f"{name}.extra.{k}"] for k in ctx.extra})
                bar.update(len(part))
                if stop is not None and stop():
                    stopped = True
                    break
            if not names:
                raise KeyboardInterrupt
            while f"shard-{next_shard:05d}.safetensors" in taken:  # never over a shard already there
                next_shard += 1
            shard = f"shard-{next_shard:05d}.safetensors"
            taken.add(shard)
            atomic_write(self.dir / shard, lambda t, tensors=tensors: save_file(
                tensors, str(t), metadata={_IDENTITY_KEY: self._identity_tag()}))
            for key, name in names.items():
                self.entries[key] = [shard, name]
            self.checksums.update(sums)
            if self.kinds is not None:
                self.kinds |= {kind for key, kind, _ in chunk if key in names}
            saver.wrote(now=stopped)  # a shard the manifest does not name yet is adopted by the next dopsd-cache
            if s0 == 0 and len(todo) > len(names):
                self._say_size(shard, len(names), len(todo) - len(names))
            if stopped:
                raise KeyboardInterrupt


    def _say_size(self, shard: str, written: int, left: int) -> None:
        """After the first shard: what the cache will come to, from that shard's bytes per context, and a
        warning where the rest passes the folder's free disk (a cache of 50k rows is hundreds of GB; the
        write that does not fit would stop it hours in: the shards written are kept)."""
        import shutil

        from dopsd_fast.memory import fmt_bytes

        try:
            per = (self.dir / shard).stat().st_size / written
            free = shutil.disk_usage(self.dir).free
        except OSError:
            return
        need = per * left
        log.info("feature cache: about %s more for %d contexts (%s each in the first shard); %s free in %s",
                 fmt_bytes(need), left, fmt_bytes(per), fmt_bytes(free), self.dir)
        if need > free:
            log.warning("feature cache: the %d contexts still to write need about %s and %s is free in %s: it "
                        "will not fit; the shards written are kept: free space and run dopsd-cache again to go on "
                        "from them, or set cache.dir to a folder on a larger disk", left, fmt_bytes(need),
                        fmt_bytes(free), self.dir)


class _ManifestSaver:
    """Saves a cache's manifest after a shard where the save costs at most ``1 / RATIO`` of the time since
    the last one: the manifest names every entry, so a save after each shard grew with the cache (16 MB at
    50k rows: 0.3 s a save, quadratic in all); a shard written since the last save is adopted by the next
    dopsd-cache (:meth:`FeatureCache._adopt`), and :meth:`flush` saves at the end, on an error and on a stop."""

    RATIO = 20

    def __init__(self, save, clock=None):
        import time

        self.save, self.clock = save, clock or time.monotonic
        self.dirty, self.cost, self.last = False, 0.0, self.clock()

    def wrote(self, now: bool = False) -> None:
        self.dirty = True
        if now or self.clock() - self.last >= self.RATIO * self.cost:
            self.flush()

    def flush(self) -> None:
        if not self.dirty:
            return
        t0 = self.clock()
        self.save()
        self.last = self.clock()
        self.cost, self.dirty = self.last - t0, False


def host_memory_available() -> int | None:
    """Bytes of host memory available now (Linux's MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _ranks_on_this_machine() -> int:
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


class ContextProvider:
    """Contexts for the trainer: from a complete cache, or encoded on the fly and memoised in host memory.

    The memo grows with the data (every (record, prompt, branch) once: a VLM teacher context is megabytes):
    each time it doubles past ``REPORT_FROM`` bytes its size is said, with what it comes to when every one
    of the run's ``total`` contexts is encoded, and a warning where that is more than the host memory
    available: the feature cache (``dopsd-cache``, then ``cache.dir``) keeps them on disk instead."""

    REPORT_FROM = 1 << 30

    def __init__(self, adapter, cache: FeatureCache | None = None, total: int | None = None):
        self.adapter = adapter
        self.cache = cache
        self.memo: dict = {}
        self.total = total  # the contexts the run can ask for (cache.needed_entries), for the projection
        self.memo_bytes = 0
        self._contexts = 0
        self._report_at = self.REPORT_FROM

    def _remember(self, key, value, context: bool) -> None:
        self.memo[key] = value
        tensors = [value] if torch.is_tensor(value) else [value.features, *(v for v in value.extra.values()
                                                                          if torch.is_tensor(v))]
        self.memo_bytes += sum(t.numel() * t.element_size() for t in tensors)
        self._contexts += context
        if self.memo_bytes < self._report_at:
            return
        while self._report_at <= self.memo_bytes:
            self._report_at *= 2
        from dopsd_fast.memory import fmt_bytes

        line = f"contexts held in host memory: {fmt_bytes(self.memo_bytes)} for the {self._contexts} encoded so far"
        projected = None
        if self.total and self._contexts:
            projected = self.memo_bytes * max(self.total, self._contexts) / self._contexts
            line += f", about {fmt_bytes(projected)} when all {self.total} of the run are"
        avail = host_memory_available()
        ranks = _ranks_on_this_machine()  # under torchrun each rank of the machine holds its own
        if projected is not None and avail is not None and ranks * (projected - self.memo_bytes) > avail:
            each = f" on each of its {ranks} ranks" if ranks > 1 else ""
            log.warning("%s%s: more than the %s of host memory available; a feature cache keeps them on disk "
                        "(dopsd-cache, then cache.dir)", line, each, fmt_bytes(avail))
        else:
            log.info("%s (a feature cache keeps them on disk: dopsd-cache, then cache.dir)", line)

    def _get(self, kind, s) -> Context:
        """The context of sample ``s``; its images are read (decoded) only when it must be encoded."""
        key = record_key(kind, s.prompt, s.record)
        if self.cache is not None:
            return self.cache.get(key)
        ctx = self.memo.get(key)
        if ctx is None:
            refs = s.references if s.record.reference_paths else []
            ref_kw = {"references": [refs]} if refs else {}
            if kind == "student":
                ctx = self.adapter.encode_student([s.prompt], **ref_kw)[0]
            else:
                ctx = self.adapter.encode_teacher([s.prompt], [s.image], **ref_kw)[0]
            self._remember(key, ctx, context=True)
        return ctx

    def student(self, samples) -> list[Context]:
        return [self._get("student", s) for s in samples]

    def latents(self, samples) -> torch.Tensor:
        """Clean latents of the samples' target images (the SFT baseline's x0), memoised."""
        out = []
        for s in samples:
            key = ("latents", s.record.image_hash, tuple(s.record.bucket))
            if key not in self.memo:
                self._remember(key, self.adapter.encode_images(s.image[None].float())[0].float().cpu(), context=False)
            out.append(self.memo[key])
        return torch.stack(out)

    def teacher(self, samples) -> list[Context]:
        return [self._get("teacher", s) for s in samples]
