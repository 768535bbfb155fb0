"""``python -m memory_test.train ...``: DP-SGD training of a DiT (see memory_test/train/run.py, docs/TRAIN_DP.md)."""

import sys

from memory_test.train.run import main

if __name__ == "__main__":
    sys.exit(main())
