"""The toy world and its pretrained toy Z-Image (see ``benchmarks/science/README.md``):
``world`` (the procedural pictures and captions), ``models`` (the real classes at toy size, the
shipped weights), ``pipeline`` (the resumable stages: ``python -m dopsd_fast.toy``)."""
