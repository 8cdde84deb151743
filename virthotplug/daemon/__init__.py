"""The daemon, ``virthotplug watch``: follows events on every host and enforces policy.

Open this package for: the main loop (``watch``), one session per host that owns its
connection and reconnects (``session``), the reconcile workers and what each does with one
job (``worker``), the types the loop and its parts hand each other (``results``), the one
record per domain and the one place that forgets a domain (``domains``), the libvirt
callbacks that translate and enqueue (``listener``), the per-domain flood guard for events
a guest can trigger (``flood``), the per-domain QEMU monitor registrations
(``subscriptions``), the bulk periodic resync (``resync``), the one-daemon-per-host lock
(``lock``: taking it; ``host.watchlock`` reads it), the reconcile jobs (``jobs``), the
hook socket (``hookserver``), the JSON-lines event log (``eventlog``), the decoded QEMU
monitor log lines (``monitorlog``), the Prometheus metrics (``metrics``) and their HTTP
endpoint (``metricsserver``), and the C allocator's settings for a long-running process
(``memory``).

Imports: ``virthotplug.core``, ``virthotplug.host`` and ``virthotplug.ops`` (the one
reconcile every job runs). Never ``virthotplug.cli``.
"""
