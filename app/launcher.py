"""The ``outlast`` console script: the service's CLI when the server is installed.

A client-only install (``pip install outlast``) has the Python client but not the
command line, which runs the stack and needs the ``server`` extra; say so plainly
instead of a traceback. (Only the standard library here: it must import without them.)
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from app.cli import main as cli
    except ImportError as exc:
        sys.exit(f"the outlast command needs the server: pip install 'outlast[server]' ({exc})")
    cli()


if __name__ == "__main__":
    main()
