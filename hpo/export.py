"""Find a sweep, pick its best trial and write that trial's full training config."""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from cmath_model.config import from_dict

from .errors import SweepError
from .record import RESCORE_FILE, find_sweep, read_record, read_rescore
from .trials import TRIALS_FILE, best_row, read_trials, records, scored


def best_trial(sweep_dir: Path) -> dict:
    """The sweep's best trial by validation score; SweepError when no trial has one yet."""
    if not (sweep_dir / TRIALS_FILE).exists():
        raise SweepError(f"{sweep_dir}: no {TRIALS_FILE} yet; no trial of this sweep has finished")
    best = best_row(read_trials(sweep_dir))
    if best is None:
        raise SweepError(f"{sweep_dir}: no trial has a validation score (all failed?); see {TRIALS_FILE}")
    return best


def export_best(sweep: str | Path, output: str | Path, results: str | Path = "results") -> dict:
    """Write the best trial's config plus provenance; returns what was written.

    The best is the re-scoring's pick when the sweep has one (`rescore`, rescored.json): its config
    as re-scored, every epoch, with the best epoch picked on validation as it was there. Otherwise
    it is the trial with the highest validation score, with epochs set to that trial's best epoch.

    Args:
        sweep: a sweep folder, a sweep name under `results`, or `latest`.
        output: the YAML file to write (`cmath-train --config` reads it).
        results: the folder sweeps are written to.

    Returns:
        The values written: the config's fields and `provenance` (sweep, trial, scores, MLflow run).

    >>> values = export_best("latest", "best.yaml")   # then: cmath-train --config best.yaml --seeds 5
    >>> values["provenance"]["trial_id"], values["provenance"]["best_val_wf1"]
    """
    sweep_dir = find_sweep(sweep, results)
    record = read_record(sweep_dir)
    best = best_trial(sweep_dir)
    rescored = read_rescore(sweep_dir)
    if rescored is not None:
        trials = read_trials(sweep_dir)
        if len(trials) != rescored.get("sweep_trials", len(trials)):
            raise SweepError(f"{sweep_dir}: the re-scoring ({RESCORE_FILE}) saw {rescored['sweep_trials']} trials, "
                             f"the sweep has {len(trials)} now; re-score again with --top {rescored['top']} --seeds "
                             f"{rescored['seeds']} (runs already trained are kept) or delete {RESCORE_FILE}")
        best = records(trials[trials["trial_id"] == rescored["picked"]])[0]
    config = from_dict(json.loads(best["config"]), source=f"{sweep_dir}/{TRIALS_FILE}")
    epochs = config.epochs if rescored is not None else int(best["best_epoch"])
    # Where retraining runs is the machine's to say, not the trial's share of the sweep's:
    # `device: auto` takes a GPU if there is one, `num_threads: 0` every CPU this process may use
    # (a trial had 1 of 2 cores: the retrain ran at 93 % CPU).
    config = config.replace(epochs=epochs, device="auto", num_threads=0)
    values = config.to_dict()
    values["provenance"] = {
        "sweep": record["name"], "sweep_dir": str(sweep_dir.resolve()), "trial_id": best["trial_id"],
        "mlflow_run_id": best.get("mlflow_run_id"), "mlflow_uri": record["mlflow"]["uri"],
        "mlflow_experiment": record["mlflow"]["experiment"], "metric": "val_wf1",
        "picked_by": "rescore" if rescored is not None else "sweep",
        "best_val_wf1": best["best_val_wf1"], "best_epoch": int(best["best_epoch"]),
        "test_wf1_at_best_val": best["test_wf1_at_best_val"], "data_sha256": config.data_sha256,
        "checkpoint": best.get("checkpoint"), "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if rescored is not None:
        picked = next(r for r in rescored["trials"] if r["trial_id"] == best["trial_id"])
        values["provenance"]["rescore"] = {k: picked[k] for k in (
            "seeds", "best_val_wf1_mean", "best_val_wf1_std", "test_wf1_at_best_val_mean",
            "test_wf1_at_best_val_std")} | {"top": rescored["top"]}
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(yaml.safe_dump(values, sort_keys=False))
    return values


def close_to_best(sweep: str | Path, results: str | Path = "results", within: float = 0.01) -> int:
    """How many other trials ended within `within` validation W-F1 of the best: a pick among
    trials that close is a pick among seeds, which re-scoring (`--top K --seeds N`) settles."""
    scores = scored(read_trials(find_sweep(sweep, results)))["best_val_wf1"]
    return int((scores >= scores.max() - within).sum() - 1) if len(scores) else 0
