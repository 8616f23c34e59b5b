"""The training progress line: its step total never falls behind the step (the demo once printed
"step 540/520 ... eta 0.0 min"), and the ETA is the remaining steps at the measured pace plus the
validation passes still to come (issue 12 §5)."""

import re
import time
from types import SimpleNamespace

import pytest

from reidscale.train.loop import progress_line
from reidscale.train.state import TrainState


def _worker(epochs: int, eval_every: int, seconds_since_start: float):
    train = SimpleNamespace(epochs=epochs, eval_every_epochs=eval_every)
    return SimpleNamespace(cfg=SimpleNamespace(train=train), optimizer=SimpleNamespace(param_groups=[{"lr": 1e-3}]),
                           start_time=time.time() - seconds_since_start, start_step=0)


def _fields(line: str) -> tuple[int, int, int, int, float, str]:
    m = re.search(r"epoch (\d+)/(\d+) step (\d+)/(\d+) .* eta ([\d.]+) min(.*)$", line)
    assert m, line
    return int(m[1]), int(m[2]), int(m[3]), int(m[4]), float(m[5]), m[6]


def test_the_step_total_never_falls_behind_an_epoch_longer_than_measured():
    # the last of 20 epochs measured at 26 steps each has already taken 30 (P×K epochs vary)
    state = TrainState(global_step=524, steps_per_epoch=26)
    epoch, epochs, step, total, eta, _ = _fields(progress_line(_worker(20, 0, 524.0), state, 19, 30, 0.5, {}, 10.0))
    assert (epoch, epochs, step) == (20, 20, 524)
    assert total == 524  # 494 steps before this epoch + the 30 it has taken, not 494 + 26
    assert eta == 0.0


def test_eta_is_remaining_steps_at_the_measured_pace_plus_the_validations_to_come():
    # 24 steps in 96 s: 4 s/step. Epoch 3 of 10, 4 of its 10 steps done: 100 steps in all, 76 to go.
    # Validation every 5 epochs (after epochs 5 and 10): 2 passes of 30 s still to come.
    state = TrainState(global_step=24, steps_per_epoch=10, validation_seconds=30.0)
    _, _, step, total, eta, rest = _fields(progress_line(_worker(10, 5, 96.0), state, 2, 4, 0.5, {}, 10.0))
    assert (step, total) == (24, 100)
    assert eta == pytest.approx((76 * 4 + 2 * 30) / 60, abs=0.051)
    assert rest == ""
    # before any validation has been timed the line says how many passes the ETA leaves out
    state.validation_seconds = 0.0
    _, _, _, _, eta, rest = _fields(progress_line(_worker(10, 5, 96.0), state, 2, 4, 0.5, {}, 10.0))
    assert eta == pytest.approx(76 * 4 / 60, abs=0.051) and rest.strip() == "+ 2 validation passes"
