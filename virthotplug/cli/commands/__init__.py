"""One module per command. Each has ``register(subparsers)``, which sets ``run`` as the
parser default, and keeps heavy imports (libvirt, lxml) inside ``run`` so start-up stays
light.
"""

from __future__ import annotations

from virthotplug.cli.commands import apply, check, policy, setvcpus, status, watch

COMMANDS = (status, check, watch, policy, apply, setvcpus)
