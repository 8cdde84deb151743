"""Operations: what a command or the daemon does to one domain, start to end.

Open this package for: the one reconcile of a domain — read, decide, act, re-read, credit,
record, judge — used unchanged by ``apply``, ``setvcpus`` and ``watch`` (``reconcile``), and
the verified ``setvcpus`` flow: its entry point and the grow (``resize``), the shrink with
its repeated unplug request, synchronous or async (``shrink``), what the command sees of the
domain meanwhile (``seen``), and its ``--guest`` count (``guestcount``). The decisions they
take are pure and live in ``core`` (``policy``, ``judge``, ``resizeplan``, ``drift``); the
libvirt calls they make are ``host``'s.

Imports: ``core`` and ``host``, never ``daemon`` or ``cli`` (the layers contract in
``pyproject.toml``).
"""
