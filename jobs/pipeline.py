"""The whole pipeline as a Ray job:

    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/pipeline.py --config cpu-demo \
        --set run_name=demo1 --set storage_path=/shared/raymed

assets → data → train (or a sweep, pipeline.tune) → evaluate → promote → deploy on Serve →
one answer, printed with the run directory. Resubmitting with the same run name and
storage_path skips the stages that finished with the same inputs and continues from the
first that did not. The deployment stays up after the job ends. Exits non-zero, naming the
stage, on failure; a missing or bad config fails before the job touches the cluster.
"""

import sys

from raymed.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
