"""What a sweep records about itself: sweep.json's provenance, the driver that runs it, and the
MLflow parent run's parameters."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from .plan import SweepOptions, SweepPlan
from .processes import command_line

PACKAGES = ("cmath-hpo", "torch", "ray", "optuna", "mlflow", "pandas", "pyarrow", "numpy")


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
        "num_samples": o.num_samples, "max_concurrent": plan.max_concurrent or None, "cluster_slots": plan.slots,
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


def driver_record(plan: SweepPlan) -> dict:
    """Who runs the sweep: a resume checks this driver is gone and stops what its private Ray left."""
    return {"host": platform.node(), "pid": os.getpid(), "cmdline": command_line(os.getpid()),
            "private_ray": plan.address is None, "ray_session_dir": plan.ray_session_dir}


def parent_params(plan: SweepPlan) -> dict:
    o = plan.options
    return {"space": plan.space.path, "metric": plan.space.metric, "num_samples": o.num_samples,
            "max_concurrent": plan.max_concurrent or "auto", "cpus_per_trial": o.cpus_per_trial,
            "gpus_per_trial": o.gpus_per_trial, "sampler": o.sampler, "sampler_seed": plan.space.seed,
            "n_startup_trials": plan.n_startup, "early_stopping": o.early_stopping,
            "asha_grace_period": plan.space.grace_period, "asha_reduction_factor": plan.space.reduction_factor,
            "asha_max_t": plan.max_t, "searched": ",".join(plan.searched), "address": plan.address or "local",
            "time_budget_s": o.time_budget}
