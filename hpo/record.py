"""A sweep's folder and the records it keeps there: sweep.json (what the sweep is and how it
ended) and the re-scoring's results. Finding and reading them needs no Ray, so `export-best`,
`report` and `resume` start from here."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import SweepError
from .storage import has_redacted

SWEEP_FILE = "sweep.json"
OPTUNA_FILE = "optuna.db"
RESCORE_TABLE = "rescored.parquet"  # one row per (trial, seed), written as each run ends
RESCORE_FILE = "rescored.json"  # the finished re-scoring: each trial's mean and spread, and the pick
FAILURES_FILE = "mlflow_failures.json"  # what the trials' MLflow calls lost (hpo.tracking writes it at the end)
NODE_FAULTS_FILE = "node_faults.json"  # nodes that could not use the storage (hpo.placement)


def find_sweep(sweep: str | Path, results: str | Path = "results") -> Path:
    """A sweep's folder.

    Args:
        sweep: a sweep folder, a sweep name under `results`, or `latest` (the last one started).
        results: the folder sweeps are written to.

    Returns:
        The folder that holds the sweep's sweep.json; SweepError naming the sweeps there if none.
    """
    if str(sweep) == "latest":
        started = sorted(Path(results).glob(f"*/{SWEEP_FILE}"), key=lambda p: p.stat().st_ctime)
        if started:
            return started[-1].parent
    for candidate in (Path(sweep), Path(results) / str(sweep)):
        if (candidate / SWEEP_FILE).exists():
            return candidate
    known = sorted(p.parent.name for p in Path(results).glob(f"*/{SWEEP_FILE}"))
    hint = f"sweeps in {results}: {', '.join(known)}" if known else f"no sweeps in {results}"
    raise SweepError(f"no sweep '{sweep}' (looked for {SWEEP_FILE} in {sweep} and {Path(results) / str(sweep)}); "
                     f"{hint}")


def read_record(sweep_dir: Path) -> dict:
    """The sweep's sweep.json."""
    return json.loads((sweep_dir / SWEEP_FILE).read_text())


def tracked_record(record: dict, mlflow_uri: str | None = None) -> dict:
    """A sweep's record, for logging to its MLflow runs after the sweep (report, re-scoring).

    Args:
        record: the sweep's sweep.json.
        mlflow_uri: the sweep's tracking store, given again (its secret is not recorded, see
            hpo.storage.redact) or as this host reaches it; None: the recorded one.

    Returns:
        The record with `mlflow_uri` in place of the recorded URI if given; SweepError if the
        recorded one lost its secret and none is given.
    """
    recorded = (record.get("mlflow") or {}).get("uri")
    if mlflow_uri:
        return {**record, "mlflow": {**(record.get("mlflow") or {}), "uri": mlflow_uri}}
    if has_redacted(recorded):
        raise SweepError(f"sweep '{record.get('name')}' recorded its MLflow store without the secret in it "
                         f"({recorded}); pass --mlflow-uri with it, or keep secrets out of URLs "
                         f"(MLFLOW_TRACKING_PASSWORD, PGPASSWORD or ~/.pgpass)")
    return record


def write_json(path: Path, values: dict) -> None:
    """Write a JSON record so that a reader (or a killed writer) never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(values, indent=1, default=str))
    os.replace(tmp, path)


def read_rescore(sweep_dir: Path) -> dict | None:
    """The finished re-scoring of the sweep's best trials (rescored.json), None if there is none."""
    path = sweep_dir / RESCORE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def read_node_faults(sweep_dir: Path) -> dict[str, dict]:
    """The nodes that could not use the storage during the sweep ({} when none): node id -> its
    faults, whether it is excluded (in the driver's run that wrote it), the first problem, and
    the trials it failed."""
    try:
        return json.loads((sweep_dir / NODE_FAULTS_FILE).read_text())
    except (OSError, ValueError):
        return {}
