"""The errors a user acts on, each with a message that names the field, file or row: defined here, at
the bottom of the import order, so every layer can raise them (``dopsd_fast.config`` and
``dopsd_fast.data`` re-export them)."""


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
