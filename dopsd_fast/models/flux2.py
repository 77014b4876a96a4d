"""The fast FLUX.2-klein model, under its earlier import path (:mod:`dopsd_fast.families.klein.fast`)."""

from dopsd_fast.families.klein.fast import FastFlux2, KleinBranch  # noqa: F401
