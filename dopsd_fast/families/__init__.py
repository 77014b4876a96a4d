"""The model families, read through one registry.

Each family is one folder, ``dopsd_fast/families/<name>/``: its spec (:class:`~dopsd_fast.families.spec.
FamilySpec`: shapes, conventions, FLOP and memory coefficients, FP8 module patterns, presets, named
schedules), its adapter, its fast model and its presets. Adding a family = one folder + one line in
:data:`_FAMILY_SPECS` below. Code outside ``families/`` asks the registry (``family(cfg.model.family)``)
and never names a family.
"""

from __future__ import annotations

from dopsd_fast.algorithm import register_schedules
from dopsd_fast.errors import ConfigError, DataError
from dopsd_fast.families import klein, zimage
from dopsd_fast.families.spec import FAST_FEATURES, Convention, FamilySpec, Flavour, MemoryCoefficients, Preset
from dopsd_fast.families.adapter import resolve_device_dtype

# The registry: one line per family, the first is the default (``model.family`` when none is given).
_FAMILY_SPECS = (zimage.SPEC, klein.SPEC)

FAMILIES: dict[str, FamilySpec] = {s.name: s for s in _FAMILY_SPECS}
DEFAULT_FAMILY = _FAMILY_SPECS[0].name
for _spec in _FAMILY_SPECS:
    register_schedules(_spec.named_schedules)
ZIMAGE, KLEIN = zimage.SPEC, klein.SPEC  # the specs by name, for code inside families/ and for tests

__all__ = ["DEFAULT_FAMILY", "FAMILIES", "FAST_FEATURES", "Convention", "FamilySpec", "Flavour", "MemoryCoefficients",
           "Preset", "build_adapter", "check_buckets", "family", "family_of_transformer", "flavour",
           "require_editing_support"]


def family(name: str) -> FamilySpec:
    """The spec of ``model.family`` ``name`` (one line naming the known ones otherwise)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"config field 'model.family': unknown family {name!r}; known: {sorted(FAMILIES)}") from None


def build_adapter(cfg, load_encoders: bool = True, empty_weights: bool = False, encoding_only: bool = False,
                  transformer_weights: bool = True):
    """The adapter of ``cfg.family`` (a :class:`~dopsd_fast.config.ModelConfig`); ``empty_weights``:
    the architecture on the meta device, nothing read (``dopsd-train --dry-run``); ``encoding_only``:
    what encoding contexts needs, the transformer's weights not read (``dopsd-cache``);
    ``transformer_weights`` False: the transformer's weights alone not read (another is loaded in its place)."""

    spec = family(cfg.family)
    device, dtype = resolve_device_dtype(cfg)
    return spec.adapter_class()(cfg, device, dtype, load_encoders=load_encoders, empty_weights=empty_weights,
                                encoding_only=encoding_only, transformer_weights=transformer_weights)


def family_of_transformer(module) -> FamilySpec:
    """The family of a diffusers transformer instance (by its class), for the drop-in backend."""
    cls = type(getattr(module, "base_model", module)).__name__
    for spec in FAMILIES.values():
        if any(c.__name__ == spec.transformer_class for c in type(module).__mro__) or cls == spec.transformer_class:
            return spec
    raise TypeError(f"{type(module).__name__}: not a transformer of a known family "
                    f"({', '.join(s.transformer_class for s in FAMILIES.values())})")


def require_editing_support(spec: FamilySpec, dataset) -> None:
    """Refuse rows with reference images (editing rows) for a family without an editing mode."""
    if spec.editing:
        return
    bad = next((r for r in dataset.records if r.reference_paths), None)
    if bad is not None:
        editing = [s.name for s in FAMILIES.values() if s.editing]
        raise DataError(f"{bad.where}: a row with reference images (an editing row), but model.family={spec.name} "
                        f"has no editing mode; use model.family={' or '.join(editing)}")


def check_buckets(adapter, dataset=None, sizes=None, what: str = "a bucket of the data", teacher: bool = True) -> None:
    """Every bucket the data uses (targets and references; or the (width, height) ``sizes`` given, ``what``
    they are) is one the model takes (its latent grid): one line naming the fields at start-up, not a
    reshape error at the first image of that size. The model's settings for training too (``teacher``:
    its teacher's, where the method encodes teacher contexts: :meth:`~dopsd_fast.families.adapter.
    ModelAdapter.check_settings`)."""
    adapter.check_settings(teacher=teacher)
    sizes = {tuple(b) for b in sizes or ()}
    if dataset is not None:
        sizes |= {tuple(r.bucket) for r in dataset.records}
        sizes |= {tuple(b) for r in dataset.records for b in r.reference_buckets}
    for w, h in sorted(sizes):
        try:
            adapter.latent_shape(h, w)
        except ValueError as e:
            raise ConfigError(f"config fields 'data.buckets' / 'data.bucket_scale' / 'data.bucket_multiple': {e} "
                              f"({what})") from None


def flavour(name: str) -> tuple[FamilySpec, Flavour]:
    """A flavour by name across families (``zimage-6b``, ``tiny-klein``, ...)."""
    for spec in FAMILIES.values():
        if name in spec.flavours:
            return spec, spec.flavours[name]
    known = [n for s in FAMILIES.values() for n in s.flavours]
    raise KeyError(f"unknown flavour {name!r}; known: {known}")
