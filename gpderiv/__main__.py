"""``python -m gpderiv`` and the ``gpderiv`` command (see :mod:`gpderiv.cli`).

``--version`` is answered here, before :mod:`gpderiv.cli` (and with it torch) is imported: it
takes milliseconds instead of the seconds torch's import costs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line (:func:`gpderiv.cli.main`); ``--version`` without importing torch."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["--version"]:
        from gpderiv import __version__  # the package's __init__ imports nothing heavy

        print(f"gpderiv {__version__}")
        return 0
    from gpderiv.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
