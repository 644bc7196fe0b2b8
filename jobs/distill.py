"""Distill a teacher into a smaller student as a Ray job:

    ray job submit --working-dir . -- python jobs/distill.py --config cpu-demo \
        --set distill.student_layers=[0,2,4,6,8,10,12,14,16,18,20,22,24,26,28] --set run_name=distill

Trains the student, promotes it into its own registry model (`<registry.name>-small`) if it
passes the gate, and prints how to serve it; exits non-zero on failure. Resubmitting with the
same run name resumes from the latest checkpoint.
"""

import sys

from raymed.cli import main

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
