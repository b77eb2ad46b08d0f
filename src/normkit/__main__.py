"""``python -m normkit``: the ``normkit`` command line (:mod:`normkit.tools.cli`)."""

import sys

from normkit.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
