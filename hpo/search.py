"""Optuna's TPE behind Ray Tune, told the truth about trials that ASHA stopped.

Ray's OptunaSearch reports every trial that ends without an error as COMPLETE with its last
score, so a trial ASHA stopped after two epochs looks to TPE like a finished trial that only
reached an epoch-2 score. Here such a trial is told as PRUNED (TPE ranks pruned trials by
their intermediate values, below completed ones), a finished trial's value is its best epoch
(the sweep selects checkpoints on validation), and each Optuna trial records which Ray trial
it is and whether it came from the warm start, the random start-up or TPE.

The searcher's state is saved with Ray's, every 10 s or more; a driver killed in between leaves
Optuna trials (the study is written at once) for Ray trials that the restored state never had.
On a resume they are handed out first, each as a new Ray trial that carries the old one on.
"""

from __future__ import annotations

import math

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from ._compat import is_enqueued, searcher_study, searcher_told, searcher_trials, storage_id, stored_trial, study_trial
from .recovery import CHECKPOINTS_OF, CONTINUES
from .space import METRIC, MODE, SearchSpace, make_sampler
from .study import open_storage
from .trials import end_state

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class SweepSearch(OptunaSearch):
    def __init__(self, space: SearchSpace, n_startup_trials: int, storage: str | None = None,
                 study_name: str = "cmath", sampler: str = "tpe"):
        self.n_startup_trials = n_startup_trials
        self.sampler_kind = sampler
        super().__init__(space=dict(space.distributions), metric=METRIC, mode=MODE,
                         points_to_evaluate=[dict(p) for p in space.warm_start] or None,
                         sampler=make_sampler(sampler, space.seed, n_startup_trials),
                         storage=open_storage(storage) if storage else None, study_name=study_name)
        self._best: dict[str, float] = {}
        self._values: dict[str, dict[int, float]] = {}  # per trial: epoch -> metric, written when it ends
        self._lost: list[optuna.trial.FrozenTrial] = []  # see restore
        self._tpe_started = False  # see _origin

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self._lost = lost_trials(searcher_study(self), {storage_id(t) for t in searcher_trials(self).values()})

    def suggest(self, trial_id: str) -> dict | None:
        if self._lost:
            return self._carry_on(trial_id, self._lost.pop(0))
        origin = self._origin()
        config = super().suggest(trial_id)
        ot_trial = searcher_trials(self)[trial_id]
        if is_enqueued(searcher_study(self), ot_trial):
            origin = "warm_start"
        ot_trial.set_user_attr("ray_trial_id", trial_id)
        ot_trial.set_user_attr("suggested_by", origin)
        return config

    def _origin(self) -> str:
        """Which part of the sampler makes the next suggestion (warm start aside). TPE takes over
        once n_startup_trials have finished and keeps every later suggestion, so the study's
        finished trials (a read of every trial, on Tune's loop) are counted only until then."""
        if self.sampler_kind != "tpe":
            return "random"
        if not self._tpe_started:
            finished = len(searcher_study(self).get_trials(deepcopy=False, states=FINISHED))
            self._tpe_started = finished >= self.n_startup_trials
        return "tpe" if self._tpe_started else "random"

    def _carry_on(self, trial_id: str, lost: optuna.trial.FrozenTrial) -> dict:
        """Ray trial `trial_id` takes over a lost trial: the same Optuna trial and values, and in
        its config the id the sweep's records know it by and whose checkpoints to start from.
        A trial asked for but killed before it was handed to Ray is simply handed out now."""
        ot_trial = study_trial(searcher_study(self), lost)
        searcher_trials(self)[trial_id] = ot_trial
        if "ray_trial_id" not in lost.user_attrs:
            ot_trial.set_user_attr("ray_trial_id", trial_id)
            ot_trial.set_user_attr("suggested_by", self._origin())
            return dict(lost.params)
        # Read before the trial changes: a storage may hand out its own trial objects (Optuna's
        # journal does, read without a deep copy), and `lost` would then show the change.
        continues = lost.user_attrs["ray_trial_id"]
        checkpoints_of = lost.user_attrs.get("carried_on_by", continues)
        if not lost.state.is_finished():  # a finished trial cannot change; it only replays its end
            ot_trial.set_user_attr("carried_on_by", trial_id)
        return {**lost.params, CONTINUES: continues, CHECKPOINTS_OF: checkpoints_of}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Kept here until the trial ends, not written to the study now: Tune waits for this
        before the trial's next epoch, a study write is a database commit, and TPE reads only
        finished trials. (The searcher's state, these values included, is saved with Tune's.)"""
        if self.metric not in result:  # the error report of a failing trial; its FAIL comes next
            return
        self._track(trial_id, result)

    def _track(self, trial_id: str, result: dict) -> None:
        value = result.get(self.metric)
        if value is not None and math.isfinite(value):
            self._best[trial_id] = max(self._best.get(trial_id, -math.inf), value)
            self._values.setdefault(trial_id, {})[int(result.get("epoch", result.get("training_iteration", 0)))] = value

    def _report_values(self, trial_id: str, ot_trial) -> None:
        reported = set(stored_trial(searcher_study(self), ot_trial).intermediate_values)
        for step, value in sorted(self._values.pop(trial_id, {}).items()):
            if step not in reported:
                ot_trial.report(value, step)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        study, told = searcher_study(self), searcher_told(self)
        if trial_id in told or trial_id not in searcher_trials(self):
            return
        ot_trial = searcher_trials(self)[trial_id]
        state = end_state(result, error)
        if state == "interrupted":
            return  # stays RUNNING in the study: `cmath-hpo resume` finishes it and tells the outcome
        finished = stored_trial(study, ot_trial).state.is_finished()
        if state != "failed" and not finished:
            # The final result never reaches on_trial_result: Tune skips it for stopped trials.
            self._track(trial_id, result)
            self._report_values(trial_id, ot_trial)
        if finished:
            # told before a driver was killed; the restored searcher state predates it
            told.add(trial_id)
            return
        try:
            if state == "failed":
                study.tell(ot_trial, state=TrialState.FAIL)
            elif state == "stopped_by_asha":
                study.tell(ot_trial, state=TrialState.PRUNED)
            else:
                study.tell(ot_trial, self._best.get(trial_id, result[self.metric]))
        finally:
            told.add(trial_id)


def lost_trials(study: optuna.Study, handed_out: set[int]) -> list[optuna.trial.FrozenTrial]:
    """Trials in the study that the searcher, restored with Ray's state, never handed out: they
    were asked for after that state was saved, then the driver was killed (before or after Ray
    started them). Enqueued ones not yet asked for are WAITING, and not among them. (A sweep
    resumed before this was built marked such trials FAIL with a note and ran others instead.)"""
    return [t for t in study.get_trials(deepcopy=False)
            if storage_id(t) not in handed_out and t.state != TrialState.WAITING
            and not t.user_attrs.get("note", "").startswith("orphaned")]
