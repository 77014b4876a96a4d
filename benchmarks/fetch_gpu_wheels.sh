#!/usr/bin/env bash
# Run HERE (with internet to PyPI), once per checkout, before a GPU check: the lent GPU machine has
# torch/triton/transformers/peft but no diffusers and no network, so its wheels travel in .whl/
# (git-ignored; named in the device call's `carry`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl diffusers==0.42.1 importlib_metadata==10.2.0
ls -la .whl
