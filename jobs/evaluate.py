"""Evaluate a model (optionally against a base) as a Ray job:

    ray job submit --working-dir . -- python jobs/evaluate.py --model DIR --base DIR --config cpu-demo

Prints the metrics table and writes eval.json / eval.md; exits non-zero on failure.
"""

import sys

from raymed.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
