"""``python -m sculpt.cli``: the same as the ``sculpt`` command."""

import sys

from sculpt.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
