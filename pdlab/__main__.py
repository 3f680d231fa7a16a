"""``python -m pdlab``: the command line (``pdlab.lab.cli``)."""

import sys

from pdlab.lab.cli import main

if __name__ == "__main__":
    sys.exit(main())
