"""DeepSpeed initialised as training initialises it: no shared-memory all-reduce op.

DeepSpeed's CPU communication backend would compile (25.7 s on a machine's first run; a failed
run without a C++ compiler) and load a C++ op only its tensor-parallel inference uses; see
``train.engine.initialize_deepspeed``. Two real gloo ranks: the op is not loaded, nothing about it
is printed, DeepSpeed's own function is put back, and gradients are still averaged over the ranks.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from gloo_ranks import run_ranks


def _worker(rank: int, world: int, tmp: str) -> dict:
    import importlib

    ds_comm = importlib.import_module("deepspeed.comm.comm")
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")  # not the torch package (engine.py)

    from reidscale.train.engine import initialize_deepspeed

    stock = ds_comm_torch.build_shm_op
    model = nn.Linear(4, 1, bias=False)
    engine, *_ = initialize_deepspeed(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0}, "steps_per_print": 10**9})
    x = torch.full((1, 4), float(rank + 1))
    engine.backward(engine(x).sum())  # d/dw of w·x is x: rank 0's is all 1, rank 1's all 2
    return {
        "shm_op": torch.tensor(ds_comm.cdb.shm_comm_op is not None),
        "put_back": torch.tensor(ds_comm_torch.build_shm_op is stock),
        "extension_tools_imported": torch.tensor("torch.utils.cpp_extension" in sys.modules),
        "grad": model.weight.grad.detach().clone(),
    }


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(_worker, 2, tmp_path_factory.mktemp("ds_init"), timeout_s=300)


def test_no_shared_memory_op_is_built_or_loaded(ranks):
    for r in ranks:
        assert not bool(r["shm_op"])
        # the op's JIT build is what imports torch's extension tools (and prints a CUDA warning)
        assert not bool(r["extension_tools_imported"])
        assert bool(r["put_back"])


def test_gradients_are_still_averaged_over_the_ranks(ranks):
    expected = torch.full((1, 4), (1.0 + 2.0) / 2)
    for r in ranks:
        torch.testing.assert_close(r["grad"], expected)
