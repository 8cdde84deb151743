"""Stack 2 (libvirt 11.3 + QEMU 10.0 in a Debian trixie root) from the command line; the
stacks themselves are in stacks.py.

    python3 tests/lab/stack2.py build|start|stop|status
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stacks import main

if __name__ == "__main__":
    sys.exit(main(["stack2", *(sys.argv[1:] or ["status"])]))
