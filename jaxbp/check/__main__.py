"""``python -m jaxbp.check``: the command-line gradient checker (`jaxbp.check.cli`)."""

import sys

from jaxbp.check.cli import main

if __name__ == "__main__":
    sys.exit(main())
