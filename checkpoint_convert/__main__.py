"""``python -m checkpoint_convert <command>``: see checkpoint_convert/cli.py or ``--help``."""

import sys

from checkpoint_convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
