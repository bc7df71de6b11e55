"""The Ray Tune experiment of a sweep: the trainable with its resources, Optuna's TPE behind a
concurrency limiter, ASHA (or FIFO) keeping trials off faulty nodes (hpo.placement), and the
driver's callbacks (MLflow, tables, progress, no retry of a trial's own error); built for a new
sweep, restored for a resumed one."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import optuna
from ray.tune import Callback

from cmath_model.data import load_dataset

from ._compat import (
    asha_brackets,
    asha_record,
    bound_snapshot_rate,
    keep_statistics_of,
    restored_scheduler,
    set_restored_callbacks,
)
from .plan import SweepPlan
from .provenance import SweepRecord
from .space import METRIC, MODE
from .storage import place_marker, public_query
from .trials import read_journal

# What Tune's snapshots may write a second on average, each written twice (its staging folder,
# then the storage). A trial's state takes about 10 KB of one (benchmarks.driver): with 1,000
# trials, 10 MB, written every 40 s; with 100, 1 MB every 10 s, Tune's own period.
SNAPSHOT_BYTES_PER_S = 250_000


def tune_environment() -> None:
    """Tune's settings for a sweep's driver, set before Tune reads them."""
    # Ray warns about each snapshot forced by a trial's checkpoints (none are: bound_snapshot_rate).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Progress comes from ProgressPrinter; Tune's own tables (verbose=0 in its legacy reporter) stay quiet.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # A failing trial's error report carries no metric (see CMATHTrial); every epoch does.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # Tune's own per-result loggers (CSV, JSON, TensorBoard) run on the driver between a trial's
    # epochs and fill the driver's folder that every experiment snapshot uploads; the sweep's
    # journal (history.jsonl), tables and MLflow hold every result, so none of them runs.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # Without them, the ResultGrid that Tuner.fit returns finds no per-trial result file to read
    # its (unused) metric dataframes from and warns once per trial; its results still carry each
    # trial's last result, which is all the sweep reads of it.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    # Tune's experiment snapshot holds every trial's state and is rewritten to the storage each
    # period: every second it was most of what a 1,000-trial driver wrote (benchmarks.driver), and
    # at Tune's own period ("auto": 10 s or more) what a driver writes still grows as the square
    # of the trials. So snapshots also wait in proportion to their size (SNAPSHOT_BYTES_PER_S).
    # A killed driver loses nothing finished: ended trials have their records, every result is in
    # the journal, a trial started since the snapshot is carried on by a new one (SweepSearch).
    # A trial Ray restores takes its newest usable checkpoint on the storage, whichever one (or
    # none) the snapshot names, so a trial's checkpoints no longer force a snapshot either. What a
    # longer period costs is the replays of trials started since the snapshot, on a resume.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "auto")
    bound_snapshot_rate(SNAPSHOT_BYTES_PER_S)


def build_trainable(plan: SweepPlan, trial_class: type | None = None):
    """The trial class with its resources; the base config and the dataset go to the object store
    once. The dataset is the file the plan checked (its SHA-256 pinned). Writes the marker on the
    storage that each trial checks before it trains."""
    from ray import tune

    from .trainable import CMATHTrial

    dataset = load_dataset(plan.data.path, plan.data.sha256)
    probe = (plan.probe_dir, place_marker(plan.probe_dir))  # a new token for each driver, so a stale marker fails
    trainable = tune.with_parameters(trial_class or CMATHTrial, base=plan.base.to_dict(), dataset=dataset,
                                     ended_dir=plan.ended_dir, checkpoint_epochs=plan.rungs, probe=probe)
    return tune.with_resources(trainable, plan.resources)


def sweep_callbacks(plan: SweepPlan, record: SweepRecord, log: Callable[[str], None], resumed: bool) -> list:
    """The driver's callbacks for this host: MLflow, the tables (and their mirror on a shared
    storage), progress, and no retry of a trial's own error. Built for every driver, new or
    resumed (`resumed`: its trials may have MLflow runs already), so no path of an earlier
    driver's host reaches a resumed one."""
    from .mirror import SweepMirror
    from .progress import ProgressPrinter
    from .recovery import NoRetryOnTrialError
    from .table import TrialTable
    from .tracking import MlflowTrials

    base = plan.base.to_dict()
    # Ended trials' older checkpoints and resume state are pruned once their best/ is uploaded.
    tracker = MlflowTrials(plan.tracking_uri, record.experiment_id, record.parent_id, plan.name, base, plan.searched,
                           sweep_dir=plan.sweep_dir.resolve(), prune=not plan.options.keep_checkpoints,
                           ended_dir=plan.ended_dir, resumed=resumed)
    mirror = SweepMirror(plan.sweep_dir, plan.shared_state) if plan.shared_state else None
    table = TrialTable(plan.sweep_dir.resolve(), base, plan.searched, tracker, plan.study_storage, plan.name,
                       plan.ended_dir, mirror=mirror, storage_query=public_query(plan.storage_path))
    printer = ProgressPrinter(plan.searched, plan.options.num_samples, log, plan.options.verbose, plan.rungs)
    return [NoRetryOnTrialError(), tracker, table, printer, EndedTrialsKeepLittle()]


class EndedTrialsKeepLittle(Callback):
    """An ended trial keeps Tune's running statistics of the sweep's metric only (hpo._compat.
    keep_statistics_of): the driver holds every trial for the whole sweep, and each experiment
    snapshot writes them all."""

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        keep_statistics_of(trial, METRIC)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        keep_statistics_of(trial, METRIC)


def build_tuner(plan: SweepPlan, record: SweepRecord, log: Callable[[str], None], trial_class: type | None = None):
    """A new sweep's Tuner, its trials logged under the record's MLflow parent run."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from .placement import SweepASHA, SweepFIFO
    from .search import SweepSearch

    tune_environment()
    # The limiter makes Tune ask for a trial only when a slot is free, not queue suggestions ahead:
    # a suggestion made early is made with less history, and could not use TPE at all.
    searcher = ConcurrencyLimiter(SweepSearch(plan.space, plan.n_startup, storage=plan.study_storage,
                                              study_name=plan.name, sampler=plan.options.sampler),
                                  max_concurrent=plan.max_concurrent)
    if plan.options.early_stopping:
        scheduler = SweepASHA(time_attr="training_iteration", max_t=plan.max_t,
                              grace_period=plan.space.grace_period, reduction_factor=plan.space.reduction_factor)
    else:
        scheduler = SweepFIFO()
    scheduler.attach(log, plan.sweep_dir)
    return tune.Tuner(
        build_trainable(plan, trial_class),
        tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=searcher, scheduler=scheduler,
                                    num_samples=plan.options.num_samples, reuse_actors=True,
                                    time_budget_s=plan.options.time_budget),
        run_config=tune.RunConfig(name=plan.storage_name, storage_path=plan.storage_path,
                                  callbacks=sweep_callbacks(plan, record, log, resumed=False), verbose=0,
                                  # The trial asks for its own checkpoints (rungs, every N, its last
                                  # epoch); Ray's one at the end would be taken of a replay too, empty.
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_at_end=False),
                                  failure_config=tune.FailureConfig(max_failures=plan.options.max_retries)),
    )


def restore_tuner(plan: SweepPlan, record: SweepRecord, log: Callable[[str], None], trial_class: type | None = None):
    """A resumed sweep's Tuner: Ray's saved experiment (trials, searcher) with the trainable given
    again, since its parameters (base config, dataset) are not in Ray's state, and this host's
    callbacks in place of the pickled ones, which hold the first driver's paths. (Their state
    is in the sweep's files, which they read when the fit starts.)"""
    from ray import tune

    tune_environment()
    tuner = tune.Tuner.restore(plan.experiment_path, trainable=build_trainable(plan, trial_class),
                               resume_unfinished=True, resume_errored=False, restart_errored=False)
    set_restored_callbacks(tuner, sweep_callbacks(plan, record, log, resumed=True))
    scheduler = restored_scheduler(tuner)
    if hasattr(scheduler, "attach"):  # a sweep started before hpo.placement has Ray's own
        scheduler.attach(log, plan.sweep_dir)
    if plan.options.early_stopping:
        rebuild_rungs(scheduler, read_journal(plan.sweep_dir))
    return tuner


def rebuild_rungs(scheduler, journal: dict[str, list[dict]]) -> None:
    """ASHA's rungs as they stood before the resume, from the journal: Ray saves no scheduler
    state, so a resumed sweep would compare new trials with nobody and stop none. Each trial's
    results are replayed in epoch order through its bracket (the sweep's ASHA has one), which
    records at each milestone what it recorded then."""
    bracket = asha_brackets(scheduler)[0]
    sign = 1.0 if MODE == "max" else -1.0  # ASHA compares as a maximisation
    for trial_id, rows in journal.items():
        for row in sorted({int(r["epoch"]): r for r in rows}.values(), key=lambda r: int(r["epoch"])):
            asha_record(bracket, trial_id, int(row["epoch"]), sign * float(row[METRIC]))
