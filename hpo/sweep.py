"""`cmath-hpo sweep` as a library: plan (no Ray), then run (Ray Tune + Optuna + ASHA + MLflow).

Everything that can be checked without Ray (the space, the data, the name, the resources asked
for, the tracking store) is checked in `plan_sweep`, so a bad input fails before a cluster is
touched and `--dry-run` is just a plan that is printed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import optuna

from cmath_model.config import CMATHConfig
from cmath_model.data import Dataset
from cmath_model.runs import resolve_data

from .checkpoints import asha_rungs
from .errors import SweepError
from .processes import command_line, pids_using, stop
from .space import SAMPLERS, SearchSpace, load_space, make_sampler
from .storage import check_storage_on_every_node, join, resolve_storage
from .table import TRIALS_FILE, read_trials, records
from .tracking import check_tracking_uri, default_tracking_uri

SWEEP_FILE = "sweep.json"
OPTUNA_FILE = "optuna.db"
PACKAGES = ("cmath-hpo", "torch", "ray", "optuna", "mlflow", "pandas", "pyarrow", "numpy")


@dataclass
class SweepOptions:
    space: str | Path
    data: str | None = None
    num_samples: int = 8
    max_concurrent: int | None = None  # None: as many as the cluster's resources allow
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    address: str | None = None  # None: RAY_ADDRESS, else a private local Ray
    num_cpus: int | None = None  # CPUs of the private local Ray (None: all of this machine's)
    mlflow_uri: str | None = None
    experiment: str | None = None
    results: str | Path = "results"
    name: str | None = None
    storage: str | None = None  # shared path or pyarrow URI for Ray's trial folders and checkpoints
    time_budget: float | None = None  # seconds
    overrides: dict = field(default_factory=dict)  # fixed values on top of the space's
    verbose: bool = False
    keep_checkpoints: bool = False  # keep ended trials' resume state and older checkpoints
    max_retries: int = 2  # restarts from the last checkpoint when a trial's worker or node is lost
    sampler: str = "tpe"  # tpe | random (random: the baseline benchmarks.search measures TPE against)
    early_stopping: bool = True  # ASHA; False runs every trial to its last epoch
    seed: int | None = None  # the sampler's seed instead of the space's
    trainable: type | None = None  # a CMATHTrial subclass (tests inject faults through one)
    command: str | None = None  # recorded in sweep.json


@dataclass
class SweepPlan:
    options: SweepOptions
    space: SearchSpace
    base: CMATHConfig
    data: Dataset
    name: str
    sweep_dir: Path
    tracking_uri: str
    experiment: str
    address: str | None
    max_concurrent: int
    n_startup: int
    max_t: int
    storage_path: str
    storage_name: str
    ray_session_dir: str | None = None  # the Ray session this driver joined or started (set by start_ray)

    @property
    def searched(self) -> list[str]:
        return list(self.space.distributions)

    @property
    def resources(self) -> dict[str, float]:
        return {"cpu": self.options.cpus_per_trial, "gpu": self.options.gpus_per_trial}

    @property
    def ended_dir(self) -> str:
        """Where the driver records ended trials, beside Ray's experiment folder (shared storage)."""
        from .trainable import ENDED_FOLDER

        return join(self.storage_path, self.storage_name, ENDED_FOLDER)

    @property
    def experiment_path(self) -> str:
        """Ray Tune's experiment folder: what `Tuner.restore` reads."""
        return join(self.storage_path, self.storage_name)

    @property
    def optuna_storage(self) -> str:
        return f"sqlite:///{(self.sweep_dir / OPTUNA_FILE).resolve()}"


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


# ---------------------------------------------------------------------------- planning
def plan_sweep(options: SweepOptions, space: SearchSpace | None = None, resuming: bool = False) -> SweepPlan:
    space = space or load_space(options.space)
    if options.seed is not None:
        space = dataclasses.replace(space, seed=options.seed)
    _check_counts(options)
    if options.sampler not in SAMPLERS:
        raise SweepError(f"--sampler {options.sampler}: use one of {', '.join(SAMPLERS)}")
    for key in options.overrides:
        if key in space.distributions:
            raise SweepError(f"--set {key}: {key} is searched by {space.path}; remove it from --set or from search")
    device = "cuda" if options.gpus_per_trial > 0 else "cpu"
    # A trial's torch threads match the CPUs Ray reserved for it, so parallel trials do not fight.
    threads = max(1, int(options.cpus_per_trial))
    try:
        base = space.base_config(**options.overrides, data=options.data, data_sha256=None, device=device,
                                 num_threads=threads)
    except Exception as exc:  # a bad --set value
        raise SweepError(f"--set: {exc}") from None
    base, data = resolve_data(base, options.results)
    if data.name in ("iemocap", "meld") and data.name != space.dataset:
        raise SweepError(f"{data.path} holds {data.name} data but {space.path} is an {space.dataset} space; "
                         f"use search_spaces/{data.name}.yaml or set dataset: {data.name} in the space")
    for choice in _modality_choices(space, base):
        data.require_modalities(base.replace(modalities=choice).modality_names)

    name = options.name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if "/" in name or name.startswith("."):
        raise SweepError(f"--name {name!r}: use a plain folder name (letters, digits, - and _)")
    sweep_dir = Path(options.results) / name
    if (sweep_dir / SWEEP_FILE).exists() and not resuming:
        raise SweepError(f"sweep '{name}' already exists in {sweep_dir}; pick another --name, "
                         f"or continue it with `cmath-hpo resume {sweep_dir}`")
    max_concurrent = options.max_concurrent or 0
    epochs = space.distributions.get("epochs")
    if epochs is None:
        most_epochs = base.epochs
    else:
        most_epochs = int(max(epochs.choices) if hasattr(epochs, "choices") else epochs.high)
    max_t = space.max_t or most_epochs
    if max_t < most_epochs:
        raise SweepError(f"{space.path}: asha.max_t {max_t} is below the {most_epochs} epochs a trial runs; ASHA "
                         f"would stop every trial there. Drop max_t or lower epochs")
    if space.grace_period > max_t:
        raise SweepError(f"{space.path}: asha.grace_period {space.grace_period} exceeds the {max_t} epochs a trial "
                         f"runs; lower grace_period or raise epochs")
    address = options.address or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith("ray://"):
        raise SweepError(f"--address {address}: under Ray Client the sweep's driver would run on the head and write "
                         f"its tables and stores at this machine's paths there; run the sweep on the head with "
                         f"`ray job submit` instead (README 'Cluster')")
    if options.storage:
        storage_path, storage_name = resolve_storage(options.storage), name
    else:
        storage_path, storage_name = str(sweep_dir.resolve()), "ray"
    return SweepPlan(options=options, space=space, base=base, data=data, name=name, sweep_dir=sweep_dir,
                     tracking_uri=options.mlflow_uri or default_tracking_uri(options.results),
                     experiment=options.experiment or name, address=address, max_concurrent=max_concurrent,
                     n_startup=space.startup_size(options.num_samples, max(1, max_concurrent or 1)),
                     max_t=max_t, storage_path=storage_path, storage_name=storage_name)


def _check_counts(options: SweepOptions) -> None:
    if options.num_samples < 1:
        raise SweepError(f"--num-samples {options.num_samples}: run at least one trial")
    if options.max_concurrent is not None and options.max_concurrent < 1:
        raise SweepError(f"--max-concurrent {options.max_concurrent}: must be >= 1")
    if options.cpus_per_trial <= 0:
        raise SweepError(f"--cpus-per-trial {options.cpus_per_trial}: must be > 0")
    gpus = options.gpus_per_trial
    if gpus < 0 or gpus > 1:
        raise SweepError(f"--gpus-per-trial {gpus:g}: a trial trains on one GPU; use 1, or a fraction to pack "
                         f"trials (0.25 runs 4 per GPU)")


def _modality_choices(space: SearchSpace, base: CMATHConfig) -> list[str]:
    dist = space.distributions.get("modalities")
    return list(dist.choices) if dist is not None else [base.modalities]


def first_configs(plan: SweepPlan, count: int = 5) -> list[dict]:
    """The configs the sweep starts with: the warm start, then the sampler's seeded start-up.
    An in-memory study with the same sampler and seed asks exactly what the sweep will ask."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = make_sampler(plan.options.sampler, plan.space.seed, plan.n_startup)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for point in plan.space.warm_start:
        study.enqueue_trial(point)
    return [study.ask(fixed_distributions=dict(plan.space.distributions)).params
            for _ in range(min(count, plan.options.num_samples))]


def describe_plan(plan: SweepPlan) -> str:
    o = plan.options
    skip = {*plan.searched, "extra", "data", "data_sha256"}
    fixed = ", ".join(f"{k}={v}" for k, v in plan.base.to_dict().items() if k not in skip)
    lines = [
        f"sweep {plan.name} -> {plan.sweep_dir}",
        f"space {plan.space.path}: maximise {plan.space.metric} over {o.num_samples} trials "
        f"({_describe_search(plan)})",
        *[f"  search {line}" for line in plan.space.describe()],
        f"fixed: {fixed}",
        f"data: {plan.data.path} ({plan.data.name}, sha256 {plan.data.sha256[:12]}...)",
        f"resources per trial: {o.cpus_per_trial:g} CPU, {o.gpus_per_trial:g} GPU; at most "
        f"{plan.max_concurrent or 'as many as fit'} at a time",
        f"ray: {plan.address or 'a private local Ray (address=local)'}; storage {plan.storage_path}",
        f"mlflow: {plan.tracking_uri}, experiment {plan.experiment}",
        "first configs:",
        *[f"  {i + 1}. " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in c.items())
          for i, c in enumerate(first_configs(plan))],
    ]
    return "\n".join(lines)


def _describe_search(plan: SweepPlan) -> str:
    o, space = plan.options, plan.space
    sampler = (f"random search seeded {space.seed}" if o.sampler == "random" else
               f"{plan.n_startup} random start-up, then TPE seeded {space.seed}")
    stopping = (f"ASHA grace {space.grace_period}, reduction {space.reduction_factor:g}, max_t {plan.max_t}"
                if o.early_stopping else "no early stopping")
    return f"{sampler}; {stopping}"


# ---------------------------------------------------------------------------- provenance
def provenance(plan: SweepPlan) -> dict:
    o = plan.options
    return {
        "name": plan.name,
        "status": "running",
        "command": o.command or " ".join(sys.argv),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "versions": {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES}},
        "git_commit": _git_commit(),
        "data": {"path": plan.data.path, "sha256": plan.data.sha256, "dataset": plan.data.name},
        "space": {"path": str(plan.space.path), "content": plan.space.raw},
        "seeds": {"sampler": plan.space.seed, "trial": plan.base.seed},
        "num_samples": o.num_samples, "max_concurrent": plan.max_concurrent or None,
        "n_startup_trials": plan.n_startup, "sampler": o.sampler, "early_stopping": o.early_stopping,
        "asha": {"grace_period": plan.space.grace_period, "reduction_factor": plan.space.reduction_factor,
                 "max_t": plan.max_t},
        "resources_per_trial": plan.resources, "address": plan.address, "time_budget_s": o.time_budget,
        "storage": {"path": plan.storage_path, "name": plan.storage_name},
        "mlflow": {"uri": plan.tracking_uri, "experiment": plan.experiment},
        "base_config": plan.base.to_dict(),
        "searched": plan.searched,
        "options": options_record(o),
    }


def options_record(options: SweepOptions) -> dict:
    """What `cmath-hpo resume` needs to rebuild the sweep's options."""
    values = {k: v for k, v in dataclasses.asdict(options).items() if k not in ("trainable", "command")}
    values.update(space=str(options.space), results=str(options.results))
    return values


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


def write_json(path: Path, values: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(values, indent=1, default=str))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- Ray
def check_address(address: str, timeout: float = 3.0) -> None:
    """An unreachable host:port fails here in seconds instead of hanging inside ray.init."""
    if address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        raise SweepError(f"Ray cluster at {address} is unreachable ({exc}); check the head's address and "
                         f"port (ray start --head prints it) or leave out --address for a local Ray") from None


def start_ray(plan: SweepPlan) -> float:
    """Join the given cluster, or start a private local Ray (never one that happens to be running).
    Records the Ray session's folder in the plan: a resume finds what a killed driver left by it."""
    import logging

    import ray

    started = time.perf_counter()
    quiet = {"logging_level": logging.WARNING, "log_to_driver": plan.options.verbose}
    if plan.address:
        check_address(plan.address)
        try:
            context = ray.init(address=plan.address, **quiet)
        except (ConnectionError, ray.exceptions.AuthenticationError) as exc:
            raise SweepError(f"could not join the Ray cluster at {plan.address} ({str(exc).splitlines()[0][:160]}); "
                             f"with token authentication (Ray's default) set RAY_AUTH_MODE=token and give this "
                             f"machine the cluster's token (~/.ray/auth_token or RAY_AUTH_TOKEN)") from None
    else:
        context = ray.init(address="local", num_cpus=plan.options.num_cpus, include_dashboard=False, **quiet)
    plan.ray_session_dir = context.address_info.get("session_dir")
    return time.perf_counter() - started


def check_cluster(plan: SweepPlan) -> None:
    """Ray queues a request no node can satisfy forever; refuse it instead."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    cpus, gpus = plan.options.cpus_per_trial, plan.options.gpus_per_trial
    if any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
        return
    biggest = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
    raise SweepError(f"no node has {cpus:g} CPU and {gpus:g} GPU for one trial (largest node: "
                     f"{biggest.get('CPU', 0):g} CPU, {biggest.get('GPU', 0):g} GPU); lower --cpus-per-trial/"
                     f"--gpus-per-trial or add a node that has them")


# ---------------------------------------------------------------------------- running
def size_concurrency(plan: SweepPlan, resources: dict) -> None:
    """Without --max-concurrent: as many trials as the cluster's CPUs (and GPUs) hold at once.
    The random start-up is sized for that concurrency (see SearchSpace.startup_size)."""
    if not plan.max_concurrent:
        fits = resources.get("CPU", 0) / plan.options.cpus_per_trial
        if plan.options.gpus_per_trial:
            fits = min(fits, resources.get("GPU", 0) / plan.options.gpus_per_trial)
        plan.max_concurrent = max(1, int(fits + 1e-9))
    plan.n_startup = plan.space.startup_size(plan.options.num_samples, plan.max_concurrent)


def join_cluster(plan: SweepPlan) -> tuple[float, dict]:
    """Start or join Ray, then check it can run this sweep: a node with a trial's resources, and
    storage that every node reads and writes (on a private local Ray there is only this machine).
    Sizes the concurrency from the cluster. Returns Ray's start-up seconds and what was checked."""
    import ray

    ray_seconds = start_ray(plan)
    check_cluster(plan)
    preflight = check_storage_on_every_node(plan.storage_path) if plan.address else None
    resources = ray.cluster_resources()
    size_concurrency(plan, resources)
    return ray_seconds, {"resources": resources, "preflight_seconds": preflight,
                         "nodes": sum(1 for n in ray.nodes() if n.get("Alive"))}


def describe_cluster(plan: SweepPlan, ray_seconds: float, cluster: dict) -> str:
    r = cluster["resources"]
    where = f"joined {plan.address}" if plan.address else "local"
    checked = (f"; storage {plan.storage_path} checked on {cluster['nodes']} nodes in "
               f"{cluster['preflight_seconds']:.1f}s" if cluster["preflight_seconds"] is not None else "")
    return (f"ray: {where} in {ray_seconds:.1f}s; cluster {r.get('CPU', 0):g} CPU, {r.get('GPU', 0):g} GPU{checked}; "
            f"mlflow {plan.tracking_uri}")


def run_sweep(options: SweepOptions, log: Callable[[str], None] = print) -> SweepOutcome:
    started = time.perf_counter()
    plan = plan_sweep(options)
    check_tracking_uri(plan.tracking_uri)

    try:
        ray_seconds, cluster = join_cluster(plan)
        # Nothing is written before the cluster can run a trial: a refused sweep leaves no trace.
        record, client, parent_id, experiment = open_sweep(plan)
        log(f"sweep {plan.name}: {options.num_samples} trials -> {plan.sweep_dir}")
        log(describe_cluster(plan, ray_seconds, cluster))
        try:
            tuner = build_tuner(plan, experiment, parent_id, log)
            fit_started = time.perf_counter()
            record["fit_started_at"] = time.time()  # benchmarks.overhead lines trial times up against it
            tuner.fit()
            fit_seconds = time.perf_counter() - fit_started
        except BaseException:
            client.set_terminated(parent_id, "FAILED")
            raise
    finally:
        leave_cluster(plan)
    return finish_sweep(plan, record, client, parent_id, started, fit_seconds, ray_seconds, log)


def leave_cluster(plan: SweepPlan, timeout: float = 20.0) -> None:
    """Disconnect; a private Ray is also waited for until none of its processes is left (a trial
    worker can take seconds to tear down after ray.shutdown), so when a sweep returns nothing it
    started is still running. Stragglers past `timeout` are stopped, by PID."""
    import ray

    ray.shutdown()
    session = plan.ray_session_dir if plan.address is None else None  # a private Ray: this process started it
    if session is None:
        return
    deadline = time.monotonic() + timeout
    while pids_using(session) and time.monotonic() < deadline:
        time.sleep(0.25)
    stop(pids_using(session))


def open_sweep(plan: SweepPlan) -> tuple[dict, object, str, str]:
    """Write sweep.json and open the MLflow parent run that carries its provenance."""
    from mlflow.tracking import MlflowClient

    from cmath_model.runs import mlflow_experiment

    from .tracking import log_params

    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    record = provenance(plan)
    record["driver"] = driver_record(plan)
    write_json(plan.sweep_dir / SWEEP_FILE, record)
    client = MlflowClient(plan.tracking_uri)
    experiment = mlflow_experiment(client, plan.experiment, plan.tracking_uri)
    parent = client.create_run(experiment, run_name=plan.name, tags={
        "cmath.sweep": plan.name, "cmath.kind": "sweep", "cmath.git_commit": str(record["git_commit"]),
        "cmath.data_sha256": plan.data.sha256, "cmath.command": record["command"][:5000]})
    parent_id = parent.info.run_id
    record["mlflow"].update(experiment_id=experiment, parent_run_id=parent_id)
    write_json(plan.sweep_dir / SWEEP_FILE, record)
    log_params(client, parent_id, {**_parent_params(plan), **{f"base.{k}": v for k, v in plan.base.to_dict().items()}})
    client.log_artifact(parent_id, str(plan.sweep_dir / SWEEP_FILE))
    client.log_artifact(parent_id, str(plan.space.path))
    return record, client, parent_id, experiment


def driver_record(plan: SweepPlan) -> dict:
    """Who runs the sweep: a resume checks this driver is gone and stops what its private Ray left."""
    return {"host": platform.node(), "pid": os.getpid(), "cmdline": command_line(os.getpid()),
            "private_ray": plan.address is None, "ray_session_dir": plan.ray_session_dir}


def _parent_params(plan: SweepPlan) -> dict:
    o = plan.options
    return {"space": plan.space.path, "metric": plan.space.metric, "num_samples": o.num_samples,
            "max_concurrent": plan.max_concurrent or "auto", "cpus_per_trial": o.cpus_per_trial,
            "gpus_per_trial": o.gpus_per_trial, "sampler": o.sampler, "sampler_seed": plan.space.seed,
            "n_startup_trials": plan.n_startup, "early_stopping": o.early_stopping,
            "asha_grace_period": plan.space.grace_period, "asha_reduction_factor": plan.space.reduction_factor,
            "asha_max_t": plan.max_t, "searched": ",".join(plan.searched), "address": plan.address or "local",
            "time_budget_s": o.time_budget}


def tune_environment() -> None:
    # Forced experiment snapshots after checkpoints keep a restore consistent; Ray warns about each one.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Progress comes from ProgressPrinter; Tune's own tables (verbose=0 in its legacy reporter) stay quiet.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # A failing trial's error report carries no metric (see CMATHTrial); every epoch does.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # Tune's own per-result loggers (CSV, JSON, TensorBoard) run on the driver between a trial's
    # epochs; the sweep's tables and MLflow hold every metric, so only result.json is kept.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # Save the experiment state at least every second (default: every 10 s or more), so a killed
    # driver loses as little as possible of which trials exist and where they stand.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")


def build_trainable(plan: SweepPlan):
    """The trial class with its resources; the base config and the dataset go to the object store once."""
    from ray import tune

    from .trainable import CMATHTrial

    trial_class = plan.options.trainable or CMATHTrial
    rungs = (asha_rungs(plan.space.grace_period, plan.space.reduction_factor, plan.max_t)
             if plan.options.early_stopping else ())
    trainable = tune.with_parameters(trial_class, base=plan.base.to_dict(), dataset=plan.data,
                                     ended_dir=plan.ended_dir, checkpoint_epochs=rungs)
    return tune.with_resources(trainable, plan.resources)


def build_tuner(plan: SweepPlan, experiment: str, parent_id: str, log: Callable[[str], None]):
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    from .search import SweepSearch
    from .table import NoRetryOnTrialError, ProgressPrinter, TrialTable
    from .tracking import MlflowTrials

    tune_environment()
    base = plan.base.to_dict()
    trainable = build_trainable(plan)
    # The limiter makes Tune ask for a trial only when a slot is free, not queue suggestions ahead:
    # a suggestion made early is made with less history, and could not use TPE at all.
    searcher = ConcurrencyLimiter(SweepSearch(plan.space, plan.n_startup, storage=plan.optuna_storage,
                                              study_name=plan.name, sampler=plan.options.sampler),
                                  max_concurrent=plan.max_concurrent)
    if plan.options.early_stopping:
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=plan.max_t,
                                  grace_period=plan.space.grace_period, reduction_factor=plan.space.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    # Ended trials' older checkpoints and resume state are pruned once their best/ is uploaded.
    tracker = MlflowTrials(plan.tracking_uri, experiment, parent_id, plan.name, base, plan.searched,
                           sweep_dir=plan.sweep_dir.resolve(), prune=not plan.options.keep_checkpoints)
    # Absolute: the table is pickled into Ray's tuner.pkl and a resume may run from another folder.
    table = TrialTable(plan.sweep_dir.resolve(), base, plan.searched, tracker, plan.optuna_storage, plan.name,
                       plan.ended_dir)
    printer = ProgressPrinter(plan.searched, plan.options.num_samples, log, plan.options.verbose)
    callbacks = [NoRetryOnTrialError(), tracker, table, printer, JsonLoggerCallback()]
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=plan.space.metric, mode=plan.space.mode, search_alg=searcher,
                                    scheduler=scheduler, num_samples=plan.options.num_samples,
                                    reuse_actors=True,
                                    time_budget_s=plan.options.time_budget),
        run_config=tune.RunConfig(name=plan.storage_name, storage_path=plan.storage_path,
                                  callbacks=callbacks, verbose=0,
                                  # The trial asks for its own checkpoints (rungs, every N, its last
                                  # epoch); Ray's one at the end would be taken of a replay too, empty.
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_at_end=False),
                                  failure_config=tune.FailureConfig(max_failures=plan.options.max_retries)),
    )


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
        params = "  ".join(f"{k}={_fmt(best[f'param_{k}'])}" for k in searched)
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


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
