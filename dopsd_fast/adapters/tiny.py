"""The tiny presets' offline pieces, under their earlier import path (:mod:`dopsd_fast.offline`; the tiny
Z-Image config is the family's, :mod:`dopsd_fast.families.zimage.spec`)."""

from dopsd_fast.families.zimage.spec import TINY_ZIMAGE  # noqa: F401
from dopsd_fast.offline import (CHAT_TEMPLATE, SPECIAL_TOKENS, TINY_IMAGE_PROCESSOR, TINY_TEXT, TINY_VAE, TINY_VISION,  # noqa: F401
                                build_tokenizer)
