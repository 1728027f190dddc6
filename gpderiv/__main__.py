"""``python -m gpderiv``: the same as the ``gpderiv`` command (see :mod:`gpderiv.cli`)."""

import sys

from gpderiv.cli import main

if __name__ == "__main__":
    sys.exit(main())
