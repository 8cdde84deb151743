"""The host layer: the only code that talks to libvirt or parses domain XML.

Open this package for: the connection owner (``connection``), the typed per-domain wrapper
(``domain``) and the Protocols of the libvirt objects it wraps (``libvirt_types``), error
classification by code and error domain (``errors``), the libvirt import and the one event
loop (``libvirt_module``), the connection's capability record (``support``), the domain XML
model (``domxml``), reading the four layers of every domain (``collect``: its entry points;
``bulk``: the one bulk reader of stats and definitions; ``views``: the one view builder;
``agentread``: the guest agents asked, findings added), writes through the guest agent
(``actions``), where a domain's policy comes from (``policysource``), the domain's vCPU
history kept in its live metadata and each domain's policy and history for findings
(``history``), which watch holds a host's lock now, the one that vouches for a history
(``watchlock``), and QEMU's own vCPU answer for ``status --qemu-monitor``, which taints
(``qemu_monitor``).

Imports: ``virthotplug.core``, libvirt, libvirt_qemu, lxml. Never ``virthotplug.ops``,
``virthotplug.daemon`` or ``virthotplug.cli``. The operations that use these calls (one
reconcile, the verified ``setvcpus``) are ``virthotplug.ops``.
"""
