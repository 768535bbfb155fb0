"""The old module path of DiT DP training: ``python -m memory_test.diffusion_profile.train_dp`` runs
``python -m memory_test.train`` (same flags, same exit codes)."""

import sys

from memory_test.train.run import main

if __name__ == "__main__":
    sys.exit(main())
