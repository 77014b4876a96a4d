"""The toy Z-Image's model, encoders and shipped weights: the Z-Image family's ``toy-zimage`` preset
module (:mod:`dopsd_fast.families.zimage.toy`), under the toy world's name."""

from dopsd_fast.families.zimage.toy import *  # noqa: F401,F403
