"""FLUX.2-klein: spec (:mod:`.spec`), adapter (:mod:`.adapter`), fast model (:mod:`.fast`), preset (:mod:`.tiny`)."""

from dopsd_fast.families.klein.spec import SPEC

__all__ = ["SPEC"]
