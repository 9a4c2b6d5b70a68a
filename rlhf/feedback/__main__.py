"""`python -m rlhf.feedback ...` (the same as `python -m rlhf feedback ...`)."""

import sys

from rlhf.feedback.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
