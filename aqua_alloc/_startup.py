"""Run by the start-up hook (aqua_alloc_startup.pth) when ``AQUA_ALLOC`` is set.

A failure to enable (no GPU, a bad setting) prints one line and lets the program run
without aqua_alloc, rather than a traceback from inside Python's start-up.
"""

import sys

try:
    from aqua_alloc.lifecycle import enable

    enable()
except Exception as exc:  # noqa: BLE001 - start-up must not die here
    print(f"aqua_alloc: AQUA_ALLOC is set, but aqua_alloc stays off: {exc}", file=sys.stderr)
