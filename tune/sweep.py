"""A Ray Tune sweep as a Ray job:

    ray job submit --working-dir . -- python tune/sweep.py --config ci-tiny \
        --space tune/spaces/lr-warmup.yaml --set run_name=sweep1

Prints the results table and where results.csv, curves.png and the best checkpoint went;
exits non-zero on failure. Resubmit with `--resume` (same run name) after an interruption:
finished trials are not re-run.
"""

import sys

from raymed.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
