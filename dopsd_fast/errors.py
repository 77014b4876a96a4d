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
