"""The lines a person reads while a sweep runs: one when a trial starts, one at each of ASHA's
rungs (without early stopping, at each quarter of its epochs), one when it ends (with --verbose,
one per epoch), and how a trial came back after a lost worker or a resume."""

from __future__ import annotations

import math
from collections.abc import Callable

from ray.tune import Callback
from ray.tune.experiment import Trial

from .recovery import REPLAYED, RESTORE_NOTE, error_summary, is_epoch, trial_key
from .space import show
from .trainable import model_metrics
from .trials import end_state


class ProgressPrinter(Callback):
    """One line when a trial starts, at each rung and when it ends; with verbose, one per epoch.

    Args:
        searched: the searched names, in the space's order.
        num_samples: the sweep's trials.
        log: where the lines go.
        verbose: a line per epoch.
        rungs: the epochs ASHA decides at; () without early stopping (then a line at each
            quarter of a trial's epochs).
    """

    def __init__(self, searched: list[str], num_samples: int, log: Callable[[str], None] = print,
                 verbose: bool = False, rungs: tuple[int, ...] = ()):
        self.searched = searched
        self.num_samples = num_samples
        self.log = log
        self.verbose = verbose
        self.rungs = rungs
        self.started: dict[str, int] = {}  # trial id -> its place in start order, 1-based

    def __getstate__(self) -> dict:
        return {**self.__dict__, "log": print}

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        params = "  ".join(f"{k}={show(trial.config.get(k), 3)}" for k in self.searched)
        again = " again, from its last checkpoint" if trial_key(trial) in self.started else ""
        # Numbered as they start: Ray's list also holds trials created but still waiting for a slot.
        number = self.started.setdefault(trial_key(trial), len(self.started) + 1)
        self.log(f"[{trial_key(trial)}] start{again} ({number}/{self.num_samples})  {params}")

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        if not is_epoch(trial.last_result or {}):
            return  # it reported a fault of its place first, and hpo.placement said what is done about it
        self.log(f"[{trial_key(trial)}] lost its worker: {error_summary(trial)}; retrying from its last checkpoint")

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info) -> None:
        if RESTORE_NOTE in result:
            self.log(f"[{trial_key(trial)}] {result[RESTORE_NOTE]}")
        if not is_epoch(result) or REPLAYED in result:
            return
        if self.verbose:
            self.log(f"[{trial_key(trial)}] epoch {result['epoch']:3d}  val W-F1 {100 * result['val_wf1']:.2f}"
                     f"  ({model_metrics(result).get('epoch_seconds', 0):.1f}s)")
        elif result["epoch"] in self._milestones(result["epochs_planned"]):
            self.log(f"[{trial_key(trial)}] epoch {result['epoch']}/{result['epochs_planned']}  val W-F1 "
                     f"{100 * result['val_wf1']:.2f}, best {100 * result['best_val_wf1']:.2f}")

    def _milestones(self, planned: int) -> set[int]:
        """The epochs before the last that get a line without --verbose."""
        marks = self.rungs or {math.ceil(planned * quarter / 4) for quarter in (1, 2, 3)}
        return {epoch for epoch in marks if epoch < planned}

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        r = trial.last_result
        state = end_state(r).replace("_", " ").replace("interrupted", "interrupted (time budget or Ctrl-C)")
        if r.get(REPLAYED):
            state = f"had already {state.replace('stopped', 'been stopped')} before the resume:"
        self.log(f"[{trial_key(trial)}] {state} at epoch {r['epoch']}/{r['epochs_planned']}  best val W-F1 "
                 f"{100 * r['best_val_wf1']:.2f} (epoch {r['best_epoch']})  "
                 f"[{_ended(trials) + 1}/{self.num_samples} done]")

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        # Ray has marked the trial ERROR already (a completed one is marked after on_trial_complete).
        self.log(f"[{trial_key(trial)}] failed: {error_summary(trial)}  [{_ended(trials)}/{self.num_samples} done]")


def _ended(trials: list[Trial]) -> int:
    return sum(t.status in (Trial.TERMINATED, Trial.ERROR) for t in trials)


