"""The libvirt module, imported once, with its default error printer silenced, and the one
default event loop of the process.

libvirt is imported lazily so that commands which never connect start fast.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Optional

log = logging.getLogger("virthotplug.host.connection")

_handler_lock = threading.Lock()
_handler_installed = False
_event_loop_thread: Optional[threading.Thread] = None


def libvirt_module() -> Any:
    """Import libvirt once and silence its default handler (it prints every failed call)."""
    global _handler_installed
    import libvirt

    with _handler_lock:
        if not _handler_installed:
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
            _handler_installed = True
    return libvirt


def ensure_event_loop() -> None:
    """Register libvirt's default event loop once per process and run it in one thread.

    Must happen before the first ``open()`` of any connection that wants events or a close
    callback; libvirt binds a connection to the event implementation present when it opens.
    """
    global _event_loop_thread
    libvirt = libvirt_module()
    with _handler_lock:
        if _event_loop_thread is not None:
            return
        libvirt.virEventRegisterDefaultImpl()
        _event_loop_thread = threading.Thread(
            target=_run_event_loop, args=(libvirt,), name="libvirt-events", daemon=True
        )
        _event_loop_thread.start()


def _run_event_loop(libvirt: Any) -> None:
    while True:
        if libvirt.virEventRunDefaultImpl() < 0:
            log.error("libvirt event loop iteration failed")
