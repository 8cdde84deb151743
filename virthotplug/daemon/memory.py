"""The daemon's use of the C allocator (glibc), which Python's own allocator sits on.

What keeps a long-running ``watch`` small; a no-op where the C library is not glibc (musl,
another system) or cannot be loaded:

* **Trim after a burst.** After a resync, free memory at the top of each arena goes back to
  the system (``malloc_trim``), instead of staying resident until the next burst reuses it.

Not done: a limit of two malloc arenas (``mallopt(M_ARENA_MAX, 2)``) saved about 1 MiB at a
thousand domains; with the per-domain records slotted and shared (``core.shared``) watch
stays well under its budget without making its threads share arenas.
"""

from __future__ import annotations

import ctypes
from typing import Optional

_libc: Optional[ctypes.CDLL] = None


def _glibc() -> Optional[ctypes.CDLL]:
    global _libc
    if _libc is None:
        try:
            # The process's own symbols, the C library's among them (ctypes.util's search
            # would import subprocess and friends: megabytes, for a name already loaded).
            libc = ctypes.CDLL(None)
            libc.malloc_trim  # noqa: B018  # glibc only: raises AttributeError elsewhere
        except (OSError, AttributeError, TypeError):
            return None
        _libc = libc
    return _libc


def trim() -> None:
    """Give the allocator's free memory back to the system."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
