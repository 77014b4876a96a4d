"""``python -m dopsd_fast.toy <stage> --out DIR``: see :mod:`dopsd_fast.toy.pipeline`."""

from dopsd_fast.toy.pipeline import main

if __name__ == "__main__":
    raise SystemExit(main())
