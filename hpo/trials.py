"""A sweep's trials as its tables record them: how a trial ended, the tables' files, and which
trials count as scored and best. Plain pandas: the export, the report and the re-scoring read
these without Ray; the sweep's callbacks (hpo.table, hpo.tracking, hpo.progress) and its
searcher (hpo.search) name a trial's end with the same words."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd

TRIALS_FILE = "trials.parquet"
HISTORY_FILE = "history.parquet"
JOURNAL_FILE = "history.jsonl"  # every result as it arrives: survives a killed driver between table writes
END_STATES = ("completed", "stopped_by_asha", "failed", "interrupted")


def end_state(result: dict | None, error: bool = False) -> str:
    """How a trial ended, from its last result: completed, stopped_by_asha, interrupted or failed.

    Tune marks the result a scheduler stopped on as done; a trial stopped from outside (the
    time budget, Ctrl-C) ends without a done result, before its planned epochs.

    Args:
        result: the trial's last result (None: it reported nothing).
        error: the trial raised.
    """
    if error or not result:
        return "failed"
    if result.get("epoch", 0) >= result.get("epochs_planned", math.inf):
        return "completed"
    return "stopped_by_asha" if result.get("done") else "interrupted"


def ended_state(trial) -> str | None:
    """How a trial that Ray has as ended (TERMINATED or ERROR) ended; None while it has not.

    Args:
        trial: a Ray Tune Trial.
    """
    if trial.status == trial.ERROR:
        return "failed"
    return end_state(trial.last_result) if trial.status == trial.TERMINATED else None


def state_words(state: str) -> str:
    """How an end state reads in a plot or a run name: `stopped by ASHA`."""
    return state.replace("_", " ").replace("asha", "ASHA")


def trial_number(trials: list, trial) -> int:
    """A trial's number, as trials.parquet, the report and the MLflow run names have it: its place
    in Ray's list of the sweep's trials, in creation order, from 0 (the warm start is number 0).

    Args:
        trials: Ray Tune's list of the sweep's trials.
        trial: one of them (one not in the list gets the next number).
    """
    return trials.index(trial) if trial in trials else len(trials)


def read_trials(sweep_dir: str | Path) -> pd.DataFrame:
    """trials.parquet: one row per trial."""
    return pd.read_parquet(Path(sweep_dir) / TRIALS_FILE)


def read_journal(sweep_dir: str | Path) -> dict[str, list[dict]]:
    """The journal by trial: {trial id: [results in the order the driver received them]}. A line
    cut short (a driver killed mid-write, or one being written) is left out."""
    found: dict[str, list[dict]] = {}
    path = Path(sweep_dir) / JOURNAL_FILE
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        found.setdefault(row["trial_id"], []).append(row)
    return found


def write_parquet_atomic(frame: pd.DataFrame, path: Path) -> None:
    """Write a table so that a reader (or a killed writer) never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def records(frame: pd.DataFrame) -> list[dict]:
    """Rows as plain Python values, missing ones as None (Parquet gives NaN for an empty column)."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v.item() if hasattr(v, "item") else v)
             for k, v in row.items()} for row in frame.to_dict("records")]


def scored(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials that did not fail and have a validation score: those a pick may choose from."""
    return trials[(trials["end_state"] != "failed") & trials["best_val_wf1"].notna()]


def ranked(trials: pd.DataFrame, top: int | None = None) -> list[dict]:
    """The scored trials, best validation score first (ties: the earlier trial), at most `top`."""
    order = scored(trials).sort_values(["best_val_wf1", "number"], ascending=[False, True])
    return records(order if top is None else order.head(top))


def best_row(trials: pd.DataFrame) -> dict | None:
    """The trial with the highest validation score at any epoch; None when no trial has one."""
    best = ranked(trials, 1)
    return best[0] if best else None
