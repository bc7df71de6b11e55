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


def _epochs(printer, trial, planned):
    for epoch in range(1, planned + 1):
        printer.on_trial_result(0, [trial], trial, {"epoch": epoch, "epochs_planned": planned, "val_wf1": epoch / 100,
                                                    "best_val_wf1": epoch / 100, "training_iteration": epoch})


def test_a_running_trial_gets_a_line_at_each_rung_or_quarter_of_its_epochs():
    """Without --verbose a trial of many epochs printed nothing between its start and its end."""
    trial = Trial("CMATHTrial", config={"lr": 1e-3}, trial_id="aaa", stub=True)
    lines = []
    _epochs(ProgressPrinter(["lr"], 4, lines.append, rungs=(1, 3, 9)), trial, planned=9)
    assert lines == ["[aaa] epoch 1/9  val W-F1 1.00, best 1.00", "[aaa] epoch 3/9  val W-F1 3.00, best 3.00"]
    lines.clear()
    _epochs(ProgressPrinter(["lr"], 4, lines.append), trial, planned=8)  # no ASHA: each quarter
    assert [line.split("  ")[0] for line in lines] == ["[aaa] epoch 2/8", "[aaa] epoch 4/8", "[aaa] epoch 6/8"]
    lines.clear()
    _epochs(ProgressPrinter(["lr"], 4, lines.append, verbose=True), trial, planned=3)
    assert len(lines) == 3 and lines[0].startswith("[aaa] epoch   1  val W-F1 1.00")


def test_the_summary_says_when_the_best_trial_is_the_warm_start_point():
    """The quick start's best trial was the space's own warm start, and nothing said so."""
    from pathlib import Path

    from hpo.sweep import SweepOutcome, summary_text

    best = {"trial_id": "aaa", "best_val_wf1": 0.84, "best_epoch": 12, "test_wf1_at_best_val": 0.74,
            "test_acc_at_best_val": 0.75, "param_lr": 3e-4, "suggested_by": "warm_start"}
    counts = {"completed": 1, "stopped_by_asha": 0, "failed": 0, "interrupted": 0}
    outcome = SweepOutcome("s", Path("s"), "finished", counts, best, 1.0, 1.0, 0.0, 1.0)
    text = summary_text(outcome, ["lr"])
    assert "  lr=0.0003  (the space's warm-start point, not one the search found)" in text
    assert "val W-F1 84.00 at epoch 12" in text and "74.00" not in text and "75.00" not in text  # test: not here
    outcome.best["suggested_by"] = "tpe"
    assert "warm-start" not in summary_text(outcome, ["lr"])
