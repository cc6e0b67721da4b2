"""``python -m sculpt``: the same as the ``sculpt`` command."""

import sys

from sculpt.cli import main

if __name__ == "__main__":
    sys.exit(main())
