import math

import pytest

from train.stability import SpikeDetector, StabilitySettings, stability_problems


def detector(**changes) -> SpikeDetector:
    return SpikeDetector(StabilitySettings(**{"window": 5, "min_history": 3, **changes}))


def test_no_verdict_before_the_window_has_min_history():
    d = detector()
    d.accept(1.0)
    d.accept(1.0)
    assert d.judge(100.0) is None


def test_z_score_and_ratio_spikes():
    d = detector(z_threshold=3.0, ratio_threshold=10.0)
    for loss in (1.0, 1.1, 0.9, 1.0):
        d.accept(loss)
    mean, std = 1.0, math.sqrt(0.02 / 3)
    assert d.judge(mean + 2.9 * std) is None
    assert "sigma above" in d.judge(mean + 3.1 * std)
    flat = detector(ratio_threshold=2.0)
    for _ in range(3):
        flat.accept(2.0)  # no spread: only the ratio can judge
    assert flat.judge(3.9) is None
    assert "2.05x the window mean" in flat.judge(4.1)


def test_the_window_keeps_the_last_accepted_losses_and_round_trips():
    d = detector()
    for loss in range(8):
        d.accept(float(loss))
    d.accept(float("nan"))  # never enters the window
    assert d.state_dict() == {"history": [3.0, 4.0, 5.0, 6.0, 7.0]}
    other = detector()
    other.load_state_dict(d.state_dict())
    assert other.judge(100.0) == d.judge(100.0) is not None


def test_disabled_guard_never_judges():
    d = detector(enabled=False)
    for _ in range(5):
        d.accept(1.0)
    assert d.judge(1e9) is None


@pytest.mark.parametrize(
    "changes", [{"window": 1}, {"min_history": 0}, {"min_history": 9}, {"ratio_threshold": 1.0}]
)
def test_bad_settings_are_reported(changes):
    assert stability_problems(StabilitySettings(**{"window": 5, "min_history": 3, **changes}))
