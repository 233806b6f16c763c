"""``python -m pneumoseg.serve --model PATH``: the HTTP model server (see :mod:`pneumoseg.serve.server`)."""

import sys

from pneumoseg.serve.server import main

if __name__ == "__main__":
    sys.exit(main())
