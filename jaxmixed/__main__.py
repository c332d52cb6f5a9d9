"""``python -m jaxmixed ...``: the command line (see :mod:`jaxmixed.app.cli`)."""

import sys

from jaxmixed.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
