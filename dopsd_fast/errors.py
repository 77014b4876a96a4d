"""The errors a user acts on, each with a message that names the field, file or row: defined here, at
the bottom of the import order, so every layer can raise them (``dopsd_fast.config`` and
``dopsd_fast.data`` re-export them)."""

import pickle
import re


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


class DataError(ValueError):
    """Bad input data; the message names the file, row and field."""


class BackendError(ValueError):
    """The drop-in backend was handed something it cannot use (a sharded model, a latent layout, a
    missing EMA entry); the message names it and says what to pass instead."""


class ConventionError(BackendError):
    """A time or velocity convention is the opposite of this project's (sigma = 1 is noise, sigma = 1 - t
    for a model whose t = 1 is clean, v = eps - x0); the message names which one and how to convert."""


class AdapterError(ValueError):
    """peft state the fast path would not apply as the eager model does (LoRA on a module it runs whole,
    ``modules_to_save``, LoRA dropout or bias, a third adapter active, a LoRA'd module given no adapter
    name); the message names the module and what to change."""


class OutputDirError(RuntimeError):
    """The output folder cannot be used as asked (in use by another trainer, holding an earlier run, a
    planted lock link); the message names the folder and the ways on."""


def load_error(e: BaseException) -> str:
    """Why a received file did not load, for its one line: ``Type: first line``; for a Python object torch's
    safe loader refused, that (and the object), never torch's advice to load it unsafely
    (``weights_only=False``: the file may be made to run code)."""
    text = str(e)
    if isinstance(e, pickle.UnpicklingError) and "weights_only" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        return (f"UnpicklingError: it holds Python objects a checkpoint may not hold"
                f"{f' ({found.group(1)})' if found else ''}: a file of another kind, or made to run code")
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


# The lowest releases the package runs on, where an older one installs without complaint and then fails
# (setup.py's install_requires floors; tests/test_requirements.py keeps the two equal): transformers 5.4 ships
# the Qwen2-VL image processor module the Z-Image family imports, peft 0.18 is the first that imports under
# transformers 5, diffusers 0.42 has the Z-Image and FLUX.2-klein classes.
LIBRARY_FLOORS = {"transformers": "5.4", "peft": "0.18", "diffusers": "0.42"}


def _release(version: str) -> tuple:
    """'5.4.0.dev0' -> (5, 4, 0): the release numbers, what a floor compares."""
    m = re.match(r"\d+(?:\.\d+)*", version.strip())
    return tuple(int(x) for x in m.group(0).split(".")) if m else ()


def check_library_versions() -> None:
    """An ImportError in one line where an installed library is older than its floor
    (:data:`LIBRARY_FLOORS`): pip checks the range at install time, but not an install with --no-deps,
    or a package upgraded or downgraded later inside another trainer's environment. A library that is
    not installed is left to its own import error."""
    import importlib.metadata as md

    old = []
    for name, floor in LIBRARY_FLOORS.items():
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            continue
        if _release(have) < _release(floor):
            old.append(f"{name} {have} (needs >= {floor})")
    if old:
        raise ImportError(f"dopsd_fast: {', '.join(old)} installed; upgrade: pip install "
                          + " ".join(f"'{n}>={LIBRARY_FLOORS[n]}'" for n in LIBRARY_FLOORS if any(
                              o.startswith(n + " ") for o in old)))
