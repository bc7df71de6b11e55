"""`cmath-hpo resume SWEEP`: continue a sweep whose driver was interrupted or killed.

Ray Tune's `Tuner.restore` brings back the trials (finished ones are kept, unfinished ones
continue from their latest checkpoints, failed ones stay failed), the Optuna searcher's state
and the callbacks. Trials that started after Ray's last saved state are carried on by new Ray
trials under their old ids (hpo.search.SweepSearch.restore). The MLflow callback finds each
trial's existing run by its tag, so no trial gets a second run; the sweep's parent run is
reopened from sweep.json. The resumed sweep then takes the same path as a new one
(hpo.sweep.fit_sweep).
"""

from __future__ import annotations

import fnmatch
import platform
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs

from cmath_model.errors import command

from .errors import SweepError
from .mirror import is_mirror, restore_sweep_folder, storage_of
from .plan import SweepOptions, plan_sweep
from .processes import is_running, pids_using, stop
from .provenance import URI_OPTIONS
from .record import find_sweep, read_record
from .space import parse_space
from .storage import has_redacted
from .sweep import SweepOutcome, check_tracking_uri, fit_sweep


def resume_sweep(sweep: str | Path, results: str | Path = "results", log: Callable[[str], None] = print,
                 address: str | None = None, trainable: type | None = None,
                 driver_gone: bool = False, allow_open_cluster: bool = False, mlflow_uri: str | None = None,
                 data: str | None = None, study_storage: str | None = None,
                 storage: str | None = None) -> SweepOutcome:
    """Continue a sweep after Ctrl-C, a killed driver or a lost machine: ended trials stay ended,
    unfinished ones continue from their last checkpoints, the searcher keeps its history, and
    each trial keeps its one MLflow run. Refuses while the sweep's driver may still run.

    Args:
        sweep: a sweep folder, a sweep name under `results`, `latest`, or the sweep's folder on its
            shared storage (`<storage>/<name>`), from which the sweep's folder under `results` is
            rebuilt (hpo.mirror): the sweep then continues from any host.
        results: the folder sweeps are written to.
        log: where progress lines go.
        address: join this Ray cluster instead of the one the sweep used.
        trainable: a CMATHTrial subclass to run instead (see hpo.sweep.run_sweep).
        driver_gone: the sweep's driver ran on another host and is gone.
        allow_open_cluster: join a cluster without token authentication (else as the sweep was started).
        mlflow_uri: the sweep's tracking store, served from another address than it was.
        data: the sweep's dataset at another path (its SHA-256 must match).
        study_storage, storage: the sweep's study database and storage, given again (a secret in
            their URLs is not recorded), or as this host reaches them.

    Returns:
        The sweep's outcome, as `run_sweep` returns it.

    >>> outcome = resume_sweep("latest")                       # or a name under results/, or a folder
    >>> outcome.status, outcome.counts
    ('finished', {'completed': 5, 'stopped_by_asha': 3, 'failed': 0, 'interrupted': 0})
    """
    started = time.perf_counter()
    try:
        sweep_dir, from_storage = find_sweep(sweep, results), False
    except SweepError:
        if not is_mirror(str(sweep)):
            raise
        sweep_dir, from_storage = restore_sweep_folder(str(sweep), results), True
    record = read_record(sweep_dir)
    if record.get("status") == "finished":
        raise SweepError(f"sweep '{record['name']}' already finished; export it with "
                         f"`{command('cmath-hpo')} export-best {sweep_dir}` or start a new one")
    if record.get("status") == "time_budget_spent":
        raise SweepError(f"sweep '{record['name']}' ended at its --time-budget, which Ray does not continue; export "
                         f"what it found (`{command('cmath-hpo')} export-best {sweep_dir}`) or start a new sweep")
    values = {**record["options"], "name": record["name"], "results": str(sweep_dir.parent)}
    if address is not None:
        values["address"] = address
    if allow_open_cluster:
        values["allow_open_cluster"] = True
    if mlflow_uri is not None:
        values["mlflow_uri"] = mlflow_uri
    if data is not None:
        values["data"] = data
    if study_storage is not None:
        values["study_storage"] = study_storage
    if from_storage:  # the storage as this host reaches it
        values["storage"] = storage_of(str(sweep))
    if storage is not None:
        values["storage"] = storage
    check_secrets_given(values, record["name"])
    plan = plan_sweep(SweepOptions(**values), space=parse_space(record["space"]["content"], record["space"]["path"]),
                      resuming=True)
    if plan.data.sha256 != record["data"]["sha256"]:
        raise SweepError(f"{plan.data.path} changed since the sweep started (SHA-256 {plan.data.sha256[:12]}…, "
                         f"was {record['data']['sha256'][:12]}…); restore the original file to resume")
    check_tracking_uri(plan.tracking_uri)
    check_parent_run(plan.tracking_uri, record)

    check_ray_state(plan.experiment_path, record["name"])
    stop_leftovers(record, log, driver_gone)
    return fit_sweep(plan, started, log, trainable, resumed=record)


def check_secrets_given(values: dict, name: str) -> None:
    """A URL whose secret was left out of the record (hpo.storage.redact) must be given again."""
    for key in URI_OPTIONS:
        if has_redacted(values.get(key)):
            flag = "--" + key.replace("_", "-")
            raise SweepError(f"sweep '{name}' recorded its {flag} without the secret in it ({values[key]}); pass "
                             f"{flag} with it to resume, or keep secrets out of URLs (PGPASSWORD or ~/.pgpass, "
                             f"AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_PASSWORD)")


def check_ray_state(experiment_path: str, name: str) -> None:
    """Ray must have saved the experiment's state at least once. `Tuner.can_restore` looks only
    for tuner.pkl, which is written when the Tuner is built, before any trial; restoring without
    a saved state, Ray logs "Restarting experiment" and runs every trial anew while the study
    keeps the old ones running and the warm start is spent. So such a sweep is refused."""
    from ray.tune.execution.tune_controller import TuneController

    pattern = TuneController.CKPT_FILE_TMPL.format("*")
    fs, path = pafs.FileSystem.from_uri(experiment_path)
    found = fs.get_file_info(pafs.FileSelector(path.rstrip("/"), allow_not_found=True))
    if not any(fnmatch.fnmatch(info.base_name, pattern) for info in found):
        raise SweepError(f"sweep '{name}' was stopped before Ray first saved its state (no {pattern} in "
                         f"{experiment_path}), so Ray cannot resume it; start it again with a new --name "
                         f"(its first trials' runs stay in MLflow)")


def check_parent_run(uri: str, record: dict) -> None:
    """The tracking store must be the one the sweep logged to: its trials' runs are found there
    and continued, not opened again."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    parent = (record.get("mlflow") or {}).get("parent_run_id")
    if not parent:
        return
    try:
        MlflowClient(uri).get_run(parent)
    except MlflowException:
        raise SweepError(f"sweep '{record['name']}' logged to the MLflow store {record['mlflow']['uri']}, and {uri} "
                         f"does not have its parent run {parent}; pass --mlflow-uri where that store is served "
                         f"(a tracking server every host reaches: docs/cluster.md)") from None


def check_driver_gone(record: dict, driver_gone: bool = False) -> None:
    """Refuse while the sweep's recorded driver may still run. On this machine that is a PID
    check; a driver on another host cannot be seen from here, so unless it ended cleanly (its
    status says how), the user has to say it is gone."""
    driver = record.get("driver") or {}
    host = driver.get("host")
    ended = record.get("status") not in (None, "running")
    if host and host != platform.node() and not ended and not driver_gone:
        raise SweepError(f"sweep '{record['name']}' was driven from host {host} (pid {driver.get('pid')}), which may "
                         f"still run it; stop it there, or if that driver is gone resume with --driver-gone")
    # A driver that closed the record (Ctrl-C, a stop) is done with the sweep even if its process
    # lives on: a notebook's kernel, or a script that resumes what it stopped.
    if (not host or host == platform.node()) and not ended and driver.get("pid") \
            and is_running(driver["pid"], driver.get("cmdline")):
        raise SweepError(f"sweep '{record['name']}' is still running (driver pid {driver['pid']}); "
                         f"stop it first (Ctrl-C) or wait for it to end")


def stop_leftovers(record: dict, log: Callable[[str], None], driver_gone: bool = False) -> list[int]:
    """Refuse while the previous driver may run; stop what its private Ray left on this machine."""
    check_driver_gone(record, driver_gone)
    driver = record.get("driver") or {}
    if driver.get("host", platform.node()) != platform.node():
        return []
    session = driver.get("ray_session_dir")
    if not (driver.get("private_ray") and session):
        return []
    leftovers = pids_using(session)
    if leftovers:
        log(f"stopping {len(leftovers)} processes the previous driver's Ray left behind: {leftovers}")
        stop(leftovers)
    return leftovers
