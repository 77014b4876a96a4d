#!/usr/bin/env bash
# Run HERE (with PyPI), once per checkout, before a GPU check: the lent GPU machine has
# torch/triton/transformers/peft but no diffusers and no network, so its wheel travels in .whl/
# (git-ignored; named in the device call's `carry`). diffusers and requests (diffusers checks for it at import;
# transformers, peft and accelerate do not need it, so an image may lack it) with requests' own dependencies;
# on Python 3.12 diffusers imports the standard library's importlib.metadata (no importlib_metadata wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
rm -rf .whl && mkdir -p .whl
# pure-Python wheels (py3-none-any): they install on the image's 3.12 and on this checkout's own Python, so a test
# run here that finds .whl/ is not broken by a cp312-only wheel
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py --abi none \
  --platform any \
  -d .whl diffusers==0.42.1 requests==2.34.2 urllib3==2.8.0 idna==3.21 certifi==2026.10.19.post1 \
  charset_normalizer==3.5.3
ls -la .whl
