"""The loop's window statistics: summed on the device, read (with the stop votes) at a tally."""

from __future__ import annotations

import math
import signal
from types import SimpleNamespace

import pytest
import torch

from capsdist.train.step import WindowStats


def test_tally_averages_the_window_counts_votes_and_resets_only_when_asked():
    window = WindowStats()
    window.add(torch.tensor(0.5), torch.tensor(3), batch_size=4)
    window.add(torch.tensor(1.5), torch.tensor(1), batch_size=4)
    peek = window.tally([True, False, True], reset=False)  # a checkpoint step
    assert (peek.loss, peek.accuracy, peek.votes) == (1.0, 0.5, (1, 0, 1))
    window.add(torch.tensor(4.0), torch.tensor(4), batch_size=4)
    logged = window.tally()  # a log step: the whole window since the last one
    assert (logged.loss, logged.accuracy, logged.votes) == (2.0, 8 / 12, ())
    window.add(torch.tensor(0.25), torch.tensor(2), batch_size=2)
    assert window.tally().loss == 0.25  # a new window


def test_a_nan_loss_anywhere_in_the_window_makes_its_tally_non_finite():
    window = WindowStats()
    for loss in (0.5, float("nan"), 0.5):
        window.add(torch.tensor(loss), torch.tensor(1), batch_size=2)
    assert math.isnan(window.tally().loss)
    window.add(torch.tensor(float("inf")), torch.tensor(1), batch_size=2)
    assert not math.isfinite(window.tally().loss)


def test_sync_ranks_names_the_stop_and_refuses_a_non_finite_loss(tmp_path):
    from capsdist.train.loop import NonFiniteLossError, StopSignals, sync_ranks

    trainer = SimpleNamespace(stop=StopSignals(announce=False), ckpt_dir=tmp_path / "ckpt")
    window = WindowStats()
    window.add(torch.tensor(0.5), torch.tensor(1), batch_size=2)
    assert sync_ranks(trainer, window, False, (0, 10), reset=False)[1] == 0
    assert sync_ranks(trainer, window, True, (0, 10), reset=False)[1] == 1  # out of time
    trainer.stop.signum = signal.SIGUSR1
    assert sync_ranks(trainer, window, True, (0, 10), reset=False)[1] == signal.SIGUSR1

    window.add(torch.tensor(float("nan")), torch.tensor(1), batch_size=2)
    with pytest.raises(NonFiniteLossError, match="between step 10 and step 20") as caught:
        sync_ranks(trainer, window, False, (10, 20), reset=True)
    assert str(tmp_path / "ckpt") in str(caught.value)
