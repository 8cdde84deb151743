"""The daemon, ``virthotplug watch``: follows events on every host and enforces policy.

Open this package for: the main loop and one session per host (``watch``), the libvirt
callbacks that translate and enqueue (``listener``), the per-domain flood guard for events a
guest can trigger (``flood``), the per-domain QEMU monitor registrations (``subscriptions``),
the bulk periodic resync (``resync``), the one-daemon-per-host lock (``lock``), the
reconcile jobs (``jobs``), the hook socket (``hookserver``), the JSON-lines event log
(``eventlog``), the decoded QEMU monitor log lines (``monitorlog``), the Prometheus
endpoint (``metrics``) and the C allocator's settings for a long-running process
(``memory``).

Imports: ``virthotplug.core``, ``virthotplug.host`` and ``virthotplug.ops`` (the one
reconcile every job runs). Never ``virthotplug.cli``.
"""
