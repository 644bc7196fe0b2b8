"""Deploy (or roll forward to) the registry's current version on Ray Serve, as a Ray job:

    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/deploy.py --config cpu-demo \
        --set storage_path=/shared/raymed --set serve.host=0.0.0.0

Prints the URL, model and pinned version and returns once the deployment is healthy (it
stays up after the job ends); exits non-zero on failure. Resubmitting redeploys the
current version without dropping requests in flight.
"""

import sys

from raymed.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", "--deploy", *sys.argv[1:]]))
