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
