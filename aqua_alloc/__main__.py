"""``python -m aqua_alloc``: the command line (see aqua_alloc/cli.py)."""

from aqua_alloc.cli import main

raise SystemExit(main())
