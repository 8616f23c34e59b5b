import math

import pytest

from reidscale.train.schedule import lr_factor


def test_warmup_then_cosine_reaches_zero():
    kw = dict(total_steps=110, warmup_steps=10, schedule="cosine")
    assert lr_factor(0, **kw) == pytest.approx(0.01)
    assert lr_factor(5, **kw) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(10, **kw) == pytest.approx(1.0)
    assert lr_factor(60, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(110, **kw) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(500, **kw) == pytest.approx(0.0, abs=1e-12)


def test_multistep_multiplies_by_gamma_at_each_milestone():
    kw = dict(total_steps=100, warmup_steps=0, schedule="multistep", milestone_steps=[40, 70], gamma=0.1)
    assert [lr_factor(s, **kw) for s in (0, 39, 40, 69, 70)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="bogus"):
        lr_factor(0, total_steps=1, warmup_steps=0, schedule="bogus")


@pytest.mark.parametrize("grad_clip", [0.0, 2.5])
def test_deepspeed_clips_exactly_as_configured_and_not_at_its_own_default(grad_clip):
    """DeepSpeed clips at norm 1.0 when its config has no gradient_clipping: optim.grad_clip=0
    ("no clipping", the default) must reach it as 0. Read back by DeepSpeed's own parser."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from reidscale.config import load_config
    from reidscale.train.config import TrainJobConfig
    from reidscale.train.engine import deepspeed_config

    cfg = load_config(TrainJobConfig, overrides=[f"optim.grad_clip={grad_clip}"])
    assert DeepSpeedConfig({"train_micro_batch_size_per_gpu": 4}).gradient_clipping == 1.0  # the trap
    assert DeepSpeedConfig(deepspeed_config(cfg, "fp32")).gradient_clipping == grad_clip
