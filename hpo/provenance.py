"""What a sweep records about itself: sweep.json and the MLflow parent run that carries it.

`SweepRecord` is a running sweep's record, opened for a new sweep (`SweepRecord.open`) or
reopened for a resumed one (`SweepRecord.reopen`) only once the cluster can run a trial, so a
refused sweep leaves no trace; `close` writes how the sweep ended to both.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from mlflow.tracking import MlflowClient

from cmath_model.tracking import metrics_at, mlflow_experiment, open_run, tracking_client

from .cluster import Cluster
from .plan import SweepOptions, SweepPlan
from .processes import command_line
from .record import SWEEP_FILE, write_json
from .space import METRIC
from .storage import redact
from .trials import TRIALS_FILE

BEST_MARK = "★ "  # in front of the best trial's run name

URI_OPTIONS = ("mlflow_uri", "storage", "study_storage")  # SweepOptions fields that may carry a secret
PACKAGES = ("cmath-hpo", "torch", "ray", "optuna", "mlflow", "pandas", "pyarrow", "numpy")


@dataclass
class SweepRecord:
    """A running sweep's sweep.json (`values`) and its MLflow parent run."""

    plan: SweepPlan
    values: dict
    client: MlflowClient
    parent_id: str
    experiment_id: str

    @classmethod
    def open(cls, plan: SweepPlan, cluster: Cluster) -> SweepRecord:
        """Write a new sweep's sweep.json and open the MLflow parent run that carries its provenance."""
        plan.sweep_dir.mkdir(parents=True, exist_ok=True)
        values = {**provenance(plan), "driver": driver_record(plan, cluster)}
        path = plan.sweep_dir / SWEEP_FILE
        write_json(path, values)
        client = tracking_client(plan.tracking_uri)
        experiment_id = mlflow_experiment(client, plan.experiment, plan.tracking_uri)
        parent_id = open_run(client, experiment_id, plan.name, tags={
            "cmath.sweep": plan.name, "cmath.kind": "sweep", "cmath.git_commit": str(values["git_commit"]),
            "cmath.data_sha256": plan.data.sha256, "cmath.command": values["command"][:5000]},
            params={**parent_params(plan), **{f"base.{k}": v for k, v in plan.base.to_dict().items()}})
        values["mlflow"].update(experiment_id=experiment_id, parent_run_id=parent_id)
        write_json(path, values)
        client.log_artifact(parent_id, str(path))
        client.log_artifact(parent_id, str(plan.space.path))
        return cls(plan, values, client, parent_id, experiment_id)

    @classmethod
    def reopen(cls, plan: SweepPlan, cluster: Cluster, values: dict) -> SweepRecord:
        """Continue a resumed sweep's record: its parent run runs again, and sweep.json names the
        new driver and keeps the previous one."""
        client = MlflowClient(plan.tracking_uri)
        parent_id = values["mlflow"]["parent_run_id"]
        client.update_run(parent_id, status="RUNNING")
        values = {**values, "status": "running", "driver": driver_record(plan, cluster),
                  "resumes": [*values.get("resumes", []), {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                           "previous_driver": values.get("driver")}]}
        write_json(plan.sweep_dir / SWEEP_FILE, values)
        client.set_tag(parent_id, "cmath.resumes", str(len(values["resumes"])))
        return cls(plan, values, client, parent_id, values["mlflow"].get("experiment_id"))

    def fit_started(self) -> None:
        """benchmarks.overhead lines the trials' times up against this."""
        self.values["fit_started_at"] = time.time()

    def failed(self) -> None:
        """The fit raised: the parent run ends FAILED (sweep.json keeps status running, for a resume)."""
        self.client.set_terminated(self.parent_id, "FAILED")

    def close(self, ended: dict, metrics: dict, best_trial_id: str | None, finished: bool,
              failures: dict) -> dict:
        """Write how the sweep ended to sweep.json and the parent run. A failing tracking store
        is counted in `failures` (the sweep's MLflow failures), not raised: sweep.json has it all.

        Args:
            ended: what sweep.json gains (status, counts, timings, best, ...).
            metrics: the parent run's closing metrics.
            best_trial_id: tagged on the parent run.
            finished: every trial ended; the parent run ends FINISHED (else KILLED).
            failures: {"failures": count, "notes": [...]}, added to here.

        Returns:
            `failures`.
        """
        trials = self.plan.sweep_dir / TRIALS_FILE
        try:
            if best_trial_id is not None:
                self.client.set_tag(self.parent_id, "cmath.best_trial_id", best_trial_id)
            if self.experiment_id:
                mark_best_run(self.client, self.experiment_id, self.plan.name, best_trial_id)
            self.client.log_batch(self.parent_id, metrics=metrics_at(metrics, 0))
            if trials.exists():
                self.client.log_artifact(self.parent_id, str(trials))
        except Exception as exc:  # noqa: BLE001
            _count(failures, exc)
        path = self.plan.sweep_dir / SWEEP_FILE
        self.values.update(ended, mlflow_failures=failures["failures"], mlflow_failure_notes=failures["notes"])
        write_json(path, self.values)
        try:
            self.client.log_artifact(self.parent_id, str(path))
            status = "FINISHED" if finished and not failures["failures"] else "KILLED"
            self.client.set_terminated(self.parent_id, status)
        except Exception as exc:  # noqa: BLE001
            _count(failures, exc)
            self.values.update(mlflow_failures=failures["failures"], mlflow_failure_notes=failures["notes"])
            write_json(path, self.values)
        return failures


def mark_best_run(client: MlflowClient, experiment_id: str, sweep: str, best_trial_id: str | None) -> None:
    """Put BEST_MARK in front of the best trial's run name, and take it off any other trial run
    of the sweep (a best that a resumed sweep overtook).

    Args:
        client: the tracking store's client.
        experiment_id: the sweep's experiment.
        sweep: the sweep's name.
        best_trial_id: the best trial (None: no trial scored).
    """
    for run in trial_runs(client, experiment_id, sweep):
        name = run.info.run_name or ""
        plain = name.removeprefix(BEST_MARK)
        wanted = BEST_MARK + plain if run.data.tags.get("cmath.trial_id") == best_trial_id else plain
        if wanted != name:
            client.update_run(run.info.run_id, name=wanted)


def trial_runs(client: MlflowClient, experiment_id: str, sweep: str, condition: str = "") -> list:
    """The sweep's trial runs (its child runs, by their tags).

    Args:
        client: the tracking store's client.
        experiment_id: the sweep's experiment.
        sweep: the sweep's name.
        condition: more of MLflow's filter, e.g. `and attributes.status = 'RUNNING'`.

    Returns:
        The runs, as MLflow's search returns them.
    """
    return client.search_runs([experiment_id], max_results=10000, filter_string=(
        f"tags.`cmath.sweep` = '{sweep}' and tags.`cmath.kind` = 'trial' {condition}"))


def _count(failures: dict, exc: Exception) -> None:
    failures["failures"] += 1
    failures["notes"].append(f"closing the sweep's parent run: {type(exc).__name__}: {str(exc)[:200]}")


def provenance(plan: SweepPlan) -> dict:
    """sweep.json's account of a new sweep: command, versions, data, space, sizes, stores."""
    o = plan.options
    return {
        "name": plan.name,
        "status": "running",
        "command": " ".join(redact(word) for word in (o.command or " ".join(sys.argv)).split(" ")),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "versions": {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES}},
        "git_commit": _git_commit(),
        "data": {"path": plan.data.path, "sha256": plan.data.sha256, "dataset": plan.data.name},
        "space": {"path": str(plan.space.path), "content": plan.space.raw},
        "seeds": {"sampler": plan.space.seed, "trial": plan.base.seed},
        "num_samples": o.num_samples, "max_concurrent": plan.max_concurrent, "cluster_slots": plan.slots,
        "n_startup_trials": plan.n_startup, "sampler": o.sampler, "early_stopping": o.early_stopping,
        "asha": {"grace_period": plan.space.grace_period, "reduction_factor": plan.space.reduction_factor,
                 "max_t": plan.max_t, "rungs": list(plan.rungs)},
        "resources_per_trial": plan.resources, "address": plan.address, "time_budget_s": o.time_budget,
        "storage": {"path": redact(plan.storage_path), "name": plan.storage_name},
        "study": {"storage": redact(plan.study_storage)},
        "mlflow": {"uri": redact(plan.tracking_uri), "experiment": plan.experiment},
        "base_config": plan.base.to_dict(),
        "searched": plan.searched,
        "options": options_record(o),
    }


def options_record(options: SweepOptions) -> dict:
    """What `cmath-hpo resume` needs to rebuild the sweep's options. Secrets in URIs are not
    recorded (hpo.storage.redact): a resume asks for them again."""
    values = {k: v for k, v in dataclasses.asdict(options).items() if k != "command"}
    values.update(space=str(options.space), results=str(options.results))
    for key in URI_OPTIONS:
        if values[key]:
            values[key] = redact(values[key])
    return values


def driver_record(plan: SweepPlan, cluster: Cluster) -> dict:
    """Who runs the sweep: a resume checks this driver is gone and stops what its private Ray left."""
    return {"host": platform.node(), "pid": os.getpid(), "cmdline": command_line(os.getpid()),
            "private_ray": plan.address is None and cluster.own, "ray_session_dir": cluster.session_dir}


def parent_params(plan: SweepPlan) -> dict:
    """The sweep's settings as the MLflow parent run's parameters."""
    o = plan.options
    return {"space": plan.space.path, "metric": METRIC, "num_samples": o.num_samples,
            "max_concurrent": plan.max_concurrent, "cpus_per_trial": o.cpus_per_trial,
            "gpus_per_trial": o.gpus_per_trial, "sampler": o.sampler, "sampler_seed": plan.space.seed,
            "n_startup_trials": plan.n_startup, "early_stopping": o.early_stopping,
            "asha_grace_period": plan.space.grace_period, "asha_reduction_factor": plan.space.reduction_factor,
            "asha_max_t": plan.max_t, "searched": ",".join(plan.searched), "address": plan.address or "local",
            "time_budget_s": o.time_budget}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("-dirty" if dirty else "")) if commit else None
