"""Train a tokenizer on a corpus as a Ray job:

    ray job submit --working-dir . -- python jobs/tokenizer.py --out /shared/tokenizers/medical-16k \
        --vocab-size 16000 [--data PATH] [--config cpu-demo]

Writes the Hugging Face tokenizer directory to --out; exits non-zero on failure.
"""

import sys

from raymed.cli import main

if __name__ == "__main__":
    sys.exit(main(["tokenizer", "train", *sys.argv[1:]]))
