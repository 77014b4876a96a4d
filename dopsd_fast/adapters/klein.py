"""The FLUX.2-klein adapter, under its earlier import path (:mod:`dopsd_fast.families.klein.adapter`)."""

from dopsd_fast.families.klein.adapter import (AUTHORS_GT_INSTRUCTION,  # noqa: F401
                                               AUTHORS_TEACHER_INSTRUCTION, DEFAULT_GT_INSTRUCTION,
                                               DEFAULT_TEACHER_INSTRUCTION, KleinAdapter, flux2_velocity, image_ids,
                                               pack, refs_of, text_ids)
from dopsd_fast.families.klein.spec import BASE_TARGETS, TINY_KLEIN, compute_empirical_mu  # noqa: F401
