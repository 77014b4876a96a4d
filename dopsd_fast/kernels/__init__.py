"""Triton kernels of dopsd-fast: ``dopsd_fast.kernels.attention``, ``.multi_lora``, ``.rope_qk_norm``,
``.norm_modulation``, ``.swiglu``, ``.fp8_quant``, ``._common``. Importing this
package imports nothing heavy; import the module you need.

Where the modules live: in a source checkout they stay in the repository's top-level ``kernels/``
folder, which has no ``__init__.py`` on purpose: ``kernels`` is the top-level name of Hugging Face's
package (which transformers and diffusers import), so our folder must never be importable as a
regular package under that name. This package reaches the folder through its ``__path__``, so the
checkout imports as-is (no install step), and so does an editable install. A wheel copies the
modules into this folder (setup.py's ``build_py``), and the source folder is not looked for."""

from pathlib import Path as _Path

# A cost pass's impl (the step model, benchmarks/perf_model.py, prices passes by kind, shape and impl):
# torch._scaled_mm with use_fast_accum=True, the FP8 forward of ``multi_lora`` on cuBLAS.
CUBLAS_FAST = "cublas_fast"


def _source_folder() -> _Path | None:
    """The checkout's top-level ``kernels/`` folder, when this file sits in a checkout (``setup.py``
    beside the package and our ``_common.py`` in the folder); None in an installed copy."""
    here = _Path(__file__).resolve().parent
    if (here / "_common.py").is_file():  # an installed copy: the modules are already here
        return None
    root = here.parents[1]
    folder = root / "kernels"
    if (root / "setup.py").is_file() and (folder / "_common.py").is_file() and not (folder / "__init__.py").exists():
        return folder
    return None


_folder = _source_folder()
if _folder is not None:
    __path__.append(str(_folder))  # noqa: F821 (a package's __path__)
del _folder
