"""Allow ``python -m virthotplug``."""

import sys

from virthotplug.cli.main import main

sys.exit(main())
