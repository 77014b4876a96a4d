"""``python -m dopsd_fast`` = ``dopsd-train`` (what ``torchrun ... -m dopsd_fast`` launches per rank)."""

from dopsd_fast.cli import train_main

raise SystemExit(train_main())
