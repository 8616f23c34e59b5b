import os
import random
import shutil
import sys
import tempfile
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


@pytest.fixture(scope="session", autouse=True)
def _ray_temp_root(request):
    """Ray's files in a folder of this test process, removed when its tests all pass.

    Each private Ray a test starts leaves a session folder in ``$RAY_TMPDIR/ray`` (~1.4 MB of
    logs and sockets; a suite run starts ~80), and its dashboard's ``multiprocessing`` an empty
    ``pymp-*`` folder in ``$TMPDIR``, both for good (1.5 GB and 830 folders in this machine's /tmp
    after a day of runs). Both variables point here for the tests and every process they start.
    Not pytest's tmp_path: Ray's socket paths must stay under 107 characters. A failed run keeps
    the folder for its Ray logs and names it on stderr (past pytest's capture).
    """
    root = tempfile.mkdtemp(prefix="rs-tests-")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TMPDIR", root)
        env.setenv("TMPDIR", root)
        yield root
    if request.session.testsfailed:
        print(f"\nRay's logs of this test process's failed run: {root}/ray", file=sys.__stderr__)
    else:
        shutil.rmtree(root, ignore_errors=True)
