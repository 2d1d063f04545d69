"""Ctrl-C and SIGTERM while the CLI runs stages raise in the main thread, even after Ray set
handlers of its own (pipelines.interrupts). Without Ray: the signals are sent to this process."""

from __future__ import annotations

import os
import signal
import time
from types import SimpleNamespace

import pytest

from pipelines import interrupts, training
from pipelines.config import PriorSection


def _send(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(1)  # the handler runs at the next bytecode; this call must not return first


@pytest.mark.parametrize(
    ("signum", "raised", "status"),
    [(signal.SIGINT, KeyboardInterrupt, 130), (signal.SIGTERM, interrupts.Terminated, 143)],
)
def test_a_signal_raises_while_stages_run_and_the_handlers_come_back(signum, raised, status):
    before = signal.getsignal(signum)
    with pytest.raises(raised) as stop, interrupts.stop_on_signals():
        _send(signum)
    assert interrupts.exit_code(stop.value) == status
    assert signal.getsignal(signum) is before


def test_the_handlers_come_back_after_ray_set_its_own():
    with interrupts.stop_on_signals():
        # What ray.init does to SIGTERM, and a Ray Train run to SIGINT.
        signal.signal(signal.SIGTERM, lambda *_: None)
        signal.signal(signal.SIGINT, lambda *_: None)
        interrupts.reclaim()
        with pytest.raises(interrupts.Terminated):
            _send(signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            _send(signal.SIGINT)


def test_reclaim_changes_nothing_outside_the_cli():
    ours = signal.getsignal(signal.SIGINT)
    interrupts.reclaim()
    assert signal.getsignal(signal.SIGINT) is ours


class _TrainerThatTakesSigint:
    """Stands in for the trainer run_trainer builds (a TorchTrainer): its fit() sets a SIGINT
    handler, as Ray Train's does (to abort the run's controller), and leaves it set."""

    def __init__(self, *args, **kwargs):
        pass

    def fit(self):
        signal.signal(signal.SIGINT, lambda *_: None)
        return SimpleNamespace(checkpoint=object())


def test_a_training_run_leaves_ctrl_c_to_the_cli(monkeypatch, tmp_path):
    monkeypatch.setattr(training, "LeanTorchTrainer", _TrainerThatTakesSigint)
    knobs = PriorSection(steps=2, batch_size=2)
    with interrupts.stop_on_signals():
        training.run_trainer(
            lambda config: None,
            {},
            name="sigint",
            stage_dir=str(tmp_path),
            knobs=knobs,
            section="train_prior.top",
            resource_wait_seconds=1,
        )
        with pytest.raises(KeyboardInterrupt):
            _send(signal.SIGINT)
