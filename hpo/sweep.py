"""`cmath-hpo sweep` as a library: plan (no Ray), then run on Ray Tune + Optuna + ASHA + MLflow.

A sweep, new or resumed, takes one path (`fit_sweep`): join or start Ray and check it can run the
sweep (hpo.cluster), open the sweep's record (sweep.json and the MLflow parent run), build or
restore the Tuner (hpo.tuner), fit, then close the record and leave Ray. The plan and its checks
are in hpo.plan, the provenance in hpo.provenance.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import optuna

from .cluster import describe_cluster, join_cluster, leave_cluster
from .plan import SWEEP_FILE, SweepOptions, SweepPlan, plan_sweep
from .provenance import driver_record, parent_params, provenance, write_json
from .space import show
from .table import TRIALS_FILE, read_trials, records
from .tracking import check_tracking_uri

__all__ = ["SweepOptions", "SweepOutcome", "fit_sweep", "plan_sweep", "run_sweep"]


@dataclass
class SweepOutcome:
    name: str
    sweep_dir: Path
    status: str  # finished | incomplete
    counts: dict[str, int]
    best: dict | None
    wall_seconds: float
    fit_seconds: float
    ray_init_seconds: float
    trial_train_seconds: float
    mlflow_failures: int = 0  # MLflow calls that failed (the sweep went on; its tables have everything)
    mlflow_failure_notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """1 when every trial failed or MLflow lost part of the record, else 0."""
        c = self.counts
        return 1 if (c["failed"] and c["failed"] == sum(c.values())) or self.mlflow_failures else 0


def run_sweep(options: SweepOptions, log: Callable[[str], None] = print) -> SweepOutcome:
    """Run a sweep and return its outcome once every trial has ended (and a private Ray is gone).

    >>> outcome = run_sweep(SweepOptions(space="search_spaces/quickstart.yaml", num_samples=8))
    >>> outcome.best["trial_id"], outcome.best["best_val_wf1"], outcome.sweep_dir
    """
    from .tuner import build_tuner

    started = time.perf_counter()
    plan = plan_sweep(options)
    check_tracking_uri(plan.tracking_uri)

    def open_record():
        record, client, parent_id, experiment = open_sweep(plan)
        log(f"sweep {plan.name}: {options.num_samples} trials -> {plan.sweep_dir}")
        return record, client, parent_id, experiment

    return fit_sweep(plan, open_record, lambda experiment, parent_id: build_tuner(plan, experiment, parent_id, log),
                     started, log)


def fit_sweep(plan: SweepPlan, open_record: Callable[[], tuple], make_tuner: Callable[[str | None, str], object],
              started: float, log: Callable[[str], None]) -> SweepOutcome:
    """What every sweep does on Ray, new or resumed. `open_record()` opens the sweep's record
    (returns record, MLflow client, parent run id, experiment id) only once the cluster can run
    a trial, so a refused sweep leaves no trace; `make_tuner(experiment, parent_id)` builds or
    restores the Tuner. Ray is left whatever happens; the parent run is marked FAILED if the fit
    raised."""
    parent_id = None
    try:
        ray_seconds, cluster = join_cluster(plan, log)
        record, client, parent_id, experiment = open_record()
        log(describe_cluster(plan, ray_seconds, cluster))
        tuner = make_tuner(experiment, parent_id)
        fit_started = time.perf_counter()
        record["fit_started_at"] = time.time()  # benchmarks.overhead lines trial times up against it
        tuner.fit()
        fit_seconds = time.perf_counter() - fit_started
    except BaseException:
        if parent_id is not None:
            client.set_terminated(parent_id, "FAILED")
        raise
    finally:
        leave_cluster(plan)
    return finish_sweep(plan, record, client, parent_id, started, fit_seconds, ray_seconds, log)


def open_sweep(plan: SweepPlan) -> tuple[dict, object, str, str]:
    """Write sweep.json and open the MLflow parent run that carries its provenance."""
    from mlflow.tracking import MlflowClient

    from cmath_model.tracking import mlflow_experiment, open_run

    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    record = provenance(plan)
    record["driver"] = driver_record(plan)
    write_json(plan.sweep_dir / SWEEP_FILE, record)
    client = MlflowClient(plan.tracking_uri)
    experiment = mlflow_experiment(client, plan.experiment, plan.tracking_uri)
    base = {f"base.{k}": v for k, v in plan.base.to_dict().items()}
    parent_id = open_run(client, experiment, plan.name, tags={
        "cmath.sweep": plan.name, "cmath.kind": "sweep", "cmath.git_commit": str(record["git_commit"]),
        "cmath.data_sha256": plan.data.sha256, "cmath.command": record["command"][:5000]},
        params={**parent_params(plan), **base})
    record["mlflow"].update(experiment_id=experiment, parent_run_id=parent_id)
    write_json(plan.sweep_dir / SWEEP_FILE, record)
    client.log_artifact(parent_id, str(plan.sweep_dir / SWEEP_FILE))
    client.log_artifact(parent_id, str(plan.space.path))
    return record, client, parent_id, experiment



def finish_sweep(plan: SweepPlan, record: dict, client, parent_id: str, started: float, fit_seconds: float,
                 ray_seconds: float, log: Callable[[str], None]) -> SweepOutcome:
    trials = read_trials(plan.sweep_dir) if (plan.sweep_dir / TRIALS_FILE).exists() else None
    counts = {state: 0 for state in ("completed", "stopped_by_asha", "failed", "interrupted")}
    best = None
    train_seconds = 0.0
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
    failures = read_failures(plan.sweep_dir)
    metrics = {f"trials_{k}": v for k, v in counts.items()}
    metrics.update(wall_seconds=wall, fit_seconds=fit_seconds, trial_train_seconds=train_seconds)
    if best is not None:
        metrics.update(best_val_wf1=best["best_val_wf1"], best_test_wf1_at_best_val=best["test_wf1_at_best_val"])
    try:  # the parent run's end: a failing store is counted like the trials' calls, not raised
        if best is not None:
            client.set_tag(parent_id, "cmath.best_trial_id", best["trial_id"])
        client.log_batch(parent_id, metrics=[_metric(k, v) for k, v in metrics.items()])
        if trials is not None:
            client.log_artifact(parent_id, str(plan.sweep_dir / TRIALS_FILE))
    except Exception as exc:  # noqa: BLE001
        failures["failures"] += 1
        failures["notes"].append(f"closing the sweep's parent run: {type(exc).__name__}: {str(exc)[:200]}")
    record.update(finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), status=status, counts=counts,
                  wall_seconds=wall, fit_seconds=fit_seconds, ray_init_seconds=ray_seconds,
                  trial_train_seconds=train_seconds, best=best, mlflow_failures=failures["failures"],
                  mlflow_failure_notes=failures["notes"])
    write_json(plan.sweep_dir / SWEEP_FILE, record)
    try:
        client.log_artifact(parent_id, str(plan.sweep_dir / SWEEP_FILE))
        client.set_terminated(parent_id, "FINISHED" if finished and not failures["failures"] else "KILLED")
    except Exception as exc:  # noqa: BLE001 - sweep.json has the record; the summary says what failed
        failures["failures"] += 1
        failures["notes"].append(f"closing the sweep's parent run: {type(exc).__name__}: {str(exc)[:200]}")
        record.update(mlflow_failures=failures["failures"], mlflow_failure_notes=failures["notes"])
        write_json(plan.sweep_dir / SWEEP_FILE, record)

    outcome = SweepOutcome(name=plan.name, sweep_dir=plan.sweep_dir, status=status, counts=counts, best=best,
                           wall_seconds=wall, fit_seconds=fit_seconds, ray_init_seconds=ray_seconds,
                           trial_train_seconds=train_seconds, mlflow_failures=failures["failures"],
                           mlflow_failure_notes=failures["notes"])
    log(summary_text(outcome, plan.searched))
    return outcome


def read_failures(sweep_dir: Path) -> dict:
    """The MLflow failures the sweep's tracker counted (hpo.tracking writes them at the sweep's end)."""
    from .tracking import FAILURES_FILE

    try:
        found = json.loads((sweep_dir / FAILURES_FILE).read_text())
        return {"failures": int(found["failures"]), "notes": list(found.get("notes", []))}
    except (OSError, ValueError, KeyError):
        return {"failures": 0, "notes": []}


def prune_unfinished_study_trials(plan: SweepPlan) -> None:
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=plan.name, storage=plan.optuna_storage)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.PRUNED)


def _metric(key: str, value: float):
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), 0)


def best_row(trials) -> dict | None:
    """Highest validation score at any epoch, over trials that did not fail; ties go to the earlier trial."""
    ok = trials[(trials["end_state"] != "failed") & trials["best_val_wf1"].notna()]
    if not len(ok):
        return None
    return records(ok.sort_values(["best_val_wf1", "number"], ascending=[False, True]).head(1))[0]


def summary_text(outcome: SweepOutcome, searched: list[str]) -> str:
    c = outcome.counts
    lines = [f"sweep {outcome.name} {outcome.status}: {c['completed']} completed, {c['stopped_by_asha']} stopped by "
             f"ASHA, {c['failed']} failed" + (f", {c['interrupted']} interrupted" if c["interrupted"] else "")
             + f"; wall {outcome.wall_seconds:.0f}s (fit {outcome.fit_seconds:.0f}s, ray start "
             f"{outcome.ray_init_seconds:.0f}s), trials trained {outcome.trial_train_seconds:.0f}s in all"]
    best = outcome.best
    if best is not None:
        params = "  ".join(f"{k}={show(best[f'param_{k}'])}" for k in searched)
        lines.append(f"best trial {best['trial_id']}: val W-F1 {100 * best['best_val_wf1']:.2f} at epoch "
                     f"{int(best['best_epoch'])}, its test W-F1 {100 * best['test_wf1_at_best_val']:.2f} "
                     f"ACC {100 * best['test_acc_at_best_val']:.2f}")
        lines.append(f"  {params}")
    else:
        lines.append("no trial produced a result")
    if outcome.mlflow_failures:
        lines.append(f"MLflow: {outcome.mlflow_failures} calls failed, so its record of this sweep is incomplete "
                     f"(first: {outcome.mlflow_failure_notes[0] if outcome.mlflow_failure_notes else '?'}); "
                     f"trials.parquet and history.parquet have every result; check the tracking store")
    lines.append(str(outcome.sweep_dir))
    return "\n".join(lines)


