"""``import aqua_alloc.auto``: switch aqua_alloc on with the ``AQUA_*`` settings, in one line.

The ``AQUA_ALLOC=1`` start-up hook (aqua_alloc_startup.pth, installed with the package)
imports this module; with the variable unset the hook does nothing and imports nothing.
"""

from aqua_alloc.lifecycle import enable

enable()
