"""`python -m visions_core …`: the same command line as `python main.py …`."""

import sys

from visions_core.cli import main

if __name__ == "__main__":
    sys.exit(main())
