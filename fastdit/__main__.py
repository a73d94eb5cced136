"""``python -m fastdit``: the command line of the ``fastdit`` script (see :mod:`fastdit.cli`)."""

import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
