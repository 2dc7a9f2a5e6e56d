"""``python -m moga.bench [options]`` = ``moga bench [options]``."""

import sys

from moga.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
