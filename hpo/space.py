"""Search spaces as data: load and check a `search_spaces/*.yaml` file before anything starts.

Schema (every key but `search` is optional):

    name: iemocap                 # default: the file's stem; the sweep name starts with it
    dataset: iemocap              # whose defaults unlisted fields take: iemocap | meld
    defaults: recipe              # recipe | paper (docs/model.md, "Departures from the paper")
    metric: val_wf1               # optional, and the only one: sweeps maximise validation W-F1
    seed: 0                       # seeds the sampler (TPE and its random start-up)
    startup_trials: auto          # random trials before TPE; auto keeps >= half the budget TPE-guided
    search:                       # any CMATHConfig field; one of these types:
      d:      {type: int, low: 100, high: 600, step: 50}      # optional step, log
      gamma1: {type: float, low: 0.0, high: 3.0}              # optional step, log
      lr:     {type: loguniform, low: 1.0e-5, high: 1.0e-2}
      modalities: {type: categorical, choices: [t, ta, tav]}
    fixed: {batch_size: 16, epochs: 60}                       # any other CMATHConfig field
    warm_start: [{d: 500, gamma1: 1.0, gamma2: 1.8, lr: 3.0e-3}]   # evaluated first, in order
    asha: {grace_period: 5, reduction_factor: 3}              # max_t defaults to epochs

Every mistake is a SpaceError that names the file and the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import optuna.distributions as od

from cmath_model.config import DATASETS, DEFAULTS, FIELD_NAMES, CMATHConfig, default_config, read_yaml
from cmath_model.errors import ConfigError, did_you_mean

from ._compat import distribution_contains
from .errors import SpaceError

TOP_LEVEL = ("name", "dataset", "defaults", "metric", "seed", "startup_trials", "search", "fixed", "warm_start", "asha")
# Only val_wf1, maximised: a trial's best epoch, its best/ checkpoint, the best trial and export-best
# are all chosen on validation W-F1, so any other metric would drive TPE and ASHA against them. A
# space may still say `metric: val_wf1` (older spaces do); any other value is refused.
METRIC = "val_wf1"
MODE = "max"
TYPES = ("int", "float", "uniform", "loguniform", "categorical")
# The sweep sets these itself: the dataset and its hash, per-trial provenance and placement.
NOT_SEARCHABLE = ("data", "data_sha256", "device", "num_threads")
ASHA_KEYS = ("grace_period", "reduction_factor", "max_t")
SAMPLERS = ("tpe", "random")
FIELD_TYPES = {name: CMATHConfig.__dataclass_fields__[name].type for name in FIELD_NAMES}


@dataclass
class SearchSpace:
    path: Path
    name: str
    dataset: str
    defaults: str  # recipe | paper: what unlisted config fields start from
    seed: int
    startup_trials: int | None  # None = auto
    distributions: dict[str, od.BaseDistribution]
    fixed: dict[str, Any]
    warm_start: list[dict[str, Any]]
    grace_period: int
    reduction_factor: float
    max_t: int | None
    raw: dict = field(default_factory=dict)

    def base_config(self, **overrides: Any) -> CMATHConfig:
        """The dataset's defaults (recipe or paper), then `fixed`, then the caller's overrides."""
        return default_config(self.dataset, self.defaults).replace(**{**self.fixed, **overrides})

    def startup_size(self, num_samples: int, max_concurrent: int) -> int:
        """Random trials before TPE. TPE guides a trial only once this many have finished, and
        up to max_concurrent - 1 more start meanwhile, so both count against half the budget."""
        if self.startup_trials is not None:
            return self.startup_trials
        return max(1, min(10, num_samples // 2 - (max_concurrent - 1)))

    def describe(self) -> list[str]:
        lines = []
        for name, dist in self.distributions.items():
            if isinstance(dist, od.CategoricalDistribution):
                lines.append(f"{name}: one of {list(dist.choices)}")
            else:
                step = f" step {dist.step}" if dist.step is not None else ""
                log = " (log)" if dist.log else ""
                lines.append(f"{name}: {type(dist).__name__.replace('Distribution', '').lower()} "
                             f"[{dist.low}, {dist.high}]{step}{log}")
        return lines


def load_space(path: str | Path) -> SearchSpace:
    path = Path(path)
    raw = read_yaml(path, SpaceError, "search-space file", "; see search_spaces/ for examples")
    return parse_space(raw, path)


def show(value: object, digits: int = 4) -> str:
    """A searched value as the sweep prints it: floats to `digits` significant digits."""
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def parse_space(raw: Any, path: str | Path = "<space>") -> SearchSpace:
    path = Path(path)

    def fail(key: str, why: str) -> SpaceError:
        return SpaceError(f"{path}: {key}: {why}")

    if not isinstance(raw, dict):
        raise SpaceError(f"{path}: expected a mapping with a 'search' section at the top level")
    for key in raw:
        if key not in TOP_LEVEL:
            raise fail(key, f"unknown key{did_you_mean(str(key), TOP_LEVEL)}; known keys: {', '.join(TOP_LEVEL)}")
    dataset = raw.get("dataset", "iemocap")
    if dataset not in DATASETS:
        raise fail("dataset", f"'{dataset}' is not one of {', '.join(DATASETS)}")
    defaults = raw.get("defaults", "recipe")
    if defaults not in DEFAULTS:
        raise fail("defaults", f"'{defaults}' is not one of {', '.join(DEFAULTS)}")
    metric = raw.get("metric", METRIC)
    if metric != METRIC:
        raise fail("metric", f"'{metric}' is not supported: sweeps maximise val_wf1, on which best epochs, "
                             "checkpoints and export-best are chosen; remove the metric line")
    seed = _integer(raw.get("seed", 0), "seed", fail, minimum=0)
    startup = raw.get("startup_trials", "auto")
    startup = None if startup == "auto" else _integer(startup, "startup_trials", fail, minimum=0)

    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise fail("fixed", "expected a mapping of config fields to values")
    for key in fixed:
        _check_field(key, "fixed", fail)
    base = _config(default_config(dataset, defaults), fixed, "fixed", fail)

    search = raw.get("search")
    if not isinstance(search, dict) or not search:
        raise fail("search", "expected a non-empty mapping of config fields to {type: ..., ...}")
    distributions = {}
    for key, spec in search.items():
        _check_field(key, "search", fail)
        if key in fixed:
            raise fail(f"search.{key}", "is also under fixed; keep it in one of the two")
        distributions[key] = _distribution(key, spec, base, fail)

    warm_start = raw.get("warm_start") or []
    if not isinstance(warm_start, list) or not all(isinstance(p, dict) for p in warm_start):
        raise fail("warm_start", "expected a list of mappings, e.g. [{d: 500, lr: 3.0e-3}]")
    for i, point in enumerate(warm_start):
        missing = [k for k in distributions if k not in point]
        if missing:
            raise fail(f"warm_start[{i}]", f"gives no value for {', '.join(missing)}; a point names every "
                                           f"searched field")
        for key, value in point.items():
            where = f"warm_start[{i}].{key}"
            if key not in distributions:
                raise fail(where, f"is not a searched field; searched: {', '.join(distributions)}")
            if not distribution_contains(distributions[key], _as_field(key, value)):
                raise fail(where, f"{value!r} lies outside the search range of {key}")
        _config(base, point, f"warm_start[{i}]", fail)
    warm_start = [{k: _as_field(k, v) for k, v in p.items()} for p in warm_start]

    asha = raw.get("asha") or {}
    if not isinstance(asha, dict):
        raise fail("asha", "expected a mapping such as {grace_period: 5, reduction_factor: 3}")
    for key in asha:
        if key not in ASHA_KEYS:
            raise fail(f"asha.{key}", f"unknown key{did_you_mean(str(key), ASHA_KEYS)}; known: {', '.join(ASHA_KEYS)}")
    grace = _integer(asha.get("grace_period", 1), "asha.grace_period", fail, minimum=1)
    try:
        factor = float(asha.get("reduction_factor", 3))
    except (TypeError, ValueError):
        raise fail("asha.reduction_factor", "must be a number > 1") from None
    if not factor > 1:
        raise fail("asha.reduction_factor", f"{factor} must be > 1")
    max_t = asha.get("max_t")
    if max_t is not None:
        max_t = _integer(max_t, "asha.max_t", fail, minimum=1)
    if "epochs" not in distributions and grace > base.epochs:
        raise fail("asha.grace_period", f"{grace} exceeds the {base.epochs} epochs every trial runs")

    return SearchSpace(path=path, name=str(raw.get("name") or path.stem), dataset=dataset, defaults=defaults,
                       seed=seed, startup_trials=startup, distributions=distributions, fixed=dict(fixed),
                       warm_start=warm_start, grace_period=grace, reduction_factor=factor, max_t=max_t, raw=raw)


def _check_field(key: str, section: str, fail) -> None:
    if key not in FIELD_NAMES:
        raise fail(f"{section}.{key}", f"is not a CMATHConfig field{did_you_mean(key, FIELD_NAMES)}; the fields "
                                       "are in cmath_model/config.py (docs/model.md)")
    if key in NOT_SEARCHABLE:
        raise fail(f"{section}.{key}", "is set by the sweep itself (use --data, --gpus-per-trial, --cpus-per-trial)")


def _config(base: CMATHConfig, changes: dict, where: str, fail) -> CMATHConfig:
    try:
        return base.replace(**changes)
    except ConfigError as exc:
        raise fail(where, str(exc)) from None


def _integer(value: Any, key: str, fail, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < minimum:
        raise fail(key, f"{value!r} must be an integer >= {minimum}")
    return int(value)


def _as_field(key: str, value: Any) -> Any:
    """Warm-start values as the field's type (YAML reads 3e-3 as a string)."""
    kind = FIELD_TYPES[key]
    if kind == "float" and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _distribution(key: str, spec: Any, base: CMATHConfig, fail) -> od.BaseDistribution:
    where = f"search.{key}"
    if not isinstance(spec, dict) or "type" not in spec:
        raise fail(where, "expected {type: int|float|loguniform|categorical, ...}")
    kind = spec["type"]
    if kind not in TYPES:
        raise fail(f"{where}.type", f"unknown type '{kind}'; use one of {', '.join(TYPES)}")
    field_type = FIELD_TYPES[key]
    allowed = {"categorical": ("type", "choices")}.get(kind, ("type", "low", "high", "step", "log"))
    for extra in spec:
        if extra not in allowed:
            raise fail(f"{where}.{extra}", f"not a key of type {kind}; allowed: {', '.join(allowed)}")

    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise fail(f"{where}.choices", "expected a non-empty list")
        choices = [_as_field(key, c) for c in choices]
        for choice in choices:
            _config(base, {key: choice}, f"{where}.choices", fail)
        return od.CategoricalDistribution(choices)

    if field_type not in ("int", "float"):
        raise fail(f"{where}.type", f"{key} is a {field_type} field: only categorical fits it")
    if kind == "int" and field_type != "int":
        raise fail(f"{where}.type", f"{key} is a float field; use float or loguniform")
    if kind != "int" and field_type == "int":
        raise fail(f"{where}.type", f"{key} is an integer field; use int (with log: true for a log scale)")
    for bound in ("low", "high"):
        value = spec.get(bound)
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise fail(f"{where}.{bound}", f"{spec.get(bound)!r} must be a finite number")
        spec = {**spec, bound: value}
    low, high = spec["low"], spec["high"]
    if not low < high:
        raise fail(where, f"low {low} must be below high {high}")
    log = bool(spec.get("log", False)) or kind == "loguniform"
    step = spec.get("step")
    if log and low <= 0:
        raise fail(f"{where}.low", f"{low} must be > 0 on a log scale")
    if step is not None:
        if log:
            raise fail(f"{where}.step", "cannot be combined with a log scale")
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0:
            raise fail(f"{where}.step", f"{step!r} must be a positive number")
    for value in (low, high):
        _config(base, {key: int(value) if field_type == "int" else float(value)}, where, fail)
    if field_type == "int":
        if low != int(low) or high != int(high) or (step is not None and step != int(step)):
            raise fail(where, "low, high and step of an int field must be whole numbers")
        return od.IntDistribution(int(low), int(high), log=log, step=int(step or 1))
    return od.FloatDistribution(float(low), float(high), log=log, step=float(step) if step is not None else None)


def make_sampler(kind: str, seed: int, n_startup_trials: int) -> optuna.samplers.BaseSampler:
    """TPE after a seeded random start-up (the sweep's default), or random search throughout
    (the baseline benchmarks.search compares TPE with)."""
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: a running trial counts as a poor one, so trials asked while others run are
    # spread out instead of piling onto the same region (explicit: Optuna's default has changed).
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials, constant_liar=True)
