"""A sweep's plan: everything that can be checked without Ray, checked before a cluster is touched.

`plan_sweep` reads the space and the data, names the sweep and its folders and refuses a bad
input with one line; `--dry-run` is a plan that is printed (`describe_plan`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna

from cmath_model.config import CMATHConfig
from cmath_model.data import Dataset
from cmath_model.runs import resolve_data

from .errors import SweepError
from .space import SAMPLERS, SearchSpace, load_space, make_sampler, show
from .storage import join, resolve_storage
from .tracking import default_tracking_uri

SWEEP_FILE = "sweep.json"
OPTUNA_FILE = "optuna.db"


@dataclass
class SweepOptions:
    space: str | Path
    data: str | None = None
    num_samples: int = 8
    max_concurrent: int | None = None  # None: the cluster's slots, at most ceil(num_samples / 4) (cluster.py)
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
    wait_for_resources: float = 0.0  # seconds to wait for a node that fits a trial (an autoscaling cluster)
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
    slots: int | None = None  # trials the cluster's resources hold at once (set by size_concurrency)

    @property
    def searched(self) -> list[str]:
        return list(self.space.distributions)

    @property
    def resources(self) -> dict[str, float]:
        return {"cpu": self.options.cpus_per_trial, "gpu": self.options.gpus_per_trial}

    @property
    def ended_dir(self) -> str:
        """Where the driver records ended trials, beside Ray's experiment folder (shared storage)."""
        from .recovery import ENDED_FOLDER

        return join(self.storage_path, self.storage_name, ENDED_FOLDER)

    @property
    def experiment_path(self) -> str:
        """Ray Tune's experiment folder: what `Tuner.restore` reads."""
        return join(self.storage_path, self.storage_name)

    @property
    def optuna_storage(self) -> str:
        return f"sqlite:///{(self.sweep_dir / OPTUNA_FILE).resolve()}"


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
    # As cmath-train does: modalities nobody asked for are narrowed to what the file holds (the
    # shared MELD transcripts are text only; the MELD recipe is tav); asked-for ones must exist.
    asked = "modalities" in space.distributions or "modalities" in space.fixed or "modalities" in options.overrides
    base, data = resolve_data(base, options.results, fit_modalities=not asked)
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
                         f"`ray job submit` instead (docs/cluster.md)")
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
    if options.wait_for_resources < 0:
        raise SweepError(f"--wait-for-resources {options.wait_for_resources:g}: seconds to wait, 0 or more")
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
    skip = {*plan.searched, "data", "data_sha256"}
    fixed = ", ".join(f"{k}={v}" for k, v in plan.base.to_dict().items() if k not in skip)
    lines = [
        f"sweep {plan.name} -> {plan.sweep_dir}",
        f"space {plan.space.path}: maximise {plan.space.metric} over {o.num_samples} trials "
        f"({_describe_search(plan)})",
        *[f"  search {line}" for line in plan.space.describe()],
        f"fixed: {fixed}",
        f"data: {plan.data.path} ({plan.data.name}, sha256 {plan.data.sha256[:12]}...)",
        f"resources per trial: {o.cpus_per_trial:g} CPU, {o.gpus_per_trial:g} GPU; at most "
        f"{plan.max_concurrent or 'as many as the cluster holds, up to a quarter of the trials,'} at a time",
        f"ray: {plan.address or 'a private local Ray (address=local)'}; storage {plan.storage_path}",
        f"mlflow: {plan.tracking_uri}, experiment {plan.experiment}",
        "first configs:",
        *[f"  {i + 1}. " + "  ".join(f"{k}={show(v)}" for k, v in c.items())
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
