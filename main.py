"""`python main.py build_index|infer …`: the original tool's entry point, kept for its users."""

import sys

from visions_core.cli import main

if __name__ == "__main__":
    sys.exit(main())
