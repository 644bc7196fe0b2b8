"""Build the knowledge index as a Ray job:

    ray job submit --working-dir . -- python jobs/index.py --config cpu-demo [--force] [--documents PATH]

Writes RAYMED_CACHE/index/<index.name>/ and its manifest; exits non-zero on failure.
"""

import sys

from raymed.cli import main

if __name__ == "__main__":
    sys.exit(main(["index", "build", *sys.argv[1:]]))
