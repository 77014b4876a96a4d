"""Image-text datasets: the authors' JSONL rows, image folders, and the built-in tiny set.

Every record is checked when the dataset is built (file exists, image decodes fully, prompts
present and non-empty, a bucket fits), so a bad row fails at start-up with the file, row and field
named, not hours into a run. ``skip_bad=True`` skips such rows and counts them instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dopsd_fast.data.buckets import assign_bucket, make_buckets, nearest_aspect
from dopsd_fast.errors import DataError  # re-exported: dopsd_fast.data.DataError
from dopsd_fast.data.tiny import ensure_tiny_dataset, ensure_toy_concept_dataset
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 20000  # a prompt past it is not a caption (the encoders read a few hundred to a thousand tokens)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")  # data.folder's images (a GIF: its first frame)


@dataclass
class Record:
    """One validated training example (no pixels held)."""

    where: str  # "file:line" or the image path: used in every message about this record
    image_path: str  # the target image
    prompts: list  # prompt variants (one drawn per sample)
    width: int
    height: int
    bucket: tuple  # (width, height)
    image_hash: str  # sha256 of the image file's bytes (cache key)
    reference_paths: list = field(default_factory=list)  # images before the target (editing rows)
    reference_buckets: list = field(default_factory=list)  # the bucket each reference is loaded at
    reference_hash: str | None = None  # sha256 over the references' file hashes (cache key); None: no refs
    background: tuple | None = None  # data.alpha_background where an image of the row has an alpha channel
    float_image: bool = False  # an image of the row is 32-bit float (mode F): scaled by its range (float_image_scale)


class Sample:
    """One example: its record, the drawn prompt, and the target image at its bucket size, values in
    [0, 1], (3, H, W), with the reference images (editing rows) likewise. The images are decoded when
    first read (a training run whose contexts come from the feature cache never decodes them), from
    ``images`` when given: a callable returning ``(image, references)``, e.g. a background decode."""

    def __init__(self, record: Record, prompt: str, image: torch.Tensor | None = None,
                 references: list | None = None, images=None):
        self.record, self.prompt = record, prompt
        self._image, self._refs = image, references
        self._load = images if images is not None else (lambda: _load_record_images(record))
        if image is not None:
            self._refs = references if references is not None else []

    def _ensure(self):
        if self._image is None:
            self._image, self._refs = self._load()

    @property
    def image(self) -> torch.Tensor:
        self._ensure()
        return self._image

    @property
    def references(self) -> list:
        self._ensure()
        return self._refs

    @property
    def decoded(self) -> bool:
        return self._image is not None


def _load_record_images(rec: "Record"):
    """(target image, reference images) of a record, decoded at their buckets. A file that no longer
    decodes (changed or damaged since the start-up check) is a :class:`DataError` naming the row and file."""
    def load(path, bucket, field):
        try:
            return load_image(path, bucket)
        except (OSError, ValueError, SyntaxError) as e:  # PIL: OSError (truncated), UnidentifiedImageError, ...
            raise DataError(f"{rec.where}: {field} {path}: {e} (it decoded at the start-up check: damaged, changed "
                            "or unreachable since; restore the file, or drop the row and resume)") from None

    return (load(rec.image_path, rec.bucket, "image"),
            [load(p, b, "reference") for p, b in zip(rec.reference_paths, rec.reference_buckets)])


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_EXIF_ORIENTATION = 0x0112
_EXIF_SWAPS_AXES = (5, 6, 7, 8)  # transpose, rotate 270, transverse, rotate 90 (as ImageOps.exif_transpose)


def upright_size(im: "Image.Image") -> tuple[int, int]:
    """(width, height) of the image as :func:`decode_image` returns it: after its EXIF orientation (a
    portrait photo stored landscape with orientation 6 or 8 is portrait)."""
    w, h = im.size
    return (h, w) if im.getexif().get(_EXIF_ORIENTATION, 1) in _EXIF_SWAPS_AXES else (w, h)


def has_alpha(im: "Image.Image") -> bool:
    """Whether :func:`decode_image` composites ``im`` on ``data.alpha_background``."""
    return im.mode in _ALPHA_MODES or (im.mode == "P" and "transparency" in im.info)


def _check_image(path: Path, where: str, field_name: str) -> tuple[int, int, bool, bool]:
    """The upright size of a fully decodable image (buckets are chosen from it), whether it has an
    alpha channel, and whether it is a 32-bit float image."""
    if not path.is_file():
        what = "is a folder, not an image file" if path.is_dir() else "image file not found:"
        raise DataError(f"{where}: field '{field_name}': {path} {what}" if path.is_dir() else
                        f"{where}: field '{field_name}': {what} {path}")
    try:
        with open_image(path, f"{where}: field '{field_name}': image {path}", DataError) as im:
            im.load()  # full decode: catches truncated files, not just bad headers
            if im.mode == "F":  # its range decides its scale: checked here, not at the first step
                float_image_scale(np.asarray(im, dtype=np.float32), f"{where}: field '{field_name}': image {path}")
            return (*upright_size(im), has_alpha(im), im.mode == "F")
    except DataError:
        raise
    except Exception as e:  # PIL raises many types for broken files
        raise DataError(f"{where}: field '{field_name}': cannot read image {path}: {type(e).__name__}: {e}") from None


ALPHA_BACKGROUND = [255, 255, 255]  # data.alpha_background (set by build_dataset)
MAX_IMAGE_PIXELS = [1 << 26]  # data.max_image_pixels (set by set_max_image_pixels)
DECODE_BYTES_PER_PIXEL = 27  # load_image's peak (fp32 copies, per-channel resize), measured on a 9000 x 9000 PNG


def set_max_image_pixels(n: int) -> None:
    """``data.max_image_pixels`` for this process: our check, and PIL's own bomb check at the same size (its
    default, 179 MP, would refuse a larger limit's images before ours is asked)."""
    MAX_IMAGE_PIXELS[0] = Image.MAX_IMAGE_PIXELS = n


def open_image(path, name: str, error: type) -> "Image.Image":
    """``Image.open`` (the header only), refused (``error``, one line naming ``name``) over
    ``data.max_image_pixels`` before its pixels are decoded: a small compressed file can declare a
    9000 x 9000 picture."""
    limit = MAX_IMAGE_PIXELS[0]
    with warnings.catch_warnings():  # PIL warns past its limit (ours) and refuses past twice it
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as e:
            raise error(f"{name}: over data.max_image_pixels = {limit} ({e})") from None
    w, h = im.size
    if w * h > limit:
        im.close()
        raise error(f"{name} is {w}x{h} = {w * h / 1e6:.3g} MP, over data.max_image_pixels = {limit} "
                    f"({limit / 1e6:.3g} MP; decoding it would take ~{w * h * DECODE_BYTES_PER_PIXEL / 1e9:.1f} "
                    "GB): downscale it, or raise data.max_image_pixels")
    return im
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_alpha_logged: set = set()


def float_image_scale(arr: np.ndarray, name: str) -> float:
    """The range a 32-bit float image is in: [0, 1] (a slight overshoot, HDR rounding, clipped) or [0, 255];
    anything else is a DataError naming the file (one pixel just over 1 once made a [0, 1] image 255x
    darker, silently)."""
    if not np.isfinite(arr).all():
        raise DataError(f"{name}: a float image with NaN or infinite pixels; refused")
    lo, hi = float(arr.min()), float(arr.max())
    if -0.5 <= lo and hi <= 1.5:
        return 1.0
    if -0.5 * 255 <= lo and hi <= 1.5 * 255:  # a dark [0, 255] image's brightest pixel may be anywhere past 1.5
        return 255.0
    raise DataError(f"{name}: a float image with pixels in [{lo:.4g}, {hi:.4g}], neither in [0, 1] nor in [0, 255]; "
                    "save it as an 8- or 16-bit image in the range meant")


def decode_image(im: "Image.Image", name: str | None = None) -> np.ndarray:
    """A PIL image -> float32 (H, W, 3) in [0, 1], decoded right: the EXIF orientation applied (a
    portrait photo stays upright); 16- and 32-bit grayscale scaled by their range (not clipped to 8
    bits); palette images through their own palette; an alpha channel composited on
    ``data.alpha_background`` (logged once per file, named: ``name``, else the image's own file name).
    """
    from PIL import ImageOps

    name = name or getattr(im, "filename", "") or "an image without a file name"
    im = ImageOps.exif_transpose(im)  # a copy: it has no .filename
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float32)
        top = 65535.0 if im.mode.startswith("I;16") or (im.mode == "I" and arr.max() > 255) else 255.0
        if im.mode == "F":
            top = float_image_scale(arr, name)
        arr = np.clip(arr / top, 0.0, 1.0)
        return np.repeat(arr[..., None], 3, axis=2)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in _ALPHA_MODES:
        if name not in _alpha_logged:
            _alpha_logged.add(name)
            log.info("%s has an alpha channel: composited on data.alpha_background %s", name, ALPHA_BACKGROUND)
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
        bg = np.asarray(ALPHA_BACKGROUND, dtype=np.float32) / 255.0
        a = rgba[..., 3:4]
        return rgba[..., :3] * a + bg * (1 - a)
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def load_image(path: str, bucket: tuple) -> torch.Tensor:
    """Decode (:func:`decode_image`), resize to cover the bucket (bicubic, per channel in floating
    point), centre-crop; float (3, H, W) in [0, 1]."""
    bw, bh = bucket
    with Image.open(path) as im:
        arr = decode_image(im, str(path))
    h, w = arr.shape[:2]
    s = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * s)), max(bh, round(h * s))
    left, top = (nw - bw) // 2, (nh - bh) // 2
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(arr[..., c]), "F").resize((nw, nh), Image.BICUBIC)
                        .crop((left, top, left + bw, top + bh))) for c in range(3)]
    return torch.from_numpy(np.clip(np.stack(chans), 0.0, 1.0).astype(np.float32))


class ImageTextDataset:
    """Validated records plus deterministic loading; prompt variants drawn with a given RNG."""

    def __init__(self, records: list[Record], skipped: list[str] | None = None, source: str = ""):
        if not records:
            detail = (f" ({len(skipped)} bad rows skipped; first: {skipped[0]})" if skipped else
                      " (the file has no rows: one JSON object per line, with an image and a prompt)"
                      if source.startswith("data.jsonl") else
                      f" (no image found: {' '.join(IMAGE_EXTS)} files in the folder itself, not its subfolders, each "
                      "with a .txt caption beside it; or use data.jsonl)")
            raise DataError(f"the dataset{' ' + source if source else ''} has no usable rows" + detail)
        self.records = records
        self.skipped = skipped or []

    def __len__(self) -> int:
        return len(self.records)

    @property
    def buckets_of(self) -> list[tuple]:
        return [r.bucket for r in self.records]

    @property
    def batch_groups(self) -> list[tuple]:
        """Per record, what the samples of one batch share: the bucket, and of an editing row the number
        and buckets of its references (one batch's references stack into one tensor per place). A row
        without references: its bucket alone, as before editing rows existed."""
        return [tuple(r.bucket) + tuple(x for b in r.reference_buckets for x in b) for r in self.records]

    def get(self, index: int, rng: random.Random | None = None, prompt_index: int | None = None,
            images=None) -> Sample:
        """The sample at ``index`` (prompt variant from ``rng``); its images decoded when first read, by
        ``images`` when given (a callable returning (image, references))."""
        rec = self.records[index]
        if prompt_index is None:
            prompt_index = rng.randrange(len(rec.prompts)) if rng is not None else 0
        sample = Sample(rec, rec.prompts[prompt_index], images=images)
        sample.index = index  # the row's place in the dataset: how other ranks' messages name it
        return sample

    def load_images(self, index: int):
        """(image, references) of record ``index``, decoded now."""
        return _load_record_images(self.records[index])

    def fingerprint(self) -> dict:
        """What the data is, not where it lies: the number of rows and SHA-256 digests of the images (every
        row's target and reference file hashes, in order: already computed when the rows were checked,
        so the fingerprint costs nothing more), of the prompts, and of the buckets. A checkpoint records
        it; a resume compares it (a file edited in place between runs changes it, a dataset copied
        elsewhere does not). Where an image has an alpha channel, also the background it is composited
        on (``data.alpha_background``: the pixels trained on)."""
        def digest(items) -> str:
            return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:32]

        rs = self.records
        out = {"rows": len(rs), "images": digest([[r.image_hash, r.reference_hash] for r in rs]),
               "prompts": digest([r.prompts for r in rs]), "buckets": digest([list(r.bucket) for r in rs])}
        composited = [list(r.background) for r in rs if r.background is not None]
        if composited:  # images with transparency: the pixels trained on depend on data.alpha_background
            out["composite"] = digest(composited)
        return out


def _no_bucket(where, field, what, path, w, h, buckets) -> DataError:
    """An image that fits inside no bucket: the bucket nearest its aspect, and what would make it fit."""
    near = nearest_aspect(w, h, buckets)
    return DataError(f"{where}: field '{field}': {what} {path} is {w}x{h}, which fits inside no bucket (the nearest "
                     f"aspect's is {near[0]}x{near[1]}); upscaling is not done: use a larger image, or smaller buckets "
                     "(data.bucket_scale)")


class CheckRecord:
    """What the data check found of each image (size, alpha, SHA-256), kept per data source in
    ``$DOPSD_FAST_HOME/datacheck/`` so that a start (a resume, a dry run, ``dopsd-cache``) neither decodes
    nor hashes again an image unchanged since: same path, size, modification and change times, device and
    inode, and first 64 KiB (a change time no tool sets back: an edit in place is seen, as git's index sees
    it; a file modified in the last 2 s is not recorded). Written by rank 0 alone. Only this check's
    images are written back; a record that cannot be read or written costs a full check, nothing else."""

    VERSION = 3  # 3: whether the image is 32-bit float

    def __init__(self, source: Path | None):
        self.path = None
        self.earlier: dict = {}
        self.now: dict = {}
        if source is None:
            return
        from dopsd_fast.data.tiny import home

        digest = hashlib.sha256(str(Path(source).absolute()).encode()).hexdigest()[:24]
        self.path = home() / "datacheck" / f"{digest}.json"
        try:
            data = json.loads(self.path.read_text())
            checks = data.get("checks") if isinstance(data, dict) and data.get("version") == self.VERSION else None
        except (OSError, ValueError):
            checks = None
        if isinstance(checks, dict):
            self.earlier = {k: v for k, v in checks.items() if isinstance(v, list) and len(v) == 5
                            and all(type(x) is int and x > 0 for x in v[:2]) and type(v[2]) is bool
                            and isinstance(v[3], str) and len(v[3]) == 64 and type(v[4]) is bool}

    HEAD_BYTES = 1 << 16  # hashed into the key: a same-size edit whose times a synced mount mirrors (EXIF is here)
    RACY_S = 2.0  # a file modified this recently may change again within the times' resolution: not recorded

    def _key(self, path: Path) -> str | None:
        try:
            st = os.stat(path)
            if time.time() - st.st_mtime < self.RACY_S:
                return None
            with open(path, "rb") as f:
                head = hashlib.sha256(f.read(self.HEAD_BYTES)).hexdigest()[:16]
        except OSError:
            return None
        return (f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_dev}|{st.st_ino}|"
                f"{head}")

    def image(self, path: Path, where: str, field_name: str) -> tuple[int, int, bool, str, bool]:
        """(width, height, alpha, SHA-256, 32-bit float) of an image: the earlier check's where the file
        is unchanged, else :func:`_check_image` (a full decode) and :func:`file_sha256`."""
        key = self._key(path) if self.path is not None and path.is_file() else None
        hit = self.earlier.get(key) if key is not None else None
        if hit is not None and hit[0] * hit[1] <= MAX_IMAGE_PIXELS[0]:  # data.max_image_pixels may be lower now
            self.now[key] = hit
            return tuple(hit)
        w, h, alpha, flt = _check_image(path, where, field_name)
        out = (w, h, alpha, file_sha256(path), flt)
        if key is not None:
            self.now[key] = list(out)
        return out

    @property
    def reused(self) -> int:
        return sum(1 for k in self.now if k in self.earlier)

    def save(self, complete: bool = True) -> None:
        """The record written: this check's images; of a check stopped by a bad row (``complete`` false),
        the earlier record's images too (the rows after it were not looked at)."""
        if self.path is None or os.environ.get("RANK", "0") != "0":  # one writer where ranks share the home
            return
        from dopsd_fast.safety import atomic_write

        text = json.dumps({"version": self.VERSION, "checks": self.now if complete else {**self.earlier, **self.now}})
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, lambda t: t.write_text(text))
        except OSError as e:  # a read-only home: the next start checks every image again
            log.info("data: the record of checked images was not written (%s)", e)


def _validate_record(where, image_path, refs, prompts, buckets, image_field, ref_field=None,
                     check: CheckRecord | None = None) -> Record:
    """``image_field``: the field naming the target (of the list form: the list, its last element the
    target); ``ref_field``: the one naming the references (None: the list form's)."""
    check = check or CheckRecord(None)
    target_field = image_field if not refs or ref_field else f"{image_field}[{len(refs)}]"
    w, h, alpha, target_hash, flt = check.image(image_path, where, target_field)
    ref_buckets, ref_hashes = [], []
    for i, r in enumerate(refs):
        field = f"{ref_field or image_field}[{i}]"
        rw, rh, ref_alpha, ref_sha, ref_flt = check.image(r, where, field)
        alpha, flt = alpha or ref_alpha, flt or ref_flt
        rb = assign_bucket(rw, rh, buckets)
        if rb is None:
            raise _no_bucket(where, field, "reference", r, rw, rh, buckets)
        ref_buckets.append(rb)
        ref_hashes.append(ref_sha)
    bucket = assign_bucket(w, h, buckets)
    if bucket is None:
        raise _no_bucket(where, target_field, "image", image_path, w, h, buckets)
    ref_hash = hashlib.sha256(json.dumps(ref_hashes).encode()).hexdigest() if refs else None
    return Record(where, str(image_path), prompts, w, h, bucket, target_hash, [str(r) for r in refs],
                  ref_buckets, ref_hash, tuple(ALPHA_BACKGROUND) if alpha else None, flt)


def _iter_jsonl(path: Path, image_key: str, prompt_keys: list):
    """Yield (where, callable building the Record's inputs) per row, raising DataError."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a byte-order mark (some editors write one)
                raw = raw[3:]
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"

            def parse(raw=raw, where=where, first=lineno == 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                    "save the file as UTF-8") from None
                try:
                    row = json.loads(line, object_pairs_hook=_Row.of)
                except json.JSONDecodeError as e:
                    hint = ("; a JSONL file holds one JSON object per line, not a JSON array (write each row "
                            "on a line of its own)") if first and line.lstrip().startswith("[") else ""
                    raise DataError(f"{where}: malformed JSON line: {e}{hint}") from None
                except RecursionError:
                    raise DataError(f"{where}: JSON nested too deeply to read") from None
                except ValueError:  # json's integer limit (not a JSONDecodeError): the file and row named
                    raise DataError(f"{where}: malformed JSON line: a number of more than "
                                    f"{sys.get_int_max_str_digits()} digits") from None
                if not isinstance(row, dict):
                    raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
                if row.twice:  # the row's own fields (an object inside a field is the row's business)
                    raise DataError(f"{where}: field {row.twice[0]!r} given twice; give it once")
                if "target" in row:  # editing rows: {"references": [...], "target": "..."}
                    if image_key in row:
                        raise DataError(f"{where}: both '{image_key}' and 'target' given; use one (the authors' list "
                                        f"form in '{image_key}', or 'references' + 'target')")
                    target, refs = row["target"], row.get("references", [])
                    if not isinstance(target, str) or not target:
                        raise DataError(f"{where}: field 'target' must be an image path")
                    if not isinstance(refs, list) or not all(isinstance(i, str) and i for i in refs):
                        raise DataError(f"{where}: field 'references' must be a list of image paths")
                    images, fields = refs + [target], ("target", "references")
                elif "references" in row:
                    raise DataError(f"{where}: field 'references' given without 'target'")
                else:
                    if image_key not in row:
                        raise DataError(f"{where}: missing field '{image_key}' (data.image_key), or 'target'")
                    images = row[image_key]
                    images = images if isinstance(images, list) else [images]
                    if not images or not all(isinstance(i, str) and i for i in images):
                        raise DataError(f"{where}: field '{image_key}' must be a path or a non-empty list of paths")
                    fields = (image_key, None)
                paths = [(path.parent / i) if not Path(i).is_absolute() else Path(i) for i in images]
                prompts = []
                for k in prompt_keys:
                    if k not in row:
                        raise DataError(f"{where}: missing prompt field '{k}' (data.prompt_keys)")
                    v = row[k]
                    if not isinstance(v, str):
                        raise DataError(f"{where}: prompt field '{k}' must be a string, got {type(v).__name__}")
                    if not v.strip():
                        raise DataError(f"{where}: prompt field '{k}' is empty")
                    try:
                        v.encode("utf-8")
                    except UnicodeEncodeError as e:  # a lone surrogate escape (\ud800): no text any encoder reads
                        raise DataError(f"{where}: prompt field '{k}' holds {v[e.start]!r} at character {e.start + 1}, "
                                        "not a character of text (a lone surrogate escape)") from None
                    if len(v) > MAX_PROMPT_CHARS:
                        raise DataError(f"{where}: prompt field '{k}' is {len(v)} characters long, over "
                                        f"{MAX_PROMPT_CHARS}, far more than the encoders read (model.student_max_tokens / "
                                        "teacher_max_tokens tokens)")
                    prompts.append(v)
                return paths[-1], paths[:-1], prompts, fields

            yield where, parse


class _Row(dict):
    """A JSON object with the keys it gave more than once (json keeps the last of a repeated key: a row's
    first `image` or prompt would be dropped silently)."""

    twice: list

    @classmethod
    def of(cls, pairs):
        row, seen = cls(pairs), set()
        row.twice = [k for k, _ in pairs if k in seen or seen.add(k)]
        return row


def _iter_folder(folder: Path):
    """Every image in ``folder``, each with its caption beside it; hidden files (``.name``, e.g. the
    ``._name.png`` of a macOS copy) are not images of the data. Subfolders are not read (a run's
    samples, masks, regularisation sets): the images they hold are counted, once, in a warning."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file()
                   and not p.name.startswith("."))  # hidden files: macOS copies' ._name.png (AppleDouble) metadata
    below = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.parent != folder
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if below:
        log.warning("data.folder %s: %d image(s) in its subfolders are not read (first: %s); the folder's own %d are",
                    folder, len(below), below[0].relative_to(folder), len(files))
    stems: dict = {}
    for img in files:
        stems.setdefault(img.with_suffix(""), []).append(img.name)
    shared = [names for names in stems.values() if len(names) > 1]
    if shared:
        log.warning("data.folder %s: %d caption file(s) serve more than one image (e.g. %s share %s.txt): each "
                    "image trains on the same caption", folder, len(shared), " and ".join(shared[0]),
                    Path(shared[0][0]).stem)
    upper = {p.with_suffix(""): p for p in folder.iterdir()  # a.TXT beside a.png (image suffixes: any case too)
             if p.suffix.lower() == ".txt" and p.suffix != ".txt" and p.is_file()}
    for img in files:
        where = str(img)

        def parse(img=img, where=where):
            txt = img.with_suffix(".txt")
            if not txt.is_file():
                txt = upper.get(img.with_suffix(""), txt)
            if not txt.is_file():
                raise DataError(f"{where}: no caption file {txt.name} beside the image")
            try:
                caption = txt.read_text(encoding="utf-8-sig").strip()  # a byte-order mark is no part of it
            except UnicodeDecodeError as e:
                raise DataError(f"{txt}: caption is not UTF-8 text (byte at offset {e.start}); save it as UTF-8") from None
            if not caption:
                raise DataError(f"{txt}: caption is empty")
            if len(caption) > MAX_PROMPT_CHARS:
                raise DataError(f"{txt}: caption is {len(caption)} characters long, over {MAX_PROMPT_CHARS}, far more "
                                "than the encoders read: not a caption file?")
            return img, [], [caption], ("image", None)

        yield where, parse


def build_dataset(cfg, progress: bool = True) -> ImageTextDataset:
    """Build and validate the dataset described by a :class:`~dopsd_fast.config.DataConfig`."""

    ALPHA_BACKGROUND[:] = list(cfg.alpha_background)
    set_max_image_pixels(cfg.max_image_pixels)
    buckets = make_buckets(cfg.buckets, cfg.bucket_scale, cfg.bucket_multiple)
    if cfg.buckets != "1mp":
        given = [tuple(int(v) for v in b) for b in cfg.buckets]
        if given != buckets:  # a recipe's bucket_scale applies to buckets given too; sides round to the multiple
            log.info("data.buckets %s -> %s (x data.bucket_scale %g, sides rounded to data.bucket_multiple %d)",
                     [list(b) for b in given], [list(b) for b in buckets], cfg.bucket_scale, cfg.bucket_multiple)
    if cfg.builtin == "tiny":
        path = ensure_tiny_dataset()
        rows = _iter_jsonl(path, cfg.image_key, cfg.prompt_keys)
    elif cfg.builtin in ("toy-concept", "toy-concept-prior"):
        path = ensure_toy_concept_dataset(prior=cfg.builtin == "toy-concept-prior")
        rows = _iter_jsonl(path, cfg.image_key, cfg.prompt_keys)
    elif cfg.jsonl:
        path = Path(cfg.jsonl)
        if path.is_dir():
            raise DataError(f"data.jsonl: {path} is a folder; give the JSONL file in it, or data.folder={path} for "
                            "a folder of images with a .txt caption beside each")
        if not path.is_file():
            raise DataError(f"data.jsonl: file not found: {path}")
        rows = _iter_jsonl(path, cfg.image_key, cfg.prompt_keys)
    else:
        folder = Path(cfg.folder)
        if not folder.is_dir():
            raise DataError(f"data.folder: not a directory: {folder}")
        rows = _iter_folder(folder)
        path = folder
    records, skipped, bare_targets = [], [], []
    rows = list(rows)
    check = CheckRecord(None if cfg.builtin else Path(path))
    t0 = time.monotonic()
    if not cfg.builtin:
        log.info("data: checking %d rows of %s (each image decoded in full and hashed, unless unchanged since an "
                 "earlier check)", len(rows), path)
    for where, parse in tqdm(rows, desc="checking data", disable=not progress, leave=False):
        try:
            image, refs, prompts, (field, ref_field) = parse()
            records.append(_validate_record(where, image, refs, prompts, buckets, field, ref_field, check))
            if field == "target" and not refs:
                bare_targets.append(where)
        except DataError as e:
            if not cfg.skip_bad:
                check.save(complete=False)  # the rows checked before it: not decoded again once it is mended
                raise
            skipped.append(str(e))
    check.save()
    if not cfg.builtin:
        counts: dict = {}
        for r in records:
            counts[tuple(r.bucket)] = counts.get(tuple(r.bucket), 0) + 1
        log.info("data: %d usable rows in %.1f s (%d images unchanged since an earlier check, not decoded again); "
                 "rows per bucket: %s", len(records), time.monotonic() - t0, check.reused,
                 ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(counts.items())))
    if skipped:
        log.warning("skipped %d bad rows (data.skip_bad=true); first: %s", len(skipped), skipped[0])
    if bare_targets:  # the teacher's mode follows each row: say it where a row may not mean it
        log.warning("%d 'target' rows name no references (first: %s): trained as text-to-image rows (the "
                    "editing-branch teacher), not as edits", len(bare_targets), bare_targets[0])
    source = (f"data.folder {path}" if not cfg.jsonl and not cfg.builtin else f"data.jsonl {path}" if cfg.jsonl
              else f"{path}")
    if not cfg.builtin:
        _say_outside(records, Path(path) if cfg.folder else Path(path).parent, source)
        _say_crops_and_repeats(records)
    return ImageTextDataset(records, skipped, source)


CROP_KEEPS_AT_LEAST = 0.6  # a row whose bucket's centre crop keeps less of its image is said (a 16:1 strip: 15 %)


def crop_kept(width: int, height: int, bucket) -> float:
    """The part of a ``width`` x ``height`` image a bucket keeps: resized to cover it, then centre-cropped."""
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    return (bw * bh) / (width * height * scale * scale)


def _say_crops_and_repeats(records) -> None:
    """Rows trained on little of their image (an aspect far from every bucket's), and rows repeating an
    earlier row (same image, references and prompts: trained twice as often): warned, with the first."""
    cut = [(r, crop_kept(r.width, r.height, r.bucket)) for r in records]
    cut = [(r, k) for r, k in cut if k < CROP_KEEPS_AT_LEAST]
    if cut:
        r, k = min(cut, key=lambda x: x[1])
        log.warning("%d rows keep less than %d%% of their image in their bucket's centre crop (the least: %s, "
                    "%dx%d in bucket %dx%d keeps %d%%): crop them yourself, or add buckets of their aspect "
                    "(data.buckets)", len(cut), round(100 * CROP_KEEPS_AT_LEAST), r.where, r.width, r.height,
                    *r.bucket, round(100 * k))
    seen, repeats = {}, []
    for r in records:
        key = (r.image_hash, r.reference_hash, tuple(r.prompts))
        if key in seen:
            repeats.append((r, seen[key]))
        else:
            seen[key] = r
    if repeats:
        r, first = repeats[0]
        log.warning("%d rows repeat an earlier row (same image and prompts: trained that much more often; the "
                    "first: %s repeats %s)", len(repeats), r.where, first.where)


def _say_outside(records, base: Path, source: str) -> None:
    """One line when rows name images outside the data's folder (an absolute path, ``..``): the user's own
    index may mean it; a received dataset's rows could name any image the user can read. Links are not
    followed (a hub snapshot's files are links into its blob store)."""
    base = Path(os.path.abspath(base))
    outside = [(rec.where, p) for rec in records for p in (rec.image_path, *rec.reference_paths)
               if not Path(os.path.abspath(p)).is_relative_to(base)]
    if outside:
        where, p = outside[0]
        log.info("%s: %d image path(s) of its rows lead outside %s (first: %s: %s); fine for your own files; "
                 "in a dataset you received, check what it reads", source, len(outside), base, where, p)
