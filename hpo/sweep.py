"""`cmath-hpo sweep` as a library: plan (no Ray), then run on Ray Tune + Optuna + ASHA + MLflow.

A sweep, new or resumed, takes one path (`fit_sweep`), top to bottom: join or start Ray and
check it can run the sweep (hpo.cluster), open the sweep's record (sweep.json and the MLflow
parent run, hpo.provenance), build or restore the Tuner (hpo.tuner), fit, leave Ray, then tally
the trials and close the record. The plan and its checks are in hpo.plan.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import optuna

from cmath_model.tracking import check_artifact_home, sqlite_file

from .cluster import describe_cluster, joined_cluster
from .errors import SweepError
from .mirror import SweepMirror
from .plan import SweepOptions, SweepPlan, describe_data, plan_sweep
from .provenance import SweepRecord
from .record import FAILURES_FILE, OPTUNA_FILE, read_node_faults
from .space import show
from .study import copy_to_sqlite, open_storage
from .trials import END_STATES, TRIALS_FILE, best_row, read_trials

__all__ = ["SweepOptions", "SweepOutcome", "fit_sweep", "plan_sweep", "run_sweep"]


@dataclass
class SweepOutcome:
    """How a sweep ended: its counts by end state, its best trial and its timings."""

    name: str
    sweep_dir: Path
    status: str  # finished | incomplete | time_budget_spent
    counts: dict[str, int]
    best: dict | None
    wall_seconds: float
    fit_seconds: float
    ray_init_seconds: float
    trial_train_seconds: float
    mlflow_failures: int = 0  # MLflow calls that failed (the sweep went on; its tables have everything)
    mlflow_failure_notes: list[str] = field(default_factory=list)
    node_faults: dict[str, dict] = field(default_factory=dict)  # nodes that could not use the storage (hpo.placement)

    @property
    def exit_code(self) -> int:
        """1 when every trial failed, MLflow lost part of the record, or a node could not use the
        storage (the cluster needs fixing, though no result was lost); else 0."""
        c = self.counts
        return 1 if (c["failed"] and c["failed"] == sum(c.values())) or self.mlflow_failures or self.node_faults else 0


def run_sweep(options: SweepOptions, log: Callable[[str], None] = print, trainable: type | None = None) -> SweepOutcome:
    """Run a sweep and return its outcome once every trial has ended (and a private Ray is gone).

    Args:
        options: what to sweep, how many trials, where (`cmath-hpo sweep`'s flags).
        log: where progress lines go.
        trainable: a subclass of hpo.trainable.CMATHTrial to run instead (to add behaviour to
            every trial, e.g. the faults the tests inject).

    Returns:
        The outcome; its `exit_code` is what `cmath-hpo sweep` exits with.

    >>> outcome = run_sweep(SweepOptions(space="search_spaces/quickstart.yaml", num_samples=8))
    >>> outcome.best["trial_id"], outcome.best["best_val_wf1"], outcome.sweep_dir
    """
    started = time.perf_counter()
    plan = plan_sweep(options)
    check_tracking_uri(plan.tracking_uri)
    return fit_sweep(plan, started, log, trainable)


def fit_sweep(plan: SweepPlan, started: float, log: Callable[[str], None], trainable: type | None = None,
              resumed: dict | None = None) -> SweepOutcome:
    """What every sweep does on Ray, new or resumed. The record is opened only once the cluster
    can run a trial, so a refused sweep leaves no trace; Ray is left whatever happens, and the
    parent run is marked FAILED if the fit raises.

    Args:
        plan: the sweep's plan (sized for the cluster once it is joined).
        started: `time.perf_counter()` when the sweep was asked for.
        log: where progress lines go.
        trainable: a CMATHTrial subclass to run instead (see run_sweep).
        resumed: the sweep.json of a sweep to continue (None: a new sweep).

    Returns:
        The sweep's outcome.
    """
    from .tuner import build_tuner, restore_tuner

    tracking_environment()
    with joined_cluster(plan, log) as (plan, cluster):
        if resumed is None:
            record = SweepRecord.open(plan, cluster)
            log(f"sweep {plan.name}: {plan.options.num_samples} trials -> {plan.sweep_dir}")
            if plan.options.data is None:
                log(f"data: {describe_data(plan)}")
        else:
            record = SweepRecord.reopen(plan, cluster, resumed)
            log(f"resuming sweep {plan.name} from {plan.experiment_path}")
        log(describe_cluster(plan, cluster))
        if plan.shared_state:  # from now on another host can resume the sweep
            SweepMirror(plan.sweep_dir, plan.shared_state).sync()
        try:
            tuner = (build_tuner(plan, record, log, trainable) if resumed is None
                     else restore_tuner(plan, record, log, trainable))
            record.fit_started()
            fit_started = time.perf_counter()
            tuner.fit()
            fit_seconds = time.perf_counter() - fit_started
        except BaseException:
            record.failed()
            raise
    return finish_sweep(plan, record, cluster.start_seconds, started, fit_seconds, log)


def finish_sweep(plan: SweepPlan, record: SweepRecord, ray_seconds: float, started: float, fit_seconds: float,
                 log: Callable[[str], None]) -> SweepOutcome:
    """Tally the trials, close the sweep's record and print its summary."""
    trials = read_trials(plan.sweep_dir) if (plan.sweep_dir / TRIALS_FILE).exists() else None
    counts = {state: 0 for state in END_STATES}
    best, train_seconds = None, 0.0
    if trials is not None and len(trials):
        for state, n in trials["end_state"].value_counts().items():
            counts[state] = int(n)
        train_seconds = float(trials["train_seconds"].sum())
        best = best_row(trials)
    finished = sum(counts[s] for s in ("completed", "stopped_by_asha", "failed")) == plan.options.num_samples
    status = "finished" if finished else "incomplete"
    budget = plan.options.time_budget
    if not finished and budget and fit_seconds >= budget:
        # Ray ends a sweep at its time budget for good (a restore continues nothing): close the
        # trials it cut short in the study, as pruned with the epochs they reached.
        status = "time_budget_spent"
        prune_unfinished_study_trials(plan)
    wall = time.perf_counter() - started
    metrics = {f"trials_{k}": v for k, v in counts.items()}
    metrics.update(wall_seconds=wall, fit_seconds=fit_seconds, trial_train_seconds=train_seconds)
    if best is not None:
        metrics.update(best_val_wf1=best["best_val_wf1"], best_test_wf1_at_best_val=best["test_wf1_at_best_val"])
    node_faults = read_node_faults(plan.sweep_dir)
    ended = {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "status": status, "counts": counts,
             "wall_seconds": wall, "fit_seconds": fit_seconds, "ray_init_seconds": ray_seconds,
             "trial_train_seconds": train_seconds, "best": best, "node_faults": node_faults}
    failures = record.close(ended, metrics, best and best["trial_id"], finished, read_failures(plan.sweep_dir))
    keep_a_copy(plan, log)
    outcome = SweepOutcome(name=plan.name, sweep_dir=plan.sweep_dir, status=status, counts=counts, best=best,
                           wall_seconds=wall, fit_seconds=fit_seconds, ray_init_seconds=ray_seconds,
                           trial_train_seconds=train_seconds, mlflow_failures=failures["failures"],
                           mlflow_failure_notes=failures["notes"], node_faults=node_faults)
    log(summary_text(outcome, plan.searched))
    return outcome


def tracking_environment() -> None:
    """MLflow's HTTP client, as the sweep's driver uses it: its defaults (7 retries with back-off,
    120 s per try) hold a call to a hanging server for minutes; the sweep's writer parks logging
    while a server does not answer (hpo.tracking.MlflowWriter), so it needs to know within
    seconds. A user's own settings of these variables win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def keep_a_copy(plan: SweepPlan, log: Callable[[str], None]) -> None:
    """The sweep's folder gets a copy of the study (optuna.db, which the report reads) unless the
    study is that file; a sweep on shared storage gets the folder's final records there
    (hpo.mirror). Neither may cost the sweep's summary: a failure is one
    warning line naming what is missing where."""
    own = plan.sweep_dir / OPTUNA_FILE
    steps = []
    if plan.study_storage != f"sqlite:///{own.resolve()}":
        steps.append((f"copying the study into {own}", lambda: copy_to_sqlite(plan.study_storage, plan.name, own)))
    if plan.shared_state:
        steps.append((f"mirroring the sweep's final records to {plan.shared_state}",
                      lambda: SweepMirror(plan.sweep_dir, plan.shared_state).sync(final=True)))
    for what, step in steps:
        try:
            step()
        except Exception as exc:  # noqa: BLE001
            log(f"warning: {what} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                f"the sweep's folder has every result")


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, naming the URI, instead of letting MLflow retry for minutes; refuse a database
    store that would put artifacts in ./mlruns (cmath_model.tracking.check_artifact_home)."""
    import urllib.error
    import urllib.request

    check_artifact_home(uri)
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
                response.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SweepError(f"MLflow tracking server {uri} is unreachable ({reason}); start it "
                             f"(mlflow server --host 127.0.0.1 --port ...) or pass a reachable --mlflow-uri") from None
    elif sqlite_file(uri) is not None:
        folder = sqlite_file(uri).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SweepError(f"MLflow store {uri}: cannot create {folder} ({exc.strerror}); "
                             f"pass --results or --mlflow-uri to a writable place") from None


def read_failures(sweep_dir: Path) -> dict:
    """The MLflow failures the sweep's tracker counted (hpo.tracking writes them at the sweep's end)."""
    try:
        found = json.loads((sweep_dir / FAILURES_FILE).read_text())
        return {"failures": int(found["failures"]), "notes": list(found.get("notes", []))}
    except (OSError, ValueError, KeyError):
        return {"failures": 0, "notes": []}


def prune_unfinished_study_trials(plan: SweepPlan) -> None:
    """Tell the study that trials still RUNNING in it were pruned where they stopped."""
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=plan.name, storage=open_storage(plan.study_storage))
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.PRUNED)


def summary_text(outcome: SweepOutcome, searched: list[str]) -> str:
    """The lines printed when a sweep ends: counts, timings, the best trial, what MLflow lost."""
    c = outcome.counts
    lines = [f"sweep {outcome.name} {outcome.status}: {c['completed']} completed, {c['stopped_by_asha']} stopped by "
             f"ASHA, {c['failed']} failed" + (f", {c['interrupted']} interrupted" if c["interrupted"] else "")
             + f"; wall {outcome.wall_seconds:.0f}s (fit {outcome.fit_seconds:.0f}s, ray start "
             f"{outcome.ray_init_seconds:.0f}s), trials trained {outcome.trial_train_seconds:.0f}s in all"]
    best = outcome.best
    if best is not None:
        params = "  ".join(f"{k}={show(best[f'param_{k}'])}" for k in searched)
        # No test score here: the best of many trials on validation overstates its test score, and a
        # figure printed after every sweep invites choosing on it. Test is read after the export's retrain.
        lines.append(f"best trial {best['trial_id']}: val W-F1 {100 * best['best_val_wf1']:.2f} at epoch "
                     f"{int(best['best_epoch'])} (test: after export-best --top 3 --seeds 3 and cmath-train --seeds 5)")
        warm = best.get("suggested_by") == "warm_start"
        lines.append(f"  {params}" + ("  (the space's warm-start point, not one the search found)" if warm else ""))
    else:
        lines.append("no trial produced a result")
    if outcome.mlflow_failures:
        lines.append(f"MLflow: {outcome.mlflow_failures} calls failed, so its record of this sweep is incomplete "
                     f"(first: {outcome.mlflow_failure_notes[0] if outcome.mlflow_failure_notes else '?'}); "
                     f"trials.parquet and history.parquet have every result; check the tracking store")
    for node, fault in outcome.node_faults.items():
        lines.append(f"node {node[:12]} could not use the sweep's storage ({fault['faults']} trials moved off it"
                     + (", then it got no more trials" if fault["excluded"] else "") + f"): {fault['problem']}; "
                     f"make the storage reachable there (the same mount, or the object store's credentials in "
                     f"that node's environment) or take the node out of the cluster")
    lines.append(str(outcome.sweep_dir))
    return "\n".join(lines)
