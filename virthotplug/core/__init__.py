"""The pure core: data and decisions, no I/O to libvirt.

Open this package for: cpulist parsing (``cpulist``), ACPI _OST and DEVICE_DELETED decoding
(``ost``), the event records every source turns into (``events``), the four-layer vCPU view
(``view``), drift findings (``drift``), onlining policy decisions (``policy``), the
per-domain job schedule (``schedule``), the circuit breaker for unresponsive agents
(``breaker``), report rendering (``report``), the watch --json record (``records``), the
table of settings shared by the command line and the file (``settings``), the configuration
file (``config``), bounded worker pools (``workpool``), equal values held once (``shared``),
the judge of what happened to each vCPU (``judge``) and the events it reads (``observed``),
what a ``setvcpus`` request may do and whether it did (``resizeplan``) and the project's
exceptions and exit statuses (``errors``).

Imports: the standard library only. Nothing here imports libvirt, libvirt_qemu or lxml, nor
``virthotplug.host``, ``virthotplug.ops``, ``virthotplug.daemon`` or ``virthotplug.cli`` (checked by
``tests/unit/test_layers.py``, run by ``make lint``).
"""
