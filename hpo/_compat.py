"""Every private name of Ray Tune and Optuna that hpo relies on, in one place.

Each exists because the public API has no route to it (said per name). pyproject pins Ray and
Optuna exactly, and tests/test_compat.py exercises each name against the installed libraries, so
an upgrade that moves or renames one fails there, not in the middle of a sweep.
"""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial


def __getattr__(name: str):
    # TrainingResult: what Tune's controller hands Trainable.restore, a checkpoint with the metrics
    # it was saved with. CMATHTrial.restore overrides restore to fall back to older checkpoints;
    # Ray exports no public name for it. Imported on first use: the planning modules import this
    # file (hpo.space, for distribution_contains) and load no Ray.
    if name == "TrainingResult":
        from ray.train._internal.checkpoint_manager import _TrainingResult

        return _TrainingResult
    raise AttributeError(name)


# ---------------------------------------------------------------------------- Ray Tune's OptunaSearch
# SweepSearch extends Ray's OptunaSearch, which keeps its study and the Optuna trial behind each
# Tune trial in private attributes with no accessor.
def searcher_study(searcher) -> optuna.Study:
    return searcher._ot_study


def searcher_trials(searcher) -> dict[str, optuna.Trial]:
    """Tune trial id -> the Optuna trial asked for it."""
    return searcher._ot_trials


def searcher_told(searcher) -> set[str]:
    """Tune trial ids whose outcome the searcher has told the study (OptunaSearch's own record)."""
    return searcher._completed_trials


# ---------------------------------------------------------------------------- Ray Tune's ASHA
# hpo.plan.asha_rungs works out where ASHA decides without Ray (the plan and the report need no
# Ray); the tests check it against Ray's own bracket, which Ray's scheduler keeps private.
def asha_bracket(grace_period: int, max_t: int, reduction_factor: float):
    """A bracket of Ray's ASHA scheduler, as ASHAScheduler builds its first one."""
    from ray.tune.schedulers.async_hyperband import _Bracket

    return _Bracket(grace_period, max_t, reduction_factor, 0)


def bracket_rungs(bracket) -> list[tuple[float, dict]]:
    """A bracket's rungs: (milestone, {trial id: the score it was recorded with}) each."""
    return bracket._rungs


def asha_brackets(scheduler) -> list:
    """An ASHAScheduler's brackets (each trial is assigned one when Tune adds it)."""
    return scheduler._brackets


def asha_record(bracket, trial_id: str, iteration: int, score: float) -> None:
    """Let an ASHA bracket record a result it saw before a resume, as its on_result would have
    (`score`: the metric, negated when it is minimised): Ray saves no scheduler state, so a
    resumed sweep's rungs start empty."""
    from types import SimpleNamespace

    bracket.on_result(SimpleNamespace(trial_id=trial_id), iteration, score)


# ---------------------------------------------------------------------------- Ray Tune's Tuner
def restored_scheduler(tuner):
    """The trial scheduler a restored Tuner will run (its pickled TuneConfig's)."""
    return tuner._local_tuner._tune_config.scheduler


def set_restored_callbacks(tuner, callbacks: list) -> None:
    """Give a restored Tuner new callbacks. `Tuner.restore` takes the RunConfig, callbacks
    included, from the pickle the first driver wrote, and has no argument to replace them; the
    sweep's callbacks hold that driver's host paths."""
    tuner._local_tuner._run_config.callbacks = callbacks


# ---------------------------------------------------------------------------- Ray Tune's snapshots
def bound_snapshot_rate(bytes_per_second: float) -> None:
    """Tune's experiment snapshots write at most about `bytes_per_second` on average: after each,
    the next waits at least the snapshot's size over that rate, or Tune's own "auto" period (10 s,
    or 19 times the time the last one took) when that is longer. A snapshot holds every trial's
    state, so at Tune's period alone what a driver writes grows as the square of the trials; Tune
    has no setting for it. A trial's checkpoints no longer force one (Tune forces one after
    `num_to_keep` of them): a restored trial takes its newest usable checkpoint on the storage,
    whichever one, or none, the snapshot names (CMATHTrial.restore, _resume_from_storage). Applies
    to every Tune experiment this process runs; calling it again changes the rate."""
    manager = snapshot_manager()
    original = getattr(manager, "_cmath_update_period", manager._update_auto_checkpoint_time)

    def update_period(self, time_taken: float) -> None:
        original(self, time_taken)
        if self._auto_checkpoint_enabled:
            staged = Path(self._storage.experiment_driver_staging_path)
            written = sum(f.stat().st_size for f in staged.glob("*state-*") if f.is_file())
            self._checkpoint_period = max(self._checkpoint_period, written / bytes_per_second)

    manager._cmath_update_period = original
    manager._update_auto_checkpoint_time = update_period
    manager.on_trial_checkpoint = _no_forced_snapshot


def snapshot_manager() -> type:
    """Tune's class that saves and uploads the experiment's snapshots, which bound_snapshot_rate
    changes; Tune builds one per experiment and exports no name for it."""
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    return _ExperimentCheckpointManager


def _no_forced_snapshot(self, trial) -> None:
    """In place of Tune's count of a trial's checkpoints since the last snapshot, which forces one
    at `num_to_keep` so that no snapshot names a checkpoint Tune has deleted."""


# ---------------------------------------------------------------------------- Ray Tune's trials
def never_retry(trial) -> None:
    """A trial that raised its own error is not retried: Tune's FailureConfig is one number for the
    whole experiment, so the trial's own copy of it is lowered."""
    trial.max_failures = 0


def allow_another_try(trial) -> None:
    """A trial whose failure was its place's, not its own (hpo.placement), is retried without
    spending one of its retries: its copy of FailureConfig's number is raised by one (-1, no
    limit, stays)."""
    if trial.max_failures >= 0:
        trial.max_failures += 1


def keep_statistics_of(trial, metric: str) -> None:
    """An ended trial keeps Tune's running statistics (min, max, last-5 and last-10 means) of
    `metric` only: Tune holds them for every numeric key of every trial in memory and in each
    experiment snapshot, and reads them of an ended trial only to rank trials by one metric
    (ExperimentAnalysis.get_best_trial). Tune's metadata has no public route to them."""
    metadata = trial.run_metadata
    metadata.metric_analysis = {k: v for k, v in metadata.metric_analysis.items() if k == metric}
    metadata.metric_n_steps = {k: v for k, v in metadata.metric_n_steps.items() if k == metric}


def restart_iteration_count(trainable) -> None:
    """A trainable that gave up on every checkpoint starts over: Tune's epoch counter, which the
    failed restore attempts had set, goes back to 0 (Trainable has no setter)."""
    trainable._iteration = 0


def trial_folder(trainable):
    """(filesystem, path) of the trainable's trial folder on the sweep's storage, where its
    checkpoints go; None without a storage. Ray hands a class trainable its storage context (and
    a new one on reset) but no public accessor."""
    storage = trainable._storage
    return None if storage is None else (storage.storage_filesystem, storage.trial_fs_path)


def number_checkpoints_after(trainable, index: int) -> None:
    """The trainable's next checkpoint is `checkpoint_<index + 1>` (or later). Ray numbers a
    trial's checkpoints from the count its saved state had, which lags a killed driver: a trial
    resumed from a newer checkpoint than that state names would otherwise write its next one under
    an older number, and "newest first" by name would no longer be by epoch."""
    storage = trainable._storage
    if storage is not None:
        storage.current_checkpoint_index = max(storage.current_checkpoint_index, index)


# ---------------------------------------------------------------------------- Optuna
def stored_trial(study: optuna.Study, trial: optuna.Trial) -> FrozenTrial:
    """One trial as the storage has it now, without reading every trial of the study
    (`study.get_trials()[number]` would, at every call)."""
    return study._storage.get_trial(trial._trial_id)


def is_enqueued(study: optuna.Study, trial: optuna.Trial) -> bool:
    """Whether the trial came from `enqueue_trial` (the warm start): Optuna marks it with a
    system attribute, which the public Trial no longer exposes."""
    return "fixed_params" in study._storage.get_trial_system_attrs(trial._trial_id)


def study_trial(study: optuna.Study, trial: FrozenTrial) -> optuna.Trial:
    """A live handle on a trial already in the study (one a killed driver's searcher asked for),
    so the searcher can report to it and tell its end: `study.ask()` only makes new ones."""
    return optuna.Trial(study, trial._trial_id)


def storage_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The storage's id of a trial, the same for a live Trial and a FrozenTrial of it (a live
    Trial exposes no public id; the searcher knows its trials as live ones)."""
    return trial._trial_id


def distribution_contains(distribution: BaseDistribution, value) -> bool:
    """Whether a value lies in a distribution, by Optuna's own rule (bounds, step grid, choices);
    a value of the wrong kind (a string for a number, a choice not listed) does not."""
    try:
        return distribution._contains(distribution.to_internal_repr(value))
    except (TypeError, ValueError):
        return False


def sampler_uses_constant_liar(sampler: optuna.samplers.BaseSampler) -> bool:
    """Whether a sampler counts running trials as poor ones (TPE's `constant_liar`; other samplers
    have none): TPESampler takes the flag in its constructor and exposes no reader of it."""
    return isinstance(sampler, optuna.samplers.TPESampler) and sampler._constant_liar
