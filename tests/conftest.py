import os

import torch
from hypothesis import settings

# Tests never read a tune cache of the machine (`anyattn tune`): auto's built-in rules are what they check;
# tests/test_tune.py points the cache at temporary files.
os.environ["ANYATTN_TUNE_CACHE"] = "none"

# Keep property-based tests fast and deterministic on 2 cores.
settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
# Tests use small tensors: one intra-op thread is faster than two, and on a loaded machine it avoids
# OpenMP threads waiting on each other (20x slowdowns of tiny ops were measured with 2 threads).
torch.set_num_threads(1)
