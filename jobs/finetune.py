"""Fine-tune as a Ray job:

    ray job submit --working-dir . -- python jobs/finetune.py --config cpu-demo --set run_name=my-run

Prints the final metrics and where the checkpoints went; exits non-zero on failure.
Resubmitting with the same run name resumes from the latest checkpoint.
"""

import sys

from raymed.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
