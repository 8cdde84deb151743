"""The daemon's use of the C allocator (glibc), which Python's own allocator sits on.

What keeps a long-running ``watch`` small; a no-op where the C library is not glibc (musl,
another system) or cannot be loaded:

* **Trim after a burst.** After a resync, free memory at the top of each arena goes back to
  the system (``malloc_trim``), instead of staying resident until the next burst reuses it.

``limit_arenas`` (two malloc arenas instead of up to eight per core) saves about 2 MiB at a
thousand domains but is not called: the other threads would then share arenas with the
libvirt event thread, whose allocations could wait on theirs while a guest floods events,
and the cut-off that protects libvirtd depends on reading those quickly. With it, the flood
e2e test failed twice in three runs. The cause is not proven.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Optional

log = logging.getLogger("virthotplug.daemon.watch")

M_ARENA_MAX = -8  # glibc's <malloc.h>
ARENAS = 2

_libc: Optional[ctypes.CDLL] = None


def _glibc() -> Optional[ctypes.CDLL]:
    global _libc
    if _libc is None:
        try:
            # The process's own symbols, the C library's among them (ctypes.util's search
            # would import subprocess and friends: megabytes, for a name already loaded).
            libc = ctypes.CDLL(None)
            libc.mallopt  # noqa: B018  # glibc only: raises AttributeError elsewhere
            libc.malloc_trim  # noqa: B018
        except (OSError, AttributeError, TypeError):
            return None
        _libc = libc
    return _libc


def limit_arenas() -> None:
    """At most ``ARENAS`` malloc arenas (call before starting threads)."""
    libc = _glibc()
    if libc is not None and libc.mallopt(M_ARENA_MAX, ARENAS) != 1:
        log.debug("mallopt(M_ARENA_MAX) refused")


def trim() -> None:
    """Give the allocator's free memory back to the system."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
