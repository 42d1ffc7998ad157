"""The training side's behaviour pinned: the first 20 steps of the tiny experiment against
the recorded losses (tests/assets/golden_losses.json, see tests/distributed/golden.py)."""

import json

import pytest

from tests.distributed.golden import (
    GOLDEN,
    RANKS,
    SETTINGS,
    differences,
    losses,
    machine,
)


@pytest.mark.smoke
@pytest.mark.parametrize("ranks", RANKS)
def test_the_first_steps_of_the_tiny_experiment_keep_their_recorded_losses(
    tmp_path, cache_dir, ranks
):
    golden = json.loads(GOLDEN.read_text())
    assert golden["settings"] == SETTINGS, "settings changed: record again with --write"
    exact = {k: golden[k] for k in machine()} == machine()
    actual = losses(ranks, tmp_path, cache_dir)
    assert differences(golden["ranks"][str(ranks)], actual, exact) == []


def test_a_changed_loss_is_found_bit_for_bit_or_beyond_the_tolerance():
    recorded = {"loss": [3.0, 2.5], "loss_per_step": [[3.1, 2.9], [2.6, 2.4]]}
    nudged = {"loss": [3.0, 2.5 * (1 + 1e-4)], "loss_per_step": recorded["loss_per_step"]}
    assert differences(recorded, nudged, exact=True) == [
        f"step 2: loss {2.5 * (1 + 1e-4)!r}, recorded 2.5"
    ]
    assert differences(recorded, nudged, exact=False) == []
    moved = {"loss": [3.0, 2.6], "loss_per_step": recorded["loss_per_step"]}
    assert differences(recorded, moved, exact=False) == ["step 2: loss 2.6, recorded 2.5"]
    assert differences(recorded, {"loss": [3.0], "loss_per_step": [[3.1]]}, exact=True) == [
        "1 steps logged, 2 recorded"
    ]
