"""What a sweep prints as trials start: numbered in the order they start."""

from ray.tune.experiment import Trial

from hpo.progress import ProgressPrinter


def test_trials_are_numbered_in_the_order_they_start():
    lines = []
    printer = ProgressPrinter(["lr"], num_samples=8, log=lines.append)
    first, second = (Trial("CMATHTrial", config={"lr": 1e-3}, trial_id=t, stub=True) for t in ("aaa", "bbb"))
    # Ray's list holds both, the second created first in the list's order, and it starts first.
    printer.on_trial_start(0, [first, second], second)
    printer.on_trial_start(0, [first, second], first)
    printer.on_trial_start(0, [first, second], second)  # its worker was lost: it starts again
    assert lines == ["[bbb] start (1/8)  lr=0.001", "[aaa] start (2/8)  lr=0.001",
                     "[bbb] start again, from its last checkpoint (1/8)  lr=0.001"]
