"""Z-Image: spec (:mod:`.spec`), adapter (:mod:`.adapter`), fast model (:mod:`.fast`), presets
(:mod:`.tiny`, :mod:`.toy`)."""

from dopsd_fast.families.zimage.spec import SPEC

__all__ = ["SPEC"]
