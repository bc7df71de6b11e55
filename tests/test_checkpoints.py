"""Where a trial checkpoints: ASHA's rungs, exactly as Ray's scheduler takes its decisions."""

import pytest
from ray.tune.experiment import Trial

from hpo._compat import asha_bracket, bracket_rungs
from hpo.plan import asha_rungs


def _ray_decision_epochs(grace: int, factor: float, max_t: int) -> tuple[int, ...]:
    """The epochs at which Ray's bracket records a trial at a rung (and may stop it there),
    found by reporting every epoch to it."""
    bracket = asha_bracket(grace, max_t, factor)
    trial = Trial("CMATHTrial", config={}, trial_id="t", stub=True)
    epochs = []
    for epoch in range(1, max_t + 1):
        before = sum(trial.trial_id in recorded for _, recorded in bracket_rungs(bracket))
        bracket.on_result(trial, epoch, 0.5)
        if sum(trial.trial_id in recorded for _, recorded in bracket_rungs(bracket)) > before:
            epochs.append(epoch)
    return tuple(epochs)


@pytest.mark.parametrize("grace, factor, max_t", [
    (2, 2.5, 60),  # 2, 5, 12.5 -> 13, 31.25 -> 32
    (3, 1.5, 30),  # 4.5 -> 5, 6.75 -> 7, ...
    (5, 3, 60), (10, 2, 20), (4, 2, 20), (1, 4, 64),
])
def test_rungs_are_the_epochs_ray_decides_at(grace, factor, max_t):
    assert asha_rungs(grace, factor, max_t) == _ray_decision_epochs(grace, factor, max_t)
