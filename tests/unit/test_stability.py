import math

import pytest

from train.stability import (
    SpikeDetector,
    StabilityGuard,
    StabilitySettings,
    TrainingStalled,
    stability_problems,
)


def detector(**changes) -> SpikeDetector:
    return SpikeDetector(StabilitySettings(**{"window": 5, "min_history": 3, **changes}))


def test_no_verdict_before_the_window_has_min_history():
    d = detector()
    d.accept(1.0)
    d.accept(1.0)
    assert d.judge(100.0) is None


def test_z_score_and_ratio_spikes():
    d = detector(z_threshold=3.0, ratio_threshold=10.0, min_rise=0.0)
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


def test_on_a_plateau_a_small_rise_is_not_a_spike_however_many_sigma():
    # the reproduction's p-hop run: losses within 0.3% of 1.077, then 1.108 (+2.9%, 9 sigma)
    d = SpikeDetector(StabilitySettings())
    g = SpikeDetector(StabilitySettings(), quantity="grad_norm")
    for i in range(100):
        d.accept(1.077 + 0.003 * (-1) ** i)
        g.accept(0.26 + 0.005 * (-1) ** i)
    assert d.judge(1.108) is None
    assert "sigma above" in d.judge(1.077 * 1.06)
    assert g.judge(0.26 * 1.4) is None  # grad norms: at least 50% above the mean
    assert "sigma above" in g.judge(0.26 * 1.6)
    strict = SpikeDetector(StabilitySettings(min_rise=0.0))
    strict.load_state_dict(d.state_dict())
    assert "sigma above" in strict.judge(1.108)  # z alone: the rise that stopped the run


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
    "changes",
    [
        {"window": 1},
        {"min_history": 0},
        {"min_history": 9},
        {"ratio_threshold": 1.0},
        {"min_rise": -0.1},
        {"grad_norm_min_rise": -1.0},
    ],
)
def test_bad_settings_are_reported(changes):
    assert stability_problems(StabilitySettings(**{"window": 5, "min_history": 3, **changes}))


def guard(**changes) -> StabilityGuard:
    settings = {"window": 5, "min_history": 3, "rollback_after": 2, "rollback_within": 10}
    return StabilityGuard(StabilitySettings(**{**settings, **changes}))


def settled(g: StabilityGuard, step: int, loss: float, grad_norm: float, nonfinite=False):
    """One step through the guard as the trainer runs it: judge, update (skipped on a spike or,
    as DeepSpeed does, on non-finite gradients), settle."""
    verdict = g.judge(loss, grad_norm)
    return verdict, *g.settle(
        step, verdict, loss, grad_norm, verdict.spike is not None or nonfinite
    )


def test_the_guard_skips_spikes_and_feeds_only_accepted_steps_to_its_windows():
    g = guard()
    for step in range(1, 4):
        assert settled(g, step, 1.0, 1.0)[1:] == (None, False)
    verdict, reason, rollback = settled(g, 4, 5.0, 1.0)
    assert verdict.loss_spike and "loss 5.0000" in reason and not rollback
    verdict, reason, _ = settled(g, 5, 1.0, 9.0)
    assert not verdict.loss_spike and "grad_norm 9.0000" in reason
    assert g.state_dict()["loss_window"] == g.state_dict()["grad_norm_window"] == [1.0] * 3
    assert g.consecutive_skips == 2


def test_only_loss_spikes_and_nonfinite_steps_count_toward_a_rollback_by_default():
    g = guard()
    for step in range(1, 4):
        settled(g, step, 1.0, 1.0)
    assert settled(g, 4, 1.0, 9.0)[2] is False  # a grad-norm spike: skipped, not counted
    assert settled(g, 5, 1.0, 9.0)[2] is False
    assert settled(g, 6, 1.0, 1.0, nonfinite=True)[1:] == ("non-finite", False)
    assert settled(g, 7, 5.0, 1.0)[2] is True  # the second counted spike within 10 steps
    counting = guard(grad_norm_rollback=True)
    for step in range(1, 4):
        settled(counting, step, 1.0, 1.0)
    settled(counting, 4, 1.0, 9.0)
    assert settled(counting, 5, 1.0, 9.0)[2] is True


def test_with_no_checkpoint_to_return_to_training_goes_on_at_the_new_level():
    """A rollback that keeps the weights lowers the LR and starts the windows over: the loss
    the weights now have is judged against itself, not against the level they left."""
    g = guard()
    for step in range(1, 4):
        settled(g, step, 1.0, 1.0)
    assert settled(g, 4, 3.0, 1.0)[2] is False
    assert settled(g, 5, 3.0, 1.0)[2] is True  # the weights moved to 3.0: a rollback is due
    g.keep_weights(5)
    assert g.rollbacks == [{"step": 5, "to_step": None, "skipped_tokens": 0}]
    assert g.lr_factor(5) == 0.5
    for step in range(6, 10):  # accepted: the new level fills the windows
        assert settled(g, step, 3.0, 1.0)[1:] == (None, False)
    assert g.state_dict()["loss_window"] == [3.0] * 4
    verdict, reason, _ = settled(g, 10, 9.0, 1.0)  # and a spike above it is still one
    assert verdict.loss_spike and "loss 9.0000" in reason


def test_a_grad_norm_spike_is_let_through_once_its_patience_runs_out():
    g = guard(grad_norm_patience=2)
    for step in range(1, 4):
        settled(g, step, 1.0, 1.0)
    assert settled(g, 4, 1.0, 9.0)[0].spike and settled(g, 5, 1.0, 9.0)[0].spike
    verdict, reason, _ = settled(g, 6, 1.0, 9.0)
    assert verdict.spike is None and "grad_norm 9.0000" in verdict.let_through
    assert reason is None and g.consecutive_skips == 0
    assert g.state_dict()["grad_norm_window"][-1] == 9.0  # the new level enters the window


def test_too_many_skips_in_a_row_stop_the_run():
    g = guard(max_consecutive_skips=3)
    settled(g, 1, 1.0, 1.0, nonfinite=True)
    settled(g, 2, 1.0, 1.0, nonfinite=True)
    with pytest.raises(TrainingStalled, match="last 3 updates \\(to step 3\\) were all skipped"):
        settled(g, 3, 1.0, 1.0, nonfinite=True)


def test_the_guard_state_round_trips_under_the_trainer_state_keys():
    g = guard()
    for step in range(1, 4):
        settled(g, step, 1.0 + step / 10, 2.0)
    settled(g, 4, 9.0, 2.0)
    state = g.state_dict()
    assert set(state) == {
        "loss_window", "grad_norm_window", "guard", "consecutive_skips", "grad_spike_run"
    }  # fmt: skip
    restored = guard()
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    assert restored.judge(9.0, 2.0) == g.judge(9.0, 2.0)
    assert not restored.good(5) and restored.good(20)
