"""Allow ``python -m virthotplug``."""

import sys

from virthotplug.cli import main

sys.exit(main())
