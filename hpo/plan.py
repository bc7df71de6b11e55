"""A sweep's plan: everything that can be decided and checked without Ray, decided once.

`plan_sweep` reads the space and the data, names the sweep and its folders, sizes how many
trials run at once where that is known before Ray starts, and refuses a bad input with one
line. `--dry-run` prints a plan (`describe_plan`). A plan is never changed: what only a joined
cluster can say (its slots) gives a new plan through `with_slots`, by the same rule the dry run
uses. This module imports neither Ray nor torch nor MLflow.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna

from cmath_model.config import CMATHConfig
from cmath_model.data import DatasetInfo, inspect_dataset, pin_data
from cmath_model.errors import command
from cmath_model.synth import default_dataset_path
from cmath_model.tracking import default_tracking_uri

from .errors import SweepError
from .mirror import MIRROR_FOLDER
from .record import OPTUNA_FILE, SWEEP_FILE
from .space import METRIC, SAMPLERS, SearchSpace, load_space, make_sampler, show
from .storage import join, resolve_storage
from .study import JOURNAL, STUDY_FOLDER

ENDED_FOLDER = "cmath_ended"  # in the experiment's storage folder: <trial_id>.json, written when a trial ends
PROBE_FOLDER = "cmath_probe"  # in the experiment's storage folder: the driver's marker that trials check


@dataclass(frozen=True)
class SweepOptions:
    """What a user asks of a sweep (`cmath-hpo sweep`'s flags); recorded in sweep.json for a resume."""

    space: str | Path
    data: str | None = None
    num_samples: int = 8
    max_concurrent: int | None = None  # None: the cluster's slots, at most ceil(num_samples / 4)
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    address: str | None = None  # None: RAY_ADDRESS, else a private local Ray
    num_cpus: int | None = None  # CPUs of the private local Ray (None: those this process may use)
    mlflow_uri: str | None = None
    experiment: str | None = None
    results: str | Path = "results"
    name: str | None = None
    storage: str | None = None  # shared path or pyarrow URI for Ray's trial folders and checkpoints
    study_storage: str | None = None  # an Optuna RDB URL for the study (None: beside the sweep, see hpo.study)
    time_budget: float | None = None  # seconds
    wait_for_resources: float = 0.0  # seconds to wait for a node that fits a trial (an autoscaling cluster)
    allow_open_cluster: bool = False  # join a cluster without token authentication (a warning, not a refusal)
    overrides: dict = field(default_factory=dict)  # fixed values on top of the space's
    verbose: bool = False
    keep_checkpoints: bool = False  # keep ended trials' resume state and older checkpoints
    max_retries: int = 2  # restarts from the last checkpoint when a trial's worker or node is lost
    sampler: str = "tpe"  # tpe | random (random: the baseline benchmarks.search measures TPE against)
    early_stopping: bool = True  # ASHA; False runs every trial to its last epoch
    seed: int | None = None  # the sampler's seed instead of the space's
    command: str | None = None  # recorded in sweep.json


@dataclass(frozen=True)
class SweepPlan:
    """A checked sweep: its space, base config, data, names, folders and sizes."""

    options: SweepOptions
    space: SearchSpace
    base: CMATHConfig
    data: DatasetInfo
    name: str
    sweep_dir: Path
    tracking_uri: str
    experiment: str
    address: str | None
    local_cpus: int | None  # CPUs of the private local Ray this sweep starts; None when it joins a cluster
    max_t: int
    storage_path: str
    storage_name: str
    slots: int | None  # trials the cluster's resources hold at once; None until Ray says (a cluster, GPUs)
    max_concurrent: int | None  # trials at a time; None while it waits on the slots
    n_startup: int | None  # random trials before TPE; None while it waits on max_concurrent

    @property
    def searched(self) -> list[str]:
        return list(self.space.distributions)

    @property
    def resources(self) -> dict[str, float]:
        return {"cpu": self.options.cpus_per_trial, "gpu": self.options.gpus_per_trial}

    @property
    def ended_dir(self) -> str:
        """Where the driver records ended trials, beside Ray's experiment folder (shared storage)."""
        return join(self.storage_path, self.storage_name, ENDED_FOLDER)

    @property
    def probe_dir(self) -> str:
        """Where the driver leaves the marker each trial reads before it trains (hpo.storage.probe_storage)."""
        return join(self.storage_path, self.storage_name, PROBE_FOLDER)

    @property
    def experiment_path(self) -> str:
        """Ray Tune's experiment folder: what `Tuner.restore` reads."""
        return join(self.storage_path, self.storage_name)

    @property
    def study_storage(self) -> str:
        """Where the Optuna study lives (hpo.study): the user's database, or a journal beside Ray's
        experiment, on the shared storage or in the sweep's folder. A journal is read once and then
        served from memory, where an sqlite study on Tune's loop read its trials again at every ask
        (benchmarks.driver); the sweep's optuna.db is its copy, made when the sweep stops. A sweep
        started when optuna.db was the study itself resumes there."""
        if self.options.study_storage:
            return self.options.study_storage
        journal = join(self.storage_path, self.storage_name, STUDY_FOLDER)
        own = self.sweep_dir / OPTUNA_FILE
        if not self.options.storage and own.exists() and not Path(journal).exists():
            return f"sqlite:///{own.resolve()}"
        return JOURNAL + journal

    @property
    def shared_state(self) -> str | None:
        """Where the sweep's own records are mirrored on the shared storage (hpo.mirror); None
        without a shared storage, when they live only in the sweep's folder."""
        return join(self.storage_path, self.storage_name, MIRROR_FOLDER) if self.options.storage else None

    @property
    def rungs(self) -> tuple[int, ...]:
        """The epochs at which ASHA may stop a trial (none without early stopping)."""
        if not self.options.early_stopping:
            return ()
        return asha_rungs(self.space.grace_period, self.space.reduction_factor, self.max_t)


def plan_sweep(options: SweepOptions, space: SearchSpace | None = None, resuming: bool = False) -> SweepPlan:
    """Check a sweep's options, space and data, and decide what can be decided before Ray starts.

    Args:
        options: the sweep's options.
        space: the space already parsed (a resume parses the copy in sweep.json); None reads
            `options.space`.
        resuming: the sweep folder may exist (`cmath-hpo resume`).

    Returns:
        The plan; SweepError or SpaceError (one line naming the input and the fix) if it cannot run.
    """
    space = space or load_space(options.space)
    if options.seed is not None:
        space = dataclasses.replace(space, seed=options.seed)
    _check_counts(options)
    if options.sampler not in SAMPLERS:
        raise SweepError(f"--sampler {options.sampler}: use one of {', '.join(SAMPLERS)}")
    for key in options.overrides:
        if key in space.distributions:
            raise SweepError(f"--set {key}: {key} is searched by {space.path}; remove it from --set or from search")
    base, data = _base_and_data(options, space)

    name = options.name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        # It names folders on every host and appears inside MLflow's search filters.
        raise SweepError(f"--name {name!r}: use letters, digits, '.', '-' and '_' (starting with a letter or digit)")
    sweep_dir = Path(options.results) / name
    if (sweep_dir / SWEEP_FILE).exists() and not resuming:
        raise SweepError(f"sweep '{name}' already exists in {sweep_dir}; pick another --name, "
                         f"or continue it with `{command('cmath-hpo')} resume {sweep_dir}`")
    address = options.address or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith("ray://"):
        raise SweepError(f"--address {address}: under Ray Client the sweep's driver would run on the head and write "
                         f"its tables and stores at this machine's paths there; run the sweep on the head with "
                         f"`ray job submit` instead (docs/cluster.md)")
    if options.storage:
        storage_path, storage_name = resolve_storage(options.storage), name
    else:
        storage_path, storage_name = str(sweep_dir.resolve()), "ray"
    local_cpus = None if address else (options.num_cpus or len(os.sched_getaffinity(0)))
    # A private Ray running CPU trials has as many slots as its CPUs hold: known now, so the dry
    # run says what the sweep will do. A cluster's (or GPUs') slots are known once Ray is up.
    slots = cluster_slots({"CPU": local_cpus}, options) if local_cpus and not options.gpus_per_trial else None
    unsized = SweepPlan(options=options, space=space, base=base, data=data, name=name, sweep_dir=sweep_dir,
                        tracking_uri=options.mlflow_uri or default_tracking_uri(options.results),
                        experiment=options.experiment or name, address=address, local_cpus=local_cpus,
                        max_t=_max_t(space, base, options.early_stopping), storage_path=storage_path,
                        storage_name=storage_name, slots=None, max_concurrent=None, n_startup=None)
    return with_slots(unsized, slots)


def with_slots(plan: SweepPlan, slots: int | None) -> SweepPlan:
    """The plan sized for a cluster that holds `slots` trials at once (None: not known yet).

    Without --max-concurrent: the slots, but at most a quarter of the budget, rounded up. TPE
    proposes a trial only once the random start-up has finished, and K - 1 more trials start
    meanwhile, so start-up + K - 1 trials are random; `SearchSpace.startup_size` keeps that at
    or below half the budget for any K <= ceil(N / 4). With every slot in use, a cluster with as
    many slots as trials would ask for all of them before any had finished, and TPE would never
    be consulted.

    Returns:
        A new plan with slots, max_concurrent and n_startup set where they are known.
    """
    n = plan.options.num_samples
    k = plan.options.max_concurrent or (min(slots, math.ceil(n / 4)) if slots else None)
    n_startup = plan.space.startup_size(n, k) if k else None
    return dataclasses.replace(plan, slots=slots, max_concurrent=k, n_startup=n_startup)


def cluster_slots(resources: dict[str, float], options: SweepOptions) -> int:
    """How many trials a cluster with these total resources (Ray's names: CPU, GPU) holds at once."""
    fits = resources.get("CPU", 0) / options.cpus_per_trial
    if options.gpus_per_trial:
        fits = min(fits, resources.get("GPU", 0) / options.gpus_per_trial)
    return max(1, int(fits + 1e-9))


def asha_rungs(grace_period: int, reduction_factor: float, max_t: int) -> tuple[int, ...]:
    """The epochs at which ASHA compares a trial with its peers and may stop it. Ray's bracket
    puts its milestones at grace * rf^k (k while that is within max_t) and decides on the first
    result at or past one: epoch ceil(grace * rf^k), 13 for 2 * 2.5^2 = 12.5. A trial
    checkpoints there, so a trial that is stopped keeps its best weights. (Worked out here, not
    asked of Ray, so the plan and the report need no Ray; tests/test_checkpoints.py checks it
    against Ray's own scheduler.)"""
    count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    # The tolerance keeps a milestone that is an integer in exact arithmetic (10 * 2 ** 1) on it.
    return tuple(sorted({math.ceil(grace_period * reduction_factor ** k - 1e-9) for k in range(count)}))


def _base_and_data(options: SweepOptions, space: SearchSpace) -> tuple[CMATHConfig, DatasetInfo]:
    """The trials' base config pinned to the checked data file, as cmath-train pins it."""
    device = "cuda" if options.gpus_per_trial > 0 else "cpu"
    # A trial's torch threads match the CPUs Ray reserved for it, so parallel trials do not fight.
    threads = max(1, int(options.cpus_per_trial))
    try:
        base = space.base_config(**options.overrides, data=options.data, data_sha256=None, device=device,
                                 num_threads=threads)
    except Exception as exc:  # a bad --set value
        raise SweepError(f"--set: {exc}") from None
    data = inspect_dataset(base.data or default_dataset_path(options.results, base.dataset))
    # As cmath-train does: modalities nobody asked for are narrowed to what the file holds (the
    # shared MELD transcripts are text only; the MELD recipe is tav); asked-for ones must exist.
    asked = "modalities" in space.distributions or "modalities" in space.fixed or "modalities" in options.overrides
    base = pin_data(base, data, fit_modalities=not asked)
    if data.name in ("iemocap", "meld") and data.name != space.dataset:
        raise SweepError(f"{data.path} holds {data.name} data but {space.path} is an {space.dataset} space; "
                         f"use search_spaces/{data.name}.yaml or set dataset: {data.name} in the space")
    for choice in _modality_choices(space, base):
        data.require_modalities(base.replace(modalities=choice).modality_names)
    return base, data


def _max_t(space: SearchSpace, base: CMATHConfig, early_stopping: bool = True) -> int:
    """The most epochs a trial runs (ASHA's max_t); with early stopping, the space's asha
    settings checked against it (without, there is no ASHA for them to be at odds with)."""
    epochs = space.distributions.get("epochs")
    if epochs is None:
        most_epochs = base.epochs
    else:
        most_epochs = int(max(epochs.choices) if hasattr(epochs, "choices") else epochs.high)
    if not early_stopping:
        return most_epochs
    max_t = space.max_t or most_epochs
    if max_t < most_epochs:
        raise SweepError(f"{space.path}: asha.max_t {max_t} is below the {most_epochs} epochs a trial runs; ASHA "
                         f"would stop every trial there. Drop max_t or lower epochs")
    if space.grace_period > max_t:
        raise SweepError(f"{space.path}: asha.grace_period {space.grace_period} exceeds the {max_t} epochs a trial "
                         f"runs; lower grace_period or raise epochs")
    return max_t


def _check_counts(options: SweepOptions) -> None:
    if options.num_samples < 1:
        raise SweepError(f"--num-samples {options.num_samples}: run at least one trial")
    if options.max_concurrent is not None and options.max_concurrent < 1:
        raise SweepError(f"--max-concurrent {options.max_concurrent}: must be >= 1")
    if options.num_cpus is not None and options.num_cpus < 1:
        raise SweepError(f"--num-cpus {options.num_cpus}: must be >= 1")
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
    An in-memory study with the same sampler and seed asks exactly what the sweep will ask.

    Args:
        plan: the sweep's plan.
        count: how many (at most the sweep's trials).

    Returns:
        Each config's searched values, in the order the sweep asks for them.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # The start-up's random draws do not depend on its length; an unsized plan uses the least.
    n_startup = plan.n_startup or plan.space.startup_size(plan.options.num_samples, 1)
    sampler = make_sampler(plan.options.sampler, plan.space.seed, n_startup)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for point in plan.space.warm_start:
        study.enqueue_trial(point)
    return [study.ask(fixed_distributions=dict(plan.space.distributions)).params
            for _ in range(min(count, plan.options.num_samples))]


def describe_concurrency(plan: SweepPlan) -> str:
    """How many trials run at once and why, and how many of them the random start-up takes."""
    n = plan.options.num_samples
    if plan.max_concurrent is None:
        return (f"trials at a time: the cluster's slots once Ray is up, at most {math.ceil(n / 4)} (a quarter of "
                f"the {n} trials) so TPE proposes at least half")
    why = ("--max-concurrent" if plan.options.max_concurrent else
           f"the cluster's {plan.slots} slots, at most a quarter of the {n} trials so TPE proposes at least half")
    if plan.options.sampler != "tpe":
        return f"{plan.max_concurrent} trials at a time ({why}); random search"
    return f"{plan.max_concurrent} trials at a time ({why}); {plan.n_startup} random start-up trials, then TPE"


def describe_data(plan: SweepPlan) -> str:
    """The sweep's dataset in a line; the built-in synthetic set (no --data) says so."""
    line = f"{plan.data.path} ({plan.data.name}, sha256 {plan.data.sha256[:12]}...)"
    if plan.options.data is None:
        line += (f"; no --data given: the built-in synthetic {plan.data.name.upper()}-shaped set, made on first "
                 f"use, whose scores say nothing of real data")
    return line


def describe_plan(plan: SweepPlan) -> str:
    """The plan as `--dry-run` prints it: what the sweep will run, where, and its first configs."""
    o = plan.options
    skip = {*plan.searched, "data", "data_sha256"}
    fixed = ", ".join(f"{k}={v}" for k, v in plan.base.to_dict().items() if k not in skip)
    where = (f"a private local Ray with {plan.local_cpus} CPUs (address=local)" if plan.address is None
             else plan.address)
    lines = [
        f"sweep {plan.name} -> {plan.sweep_dir}",
        f"space {plan.space.path}: maximise {METRIC} over {o.num_samples} trials ({_describe_search(plan)})",
        *[f"  search {line}" for line in plan.space.describe()],
        f"fixed: {fixed}",
        f"data: {describe_data(plan)}",
        f"resources per trial: {o.cpus_per_trial:g} CPU, {o.gpus_per_trial:g} GPU",
        describe_concurrency(plan),
        f"ray: {where}; storage {plan.storage_path}",
        f"mlflow: {plan.tracking_uri}, experiment {plan.experiment}",
        "first configs:",
        *[f"  {i + 1}. " + "  ".join(f"{k}={show(v)}" for k, v in c.items())
          for i, c in enumerate(first_configs(plan))],
    ]
    return "\n".join(lines)


def _describe_search(plan: SweepPlan) -> str:
    o, space = plan.options, plan.space
    if o.sampler == "random":
        sampler = f"random search seeded {space.seed}"
    elif plan.n_startup is None:
        sampler = f"a random start-up sized once the cluster's slots are known, then TPE seeded {space.seed}"
    else:
        sampler = f"{plan.n_startup} random start-up, then TPE seeded {space.seed}"
    stopping = (f"ASHA grace {space.grace_period}, reduction {space.reduction_factor:g}, max_t {plan.max_t}, "
                f"rungs at epochs {', '.join(map(str, plan.rungs))}" if o.early_stopping else "no early stopping")
    return f"{sampler}; {stopping}"
