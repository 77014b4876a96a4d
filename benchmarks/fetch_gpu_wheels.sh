#!/usr/bin/env bash
# Run HERE (with PyPI), once per checkout, before a GPU check: the lent GPU machine has
# torch/triton/transformers/peft but no diffusers and no network, so its wheel travels in .whl/
# (git-ignored; named in the device call's `carry`). diffusers alone: on Python 3.12 it imports the
# standard library's importlib.metadata (a carried importlib_metadata wheel cannot import there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl diffusers==0.42.1
ls -la .whl
