"""The host layer: the only code that talks to libvirt or parses domain XML.

Open this package for: the connection owner, error classification and the typed per-domain
wrapper (``connection``), the connection's capability record (``support``), the domain XML
model (``domxml``), reading the four layers of every domain (``collect``), writes through the
guest agent (``actions``), one policy reconcile of one domain (``reconcile``) and where a
domain's policy comes from (``policysource``).

Imports: ``virthotplug.core``, libvirt, libvirt_qemu, lxml. Never ``virthotplug.daemon`` or
``virthotplug.cli``.
"""
