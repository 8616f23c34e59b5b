import os
import random
import zlib

import numpy as np
import pytest
import torch

# No weights or datasets can come from a hub in tests; loading code must fail fast instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# Tests run in any order and split across processes (pytest-xdist, see the Makefile): an
# unseeded draw must not take its values from whatever ran before it in that process. Each test
# starts from a seed of its own name; REIDSCALE_TEST_SEED=N shifts every seed, to check that no
# test hangs on its one draw.
SEED_SHIFT_ENV = "REIDSCALE_TEST_SEED"


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    seed = (zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get(SEED_SHIFT_ENV, "0"))) % 2**32
    random.seed(seed)
    np.random.seed(seed)
    # torch is imported here, not only when a test module has it: a test that imports it in its
    # body would otherwise draw from wherever the tests before it left torch's generator
    torch.manual_seed(seed)
